"""Split conformal prediction sets for classifiers (NumPy only).

A prediction set at coverage c = 1 - alpha holds every class whose non-conformity score is at
most a threshold q taken from a calibration set of n images the classifier never fitted on:

    q = the m-th smallest calibration score (score of the true label), m = ceil((n + 1) c),

the finite-sample quantile ceil((n + 1)(1 - alpha)) / n of Vovk et al. and Angelopoulos &
Bates. When m > n the quantile does not exist: q = +inf and the set is every class. On
exchangeable data this gives P(y in set) >= c. The sets are exactly those of the conformal
p-values {k : p_k > alpha}, p_k = (#{calibration scores >= s_k} + 1) / (n + 1), as crepes
computes them (non-smoothed); the threshold is MAPIE's `_compute_classification_quantile`.

Scores, for calibrated probabilities p:

* ``lac`` (Sadinle et al. 2019): s_k = 1 - p_k;
* ``aps`` (Romano et al. 2020, randomised): s_k = sum_{j: p_j > p_k} p_j + u * p_k, the mass of
  the classes ranked above k plus a uniform share u of k's own (ties share a rank, so the
  score does not depend on the order of equal probabilities);
* ``raps`` (Angelopoulos et al. 2021, randomised): the APS score plus
  RAPS_LAMBDA * max(0, rank_k - RAPS_K_REG), rank_k = 1 + #{j: p_j > p_k}.

The randomisation is what makes APS/RAPS coverage exact (close to c, not far above it) when the
probabilities are peaked; without it (u = 1) a model that gives 0.9999 to most images gets sets
of half the classes. u is one number per image, the same for all its classes, derived from the
image's probability row (`row_uniforms`: BLAKE2b of the row rounded to 6 decimals, scaled to
(0, 1)), so the same image gets the same set while u stays uniform and independent of the label.

Class-conditional (Mondrian) sets use one threshold per class, from the calibration images of
that class only (n_k instead of n): coverage >= c holds within every class.

Any set can be empty: LAC when every probability is below 1 - q, APS/RAPS when even the top
class's randomised score is above q. docs/conformal.md explains how to read one.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from typing import Any, Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "METHODS",
    "RAPS_K_REG",
    "RAPS_LAMBDA",
    "ConformalCalibration",
    "check_coverage",
    "conformal_report",
    "conformity_scores",
    "row_uniforms",
    "evaluate_sets",
    "split_conformal_report",
]

METHODS = ("lac", "aps", "raps")
_U_KEY = b"calibrated-cifar10 conformal u"
RAPS_LAMBDA = 0.01
RAPS_K_REG = 1
_FORMAT_VERSION = 1
_SUM_TOLERANCE = 1e-4


def check_coverage(coverage: Any) -> float:
    """``coverage`` as a float strictly inside (0, 1), else ValueError."""
    if isinstance(coverage, bool):
        raise ValueError(f"coverage must be a number in (0, 1), got {coverage!r}")
    try:
        c = float(coverage)
    except (TypeError, ValueError):
        raise ValueError(f"coverage must be a number in (0, 1), got {coverage!r}") from None
    if not (math.isfinite(c) and 0.0 < c < 1.0):
        raise ValueError(f"coverage must lie strictly between 0 and 1, got {c}")
    return c


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"conformal method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def _check_probabilities(probabilities: ArrayLike, name: str = "probabilities") -> np.ndarray:
    p = np.asarray(probabilities)
    if p.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a real numeric array, got dtype {p.dtype}")
    p = p.astype(np.float64, copy=False)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"{name} must be 2-D [N, K] with K >= 2, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contain NaN or infinite values")
    if np.any(p < 0) or np.any(p > 1):
        raise ValueError(f"{name} must lie in [0, 1]")
    if p.shape[0] and not np.allclose(p.sum(axis=1), 1.0, atol=_SUM_TOLERANCE, rtol=0):
        raise ValueError(f"every row of {name} must sum to 1 (within {_SUM_TOLERANCE})")
    return p


def _rank_above(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mass of classes with a strictly larger probability, 1 + their count), both [N, K]."""
    n, k = p.shape
    order = np.argsort(-p, axis=1, kind="stable")
    srt = np.take_along_axis(p, order, axis=1)
    excl = np.cumsum(srt, axis=1) - srt
    pos = np.broadcast_to(np.arange(k), (n, k))
    new = np.ones((n, k), dtype=bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    start = np.maximum.accumulate(np.where(new, pos, 0), axis=1)  # first index of each tie group
    mass_sorted = np.take_along_axis(excl, start, axis=1)
    mass = np.empty_like(p)
    rank = np.empty((n, k), dtype=np.int64)
    np.put_along_axis(mass, order, mass_sorted, axis=1)
    np.put_along_axis(rank, order, start + 1, axis=1)
    return mass, rank


def row_uniforms(probabilities: ArrayLike) -> np.ndarray:
    """One u in (0, 1) per row, a keyed BLAKE2b hash of the row rounded to 6 decimals: pseudo-random
    (uniform, independent of the label) yet the same for the same image, even when its
    probabilities differ in the last bits (another batch composition in the backbone)."""
    p = np.ascontiguousarray(np.round(np.asarray(probabilities, dtype=np.float64), 6)) + 0.0  # -0.0 -> 0.0
    raw = b"".join(hashlib.blake2b(row.tobytes(), digest_size=8, key=_U_KEY).digest() for row in p)
    words = np.frombuffer(raw, dtype="<u8")
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53 + 2.0**-54  # 53 bits, never 0 or 1


def conformity_scores(probabilities: ArrayLike, method: str, u: ArrayLike | None = None) -> np.ndarray:
    """Non-conformity score of every class, [N, K] (see the module docstring). ``u``: APS/RAPS's
    uniform per row, [N] (default `row_uniforms`)."""
    _check_method(method)
    p = np.asarray(probabilities, dtype=np.float64)
    if method == "lac":
        return 1.0 - p
    u = row_uniforms(p) if u is None else np.asarray(u, dtype=np.float64)
    mass, rank = _rank_above(p)
    s = mass + u[:, None] * p
    if method == "raps":
        s = s + RAPS_LAMBDA * np.maximum(0, rank - RAPS_K_REG)
    return s


def _order_statistic_index(n: int, coverage: float) -> int:
    """m = ceil((n + 1) c), guarded against float noise such as 100 * 0.9 = 90.00000000000001, and
    at least 1 (c > 0: a coverage of 5e-324 rounds to 0 but still asks for the smallest score)."""
    return max(1, int(math.ceil(round((n + 1) * coverage, 9))))


def _quantile(sorted_scores: np.ndarray, coverage: float) -> float:
    n = sorted_scores.shape[0]
    m = _order_statistic_index(n, coverage)
    return math.inf if m > n else float(sorted_scores[m - 1])


class ConformalCalibration:
    """The calibration set of a split-conformal predictor: calibrated probabilities [n, K] and labels.

    Keeping the probabilities (not one threshold) serves any coverage, method and the Mondrian
    option exactly. Sorted scores are computed once per method and cached.
    """

    def __init__(self, probabilities: ArrayLike, labels: ArrayLike):
        p = _check_probabilities(probabilities)
        y = np.asarray(labels)
        if y.dtype.kind not in "iu" or y.shape != (p.shape[0],):
            raise ValueError(f"labels must be integer classes of shape ({p.shape[0]},), got {y.dtype} {y.shape}")
        if p.shape[0] == 0:
            raise ValueError("a conformal calibration set needs at least one image")
        y = y.astype(np.int64)
        if y.min() < 0 or y.max() >= p.shape[1]:
            raise ValueError(f"labels must lie in [0, {p.shape[1]})")
        self.probabilities = p
        self.labels = y
        self._sorted: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.probabilities.shape[1])

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def _scores(self, method: str, cls: int) -> np.ndarray:
        key = (method, cls)
        got = self._sorted.get(key)
        if got is None:
            with self._lock:
                if method not in {m for m, _ in self._sorted}:
                    s = conformity_scores(self.probabilities, method)[np.arange(self.n), self.labels]
                    self._sorted[(method, -1)] = np.sort(s)
                    for k in range(self.num_classes):
                        self._sorted[(method, k)] = np.sort(s[self.labels == k])
                got = self._sorted[key]
        return got

    def threshold(self, coverage: float, method: str = "lac", mondrian: bool = False) -> float | np.ndarray:
        """The score threshold q (a float), or one per class [K] when ``mondrian``; +inf = all classes."""
        c = check_coverage(coverage)
        _check_method(method)
        if not mondrian:
            return _quantile(self._scores(method, -1), c)
        return np.array([_quantile(self._scores(method, k), c) for k in range(self.num_classes)])

    def prediction_sets(
        self, probabilities: ArrayLike, coverage: float, method: str = "lac", mondrian: bool = False
    ) -> np.ndarray:
        """Boolean mask [N, K]: class k is in image i's set iff s_k(p_i) <= q (or q_k)."""
        p = _check_probabilities(probabilities)
        if p.shape[1] != self.num_classes:
            raise ValueError(f"probabilities have K = {p.shape[1]}, the calibration set K = {self.num_classes}")
        return conformity_scores(p, method) <= self.threshold(coverage, method, mondrian)

    def to_bytes(self) -> bytes:
        """A compressed .npz (probabilities float64, labels int64, format version)."""
        buf = io.BytesIO()
        np.savez_compressed(buf, probabilities=self.probabilities, labels=self.labels,
                            version=np.int64(_FORMAT_VERSION))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ConformalCalibration:
        """Inverse of to_bytes; ValueError for anything else (never unpickles)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:  # zipfile/OSError/ValueError: not our npz
            raise ValueError(f"not a conformal calibration .npz: {exc}") from None
        if set(arrays) != {"probabilities", "labels", "version"} or int(arrays["version"]) != _FORMAT_VERSION:
            raise ValueError(f"unexpected conformal calibration content {sorted(arrays)}")
        return cls(arrays["probabilities"], arrays["labels"])


def conformal_report(sets: ArrayLike, labels: ArrayLike) -> dict[str, Any]:
    """How prediction sets [N, K] did on labelled images: coverage, sizes, worst class."""
    s = np.asarray(sets, dtype=bool)
    y = np.asarray(labels, dtype=np.int64)
    if s.ndim != 2 or y.shape != (s.shape[0],) or s.shape[0] == 0:
        raise ValueError(f"sets [N, K] and labels [N] must match and be non-empty, got {s.shape} and {y.shape}")
    n, k = s.shape
    hit = s[np.arange(n), y]
    size = s.sum(axis=1)
    by_size = []
    for v in np.unique(size):
        sel = size == v
        by_size.append({"size": int(v), "n": int(sel.sum()), "coverage": float(hit[sel].mean())})
    per_class = []
    for c in range(k):
        sel = y == c
        if sel.any():
            per_class.append({"class": c, "n": int(sel.sum()), "coverage": float(hit[sel].mean())})
    worst = min(per_class, key=lambda r: (r["coverage"], r["class"]))
    return {
        "n": int(n),
        "coverage": float(hit.mean()),
        "mean_set_size": float(size.mean()),
        "singletons": float(np.mean(size == 1)),
        "empty": float(np.mean(size == 0)),
        "coverage_by_set_size": by_size,
        "worst_class": worst,
    }


def evaluate_sets(
    calibration: ConformalCalibration,
    probabilities: ArrayLike,
    labels: ArrayLike,
    coverages: Iterable[float],
    methods: Sequence[str] = METHODS,
    mondrian: bool = False,
) -> list[dict[str, Any]]:
    """`conformal_report` of ``calibration``'s sets on a labelled batch, per coverage and method."""
    out = []
    for c in coverages:
        for m in methods:
            sets = calibration.prediction_sets(probabilities, c, m, mondrian)
            thr = calibration.threshold(c, m, mondrian)
            out.append({
                "coverage_target": float(c),
                "method": m,
                "mondrian": bool(mondrian),
                "calibration_n": calibration.n,
                "threshold": _json_threshold(thr),
                **conformal_report(sets, labels),
            })
    return out


def _json_threshold(q: float | np.ndarray) -> float | None | list:
    if isinstance(q, np.ndarray):
        return [None if not math.isfinite(v) else float(v) for v in q]
    return None if not math.isfinite(q) else float(q)


def split_conformal_report(
    probabilities: ArrayLike,
    labels: ArrayLike,
    coverages: Iterable[float],
    methods: Sequence[str] = METHODS,
    mondrian: bool = False,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Split conformal on one labelled batch: a seeded half calibrates, the other half measures.

    The first floor(N / 2) images of a seeded permutation are the calibration half; the rest
    are scored. Needs N >= 2.
    """
    p = _check_probabilities(probabilities)
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or y.shape != (p.shape[0],) or (y.size and (y.min() < 0 or y.max() >= p.shape[1])):
        raise ValueError(f"labels must be integer classes in [0, {p.shape[1]}) of shape ({p.shape[0]},)")
    y = y.astype(np.int64)
    n = p.shape[0]
    if n < 2:
        raise ValueError("split conformal needs at least 2 labelled images")
    perm = np.random.default_rng(seed).permutation(n)
    cal, test = perm[: n // 2], perm[n // 2 :]
    calibration = ConformalCalibration(p[cal], y[cal])
    return {
        "split": {"seed": int(seed), "calibration_n": int(cal.size), "test_n": int(test.size)},
        "results": evaluate_sets(calibration, p[test], y[test], coverages, methods, mondrian),
    }
