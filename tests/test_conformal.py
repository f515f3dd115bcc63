"""Split conformal sets (models.calibration.conformal) against crepes and MAPIE, and their properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.calibration.conformal import (
    METHODS,
    ConformalCalibration,
    check_coverage,
    conformal_report,
    conformity_scores,
    row_uniforms,
    split_conformal_report,
)

crepes = pytest.importorskip("crepes")
mapie_classification = pytest.importorskip("mapie.classification")
from sklearn.base import BaseEstimator, ClassifierMixin  # noqa: E402  (mapie's dependency)

SETTINGS = settings(max_examples=25, deadline=None)


def synthetic(seed: int, n: int, k: int, concentration: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Exchangeable (probabilities, labels): labels drawn from a sharpened copy of p (miscalibrated)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, concentration), size=n)
    sharp = p**2 / (p**2).sum(axis=1, keepdims=True)
    u = rng.random(n)[:, None]
    y = np.minimum((u > np.cumsum(sharp, axis=1)).sum(axis=1), k - 1)
    return p, y


# --------------------------------------------------------------------------
# Same sets as the established libraries
# --------------------------------------------------------------------------

# n_cal = 500: alpha (n + 1) is not an integer for these levels, where crepes' `p >= alpha`
# and the textbook `p > alpha` coincide.
COVERAGES = (0.8, 0.9, 0.95)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("coverage", COVERAGES)
def test_sets_equal_crepes(method, coverage):
    p, y = synthetic(0, 900, 10)
    cal = ConformalCalibration(p[:500], y[:500])
    test = p[500:]
    cal_scores = conformity_scores(p[:500], method)[np.arange(500), y[:500]]
    cc = crepes.ConformalClassifier().fit(cal_scores)
    test_scores = conformity_scores(test, method)
    reference = cc.predict_set(test_scores, confidence=coverage, smoothing=False).astype(bool)
    p_values = cc.predict_p(test_scores, smoothing=False)
    ours = cal.prediction_sets(test, coverage, method)
    np.testing.assert_array_equal(ours, reference)
    np.testing.assert_array_equal(ours, p_values > round(1 - coverage, 12))


@pytest.mark.parametrize("method", METHODS)
def test_mondrian_sets_equal_crepes_per_class(method):
    p, y = synthetic(1, 1200, 6)
    cal = ConformalCalibration(p[:700], y[:700])
    test = p[700:]
    cal_scores = conformity_scores(p[:700], method)[np.arange(700), y[:700]]
    cc = crepes.ConformalClassifier().fit(cal_scores, bins=y[:700])
    scores = conformity_scores(test, method)
    ours = cal.prediction_sets(test, 0.9, method, mondrian=True)
    for k in range(6):
        # crepes' Mondrian categories are per test object; ask it for candidate class k.
        p_k = cc.predict_p(scores[:, k], bins=np.full(len(test), k), smoothing=False)
        np.testing.assert_array_equal(ours[:, k], p_k > 0.1)  # alpha, not 1 - 0.9 = 0.0999...


class GivenProbabilities(ClassifierMixin, BaseEstimator):
    """A prefit 'classifier' whose features are its probabilities (so MAPIE sees ours)."""

    def fit(self, X, y):
        self.classes_ = np.arange(X.shape[1])
        self.n_features_in_ = X.shape[1]
        return self

    def predict_proba(self, X):
        return np.asarray(X)

    def predict(self, X):
        return np.argmax(X, axis=1)


def test_lac_thresholds_and_sets_equal_mapie():
    p, y = synthetic(2, 1000, 10)
    est = GivenProbabilities().fit(p, y)
    scc = mapie_classification.SplitConformalClassifier(
        est, confidence_level=list(COVERAGES), conformity_score="lac", prefit=True
    ).conformalize(p[:600], y[:600])
    _, sets = scc.predict_set(p[600:])
    quantiles = scc._mapie_classifier.conformity_score_function_.quantiles_  # MAPIE's own thresholds
    cal = ConformalCalibration(p[:600], y[:600])
    for j, c in enumerate(COVERAGES):
        assert cal.threshold(c, "lac") == pytest.approx(float(quantiles[j]), abs=0)
        np.testing.assert_array_equal(cal.prediction_sets(p[600:], c, "lac"), sets[:, :, j])


def test_randomised_scores_are_exact_where_deterministic_ones_are_not():
    """Peaked probabilities (like a T-scaled CIFAR-10 model): randomised APS/RAPS cover close to c;
    u = 1 (the non-randomised score) would cover far more, with much larger sets."""
    p, y = synthetic(7, 6000, 10, concentration=0.05)
    cal = ConformalCalibration(p[:3000], y[:3000])
    test, yt = p[3000:], y[3000:]
    for method in ("aps", "raps"):
        covered = cal.prediction_sets(test, 0.9, method)[np.arange(3000), yt].mean()
        assert 0.88 <= covered <= 0.92, (method, covered)
    ones = np.ones(3000)
    s_cal = conformity_scores(p[:3000], "aps", ones)[np.arange(3000), y[:3000]]
    q = np.sort(s_cal)[int(np.ceil(3001 * 0.9)) - 1]
    deterministic = conformity_scores(test, "aps", ones) <= q
    randomised = cal.prediction_sets(test, 0.9, "aps")
    assert deterministic.sum(axis=1).mean() > randomised.sum(axis=1).mean()


def test_row_uniforms_are_uniform_and_a_function_of_the_row():
    from scipy.stats import kstest

    p, _ = synthetic(8, 20000, 10)
    u = row_uniforms(p)
    assert np.all((u > 0) & (u < 1))
    assert kstest(u, "uniform").pvalue > 1e-4
    perm = np.random.default_rng(0).permutation(len(p))
    np.testing.assert_array_equal(row_uniforms(p[perm]), u[perm])  # not tied to the position in the batch
    cal = ConformalCalibration(p[:500], np.zeros(500, dtype=int))
    np.testing.assert_array_equal(cal.prediction_sets(p[perm][:50], 0.9, "aps"),
                                  cal.prediction_sets(p, 0.9, "aps")[perm][:50])


# --------------------------------------------------------------------------
# Definitions and edge rules
# --------------------------------------------------------------------------


def test_scores_by_hand():
    p = np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    np.testing.assert_allclose(conformity_scores(p, "lac"), 1 - p)
    # APS with u = 1: mass ranked at or above the class; tied classes share a rank.
    ones, halves = np.ones(2), np.full(2, 0.5)
    np.testing.assert_allclose(conformity_scores(p, "aps", ones), [[0.5, 0.8, 1.0], [0.4, 0.4, 1.0]])
    # u = 0.5: the mass strictly above plus half the class's own.
    np.testing.assert_allclose(conformity_scores(p, "aps", halves), [[0.25, 0.65, 0.9], [0.2, 0.2, 0.9]])
    # RAPS adds 0.01 * max(0, rank - 1): ranks [1, 2, 3] and [1, 1, 3].
    np.testing.assert_allclose(conformity_scores(p, "raps", ones), [[0.5, 0.81, 1.02], [0.4, 0.4, 1.02]])
    u = row_uniforms(p)
    np.testing.assert_allclose(conformity_scores(p, "aps"), conformity_scores(p, "aps", u))


def test_threshold_is_the_ceil_order_statistic():
    p = np.tile([[0.6, 0.4]], (9, 1))
    y = np.array([0] * 9)
    p[:, 0] = np.linspace(0.1, 0.9, 9)
    p[:, 1] = 1 - p[:, 0]
    cal = ConformalCalibration(p, y)
    scores = np.sort(1 - p[:, 0])
    # n = 9, c = 0.8: m = ceil(10 * 0.8) = 8 -> the 8th smallest score.
    assert cal.threshold(0.8, "lac") == scores[7]
    # c = 0.95: m = ceil(9.5) = 10 > n -> +inf, every class in every set.
    assert cal.threshold(0.95, "lac") == np.inf
    assert cal.prediction_sets(np.array([[0.999, 0.001]]), 0.95, "lac").all()


def test_mondrian_class_without_calibration_images_gets_all():
    p = np.array([[0.9, 0.1, 0.0]] * 4 + [[0.2, 0.7, 0.1]] * 4)
    y = np.array([0] * 4 + [1] * 4)
    q = ConformalCalibration(p, y).threshold(0.5, "lac", mondrian=True)
    assert q.shape == (3,) and np.isfinite(q[:2]).all() and q[2] == np.inf


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, float("nan"), float("inf"), "x", None, True])
def test_coverage_outside_open_interval_is_refused(bad):
    with pytest.raises(ValueError):
        check_coverage(bad)


def test_bytes_round_trip_and_refusals():
    p, y = synthetic(3, 50, 4)
    cal = ConformalCalibration(p, y)
    back = ConformalCalibration.from_bytes(cal.to_bytes())
    np.testing.assert_array_equal(back.probabilities, cal.probabilities)
    np.testing.assert_array_equal(back.labels, cal.labels)
    assert back.n == 50
    with pytest.raises(ValueError):
        ConformalCalibration.from_bytes(b"not an npz")
    import io

    buf = io.BytesIO()
    np.savez(buf, probabilities=np.array([{"a": 1}], dtype=object), labels=y, version=1)
    with pytest.raises(ValueError):  # an object array would need pickle
        ConformalCalibration.from_bytes(buf.getvalue())


@pytest.mark.parametrize(
    "probs, labels",
    [
        ([[0.5, 0.6]], [0]),  # rows must sum to 1
        ([[np.nan, 1.0]], [0]),
        ([[0.5, 0.5]], [2]),  # label >= K
        ([[0.5, 0.5]], [0, 1]),  # length mismatch
    ],
)
def test_invalid_calibration_sets_are_refused(probs, labels):
    with pytest.raises(ValueError):
        ConformalCalibration(np.array(probs), np.array(labels))


def test_report_by_hand():
    sets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 1]], dtype=bool)
    y = np.array([0, 2, 1, 1])
    r = conformal_report(sets, y)
    assert r["coverage"] == 0.5 and r["mean_set_size"] == 1.25
    assert r["singletons"] == 0.25 and r["empty"] == 0.25
    assert r["coverage_by_set_size"] == [
        {"size": 0, "n": 1, "coverage": 0.0},
        {"size": 1, "n": 1, "coverage": 1.0},
        {"size": 2, "n": 2, "coverage": 0.5},
    ]
    assert r["worst_class"] == {"class": 2, "n": 1, "coverage": 0.0}


def test_split_conformal_report_uses_disjoint_halves():
    p, y = synthetic(4, 301, 5)
    r = split_conformal_report(p, y, [0.9], ["lac", "aps"], seed=7)
    assert r["split"] == {"seed": 7, "calibration_n": 150, "test_n": 151}
    assert [x["method"] for x in r["results"]] == ["lac", "aps"]
    assert all(x["n"] == 151 and x["calibration_n"] == 150 for x in r["results"])


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    method=st.sampled_from(METHODS),
    coverage=st.sampled_from([0.7, 0.8, 0.9]),
    mondrian=st.booleans(),
)
def test_coverage_holds_on_exchangeable_data(seed, method, coverage, mondrian):
    """Averaged over 40 calibration draws the coverage is >= c (minus 4 standard errors)."""
    n_cal, n_test, reps, k = 150, 200, 40, 5
    p, y = synthetic(seed, reps * (n_cal + n_test), k)
    covered = []
    for r in range(reps):
        a = r * (n_cal + n_test)
        cal = ConformalCalibration(p[a : a + n_cal], y[a : a + n_cal])
        t = slice(a + n_cal, a + n_cal + n_test)
        sets = cal.prediction_sets(p[t], coverage, method, mondrian)
        covered.append(sets[np.arange(n_test), y[t]].mean())
    # Coverage of one draw has sd <= sqrt(c(1-c)/n_cal_class) + sampling of the test points.
    se = np.std(covered, ddof=1) / np.sqrt(reps)
    assert np.mean(covered) >= coverage - 4 * se - 1e-9


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    method=st.sampled_from(METHODS),
    c1=st.floats(0.05, 0.95),
    c2=st.floats(0.05, 0.95),
    mondrian=st.booleans(),
)
def test_sets_grow_with_coverage(seed, method, c1, c2, mondrian):
    lo, hi = sorted((c1, c2))
    p, y = synthetic(seed, 300, 4)
    cal = ConformalCalibration(p[:200], y[:200])
    small = cal.prediction_sets(p[200:], lo, method, mondrian)
    big = cal.prediction_sets(p[200:], hi, method, mondrian)
    assert not np.any(small & ~big)


def test_a_tiny_coverage_takes_the_smallest_score_and_an_empty_class_takes_every_class():
    """Found by the API fuzzer: coverage 5e-324 rounded (n+1)c to 0, and Mondrian thresholds then
    indexed an empty class's scores at -1 (a 500). The order statistic is at least the first."""
    from models.calibration.conformal import ConformalCalibration

    p = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    calibration = ConformalCalibration(p, np.array([0, 0, 1]))      # class 2 has no calibration image
    per_class = calibration.threshold(5e-324, "lac", mondrian=True)
    assert per_class[0] == pytest.approx(1 - 0.7) and per_class[1] == pytest.approx(1 - 0.7)
    assert per_class[2] == np.inf                                    # no score: the set keeps class 2
    assert calibration.threshold(5e-324, "lac") == pytest.approx(1 - 0.7)
    sets = calibration.prediction_sets(p, 5e-324, "lac", mondrian=True)
    assert sets[:, 2].all()
