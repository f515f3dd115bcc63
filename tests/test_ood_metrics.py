"""OOD metrics: plain NumPy, checked against scikit-learn (a test-only dependency)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from models.calibration.ood import (aupr, auroc, detection, fpr_at_tpr, threshold_at_tpr,
                                    uncertainty_scores)


def _sk(in_scores, out_scores):
    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    s = np.r_[in_scores, out_scores]
    return roc_auc_score(y, s), average_precision_score(y, s)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=40),
       st.lists(st.integers(0, 6), min_size=1, max_size=40))
def test_auroc_and_aupr_equal_scikit_learn_with_ties(a, b):
    """Small integer scores make ties common: both must be handled as scikit-learn does."""
    sk_auroc, sk_ap = _sk(a, b)
    assert auroc(a, b) == pytest.approx(sk_auroc, abs=1e-12)
    assert aupr(a, b) == pytest.approx(sk_ap, abs=1e-12)


def test_separable_and_reversed_scores():
    assert auroc([0.1, 0.2], [0.5, 0.9]) == 1.0
    assert auroc([0.5, 0.9], [0.1, 0.2]) == 0.0
    assert aupr([0.1, 0.2], [0.5, 0.9]) == 1.0
    assert fpr_at_tpr([0.1, 0.2], [0.5, 0.9]) == 0.0
    assert fpr_at_tpr([0.5, 0.9], [0.1, 0.2]) == 1.0


def test_identical_distributions_give_chance():
    rng = np.random.default_rng(0)
    s = rng.random(20000)
    t = rng.random(20000)
    assert auroc(s, t) == pytest.approx(0.5, abs=0.01)
    assert fpr_at_tpr(s, t) == pytest.approx(0.95, abs=0.01)


def test_threshold_lets_at_least_the_rate_pass():
    rng = np.random.default_rng(1)
    for n in (1, 7, 20, 101, 1000):
        s = rng.normal(size=n)
        for tpr in (0.5, 0.9, 0.95, 1.0):
            thr = threshold_at_tpr(s, tpr)
            passed = np.mean(s <= thr)
            assert passed >= tpr - 1e-12
            # the smallest such threshold: one value lower lets fewer than tpr pass
            below = s[s < thr]
            assert below.size / n < tpr


def test_fpr_matches_roc_curve_at_95_percent_in_distribution_pass_rate():
    rng = np.random.default_rng(2)
    s_in, s_out = rng.normal(0, 1, 5000), rng.normal(2, 1, 3000)
    thr = np.quantile(s_in, 0.95, method="inverted_cdf")
    assert fpr_at_tpr(s_in, s_out) == pytest.approx(np.mean(s_out <= thr))


def test_bad_scores_are_value_errors():
    with pytest.raises(ValueError, match="empty"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        aupr([np.nan], [1.0])
    with pytest.raises(ValueError, match="tpr"):
        threshold_at_tpr([1.0], 0.0)


def test_uncertainty_scores_and_detection_report():
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    scores = uncertainty_scores(p, mutual_information=[0.0, 0.1])
    np.testing.assert_allclose(scores["max_probability"], [0.0, 0.5])
    np.testing.assert_allclose(scores["predictive_entropy"], [0.0, np.log(2)])
    np.testing.assert_allclose(scores["mutual_information"], [0.0, 0.1])
    assert "mutual_information" not in uncertainty_scores(p)
    d = detection("predictive_entropy", [0.0, 0.1], [0.5, 0.7]).to_dict()
    assert d["auroc"] == 1.0 and d["n_in"] == 2 and d["mean_out"] == pytest.approx(0.6)
