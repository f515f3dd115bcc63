"""Bootstrap confidence intervals for accuracy, NLL and ECE on one test set.

ECE on 10,000 images moves by a few tenths of a point between test sets of the same size, so a
single ECE figure cannot tell 1.47% from 1.68%. Resampling the (confidence, correct, NLL) triples
with replacement (scipy.stats.bootstrap, percentile method, paired) gives the spread that a
fresh test set of the same size would show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from .metrics import _check_n_bins, _check_temperature, _ece, _top_label, _validate_logits_labels


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def bootstrap_intervals(logits: ArrayLike, labels: ArrayLike, *, temperature: float = 1.0,
                        n_bins: int = 15, n_resamples: int = 1000, confidence: float = 0.95,
                        seed: int = 0) -> dict[str, Interval]:
    """Point estimate and `confidence` percentile interval of accuracy, NLL and ECE-`n_bins`."""
    t = _check_temperature(temperature)
    b = _check_n_bins(n_bins)
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 2:
        raise ValueError(f"n_resamples must be an integer >= 2, got {n_resamples!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    x, y = _validate_logits_labels(logits, labels)
    if len(y) < 2:
        raise ValueError("a bootstrap needs at least 2 samples")
    logp, conf, correct = _top_label(x, y, t)
    nll = -logp[np.arange(len(y)), y]
    statistics = {"accuracy": lambda c, k, l: float(k.mean()),
                  "nll": lambda c, k, l: float(l.mean()),
                  "ece": lambda c, k, l: _ece(c, k, b)}
    out = {}
    for name, fn in statistics.items():
        result = stats.bootstrap((conf, correct, nll), fn, paired=True, vectorized=False,
                                 n_resamples=int(n_resamples), confidence_level=float(confidence),
                                 method="percentile", random_state=np.random.default_rng(seed))
        ci = result.confidence_interval
        out[name] = Interval(fn(conf, correct, nll), float(ci.low), float(ci.high))
    return out
