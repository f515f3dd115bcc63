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


# --- the service's abstain threshold -----------------------------------------------------------
FLAG_SCORE = "predictive_entropy"   # the score the service flags on (available with or without MC)
FLAG_TPR = 0.95                     # share of clean validation images that must pass


def fit_ood_threshold(logits, temperature: float, tpr: float = FLAG_TPR, *,
                      data: str = "validation split") -> dict:
    """The model card's `ood_threshold` block: the predictive-entropy threshold (nats) of the
    calibrated probabilities softmax(logits / T) that lets `tpr` of these (clean, in-distribution)
    images pass. The service flags an image when its entropy is above it. The temperature is
    recorded because the threshold is only valid at the temperature it was fitted with."""
    from .metrics import softmax

    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty [N, K] array, got shape {z.shape}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    entropy = uncertainty_scores(softmax(z, float(temperature)))[FLAG_SCORE]
    return {"score": FLAG_SCORE, "threshold": threshold_at_tpr(entropy, tpr), "tpr": float(tpr),
            "n_images": int(z.shape[0]), "data": data, "temperature": float(temperature)}


def ood_threshold_problem(block, temperature: float) -> str | None:
    """Why a card's `ood_threshold` block cannot be used at this temperature (None: it can).
    A threshold fitted at another temperature is stale: entropies shift when T changes."""
    if not isinstance(block, dict):
        return f"expected an object, got {type(block).__name__}"
    if block.get("score") != FLAG_SCORE:
        return f"score {block.get('score')!r}; the service flags on {FLAG_SCORE!r}"
    value, fitted_t = block.get("threshold"), block.get("temperature")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        return f"threshold {value!r} is not a non-negative number"
    if isinstance(fitted_t, bool) or not isinstance(fitted_t, (int, float)):
        return f"temperature {fitted_t!r} is not a number"
    if abs(float(fitted_t) - float(temperature)) > 1e-6 * max(1.0, abs(float(temperature))):
        return f"fitted at T={fitted_t}, but the model's temperature is {temperature}: refit it"
    return None
