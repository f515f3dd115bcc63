"""Tests for models.calibration.metrics and the reliability diagram."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.calibration import (
    CalibrationMetrics,
    ReliabilityBin,
    adaptive_calibration_error,
    compute_metrics,
    expected_calibration_error,
    log_softmax,
    reliability_bins,
    reliability_diagram_png,
    softmax,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=30, deadline=None)


def sample_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``probs``."""
    u = rng.random(probs.shape[0])[:, None]
    return np.minimum((u > np.cumsum(probs, axis=1)).sum(axis=1), probs.shape[1] - 1)


# A hand-computed example (2 classes, 5 bins); logits = log(p) so softmax = p.
HAND_P = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.55, 0.45]])
HAND_Y = np.array([0, 1, 1, 1])


# ---------------------------------------------------------------- softmax


def test_softmax_matches_exp_log_softmax_and_sums_to_one():
    x = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    p = softmax(x, 1.7)
    assert p.dtype == np.float64
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.exp(log_softmax(x, 1.7)), p, rtol=1e-12, atol=0)
    np.testing.assert_allclose(softmax(x * 2.0, 2.0), softmax(x), rtol=1e-6)


def test_softmax_saturated_logits_are_finite():
    x = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]])
    lp = log_softmax(x)
    assert np.all(np.isfinite(lp))
    np.testing.assert_allclose(lp[0], [0.0, -2e4, -1e4])
    np.testing.assert_allclose(softmax(x)[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(softmax(x)[1], [1 / 3] * 3)
    assert np.all(np.isfinite(log_softmax(x, 0.05)))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "hot", None])
def test_softmax_rejects_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        softmax([[1.0, 2.0]], bad)
    with pytest.raises(ValueError, match="temperature"):
        log_softmax([[1.0, 2.0]], bad)


# ---------------------------------------------------------------- hand-computed


def test_hand_computed_example():
    m = compute_metrics(np.log(HAND_P), HAND_Y, n_bins=5)
    # bins: (0.8,1]: conf .9,.9 acc .5 -> 2/4*.4; (0.6,0.8]: .7 vs 1 -> 1/4*.3;
    #       (0.4,0.6]: .55 vs 0 -> 1/4*.55
    assert m.ece == pytest.approx(0.2 + 0.075 + 0.1375, abs=1e-12)
    assert m.mce == pytest.approx(0.55, abs=1e-12)
    assert m.accuracy == 0.5
    assert m.nll == pytest.approx(-np.mean(np.log([0.9, 0.1, 0.7, 0.45])), abs=1e-12)
    assert m.brier == pytest.approx((0.02 + 1.62 + 0.18 + 0.605) / 4, abs=1e-12)
    # B = min(5, 4) = 4 equal-mass groups of one sample each
    assert m.adaptive_ece == pytest.approx((0.1 + 0.9 + 0.3 + 0.55) / 4, abs=1e-12)
    # class 0: |1-1.8| + .3 + .55; class 1: |1-.2| + |1-.7| + |1-.45|; both / 4
    assert m.classwise_ece == pytest.approx(1.65 / 4, abs=1e-12)
    assert m.n == 4 and m.n_bins == 5 and m.temperature == 1.0
    assert [b.count for b in m.bins] == [0, 0, 1, 1, 2]
    assert m.bins[0].accuracy is None and m.bins[0].mean_confidence is None
    assert m.bins[4].mean_confidence == pytest.approx(0.9)
    assert m.bins[4].accuracy == 0.5
    assert (m.bins[1].lower, m.bins[1].upper) == (0.2, 0.4)


def test_helpers_agree_with_compute_metrics():
    m = compute_metrics(np.log(HAND_P), HAND_Y, n_bins=5)
    conf = HAND_P.max(axis=1)
    correct = HAND_P.argmax(axis=1) == HAND_Y
    assert expected_calibration_error(conf, correct, n_bins=5) == pytest.approx(m.ece)
    assert adaptive_calibration_error(conf, correct, n_bins=5) == pytest.approx(
        m.adaptive_ece
    )
    assert [b.count for b in reliability_bins(conf, correct, n_bins=5)] == [
        b.count for b in m.bins
    ]


def test_small_ece_by_hand_from_probabilities():
    conf = [0.95, 0.95, 0.15, 0.5]
    correct = [1, 0, 0, 1]
    # (0.8,1]: 2/4*|.5-.95|; (0,0.2]: 1/4*.15; (0.4,0.6]: 1/4*.5
    assert expected_calibration_error(conf, correct, n_bins=5) == pytest.approx(
        0.5 * 0.45 + 0.25 * 0.15 + 0.25 * 0.5, abs=1e-12
    )


# ---------------------------------------------------------------- bin edges


def _bin_of(conf: float, n_bins: int) -> int:
    bins = reliability_bins([conf], [1], n_bins=n_bins)
    (idx,) = [i for i, b in enumerate(bins) if b.count]
    return idx


@pytest.mark.parametrize(
    ("conf", "n_bins", "expected"),
    [
        (1.0, 5, 4),
        (1.0, 15, 14),
        (0.0, 5, 0),
        (0.2, 5, 0),
        (0.4, 5, 1),  # (0.2, 0.4]
        (0.6, 5, 2),
        (0.8, 5, 3),
        (0.7, 10, 6),  # (0.6, 0.7]
        (0.4000001, 5, 2),
        (0.5, 1, 0),
    ],
)
def test_right_closed_bins(conf, n_bins, expected):
    assert _bin_of(conf, n_bins) == expected


def test_confidence_exactly_one_lands_in_last_bin_via_logits():
    m = compute_metrics([[1e4, -1e4], [-1e4, 1e4]], [0, 1], n_bins=10)
    assert m.bins[-1].count == 2
    assert m.bins[-1].mean_confidence == 1.0
    assert m.ece == 0.0 and m.mce == 0.0


# ---------------------------------------------------------------- properties


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 10), scale=st.floats(0.5, 4.0))
def test_ece_near_zero_for_calibrated_samples(seed, k, scale):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=scale, size=(40000, k))
    y = sample_labels(rng, softmax(z))
    m = compute_metrics(z, y)
    assert m.ece < 0.02
    assert m.adaptive_ece < 0.02


def _assert_metrics_close(a: CalibrationMetrics, b: CalibrationMetrics, tol: float):
    for field in ("accuracy", "nll", "brier", "ece", "mce", "adaptive_ece", "classwise_ece"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), abs=tol, rel=0), field
    assert (a.n, a.n_bins, a.temperature) == (b.n, b.n_bins, b.temperature)
    assert len(a.bins) == len(b.bins)
    for ba, bb in zip(a.bins, b.bins):
        assert (ba.lower, ba.upper, ba.count) == (bb.lower, bb.upper, bb.count)
        if ba.count:
            assert ba.mean_confidence == pytest.approx(bb.mean_confidence, abs=tol, rel=0)
            assert ba.accuracy == pytest.approx(bb.accuracy, abs=tol, rel=0)
        else:
            assert ba.mean_confidence is None and bb.mean_confidence is None


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 300),
    k=st.integers(2, 6),
    n_bins=st.integers(1, 20),
    coarse=st.booleans(),
)
def test_metrics_invariant_to_sample_permutation(seed, n, k, n_bins, coarse):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, k))
    if coarse:  # many tied confidences, to exercise equal-mass tie handling
        z = np.round(z)
    y = rng.integers(0, k, size=n)
    perm = rng.permutation(n)
    a = compute_metrics(z, y, n_bins=n_bins)
    b = compute_metrics(z[perm], y[perm], n_bins=n_bins)
    _assert_metrics_close(a, b, 1e-12)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 200), k=st.integers(2, 8))
def test_metric_ranges(seed, n, k):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(n, k))
    y = rng.integers(0, k, size=n)
    m = compute_metrics(z, y, temperature=float(rng.uniform(0.1, 5.0)))
    assert 0.0 <= m.accuracy <= 1.0
    assert 0.0 <= m.brier <= 2.0
    assert m.nll >= 0.0
    for v in (m.ece, m.mce, m.adaptive_ece, m.classwise_ece):
        assert 0.0 <= v <= 1.0
    assert m.ece <= m.mce + 1e-12
    assert sum(b.count for b in m.bins) == n


def test_saturated_logits_give_finite_metrics():
    z = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]])
    y = np.array([1, 1, 0])  # all confidently wrong
    m = compute_metrics(z, y)
    d = m.to_dict()
    assert all(math.isfinite(v) for v in d.values() if isinstance(v, float))
    assert m.nll == pytest.approx((2e4 + 2e4 + (2e4 + math.log(2))) / 3)
    assert m.accuracy == 0.0


def test_float32_and_int_logits_accepted():
    z = np.log(HAND_P)
    a = compute_metrics(z.astype(np.float32), HAND_Y, n_bins=5)
    assert a.ece == pytest.approx(0.4125, abs=1e-6)
    b = compute_metrics([[3, 1], [0, 2]], [0, 0])
    assert b.accuracy == 0.5
    c = compute_metrics(z, HAND_Y.astype(np.float64), n_bins=5)  # integral floats
    assert c.ece == pytest.approx(0.4125, abs=1e-12)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("logits", "labels", "kwargs", "match"),
    [
        ([1.0, 2.0], [0], {}, "2-D"),
        ([[[1.0, 2.0]]], [0], {}, "2-D"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), {}, "N == 0"),
        ([[1.0], [2.0]], [0, 0], {}, "at least 2 classes"),
        ([[1.0, 2.0], [3.0, 4.0]], [0], {}, "shape"),
        ([[1.0, 2.0], [3.0, 4.0]], [[0], [1]], {}, "shape"),
        ([[1.0, 2.0], [3.0, 4.0]], [0.0, 0.5], {}, "integer"),
        ([[1.0, 2.0], [3.0, 4.0]], [True, False], {}, "integer"),
        ([[1.0, 2.0], [3.0, 4.0]], ["a", "b"], {}, "integer"),
        ([[1.0, 2.0], [3.0, 4.0]], [0, 2], {}, r"\[0, 2\)"),
        ([[1.0, 2.0], [3.0, 4.0]], [-1, 0], {}, r"\[0, 2\)"),
        ([[1.0, np.nan], [3.0, 4.0]], [0, 1], {}, "non-finite"),
        ([[1.0, np.inf], [3.0, 4.0]], [0, 1], {}, "non-finite"),
        ([["a", "b"]], [0], {}, "numeric"),
        ([[1.0, 2.0]], [0], {"n_bins": 0}, "n_bins"),
        ([[1.0, 2.0]], [0], {"n_bins": 2.5}, "n_bins"),
        ([[1.0, 2.0]], [0], {"temperature": 0.0}, "temperature"),
        ([[1.0, 2.0]], [0], {"temperature": float("nan")}, "temperature"),
    ],
)
def test_compute_metrics_validation(logits, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(logits, labels, **kwargs)


@pytest.mark.parametrize(
    ("conf", "correct", "n_bins"),
    [
        ([], [], 5),
        ([0.5, 1.2], [1, 0], 5),
        ([0.5, -0.1], [1, 0], 5),
        ([0.5, np.nan], [1, 0], 5),
        ([0.5, 0.6], [1], 5),
        ([0.5, 0.6], [1, 2], 5),
        ([[0.5, 0.6]], [[1, 0]], 5),
        ([0.5, 0.6], [1, 0], 0),
    ],
)
def test_helper_validation(conf, correct, n_bins):
    for fn in (expected_calibration_error, adaptive_calibration_error, reliability_bins):
        with pytest.raises(ValueError):
            fn(conf, correct, n_bins=n_bins)


# ---------------------------------------------------------------- serialisation


def test_to_dict_is_json_serialisable_and_round_trips():
    m = compute_metrics(np.log(HAND_P), HAND_Y, n_bins=5, temperature=1.5)
    d = m.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["bins"][0]["accuracy"] is None
    assert back["bins"][0]["mean_confidence"] is None
    assert back["n_bins"] == 5 and len(back["bins"]) == 5
    assert CalibrationMetrics.from_dict(back) == m
    assert all(type(v) in (int, float, list) for v in d.values())


def test_dataclasses_are_frozen():
    m = compute_metrics(np.log(HAND_P), HAND_Y)
    with pytest.raises(AttributeError):
        m.ece = 0.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        m.bins[0].count = 3  # type: ignore[misc]
    assert isinstance(m.bins[0], ReliabilityBin)


# ---------------------------------------------------------------- diagram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_reliability_diagram_png_single_and_pair():
    rng = np.random.default_rng(1)
    z = rng.normal(scale=3.0, size=(500, 5))
    y = sample_labels(rng, softmax(z, 0.5))
    before = compute_metrics(z, y)
    after = compute_metrics(z, y, temperature=0.5, n_bins=10)
    one = reliability_diagram_png(before)
    two = reliability_diagram_png(before, after, title="CIFAR-10 test")
    for png in (one, two):
        assert isinstance(png, bytes)
        assert png.startswith(PNG_SIGNATURE)
        assert len(png) > 1000


def test_reliability_diagram_png_rejects_wrong_type():
    with pytest.raises(TypeError):
        reliability_diagram_png({"ece": 0.1})  # type: ignore[arg-type]


# ---------------------------------------------------------------- no TensorFlow


def test_import_does_not_pull_in_tensorflow():
    code = (
        "import sys, models.calibration as c; "
        "c.compute_metrics([[1.0, 2.0], [0.0, 1.0]], [1, 0]); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]; "
        "assert not bad, bad"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
