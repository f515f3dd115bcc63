"""Out-of-distribution detection from uncertainty scores: AUROC, AUPR, FPR at 95% TPR, thresholds.

Plain NumPy (no scikit-learn in the serving image); tests check it against scikit-learn.
Conventions, as in Hendrycks & Gimpel (2017) and the OOD literature:
- a score is an *uncertainty*: higher means "more likely out of distribution"
  (1 - max probability, predictive entropy, MC mutual information);
- AUROC and AUPR treat the out-of-distribution images as the positive class (AUPR-Out);
- FPR at 95% TPR treats the in-distribution images as the positives: the threshold lets 95% of
  them pass, and the FPR is the fraction of out-of-distribution images that pass with them.
  The same threshold rule flags images in the service (`threshold_at_tpr`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata

SCORES = ("max_probability", "predictive_entropy", "mutual_information")


def _scores(values, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty: an OOD metric needs at least one score on each side")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds NaN or infinite scores")
    return a


def auroc(in_scores, out_scores) -> float:
    """Probability that a random out-of-distribution image scores higher than a random
    in-distribution one (ties count one half): the Mann-Whitney U statistic."""
    s_in, s_out = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    ranks = rankdata(np.concatenate([s_in, s_out]))       # average ranks: ties count one half
    rank_sum_out = ranks[s_in.size:].sum()
    u = rank_sum_out - s_out.size * (s_out.size + 1) / 2.0
    return float(u / (s_in.size * s_out.size))


def aupr(in_scores, out_scores) -> float:
    """Average precision with the out-of-distribution images as positives (AUPR-Out), computed
    step-wise as scikit-learn's `average_precision_score` does (no interpolation)."""
    s_in, s_out = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    scores = np.concatenate([s_in, s_out])
    positive = np.concatenate([np.zeros(s_in.size), np.ones(s_out.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.diff(scores) != 0, True]        # one operating point per distinct score
    tp = np.cumsum(positive)[last_of_tie]
    fp = np.cumsum(1.0 - positive)[last_of_tie]
    precision = tp / (tp + fp)
    recall = tp / s_out.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def threshold_at_tpr(in_scores, tpr: float = 0.95) -> float:
    """The smallest score threshold that lets at least `tpr` of the in-distribution images pass
    (an image passes when its score <= threshold)."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    s_in = np.sort(_scores(in_scores, "in_scores"))
    k = int(np.ceil(tpr * s_in.size - 1e-9))               # images that must pass
    return float(s_in[max(k, 1) - 1])


def fpr_at_tpr(in_scores, out_scores, tpr: float = 0.95) -> float:
    """Fraction of out-of-distribution images that pass the threshold letting `tpr` of the
    in-distribution images pass (FPR95 for tpr=0.95; lower is better)."""
    threshold = threshold_at_tpr(in_scores, tpr)
    s_out = _scores(out_scores, "out_scores")
    return float(np.mean(s_out <= threshold))


@dataclass(frozen=True)
class Detection:
    """How well one uncertainty score separates two batches."""

    score: str
    auroc: float
    aupr: float
    fpr_at_95_tpr: float
    n_in: int
    n_out: int
    mean_in: float
    mean_out: float

    def to_dict(self) -> dict:
        return asdict(self)


def detection(score: str, in_scores, out_scores) -> Detection:
    s_in, s_out = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    return Detection(score, auroc(s_in, s_out), aupr(s_in, s_out), fpr_at_tpr(s_in, s_out, 0.95),
                     int(s_in.size), int(s_out.size), float(s_in.mean()), float(s_out.mean()))


def uncertainty_scores(mean_probabilities, mutual_information=None) -> dict[str, np.ndarray]:
    """The scores this project reports, from [B, K] (MC-mean or deterministic) probabilities:
    1 - max probability, predictive entropy (nats) and, when MC samples were drawn, the mutual
    information (`models.calibration.uncertainty.summarize_mc_samples`)."""
    p = np.asarray(mean_probabilities, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be [B, K], got shape {p.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)
    scores = {"max_probability": 1.0 - p.max(axis=-1), "predictive_entropy": entropy}
    if mutual_information is not None:
        scores["mutual_information"] = np.asarray(mutual_information, dtype=np.float64).reshape(-1)
    return scores
