"""Recalibration maps and cross-fitted profiles (models.calibration.recalibration)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.calibration import compute_metrics, fit_temperature, log_softmax, softmax
from models.calibration.recalibration import (
    METHODS,
    Calibrator,
    TooFewImagesError,
    _fold_ids,
    fit_calibrator,
    fit_profile,
    minimum_images,
)


def class_biased(seed: int, n: int, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true model is softmax(w * z + b): per-class miscalibration a temperature cannot fix."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, k))
    w = np.linspace(0.4, 1.6, k)
    b = np.linspace(-1.0, 1.0, k)
    p = softmax(z * w + b)
    u = rng.random(n)[:, None]
    y = np.minimum((u > np.cumsum(p, axis=1)).sum(axis=1), k - 1)
    return z, y


def nll(logp: np.ndarray, y: np.ndarray) -> float:
    return float(-logp[np.arange(len(y)), y].mean())


def test_temperature_calibrator_is_the_temperature_fit():
    z, y = class_biased(0, 500)
    cal = fit_calibrator(z, y, "temperature")
    t = fit_temperature(z, y)
    assert cal.parameters == {"temperature": t}
    np.testing.assert_allclose(cal.probabilities(z), softmax(z, t))
    np.testing.assert_allclose(cal.log_probabilities(z), log_softmax(z, t))


@pytest.mark.parametrize("method", ["vector", "dirichlet"])
def test_expressive_maps_beat_temperature_on_per_class_miscalibration(method):
    z, y = class_biased(1, 4000)
    zt, yt = class_biased(2, 4000)
    t = fit_calibrator(z, y, "temperature")
    m = fit_calibrator(z, y, method)
    assert nll(m.log_probabilities(zt), yt) < nll(t.log_probabilities(zt), yt) - 0.01
    np.testing.assert_allclose(m.probabilities(zt).sum(axis=1), 1.0)


@pytest.mark.parametrize("method", METHODS)
def test_parameters_round_trip_through_json(method):
    z, y = class_biased(3, 800)
    cal = fit_calibrator(z, y, method)
    back = Calibrator.from_parameters(method, json.loads(json.dumps(cal.parameters)))
    np.testing.assert_array_equal(back.probabilities(z), cal.probabilities(z))


@pytest.mark.parametrize(
    "method, params",
    [
        ("temperature", {"temperature": -1.0}),
        ("temperature", {"temperature": float("nan")}),
        ("temperature", {"temperature": "2"}),
        ("temperature", {}),
        ("vector", {"weights": [1.0, 1.0], "bias": [0.0, 0.0, 0.0]}),
        ("vector", {"weights": [1.0, None], "bias": [0.0, 0.0]}),
        ("vector", {"weights": [1.0, 1.0], "bias": [0.0, 0.0], "extra": 1}),
        ("dirichlet", {"weights": [1.0, 0.0], "bias": [0.0, 0.0]}),
        ("dirichlet", {"weights": [[1, 0], [0, float("inf")]], "bias": [0.0, 0.0]}),
        ("platt", {"temperature": 1.0}),
        ("temperature", [1.0]),
    ],
)
def test_bad_parameters_are_a_value_error(method, params):
    with pytest.raises(ValueError):
        Calibrator.from_parameters(method, params)


def test_calibrator_refuses_logits_of_another_width():
    z, y = class_biased(4, 300)
    cal = fit_calibrator(z, y, "vector")
    with pytest.raises(ValueError):
        cal.probabilities(np.zeros((3, 4)))


def test_minimum_images():
    assert minimum_images("temperature", 10, 5) == 25  # 20 per fit, 4/5 of the batch
    assert minimum_images("vector", 10, 5) == 125  # 5 x 20 parameters
    assert minimum_images("dirichlet", 10, 5) == 688  # 5 x 110 parameters
    assert minimum_images("auto", 10, 5) == minimum_images("temperature", 10, 5)
    assert minimum_images("temperature", 10, 2) == 40
    with pytest.raises(ValueError):
        minimum_images("temperature", 10, 1)


@pytest.mark.parametrize("method", ["temperature", "vector", "dirichlet", "auto"])
def test_too_few_images_names_the_minimum(method):
    z, y = class_biased(5, 20, k=10)
    with pytest.raises(TooFewImagesError) as err:
        fit_profile(z, y, method)
    assert err.value.minimum == minimum_images(method, 10, 5)
    assert str(err.value.minimum) in str(err.value)


def test_profile_after_is_measured_out_of_fold():
    z, y = class_biased(6, 600)
    fit = fit_profile(z, y, "vector", folds=4, seed=3)
    fold = _fold_ids(600, 4, 3)
    oof = np.empty_like(z)
    for f in range(4):
        cal = fit_calibrator(z[fold != f], y[fold != f], "vector")
        oof[fold == f] = cal.log_probabilities(z[fold == f])
    assert fit.report["after"]["nll"] == pytest.approx(nll(oof, y), rel=1e-12)
    # ... and is worse than the in-sample NLL of the calibrator fitted on everything.
    assert fit.report["after"]["nll"] > nll(fit.calibrator.log_probabilities(z), y)
    assert fit.report["before"]["nll"] == pytest.approx(compute_metrics(z, y).nll)
    assert fit.conformal.n == 600
    np.testing.assert_allclose(fit.conformal.probabilities, np.exp(oof))
    assert fit.report["n"] == 600 and fit.report["folds"] == 4
    json.dumps(fit.report)


def test_profile_before_uses_the_reference():
    z, y = class_biased(7, 300)
    ref = log_softmax(z, 2.0)
    fit = fit_profile(z, y, "temperature", reference=ref)
    assert fit.report["before"]["nll"] == pytest.approx(nll(ref, y))
    with pytest.raises(ValueError):
        fit_profile(z, y, "temperature", reference=ref[:10])


def test_auto_picks_the_lowest_cross_validated_nll():
    z, y = class_biased(8, 1000)
    fit = fit_profile(z, y, "auto")
    cands = fit.report["auto"]["candidates"]
    assert set(cands) == set(METHODS)
    best = min(cands, key=lambda m: cands[m]["cv_nll"])
    assert fit.report["auto"]["choice"] == best == fit.calibrator.method == fit.report["method"]
    assert fit.report["after"]["nll"] == pytest.approx(cands[best]["cv_nll"])


def test_auto_skips_candidates_the_batch_is_too_small_for():
    z, y = class_biased(9, 100, k=10)
    fit = fit_profile(z, y, "auto")
    cands = fit.report["auto"]["candidates"]
    assert "skipped" in cands["vector"] and "skipped" in cands["dirichlet"]
    assert fit.calibrator.method == "temperature"


def test_invalid_input_is_a_value_error():
    z, y = class_biased(10, 100)
    bad = z.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        fit_profile(bad, y)
    with pytest.raises(ValueError):
        fit_profile(z, y[:-1])
    with pytest.raises(ValueError):
        fit_profile(z, np.where(y == 0, 5, y))
    with pytest.raises(ValueError):
        fit_profile(z, y, "platt")
