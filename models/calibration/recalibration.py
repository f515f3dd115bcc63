"""Recalibration maps fitted on a labelled batch, and their honest (cross-fitted) report.

A deployment's images drift from the validation split the card's temperature was fitted on;
these maps refit the calibration on the user's own labelled logits. Three families, from one
parameter to K(K+1):

* ``temperature``: softmax(z / T) (Guo et al. 2017), the existing bounded 1-D solve;
* ``vector``: softmax(w * z + b), a per-class scale and bias (Guo et al. 2017);
* ``dirichlet``: softmax(W log softmax(z) + b) (Kull et al. 2019) with ODIR regularisation
  (off-diagonal entries of W and the bias shrunk to 0), so it cannot memorise a small batch.

``vector`` and ``dirichlet`` minimise the mean NLL plus their L2 penalty with scipy's L-BFGS
(analytic gradients, float64), started at the fitted temperature so they can only improve on
it. ``auto`` picks the candidate with the lowest *cross-validated* NLL.

``fit_profile`` reports NLL / ECE-15 / Brier / accuracy before and after by k-fold
cross-fitting: every image's "after" probability comes from a calibrator fitted on the other
folds, so the reported gain is not measured on the data it was fitted on. The same out-of-fold
probabilities are the conformal calibration scores (`ConformalCalibration`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize

from .conformal import ConformalCalibration
from .metrics import _validate_logits_labels, compute_metrics, log_softmax
from .temperature import fit_temperature

__all__ = [
    "AUTO",
    "METHODS",
    "Calibrator",
    "ProfileFit",
    "TooFewImagesError",
    "fit_calibrator",
    "fit_profile",
    "minimum_images",
]

METHODS = ("temperature", "vector", "dirichlet")
AUTO = "auto"

# Regularisation (fixed, not tuned per batch; see docs/conformal.md "Recalibration methods").
# Penalties are means over the entries they act on, added to the mean NLL.
# Chosen on the shipped models' validation logits (fit on 1,000 images, NLL on the other 4,000;
# docs/conformal.md): weaker penalties overfit (Dirichlet at 1e-2: NLL 0.344 against the
# temperature's 0.307 on cifar10-augmix), these stay within 0.004 of the temperature in-domain.
VECTOR_L2 = 0.1  # on (w - w0) and b, w0 = 1/T of the temperature fit
DIRICHLET_OFFDIAG_L2 = 10.0  # ODIR lambda: off-diagonal entries of W
DIRICHLET_BIAS_L2 = 10.0  # ODIR mu: the bias

# Images a fit needs in its training part: at least MIN_FIT_IMAGES, and IMAGES_PER_PARAMETER
# per free parameter for the expressive maps.
MIN_FIT_IMAGES = 20
IMAGES_PER_PARAMETER = 5
DEFAULT_FOLDS = 5

_MAXITER = 500


class TooFewImagesError(ValueError):
    """The batch is too small for the method (or for the folds); ``minimum`` says how many."""

    def __init__(self, minimum: int, message: str | None = None):
        self.minimum = int(minimum)
        super().__init__(message or f"need at least {self.minimum} labelled images")


def _check_method(method: str, *, allow_auto: bool) -> str:
    allowed = METHODS + ((AUTO,) if allow_auto else ())
    if method not in allowed:
        raise ValueError(f"method must be one of {', '.join(allowed)}, got {method!r}")
    return method


def _parameter_count(method: str, num_classes: int) -> int:
    k = int(num_classes)
    return {"temperature": 1, "vector": 2 * k, "dirichlet": k * k + k}[method]


def _check_folds(folds: Any) -> int:
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    return int(folds)


def minimum_images(method: str, num_classes: int, folds: int = DEFAULT_FOLDS) -> int:
    """Fewest labelled images `fit_profile` accepts for ``method`` with ``folds`` folds.

    Each cross-fitting fit sees (folds - 1) / folds of the batch; that part must hold at least
    MIN_FIT_IMAGES images and IMAGES_PER_PARAMETER per parameter (vector: 2K, Dirichlet:
    K^2 + K). "auto" needs what temperature needs (the richer candidates are skipped when the
    batch is too small for them).
    """
    method = _check_method(method, allow_auto=True)
    folds = _check_folds(folds)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    base = "temperature" if method == AUTO else method
    per_fit = MIN_FIT_IMAGES
    if base != "temperature":
        per_fit = max(per_fit, IMAGES_PER_PARAMETER * _parameter_count(base, num_classes))
    return max(folds, math.ceil(per_fit * folds / (folds - 1)))


# --------------------------------------------------------------------------
# The calibrator
# --------------------------------------------------------------------------


def _finite_array(value: Any, shape_desc: str, name: str) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"parameter {name!r} must be {shape_desc} of numbers") from None
    if not np.all(np.isfinite(a)):
        raise ValueError(f"parameter {name!r} must be finite")
    return a


@dataclass(frozen=True)
class Calibrator:
    """A fitted recalibration map: ``method`` and JSON-serialisable ``parameters``.

    Build one with `fit_calibrator` or `Calibrator.from_parameters` (which validates).
    """

    method: str
    parameters: dict
    _arrays: dict = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.parameters, Mapping):
            raise ValueError("parameters must be a JSON object")
        arrays = _validate_parameters(self.method, self.parameters)
        object.__setattr__(self, "_arrays", arrays)
        object.__setattr__(self, "parameters", _to_json(self.method, arrays))

    @classmethod
    def from_parameters(cls, method: str, parameters: Mapping[str, Any]) -> Calibrator:
        """Rebuild from stored parameters; ValueError when they do not describe a valid map."""
        return cls(method=method, parameters=parameters)  # type: ignore[arg-type]

    @property
    def num_classes(self) -> int | None:
        """K the map was fitted for (None for temperature, which fits any K)."""
        b = self._arrays.get("bias")
        return None if b is None else int(b.shape[0])

    def log_probabilities(self, logits: ArrayLike) -> np.ndarray:
        """Calibrated log-probabilities [N, K] in float64."""
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim != 2:
            raise ValueError(f"logits must be 2-D [N, K], got shape {z.shape}")
        k = self.num_classes
        if k is not None and z.shape[1] != k:
            raise ValueError(f"this {self.method} calibrator expects K = {k} classes, got {z.shape[1]}")
        a = self._arrays
        if self.method == "temperature":
            return log_softmax(z, float(a["temperature"]))
        if self.method == "vector":
            return log_softmax(z * a["weights"] + a["bias"])
        return log_softmax(log_softmax(z) @ a["weights"].T + a["bias"])

    def probabilities(self, logits: ArrayLike) -> np.ndarray:
        """Calibrated probabilities [N, K] in float64 (rows sum to 1)."""
        return np.exp(self.log_probabilities(logits))


def _validate_parameters(method: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    _check_method(method, allow_auto=False)
    expected = {"temperature": {"temperature"}, "vector": {"weights", "bias"}, "dirichlet": {"weights", "bias"}}[method]
    keys = set(parameters)
    if keys != expected:
        raise ValueError(
            f"{method} parameters must have exactly the keys {sorted(expected)}, got {sorted(keys)}"
        )
    if method == "temperature":
        t = parameters["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating, np.integer)):
            raise ValueError("parameter 'temperature' must be a number")
        t = float(t)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"parameter 'temperature' must be positive and finite, got {t}")
        return {"temperature": t}
    b = _finite_array(parameters["bias"], "a list", "bias")
    w = _finite_array(parameters["weights"], "a list" if method == "vector" else "a K x K list", "weights")
    if b.ndim != 1 or b.shape[0] < 2:
        raise ValueError(f"parameter 'bias' must be a list of K >= 2 numbers, got shape {b.shape}")
    k = b.shape[0]
    want = (k,) if method == "vector" else (k, k)
    if w.shape != want:
        raise ValueError(f"parameter 'weights' must have shape {want} for K = {k}, got {w.shape}")
    return {"weights": w, "bias": b}


def _to_json(method: str, arrays: Mapping[str, Any]) -> dict[str, Any]:
    if method == "temperature":
        return {"temperature": float(arrays["temperature"])}
    return {"weights": np.asarray(arrays["weights"], dtype=np.float64).tolist(),
            "bias": np.asarray(arrays["bias"], dtype=np.float64).tolist()}


# --------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------


def _nll_grad(a: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean NLL of softmax(a) and its gradient with respect to a (one exp, one log per row)."""
    n = a.shape[0]
    rows = np.arange(n)
    shifted = a - a.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    total = e.sum(axis=1, keepdims=True)
    nll = float(np.mean(np.log(total[:, 0]) - shifted[rows, y]))
    g = e / total
    g[rows, y] -= 1.0
    return nll, g / n


def _fit_vector(z: np.ndarray, y: np.ndarray, t0: float) -> dict[str, np.ndarray]:
    k = z.shape[1]
    w0 = np.full(k, 1.0 / t0)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:k], theta[k:]
        f, g = _nll_grad(z * w + b, y)
        dw = (g * z).sum(axis=0) + 2 * VECTOR_L2 * (w - w0) / k
        db = g.sum(axis=0) + 2 * VECTOR_L2 * b / k
        f += VECTOR_L2 * (np.sum((w - w0) ** 2) + np.sum(b**2)) / k
        return f, np.concatenate([dw, db])

    theta = _lbfgs(loss, np.concatenate([w0, np.zeros(k)]))
    return {"weights": theta[:k], "bias": theta[k:]}


def _fit_dirichlet(z: np.ndarray, y: np.ndarray, t0: float) -> dict[str, np.ndarray]:
    k = z.shape[1]
    lp = log_softmax(z)
    off = ~np.eye(k, dtype=bool)
    n_off = k * (k - 1)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: k * k].reshape(k, k), theta[k * k :]
        f, g = _nll_grad(lp @ w.T + b, y)
        dw = g.T @ lp + 2 * DIRICHLET_OFFDIAG_L2 * np.where(off, w, 0.0) / n_off
        db = g.sum(axis=0) + 2 * DIRICHLET_BIAS_L2 * b / k
        f += DIRICHLET_OFFDIAG_L2 * np.sum(w[off] ** 2) / n_off + DIRICHLET_BIAS_L2 * np.sum(b**2) / k
        return f, np.concatenate([dw.ravel(), db])

    theta = _lbfgs(loss, np.concatenate([(np.eye(k) / t0).ravel(), np.zeros(k)]))
    return {"weights": theta[: k * k].reshape(k, k), "bias": theta[k * k :]}


def _lbfgs(loss, theta0: np.ndarray) -> np.ndarray:
    f0, _ = loss(theta0)
    res = minimize(loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": _MAXITER})
    theta = np.asarray(res.x, dtype=np.float64)
    # L-BFGS may stop on its iteration cap; it never returns worse than its start, but a
    # non-finite result is refused rather than served.
    if not (np.all(np.isfinite(theta)) and np.isfinite(res.fun)) or res.fun > f0:
        return theta0
    return theta


def fit_calibrator(logits: ArrayLike, labels: ArrayLike, method: str = "temperature") -> Calibrator:
    """Fit one recalibration map on (logits [N, K], labels [N]) by penalised NLL.

    ``vector`` and ``dirichlet`` start from the temperature fit. Raises ValueError for invalid
    input and TemperatureFitError when the batch cannot determine a temperature (N < 2).
    """
    _check_method(method, allow_auto=False)
    z, y = _validate_logits_labels(logits, labels)
    t0 = fit_temperature(z, y)
    if method == "temperature":
        arrays: dict[str, Any] = {"temperature": t0}
    elif method == "vector":
        arrays = _fit_vector(z, y, t0)
    else:
        arrays = _fit_dirichlet(z, y, t0)
    return Calibrator(method=method, parameters=_to_json(method, arrays))


# --------------------------------------------------------------------------
# Cross-fitted profile
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileFit:
    """What `fit_profile` returns.

    calibrator: fitted on all n images (what a profile serves);
    report: JSON-ready dict (n, folds, method, before/after, for "auto" the candidates);
    conformal: conformal calibration from the out-of-fold calibrated probabilities.
    """

    calibrator: Calibrator
    report: dict
    conformal: ConformalCalibration


def _fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """Fold of each image: a seeded permutation cut into ``folds`` near-equal parts."""
    perm = np.random.default_rng(seed).permutation(n)
    ids = np.empty(n, dtype=np.int64)
    for f, part in enumerate(np.array_split(perm, folds)):
        ids[part] = f
    return ids


def _out_of_fold(z: np.ndarray, y: np.ndarray, method: str, fold: np.ndarray, folds: int) -> np.ndarray:
    out = np.empty_like(z)
    for f in range(folds):
        held = fold == f
        cal = fit_calibrator(z[~held], y[~held], method)
        out[held] = cal.log_probabilities(z[held])
    return out


def _summary(log_probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    m = compute_metrics(log_probs, y, n_bins=15)
    return {"nll": m.nll, "ece_15": m.ece, "brier": m.brier, "accuracy": m.accuracy}


def fit_profile(
    logits: ArrayLike,
    labels: ArrayLike,
    method: str = "temperature",
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    reference: ArrayLike | None = None,
) -> ProfileFit:
    """Fit ``method`` on all images and report its effect by ``folds``-fold cross-fitting.

    reference: log-probabilities [N, K] the "before" figures are measured on (e.g. the card's
    temperature applied to the logits); default the uncalibrated softmax of ``logits``.
    Raises TooFewImagesError below `minimum_images`, ValueError for invalid input.
    """
    _check_method(method, allow_auto=True)
    folds = _check_folds(folds)
    z, y = _validate_logits_labels(logits, labels)
    n, k = z.shape
    need = minimum_images(method, k, folds)
    if n < need:
        raise TooFewImagesError(
            need, f"method {method!r} with {folds} folds needs at least {need} labelled images, got {n}"
        )
    if reference is None:
        before_lp = log_softmax(z)
    else:
        before_lp = np.asarray(reference, dtype=np.float64)
        if before_lp.shape != z.shape or not np.all(np.isfinite(before_lp)):
            raise ValueError(f"reference must be finite log-probabilities of shape {z.shape}")
    fold = _fold_ids(n, folds, seed)

    report: dict[str, Any] = {"n": int(n), "folds": folds, "seed": int(seed), "num_classes": int(k)}
    if method == AUTO:
        candidates = {}
        oof_by = {}
        for m in METHODS:
            if n < minimum_images(m, k, folds):
                candidates[m] = {"skipped": f"needs at least {minimum_images(m, k, folds)} images"}
                continue
            oof_by[m] = _out_of_fold(z, y, m, fold, folds)
            candidates[m] = {"cv_nll": float(-oof_by[m][np.arange(n), y].mean())}
        chosen = min(oof_by, key=lambda m: candidates[m]["cv_nll"])
        report["auto"] = {"candidates": candidates, "choice": chosen}
        oof = oof_by[chosen]
    else:
        chosen = method
        oof = _out_of_fold(z, y, method, fold, folds)

    report["method"] = chosen
    report["before"] = _summary(before_lp, y)
    report["after"] = _summary(oof, y)
    calibrator = fit_calibrator(z, y, chosen)
    conformal = ConformalCalibration(np.exp(oof), y)
    report["conformal_n"] = conformal.n
    return ProfileFit(calibrator=calibrator, report=report, conformal=conformal)
