"""Calibration metrics from logits, in float64 NumPy.

NumPy only so the training script, the service and the lab all report the
same numbers without importing TensorFlow.

Bin convention (equal-width, B = n_bins): bin i is the right-closed interval
(i/B, (i+1)/B]. A confidence of exactly 0 goes to the first bin and exactly
1.0 is counted in the last, so an edge value such as 0.4 with 5 bins lands in
(0.2, 0.4]. Edges are the float64 values i / B.

Brier score is the multi-class form mean_n sum_k (p_nk - 1[y_n = k])^2, with
range [0, 2] (not divided by K).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "CalibrationMetrics",
    "ReliabilityBin",
    "adaptive_calibration_error",
    "compute_metrics",
    "expected_calibration_error",
    "log_softmax",
    "reliability_bins",
    "softmax",
]


# --------------------------------------------------------------------------
# Validation helpers (shared with temperature.py)
# --------------------------------------------------------------------------


def _check_temperature(temperature: Any) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(
            f"temperature must be a positive finite number, got {temperature!r}"
        ) from None
    if not (np.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be a positive finite number, got {t!r}")
    return t


def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool):
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    try:
        b = operator.index(n_bins)
    except TypeError:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}") from None
    if b < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {b}")
    return b


def _as_float_logits(logits: ArrayLike) -> np.ndarray:
    x = np.asarray(logits)
    if x.dtype.kind not in "fiu":
        raise ValueError(f"logits must be a real numeric array, got dtype {x.dtype}")
    return x.astype(np.float64, copy=False)


def _validate_logits_labels(
    logits: ArrayLike, labels: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Return (float64 logits [N, K], int64 labels [N]) or raise ValueError."""
    x = _as_float_logits(logits)
    if x.ndim != 2:
        raise ValueError(f"logits must be 2-D [N, K], got shape {x.shape}")
    n, k = x.shape
    if n == 0:
        raise ValueError("logits must contain at least one sample (N == 0)")
    if k < 2:
        raise ValueError(f"logits must have at least 2 classes, got K = {k}")
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise ValueError(f"logits contain {bad} non-finite value(s) (NaN or inf)")

    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match logits, got {y.shape}")
    if y.dtype.kind in "iu":
        y = y.astype(np.int64, copy=False)
    elif y.dtype.kind == "f":
        if not (np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise ValueError("labels must be integer-valued class indices")
        y = y.astype(np.int64)
    else:
        raise ValueError(
            f"labels must be integer-valued class indices, got dtype {y.dtype}"
        )
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= k:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels must lie in [0, {k}), found {bad}")
    return x, y


def _validate_conf_correct(
    confidences: ArrayLike, correct: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidences)
    if c.dtype.kind not in "fiu":
        raise ValueError(f"confidences must be real numbers, got dtype {c.dtype}")
    c = c.astype(np.float64, copy=False)
    if c.ndim != 1:
        raise ValueError(f"confidences must be 1-D, got shape {c.shape}")
    if c.size == 0:
        raise ValueError("confidences must not be empty")
    if not (np.all(np.isfinite(c)) and np.all((c >= 0.0) & (c <= 1.0))):
        raise ValueError("confidences must be finite and lie in [0, 1]")

    a = np.asarray(correct)
    if a.shape != c.shape:
        raise ValueError(
            f"correct must have the same shape as confidences {c.shape}, got {a.shape}"
        )
    if a.dtype.kind not in "biuf":
        raise ValueError(f"correct must be boolean or 0/1, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.all((a == 0.0) | (a == 1.0)):
        raise ValueError("correct must contain only 0/1 (or booleans)")
    return c, a


# --------------------------------------------------------------------------
# Softmax
# --------------------------------------------------------------------------


def _shifted(logits: ArrayLike, temperature: float) -> np.ndarray:
    x = _as_float_logits(logits)
    if x.ndim == 0:
        raise ValueError("logits must have at least one dimension")
    # Shift before dividing: (x - max) <= 0 stays finite even for tiny T.
    return (x - x.max(axis=-1, keepdims=True)) / temperature


def _top_label(x: np.ndarray, y: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-probabilities [N, K], top-label confidence [N], correct [N] as 0/1 floats).

    The prediction is the argmax of the raw logits: exactly invariant to T > 0 (the map is
    monotone). Shared by `compute_metrics` and the bootstrap, so both read one definition.
    """
    logp = log_softmax(x, t)
    pred = np.argmax(x, axis=1)
    conf = np.exp(logp[np.arange(len(y)), pred])
    return logp, conf, (pred == y).astype(np.float64)


def log_softmax(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """log softmax(logits / temperature) over the last axis, float64."""
    z = _shifted(logits, _check_temperature(temperature))
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, float64."""
    e = np.exp(_shifted(logits, _check_temperature(temperature)))
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------
# Binning
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width bin (lower, upper]; stats are None when count == 0."""

    lower: float
    upper: float
    count: int
    mean_confidence: float | None
    accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "lower": float(self.lower),
            "upper": float(self.upper),
            "count": int(self.count),
            "mean_confidence": None
            if self.mean_confidence is None
            else float(self.mean_confidence),
            "accuracy": None if self.accuracy is None else float(self.accuracy),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReliabilityBin:
        mc, acc = d.get("mean_confidence"), d.get("accuracy")
        return cls(
            lower=float(d["lower"]),
            upper=float(d["upper"]),
            count=int(d["count"]),
            mean_confidence=None if mc is None else float(mc),
            accuracy=None if acc is None else float(acc),
        )


def _bin_edges(n_bins: int) -> np.ndarray:
    return np.arange(n_bins + 1, dtype=np.float64) / n_bins


def _bin_indices(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # side="left": edges[i] < c <= edges[i+1] -> i (right-closed bins);
    # c == 0 gives -1 and is clipped into the first bin.
    idx = np.searchsorted(_bin_edges(n_bins), conf, side="left") - 1
    return np.clip(idx, 0, n_bins - 1)


def _bin_sums(
    conf: np.ndarray, correct: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = _bin_indices(conf, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(idx, weights=correct, minlength=n_bins)
    return counts, sum_conf, sum_acc


def _ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    _, sum_conf, sum_acc = _bin_sums(conf, correct, n_bins)
    # sum_b (n_b/N) |acc_b - conf_b| == sum_b |sum_acc_b - sum_conf_b| / N
    return float(np.abs(sum_acc - sum_conf).sum() / conf.size)


def _mce(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    counts, sum_conf, sum_acc = _bin_sums(conf, correct, n_bins)
    ne = counts > 0
    return float(np.max(np.abs(sum_acc[ne] - sum_conf[ne]) / counts[ne]))


def _bins(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[ReliabilityBin, ...]:
    counts, sum_conf, sum_acc = _bin_sums(conf, correct, n_bins)
    edges = _bin_edges(n_bins)
    out = []
    for i in range(n_bins):
        c = int(counts[i])
        out.append(
            ReliabilityBin(
                lower=float(edges[i]),
                upper=float(edges[i + 1]),
                count=c,
                mean_confidence=float(sum_conf[i] / c) if c else None,
                accuracy=float(sum_acc[i] / c) if c else None,
            )
        )
    return tuple(out)


def _adaptive_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    n = conf.size
    # Sort by (confidence, correct) so ties split identically whatever the
    # input order: this keeps the metric exactly permutation invariant.
    order = np.lexsort((correct, conf))
    groups = min(n_bins, n)
    total = 0.0
    for c, a in zip(
        np.array_split(conf[order], groups), np.array_split(correct[order], groups)
    ):
        total += abs(float(a.sum()) - float(c.sum()))
    return total / n


def expected_calibration_error(
    confidences: ArrayLike, correct: ArrayLike, n_bins: int = 15
) -> float:
    """Equal-width ECE from confidences in [0, 1] and 0/1 (or bool) outcomes."""
    b = _check_n_bins(n_bins)
    c, a = _validate_conf_correct(confidences, correct)
    return _ece(c, a, b)


def adaptive_calibration_error(
    confidences: ArrayLike, correct: ArrayLike, n_bins: int = 15
) -> float:
    """Equal-mass ECE: min(n_bins, N) groups of nearly equal count."""
    b = _check_n_bins(n_bins)
    c, a = _validate_conf_correct(confidences, correct)
    return _adaptive_ece(c, a, b)


def reliability_bins(
    confidences: ArrayLike, correct: ArrayLike, n_bins: int = 15
) -> tuple[ReliabilityBin, ...]:
    """Per-bin count, mean confidence and accuracy (equal-width bins)."""
    b = _check_n_bins(n_bins)
    c, a = _validate_conf_correct(confidences, correct)
    return _bins(c, a, b)


# --------------------------------------------------------------------------
# Full report
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationMetrics:
    """Calibration report for one set of logits at one temperature."""

    n: int
    n_bins: int
    temperature: float
    accuracy: float
    nll: float
    brier: float
    ece: float
    mce: float
    adaptive_ece: float
    classwise_ece: float
    bins: tuple[ReliabilityBin, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable plain Python (empty-bin stats become null)."""
        return {
            "n": int(self.n),
            "n_bins": int(self.n_bins),
            "temperature": float(self.temperature),
            "accuracy": float(self.accuracy),
            "nll": float(self.nll),
            "brier": float(self.brier),
            "ece": float(self.ece),
            "mce": float(self.mce),
            "adaptive_ece": float(self.adaptive_ece),
            "classwise_ece": float(self.classwise_ece),
            "bins": [b.to_dict() for b in self.bins],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CalibrationMetrics:
        """Inverse of to_dict (e.g. to redraw a diagram from a stored report)."""
        return cls(
            n=int(d["n"]),
            n_bins=int(d["n_bins"]),
            temperature=float(d["temperature"]),
            accuracy=float(d["accuracy"]),
            nll=float(d["nll"]),
            brier=float(d["brier"]),
            ece=float(d["ece"]),
            mce=float(d["mce"]),
            adaptive_ece=float(d["adaptive_ece"]),
            classwise_ece=float(d["classwise_ece"]),
            bins=tuple(ReliabilityBin.from_dict(b) for b in d["bins"]),
        )


def compute_metrics(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float = 1.0,
    n_bins: int = 15,
) -> CalibrationMetrics:
    """All calibration metrics of softmax(logits / temperature) vs labels.

    logits: [N, K] real, converted to float64; labels: [N] integer classes.
    """
    t = _check_temperature(temperature)
    b = _check_n_bins(n_bins)
    x, y = _validate_logits_labels(logits, labels)
    n, k = x.shape
    rows = np.arange(n)

    logp, conf, correct = _top_label(x, y, t)
    p = np.exp(logp)

    nll = float(-np.mean(logp[rows, y]))
    resid = p.copy()
    resid[rows, y] -= 1.0
    brier = float(np.mean(np.sum(resid * resid, axis=1)))

    # Classwise ECE (Kull et al. 2019): every (sample, class) probability is
    # binned against 1[y == k]; all K x B bins in one bincount.
    onehot = np.zeros_like(p)
    onehot[rows, y] = 1.0
    flat = (_bin_indices(p, b) + np.arange(k) * b).ravel()
    cw_conf = np.bincount(flat, weights=p.ravel(), minlength=k * b)
    cw_acc = np.bincount(flat, weights=onehot.ravel(), minlength=k * b)
    per_class = np.abs(cw_acc - cw_conf).reshape(k, b).sum(axis=1) / n

    return CalibrationMetrics(
        n=int(n),
        n_bins=b,
        temperature=t,
        accuracy=float(correct.mean()),
        nll=nll,
        brier=brier,
        ece=_ece(conf, correct, b),
        mce=_mce(conf, correct, b),
        adaptive_ece=_adaptive_ece(conf, correct, b),
        classwise_ece=float(per_class.mean()),
        bins=_bins(conf, correct, b),
    )
