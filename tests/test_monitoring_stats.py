"""The monitoring statistics (`models.calibration.monitoring`) on synthetic data: the CBPE estimate
and its interval, KS, PSI and the chi-square of the class mix, the OOD binomial test, the
Bonferroni verdict and its false-alarm rate on in-distribution windows, and the labelled summary."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from models.calibration import monitoring as m


def _calibrated(rng, n, k=10, sharpness=3.0):
    """Probabilities and labels drawn from them: calibrated by construction."""
    z = rng.normal(size=(n, k)) * sharpness
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return p, y


def test_entropy_of_uniform_and_one_hot_rows():
    p = np.array([[0.25] * 4, [1.0, 0, 0, 0]])
    assert m.entropy(p) == pytest.approx([np.log(4), 0.0])


def test_cbpe_estimate_is_mean_confidence_and_covers_the_realised_accuracy():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(200):
        p, y = _calibrated(rng, 400)
        est = m.cbpe_accuracy(p.max(1))
        assert est.value == pytest.approx(p.max(1).mean())
        assert est.low < est.value < est.high
        covered += est.low <= float((p.argmax(1) == y).mean()) <= est.high
    assert 0.90 <= covered / 200 <= 0.99   # a 95% interval of the realised accuracy


def test_cbpe_rejects_an_empty_window():
    with pytest.raises(ValueError):
        m.cbpe_accuracy([])


def test_ks_matches_scipy_and_separates_shifted_entropies():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=300), rng.normal(size=2000)
    assert m.ks_two_sample(a, b) == pytest.approx(tuple(sps.ks_2samp(a, b))[:2])
    assert m.ks_two_sample(a + 0.5, b)[1] < 1e-6


def test_psi_is_zero_for_equal_mixes_and_grows_with_the_shift():
    assert m.psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    small = m.psi([30, 30, 40], [33, 33, 34])
    large = m.psi([70, 20, 10], [33, 33, 34])
    assert 0 < small < 0.1 < 0.2 < large
    # by hand: sum (a - e) ln(a / e)
    a, e = np.array([0.7, 0.2, 0.1]), np.array([33, 33, 34]) / 100
    assert large == pytest.approx(float(np.sum((a - e) * np.log(a / e))))
    assert np.isfinite(m.psi([0, 5, 5], [5, 5, 0]))  # empty classes are floored, not infinite


def test_class_prior_shift_is_the_two_sample_contingency_test():
    rng = np.random.default_rng(2)
    window, reference = rng.integers(0, 4, 500), rng.integers(0, 4, 3000)
    shift = m.class_prior_shift(window, reference, 4)
    table = np.stack([np.bincount(window, minlength=4), np.bincount(reference, minlength=4)])
    chi2, p, dof, _ = sps.chi2_contingency(table, correction=False)
    assert (shift.chi2, shift.p_value, shift.dof) == pytest.approx((chi2, p, dof))
    skewed = m.class_prior_shift(np.r_[np.zeros(300, int), rng.integers(0, 4, 200)], reference, 4)
    assert skewed.p_value < 1e-10 and skewed.psi > 0.2


def test_ood_share_test_is_one_sided():
    assert m.ood_share_test(50, 1000, 0.05) == pytest.approx(sps.binomtest(50, 1000, 0.05, alternative="greater").pvalue)
    assert m.ood_share_test(10, 1000, 0.05) > 0.99      # fewer flags than expected is no shift
    assert m.ood_share_test(120, 1000, 0.05) < 1e-10


def test_drift_verdict_uses_bonferroni_and_the_minimum():
    p = {"a": 0.004, "b": 0.5, "c": None}
    verdict = m.drift_verdict(p, n=1000, p_value=0.01, min_predictions=200)
    assert verdict.tests == 2 and verdict.p_value_per_test == pytest.approx(0.005)
    assert verdict.status and verdict.reasons == ["a"]
    assert not m.drift_verdict({"a": 0.006, "b": 0.5}, n=1000, p_value=0.01, min_predictions=200).status
    few = m.drift_verdict(p, n=50, p_value=0.01, min_predictions=200)
    assert not few.status and not few.enough
    psi = m.drift_verdict({"a": 0.5}, n=1000, p_value=0.01, min_predictions=200, psi_value=0.3, psi_threshold=0.2)
    assert psi.status and psi.reasons == ["class_prior_psi"]


def test_in_distribution_windows_rarely_flag_drift_and_shifted_ones_do():
    """The target's shape on synthetic data: at most 1 window in 20 flags on in-distribution data
    (the family-wise level 0.01, Bonferroni over the three tests), and a sharpness shift on half a
    window is caught."""
    rng = np.random.default_rng(3)
    ref_p, _ = _calibrated(rng, 5000)
    ref_h, ref_c = m.entropy(ref_p), ref_p.argmax(1)
    threshold = np.quantile(ref_h, 0.95)

    def verdict(p):
        h = m.entropy(p)
        shift = m.class_prior_shift(p.argmax(1), ref_c, 10)
        flagged = int((h > threshold).sum())
        return m.drift_verdict({"entropy_ks": m.ks_two_sample(h, ref_h)[1], "class_prior_chi2": shift.p_value,
                                "ood_share": m.ood_share_test(flagged, len(h), 0.05)},
                               n=len(h), p_value=0.01, min_predictions=200, psi_value=shift.psi, psi_threshold=0.2)

    alarms = sum(verdict(_calibrated(rng, 1000)[0]).status for _ in range(100))
    assert alarms <= 5
    clean, shifted = _calibrated(rng, 500)[0], _calibrated(rng, 500, sharpness=1.5)[0]
    result = verdict(np.r_[clean, shifted])
    assert result.status and "entropy_ks" in result.reasons


def test_labelled_summary_by_hand():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    y = np.array([0, 1, 1, 0])
    s = m.labelled_summary(p, y, n_bins=15)
    assert s["n"] == 4 and s["accuracy"] == pytest.approx(0.75)
    assert s["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.8, 0.7])))
    assert s["estimated_accuracy"] == pytest.approx(np.mean([0.9, 0.6, 0.8, 0.7]))
    assert s["estimated_minus_observed"] == pytest.approx(0.75 - 0.75)
    # ECE-15: each confidence alone in its bin: mean |conf - correct| weighted by 1/4
    assert s["ece_15"] == pytest.approx(np.mean([0.1, 0.6, 0.2, 0.3]))


def test_split_buckets_are_oldest_first_and_end_at_the_newest_row():
    assert m.split_buckets(10, 4, 5) == [(0, 2), (2, 6), (6, 10)]
    assert m.split_buckets(10, 4, 2) == [(2, 6), (6, 10)]
    assert m.split_buckets(0, 4, 2) == []


def test_ece_consistency_quantile_is_the_small_sample_noise_of_a_calibrated_model():
    """Calibrated rows (correct with probability = confidence) exceed ECE-15 0.05 often on 120 rows,
    but rarely their own consistency quantile; a 15-point over-confidence exceeds it."""
    from models.calibration.metrics import expected_calibration_error

    rng = np.random.default_rng(3)
    false_alarms, over_threshold = 0, 0
    for _ in range(40):
        conf = rng.uniform(0.5, 1.0, 120)
        correct = rng.random(120) < conf
        ece = expected_calibration_error(conf, correct, 15)
        floor = m.ece_consistency_quantile(conf, 15, draws=200, seed=int(rng.integers(1 << 30)))
        over_threshold += ece > 0.05
        false_alarms += ece > 0.05 and ece > floor
    assert over_threshold >= 20          # the fixed threshold alone would fire on most windows
    assert false_alarms <= 5             # the 95% quantile fires on about 1 window in 20
    conf = rng.uniform(0.5, 1.0, 2000)
    correct = rng.random(2000) < conf - 0.15
    assert expected_calibration_error(conf, correct, 15) > m.ece_consistency_quantile(conf, 15)
    with pytest.raises(ValueError):
        m.ece_consistency_quantile(np.array([]))
