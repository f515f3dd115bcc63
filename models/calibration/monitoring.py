"""Label-free monitoring statistics on served predictions (NumPy/SciPy only, no service code).

A window of served predictions (calibrated probabilities) is compared with a reference sample,
the validation split's calibrated probabilities, by:

* ``cbpe_accuracy``: the CBPE-style accuracy estimate (NannyML's confidence-based performance
  estimation): when the probabilities are calibrated, image i is right with probability c_i (its
  top probability), so the window's expected accuracy is mean(c). The window's realised
  accuracy is a Poisson-binomial variable with variance sum c_i (1 - c_i) / n^2; the interval is
  the normal one on it. It is only as good as the calibration: under a shift that makes the
  model over-confident the estimate is optimistic (docs/monitoring.md).
* ``ks_two_sample``: the two-sample Kolmogorov-Smirnov test of the predictive entropies;
* ``class_prior_shift``: the predicted-class mix, as a PSI and a two-sample chi-square test
  (a 2 x K contingency table: the reference is a sample too, so a one-sample test against its
  shares would over-reject);
* ``ood_share_test``: the one-sided binomial test of the share of OOD-flagged images against the
  share the flag's threshold lets through on clean data (5%);
* ``drift_verdict``: the tests together under a Bonferroni correction, so the family-wise false
  alarm rate of one window on in-distribution data is at most the chosen p-value threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "PSI_FLOOR",
    "AccuracyEstimate",
    "ClassPriorShift",
    "DriftVerdict",
    "cbpe_accuracy",
    "class_prior_shift",
    "drift_verdict",
    "ece_consistency_quantile",
    "entropy",
    "ks_two_sample",
    "labelled_summary",
    "ood_share_test",
    "psi",
]

PSI_FLOOR = 1e-4       # a class share of 0 counts as this in the PSI (log 0 is undefined)
PROBABILITY_FLOOR = 1e-12


def entropy(probabilities: ArrayLike) -> np.ndarray:
    """Predictive entropy (nats) of each row of [N, K] probabilities; 0 log 0 = 0."""
    p = np.asarray(probabilities, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=1)


@dataclass(frozen=True)
class AccuracyEstimate:
    value: float
    low: float
    high: float
    n: int


def cbpe_accuracy(confidences: ArrayLike, level: float = 0.95) -> AccuracyEstimate:
    """Mean calibrated confidence and the normal interval of the window's realised accuracy
    (Poisson-binomial variance), clipped to [0, 1]. ValueError on an empty window."""
    c = np.asarray(confidences, dtype=np.float64).ravel()
    if c.size == 0:
        raise ValueError("no predictions to estimate accuracy from")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    from scipy.stats import norm

    value = float(c.mean())
    se = math.sqrt(float(np.sum(c * (1.0 - c)))) / c.size
    z = float(norm.ppf(0.5 + level / 2))
    return AccuracyEstimate(value, max(0.0, value - z * se), min(1.0, value + z * se), int(c.size))


def ks_two_sample(sample: ArrayLike, reference: ArrayLike) -> tuple[float, float]:
    """(statistic, p-value) of the two-sided two-sample KS test (scipy's exact/asymptotic choice)."""
    from scipy.stats import ks_2samp

    a = np.asarray(sample, dtype=np.float64).ravel()
    b = np.asarray(reference, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("the KS test needs two non-empty samples")
    result = ks_2samp(a, b)
    return float(result.statistic), float(result.pvalue)


def psi(counts: ArrayLike, reference_counts: ArrayLike, floor: float = PSI_FLOOR) -> float:
    """Population stability index sum (a - e) log(a / e) over the class shares a (window) and
    e (reference); a share of 0 is taken as `floor`. 0.1 is a small shift, 0.2 a large one."""
    a = np.asarray(counts, dtype=np.float64)
    e = np.asarray(reference_counts, dtype=np.float64)
    if a.shape != e.shape or a.ndim != 1 or a.sum() <= 0 or e.sum() <= 0:
        raise ValueError("psi needs two non-empty count vectors of the same length")
    a = np.maximum(a / a.sum(), floor)
    e = np.maximum(e / e.sum(), floor)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class ClassPriorShift:
    psi: float
    chi2: float
    p_value: float
    dof: int


def class_prior_shift(predicted: ArrayLike, reference_predicted: ArrayLike, num_classes: int) -> ClassPriorShift:
    """PSI and the chi-square test of homogeneity (window vs reference) of the predicted classes.
    Classes neither sample predicts are left out of the test (they carry no information)."""
    from scipy.stats import chi2_contingency

    a = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=num_classes)[:num_classes]
    e = np.bincount(np.asarray(reference_predicted, dtype=np.int64), minlength=num_classes)[:num_classes]
    value = psi(a, e)
    table = np.stack([a, e])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return ClassPriorShift(value, 0.0, 1.0, 0)
    chi2, p, dof, _ = chi2_contingency(table, correction=False)
    return ClassPriorShift(value, float(chi2), float(p), int(dof))


def ood_share_test(flagged: int, n: int, expected: float) -> float:
    """One-sided binomial p-value of seeing at least `flagged` of `n` images flagged when each is
    flagged with probability `expected` (more flags than expected is the shift to catch)."""
    from scipy.stats import binomtest

    if n <= 0:
        raise ValueError("no flagged predictions to test")
    return float(binomtest(int(flagged), int(n), float(expected), alternative="greater").pvalue)


@dataclass(frozen=True)
class DriftVerdict:
    status: bool
    reasons: list[str]
    tests: int
    p_value_per_test: float
    enough: bool = True
    details: dict = field(default_factory=dict)


def drift_verdict(p_values: dict[str, Optional[float]], *, n: int, p_value: float, min_predictions: int,
                  psi_value: Optional[float] = None, psi_threshold: Optional[float] = None) -> DriftVerdict:
    """Drift when a test's p-value is below `p_value` / m (Bonferroni over the m tests that ran,
    None: not run), or the class-prior PSI reaches `psi_threshold`; never below `min_predictions`."""
    ran = {name: p for name, p in p_values.items() if p is not None}
    per_test = p_value / max(1, len(ran))
    if n < min_predictions:
        return DriftVerdict(False, [], len(ran), per_test, enough=False)
    reasons = [name for name, p in ran.items() if p < per_test]
    if psi_value is not None and psi_threshold is not None and psi_value >= psi_threshold:
        reasons.append("class_prior_psi")
    return DriftVerdict(bool(reasons), reasons, len(ran), per_test)


def labelled_summary(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict:
    """Observed accuracy, top-label ECE (equal-width bins), NLL and the CBPE estimate of the same
    rows, for predictions whose true label came back."""
    from models.calibration.metrics import expected_calibration_error

    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or len(p) != len(y) or len(y) == 0:
        raise ValueError("labelled_summary needs [N, K] probabilities and N labels, N > 0")
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    nll = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], PROBABILITY_FLOOR, None))))
    accuracy = float(correct.mean())
    estimated = float(conf.mean())
    return {"n": int(len(y)), "accuracy": accuracy,
            "ece_15": float(expected_calibration_error(conf, correct, n_bins)), "nll": nll,
            "estimated_accuracy": estimated, "estimated_minus_observed": estimated - accuracy}


def ece_consistency_quantile(confidences: ArrayLike, n_bins: int = 15, *, quantile: float = 0.95,
                             draws: int = 200, seed: int = 0) -> float:
    """The `quantile` of the ECE that perfectly calibrated predictions with these confidences would
    show on this many rows: consistency resampling (Broecker & Smith 2007), each row correct with
    probability equal to its confidence. ECE is biased upwards on few rows (about 0.05 on 120 rows
    of a calibrated model), so an alert needs the observed ECE above this as well as above the
    threshold, or small labelled windows raise false alarms."""
    from models.calibration.metrics import expected_calibration_error

    conf = np.asarray(confidences, dtype=np.float64)
    if conf.ndim != 1 or conf.size == 0:
        raise ValueError("ece_consistency_quantile needs a non-empty 1-D array of confidences")
    rng = np.random.default_rng(seed)
    eces = np.array([expected_calibration_error(conf, rng.random(conf.size) < conf, n_bins) for _ in range(draws)])
    return float(np.quantile(eces, quantile))


def split_buckets(n: int, bucket: int, buckets: int) -> Sequence[tuple[int, int]]:
    """[start, stop) of up to `buckets` consecutive buckets of `bucket` rows ending at row n (the
    oldest may be partial only when fewer rows exist); oldest first."""
    out = []
    stop = n
    while stop > 0 and len(out) < buckets:
        out.append((max(0, stop - bucket), stop))
        stop -= bucket
    return out[::-1]
