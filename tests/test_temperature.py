"""Tests for models.calibration.temperature."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.calibration import (
    TemperatureFitError,
    compute_metrics,
    fit_temperature,
    nll_at_temperature,
    softmax,
)

SETTINGS = settings(max_examples=30, deadline=None)


def sample_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    u = rng.random(probs.shape[0])[:, None]
    return np.minimum((u > np.cumsum(probs, axis=1)).sum(axis=1), probs.shape[1] - 1)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), t_true=st.floats(0.5, 3.0))
def test_recovers_known_temperature(seed, t_true):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(20000, 10))
    y = sample_labels(rng, softmax(z, t_true))
    t_hat = fit_temperature(z, y)
    # Empirical relative std is about 1.2% at this size; 6% is ~5 sigma.
    assert t_hat == pytest.approx(t_true, rel=0.06)


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 200),
    k=st.integers(2, 10),
    t=st.floats(1e-3, 1e3),
    coarse=st.booleans(),
)
def test_temperature_never_changes_accuracy(seed, n, k, t, coarse):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=5.0, size=(n, k))
    if coarse:
        z = np.round(z)  # ties in the argmax
    y = rng.integers(0, k, size=n)
    np.testing.assert_array_equal(np.argmax(z / t, axis=1), np.argmax(z, axis=1))
    assert compute_metrics(z, y, temperature=t).accuracy == compute_metrics(z, y).accuracy


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 300), k=st.integers(2, 6))
def test_fit_is_the_bounded_nll_minimum(seed, n, k):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, k))
    y = rng.integers(0, k, size=n)
    bounds = (0.05, 20.0)
    t_hat = fit_temperature(z, y, bounds=bounds)
    assert bounds[0] <= t_hat <= bounds[1]
    best = nll_at_temperature(z, y, t_hat)
    grid = np.geomspace(*bounds, 200)
    assert best <= min(nll_at_temperature(z, y, t) for t in grid) + 1e-7


def test_fit_improves_nll_of_overconfident_model():
    rng = np.random.default_rng(3)
    z = rng.normal(scale=3.0, size=(5000, 10))
    y = sample_labels(rng, softmax(z, 2.0))  # model is overconfident by T=2
    t_hat = fit_temperature(z, y)
    assert t_hat > 1.5
    before, after = compute_metrics(z, y), compute_metrics(z, y, temperature=t_hat)
    assert after.nll < before.nll
    assert after.ece < before.ece
    assert after.accuracy == before.accuracy


def test_all_correct_falls_back_to_lower_bound():
    z = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.9], [-1.0, -2.0, 5.0]])
    y = np.array([0, 1, 2])
    assert fit_temperature(z, y) == 0.05
    assert fit_temperature(z, y, bounds=(0.2, 4.0)) == 0.2


def test_all_wrong_clips_to_upper_bound():
    z = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.9], [-1.0, -2.0, 5.0]])
    y = np.array([1, 0, 1])
    assert fit_temperature(z, y) == 20.0
    assert fit_temperature(z, y, bounds=(0.2, 4.0)) == 4.0


def test_constant_rows_return_one():
    z = np.full((4, 3), 2.5)
    assert fit_temperature(z, [0, 1, 2, 0]) == 1.0


def test_saturated_logits_fit_is_finite():
    z = np.array([[1e4, -1e4], [1e4, -1e4], [-1e4, 1e4], [1e4, -1e4]])
    y = np.array([0, 1, 1, 0])
    t_hat = fit_temperature(z, y)
    assert np.isfinite(t_hat) and 0.05 <= t_hat <= 20.0
    assert np.isfinite(nll_at_temperature(z, y, t_hat))


def test_nll_at_temperature_matches_compute_metrics():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(50, 4))
    y = rng.integers(0, 4, size=50)
    assert nll_at_temperature(z, y, 1.7) == pytest.approx(
        compute_metrics(z, y, temperature=1.7).nll, abs=1e-12
    )


@pytest.mark.parametrize(
    ("logits", "labels"),
    [
        ([[1.0, 2.0]], [0]),  # N = 1
        (np.zeros((0, 3)), np.zeros(0, dtype=int)),  # N = 0
        ([[1.0], [2.0], [3.0]], [0, 0, 0]),  # K = 1
    ],
)
def test_degenerate_inputs_raise_temperature_fit_error(logits, labels):
    with pytest.raises(TemperatureFitError, match="at least 2"):
        fit_temperature(logits, labels)
    assert issubclass(TemperatureFitError, ValueError)


@pytest.mark.parametrize(
    ("logits", "labels", "kwargs"),
    [
        ([1.0, 2.0, 3.0], [0, 1, 2], {}),
        ([[1.0, 2.0], [1.0, np.nan]], [0, 1], {}),
        ([[1.0, 2.0], [1.0, 0.0]], [0, 2], {}),
        ([[1.0, 2.0], [1.0, 0.0]], [0, 0.5], {}),
        ([[1.0, 2.0], [1.0, 0.0]], [0], {}),
        ([[1.0, 2.0], [1.0, 0.0]], [0, 1], {"bounds": (0.0, 1.0)}),
        ([[1.0, 2.0], [1.0, 0.0]], [0, 1], {"bounds": (2.0, 1.0)}),
        ([[1.0, 2.0], [1.0, 0.0]], [0, 1], {"bounds": (0.1, float("inf"))}),
        ([[1.0, 2.0], [1.0, 0.0]], [0, 1], {"bounds": (0.1,)}),
    ],
)
def test_invalid_inputs_raise_value_error(logits, labels, kwargs):
    with pytest.raises(ValueError):
        fit_temperature(logits, labels, **kwargs)


@pytest.mark.parametrize("bad", [0.0, -2.0, float("inf"), float("nan")])
def test_nll_at_temperature_rejects_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        nll_at_temperature([[1.0, 2.0]], [0], bad)
