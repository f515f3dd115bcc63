"""Temperature scaling (Guo et al. 2017): one scalar T fitted by minimising NLL.

The mean NLL of softmax(beta * z) is convex in beta = 1/T (its second
derivative is a variance under the softmax), so a bounded Brent search over
beta is reliable and needs neither gradients nor TensorFlow.

Documented fallbacks, returned rather than raised:

* every sample classified correctly with a positive margin: the NLL falls
  monotonically as T -> 0, so the result is clipped to the lower bound,
  ``bounds[0]``;
* every logit row constant: the NLL does not depend on T, so 1.0 is returned;
* more generally, an optimum outside ``bounds`` is clipped to the nearer bound
  (the endpoints are compared with the solver's interior point).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar

from .metrics import _check_temperature, _validate_logits_labels, log_softmax

__all__ = ["TemperatureFitError", "fit_temperature", "nll_at_temperature"]

_XATOL = 1e-8


class TemperatureFitError(ValueError):
    """The data cannot determine a temperature (too few samples or classes)."""


def _check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be a pair of numbers, got {bounds!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and 0.0 < lo < hi):
        raise ValueError(f"bounds must satisfy 0 < lower < upper < inf, got {bounds!r}")
    return lo, hi


def nll_at_temperature(logits: ArrayLike, labels: ArrayLike, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature)."""
    t = _check_temperature(temperature)
    x, y = _validate_logits_labels(logits, labels)
    return float(-np.mean(log_softmax(x, t)[np.arange(x.shape[0]), y]))


def fit_temperature(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """Temperature T in ``bounds`` minimising the mean NLL of softmax(logits / T).

    Raises TemperatureFitError for N < 2 or K < 2, ValueError for invalid input.
    """
    t_lo, t_hi = _check_bounds(bounds)
    shape = np.shape(logits)
    if len(shape) == 2 and (shape[0] < 2 or shape[1] < 2):
        raise TemperatureFitError(
            f"need at least 2 samples and 2 classes to fit a temperature, "
            f"got N = {shape[0]}, K = {shape[1]}"
        )
    x, y = _validate_logits_labels(logits, labels)
    rows = np.arange(x.shape[0])

    d = x - x.max(axis=1, keepdims=True)  # <= 0, row max exactly 0
    if not np.any(d):
        return 1.0  # constant rows: NLL independent of T

    d_y = d[rows, y]
    others = d.copy()
    others[rows, y] = -np.inf
    if np.all(d_y > others.max(axis=1)):
        return t_lo  # all correct with a margin: NLL decreasing as T -> 0

    def nll(beta: float) -> float:
        z = beta * d  # row max is 0, so the sum below is in [1, K]
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - beta * d_y))

    b_lo, b_hi = 1.0 / t_hi, 1.0 / t_lo
    res = minimize_scalar(
        nll, bounds=(b_lo, b_hi), method="bounded", options={"xatol": _XATOL}
    )
    beta = float(res.x)
    if not (np.isfinite(beta) and np.isfinite(res.fun)):
        raise TemperatureFitError(f"temperature solve failed: {res.message}")

    # Brent never evaluates the endpoints; compare them so a boundary optimum
    # is returned as exactly the bound.
    t_star = min(max(1.0 / beta, t_lo), t_hi)
    candidates = [(float(res.fun), t_star), (nll(b_hi), t_lo), (nll(b_lo), t_hi)]
    _, best_t = min(candidates, key=lambda c: c[0])
    return float(best_t)
