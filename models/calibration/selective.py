"""Selective prediction: how accurate the classifier is when it may abstain on its least confident
images (plain NumPy, shared by the service, training and the lab).

An image is *accepted* when its confidence (largest calibrated probability) is >= a threshold;
*coverage* is the accepted fraction and *selective risk* the error rate among the accepted.

Conventions (all exact, none depends on the order of the input rows):
- Tied confidences cannot be split by a threshold, so the risk-coverage curve has one point per
  distinct confidence (threshold = that confidence, everything at least as confident accepted).
- "The k most confident images" (needed for a coverage that falls inside a tie group) counts the
  images tied with the k-th one at their tie group's mean correctness: the expected result of a
  random tie break. Without ties this is simply the top k.
- Coverage c accepts k = ceil(c * n) images (at least the requested fraction, at least one).
- AURC, as in Geifman, Uziel & El-Yaniv (ICLR 2019): the mean selective risk over the n coverages
  k/n, k = 1..n, i.e. (1/n) * sum_k errors(top k) / k with the tie rule above. E-AURC = AURC
  minus the AURC of the oracle that ranks every correct image above every wrong one (>= 0).
- The confidence threshold for a target accuracy is the *lowest* distinct confidence whose
  accepted set reaches it (the largest coverage; accuracy is not monotone in the threshold, so
  every curve point is checked). When none does, the answer says so: `achieved=False`,
  threshold None, coverage 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_COVERAGES = (0.5, 0.8, 0.9, 0.95)
DEFAULT_CURVE_STEPS = 100
# Accuracy comparisons tolerate float rounding: 99 of 100 correct reaches target 0.99.
_ACCURACY_TOLERANCE = 1e-12


# --- inputs ------------------------------------------------------------------------------------
def confidence_and_correct(probabilities, labels) -> tuple[np.ndarray, np.ndarray]:
    """(max probability, argmax == label) per image from [N, K] probabilities and [N] labels."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probabilities must be a non-empty [N, K] array, got shape {p.shape}")
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"{y.shape[0]} labels for {p.shape[0]} probability rows")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities hold NaN or infinite values")
    return p.max(axis=1), p.argmax(axis=1) == y


def _checked(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct, dtype=bool).reshape(-1)
    if c.size == 0:
        raise ValueError("no images: selective metrics need at least one")
    if c.shape != ok.shape:
        raise ValueError(f"{c.size} confidences for {ok.size} correctness flags")
    if not np.all(np.isfinite(c)):
        raise ValueError("confidences hold NaN or infinite values")
    return c, ok


@dataclass(frozen=True)
class _Ranked:
    """Images sorted by confidence (descending) with their tie groups: the one sort everything
    below shares."""

    confidence: np.ndarray     # [n] descending
    group_end: np.ndarray      # [n] accepted count at the end of each image's tie group
    group_start: np.ndarray    # [n] accepted count before the image's tie group
    errors_before: np.ndarray  # [n] errors among images more confident than the tie group
    group_error_rate: np.ndarray  # [n] mean error of the image's tie group

    @property
    def n(self) -> int:
        return self.confidence.size


def _rank(confidence, correct) -> _Ranked:
    c, ok = _checked(confidence, correct)
    order = np.argsort(-c, kind="mergesort")
    c, wrong = c[order], (~ok[order]).astype(np.float64)
    last = np.r_[c[1:] != c[:-1], True]               # last image of each tie group
    ends = np.flatnonzero(last) + 1                    # accepted count at each group end
    starts = np.r_[0, ends[:-1]]
    cum_errors = np.r_[0.0, np.cumsum(wrong)]
    group_errors = cum_errors[ends] - cum_errors[starts]
    group_of = np.repeat(np.arange(ends.size), ends - starts)
    return _Ranked(c, ends[group_of], starts[group_of], cum_errors[starts][group_of],
                   (group_errors / (ends - starts))[group_of])


def _expected_errors(r: _Ranked, k: np.ndarray) -> np.ndarray:
    """Errors among the k most confident images (k >= 1), ties at their group's mean."""
    i = np.asarray(k) - 1
    return r.errors_before[i] + (np.asarray(k) - r.group_start[i]) * r.group_error_rate[i]


# --- the curve ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RiskCoverageCurve:
    """One point per distinct confidence, from the most confident down: accept every image with
    confidence >= threshold[i]; it covers coverage[i] of the batch with selective risk risk[i]."""

    threshold: np.ndarray
    accepted: np.ndarray
    coverage: np.ndarray
    risk: np.ndarray
    n: int


def risk_coverage_curve(confidence, correct) -> RiskCoverageCurve:
    r = _rank(confidence, correct)
    ends = np.unique(r.group_end)
    errors = _expected_errors(r, ends)                 # exact at group ends
    return RiskCoverageCurve(r.confidence[ends - 1], ends, ends / r.n, errors / ends, r.n)


def _risk_at_every_k(r: _Ranked) -> np.ndarray:
    k = np.arange(1, r.n + 1)
    return _expected_errors(r, k) / k


def aurc(confidence, correct) -> float:
    """Mean selective risk over the coverages k/n, k = 1..n (lower is better)."""
    return float(_risk_at_every_k(_rank(confidence, correct)).mean())


def oracle_aurc(correct) -> float:
    """AURC of the perfect ranking (every correct image first): the floor a batch with this
    error rate allows, so E-AURC compares rankings across models of different accuracy."""
    ok = np.asarray(correct, dtype=bool).reshape(-1)
    n, n_right = ok.size, int(ok.sum())
    if n == 0:
        raise ValueError("no images: selective metrics need at least one")
    k = np.arange(1, n + 1)
    return float((np.maximum(0, k - n_right) / k).mean())


def e_aurc(confidence, correct) -> float:
    """Excess AURC over the oracle: 0 for a perfect ranking of right before wrong."""
    return aurc(confidence, correct) - oracle_aurc(correct)


# --- operating points --------------------------------------------------------------------------
@dataclass(frozen=True)
class CoveragePoint:
    """The `accepted` = ceil(coverage * n) most confident images: their accuracy, risk, and the
    confidence of the last one accepted (`threshold`)."""

    coverage: float
    accepted: int
    accuracy: float
    risk: float
    threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


def accepted_count(coverage: float, n: int) -> int:
    """ceil(coverage * n), at least 1; a hair of slack so 0.9 * 10 is 9, not 10."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    return max(1, min(n, int(np.ceil(coverage * n - 1e-9))))


def _point(r: _Ranked, coverage: float) -> CoveragePoint:
    k = accepted_count(coverage, r.n)
    risk = float(_expected_errors(r, np.array([k]))[0] / k)
    return CoveragePoint(float(coverage), k, 1.0 - risk, risk, float(r.confidence[k - 1]))


def accuracy_at_coverage(confidence, correct, coverages=DEFAULT_COVERAGES) -> list[CoveragePoint]:
    r = _rank(confidence, correct)
    return [_point(r, c) for c in coverages]


def compact_curve(confidence, correct, steps: int = DEFAULT_CURVE_STEPS) -> list[CoveragePoint]:
    """The curve at fixed coverage steps 1/steps, 2/steps, ..., 1 (same rule as
    `accuracy_at_coverage`), without repeats: at most `steps` points whatever n, so a JSON
    report of 10,000 images stays small. `coverage` is the step (the largest of those that
    accept the same count when n < steps), `accepted / n` the exact coverage."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    r = _rank(confidence, correct)
    by_count: dict[int, CoveragePoint] = {}
    for i in range(1, steps + 1):
        p = _point(r, i / steps)
        by_count[p.accepted] = p        # several steps, one count (n < steps): keep the largest
    return list(by_count.values())


@dataclass(frozen=True)
class AccuracyThreshold:
    """The lowest confidence threshold whose accepted set reaches `target_accuracy`.
    `achieved=False` (threshold None, coverage 0) when no threshold does."""

    target_accuracy: float
    achieved: bool
    threshold: float | None
    coverage: float
    accepted: int
    accuracy: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def threshold_for_accuracy(confidence, correct, target_accuracy: float) -> AccuracyThreshold:
    if not 0.0 < target_accuracy <= 1.0:   # also refuses NaN
        raise ValueError(f"target_accuracy must be in (0, 1], got {target_accuracy}")
    curve = risk_coverage_curve(confidence, correct)
    reaching = np.flatnonzero(1.0 - curve.risk >= target_accuracy - _ACCURACY_TOLERANCE)
    if reaching.size == 0:
        return AccuracyThreshold(float(target_accuracy), False, None, 0.0, 0, None)
    i = reaching[-1]                                   # lowest threshold = largest coverage
    return AccuracyThreshold(float(target_accuracy), True, float(curve.threshold[i]),
                             float(curve.coverage[i]), int(curve.accepted[i]), float(1.0 - curve.risk[i]))


# --- one report --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectiveReport:
    """What the evaluate report and `training.evaluate` show about selective prediction."""

    n: int
    accuracy: float
    aurc: float
    e_aurc: float
    oracle_aurc: float
    at_coverage: list[CoveragePoint]
    curve: list[CoveragePoint]
    target: AccuracyThreshold | None

    def to_dict(self) -> dict:
        return {"n": self.n, "accuracy": self.accuracy, "aurc": self.aurc, "e_aurc": self.e_aurc,
                "oracle_aurc": self.oracle_aurc,
                "at_coverage": [p.to_dict() for p in self.at_coverage],
                "risk_coverage_curve": [p.to_dict() for p in self.curve],
                "target": None if self.target is None else self.target.to_dict()}


def selective_report(probabilities, labels, *, target_accuracy: float | None = None,
                     coverages=DEFAULT_COVERAGES, curve_steps: int = DEFAULT_CURVE_STEPS) -> SelectiveReport:
    confidence, correct = confidence_and_correct(probabilities, labels)
    a, oracle = aurc(confidence, correct), oracle_aurc(correct)
    target = None if target_accuracy is None else threshold_for_accuracy(confidence, correct, target_accuracy)
    return SelectiveReport(int(confidence.size), float(correct.mean()), a, a - oracle, oracle,
                           accuracy_at_coverage(confidence, correct, coverages),
                           compact_curve(confidence, correct, curve_steps), target)


def format_summary(report: SelectiveReport) -> str:
    """Printable lines: AURC, the coverage table and the threshold (used by training.evaluate)."""
    lines = [f"selective prediction (confidence = max calibrated probability), n = {report.n}",
             f"AURC {report.aurc:.4f}   E-AURC {report.e_aurc:.4f}   (oracle {report.oracle_aurc:.4f})",
             f"{'coverage':>9}{'accepted':>10}{'accuracy':>10}{'risk':>9}{'threshold':>11}"]
    for p in report.at_coverage:
        lines.append(f"{p.coverage:>9.0%}{p.accepted:>10}{p.accuracy:>10.4f}{p.risk:>9.4f}{p.threshold:>11.4f}")
    t = report.target
    if t is not None:
        lines.append(f"accuracy >= {t.target_accuracy:g}: confidence >= {t.threshold:.4f} keeps "
                     f"{t.coverage:.2%} ({t.accepted} images, accuracy {t.accuracy:.4f})" if t.achieved else
                     f"accuracy >= {t.target_accuracy:g}: no confidence threshold reaches it (coverage 0)")
    return "\n".join(lines)
