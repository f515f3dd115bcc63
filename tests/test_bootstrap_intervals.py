"""Bootstrap intervals of accuracy, NLL and ECE (models.calibration.bootstrap)."""

from __future__ import annotations

import numpy as np
import pytest

from models.calibration import bootstrap_intervals, compute_metrics


def calibrated_logits(n, seed=0):
    """Logits whose softmax is the true label distribution: ECE near 0 for large n."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 5)) * 2.0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=row) for row in p])
    return logits, labels


def test_intervals_bracket_the_point_estimates_of_compute_metrics():
    logits, labels = calibrated_logits(2000)
    out = bootstrap_intervals(logits, labels, temperature=0.8, n_resamples=200, seed=1)
    full = compute_metrics(logits, labels, temperature=0.8)
    assert set(out) == {"accuracy", "nll", "ece"}
    for name, iv in out.items():
        assert iv.estimate == pytest.approx(getattr(full, name))
        assert iv.low <= iv.estimate <= iv.high
        assert iv.low < iv.high


def test_intervals_shrink_like_one_over_sqrt_n_and_repeat_with_the_seed():
    small = bootstrap_intervals(*calibrated_logits(500, seed=2), n_resamples=300, seed=0)
    large = bootstrap_intervals(*calibrated_logits(8000, seed=2), n_resamples=300, seed=0)
    width = lambda iv: iv.high - iv.low  # noqa: E731
    assert width(large["accuracy"]) < 0.5 * width(small["accuracy"])   # sqrt(16) = 4x narrower
    again = bootstrap_intervals(*calibrated_logits(500, seed=2), n_resamples=300, seed=0)
    assert again == small


@pytest.mark.parametrize("kwargs, match", [({"n_resamples": 1}, "n_resamples"),
                                           ({"confidence": 1.0}, "confidence"),
                                           ({"temperature": 0.0}, "temperature")])
def test_bad_arguments_are_value_errors(kwargs, match):
    logits, labels = calibrated_logits(50)
    with pytest.raises(ValueError, match=match):
        bootstrap_intervals(logits, labels, **kwargs)
