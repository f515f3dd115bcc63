"""Selective prediction math (models.calibration.selective) against brute force and hand-made cases.

The brute force takes the per-image definitions literally: every ordering of the images that
sorts them by confidence (all tie breaks) is enumerated and the top-k figures averaged, which is
what the module's "ties at their group's mean" rule claims to equal.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.calibration.selective import (
    accepted_count,
    accuracy_at_coverage,
    aurc,
    compact_curve,
    confidence_and_correct,
    e_aurc,
    format_summary,
    oracle_aurc,
    risk_coverage_curve,
    selective_report,
    threshold_for_accuracy,
)


# --- brute force ---------------------------------------------------------------------------------
def _orderings(conf):
    """Every index order that sorts `conf` descending (one per way of breaking the ties)."""
    return [p for p in itertools.permutations(range(len(conf)))
            if all(conf[p[i]] >= conf[p[i + 1]] for i in range(len(p) - 1))]


def brute_errors_top_k(conf, correct, k):
    orders = _orderings(conf)
    return sum(sum(not correct[i] for i in order[:k]) for order in orders) / len(orders)


def brute_aurc(conf, correct):
    n = len(conf)
    return sum(brute_errors_top_k(conf, correct, k) / k for k in range(1, n + 1)) / n


def brute_curve(conf, correct):
    points = []
    for t in sorted(set(conf), reverse=True):
        accepted = [ok for c, ok in zip(conf, correct) if c >= t]
        points.append((t, len(accepted) / len(conf), 1 - sum(accepted) / len(accepted)))
    return points


def brute_threshold(conf, correct, target):
    best = None
    for t in sorted(set(conf)):  # lowest first: the first that reaches the target wins
        accepted = [ok for c, ok in zip(conf, correct) if c >= t]
        if sum(accepted) / len(accepted) >= target - 1e-12:
            best = (t, len(accepted) / len(conf))
            break
    return best


# Confidences from a small grid so ties are common; n small enough to enumerate tie breaks.
small_batches = st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from([0.2, 0.4, 0.6, 0.8, 1.0]), min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n)))


@settings(max_examples=150, deadline=None)
@given(small_batches)
def test_curve_aurc_and_coverage_match_brute_force(batch):
    conf, correct = batch
    curve = risk_coverage_curve(conf, correct)
    got = np.column_stack([curve.threshold, curve.coverage, curve.risk])
    assert np.allclose(got, brute_curve(conf, correct))
    assert curve.accepted.tolist() == [round(c * len(conf)) for c in curve.coverage]
    assert aurc(conf, correct) == pytest.approx(brute_aurc(conf, correct))
    for point in accuracy_at_coverage(conf, correct, (0.5, 0.8, 0.9, 0.95, 1.0)):
        k = math.ceil(point.coverage * len(conf) - 1e-9)
        assert point.accepted == k
        assert point.risk == pytest.approx(brute_errors_top_k(conf, correct, k) / k)
        assert point.accuracy == pytest.approx(1 - point.risk)
        assert point.threshold == sorted(conf, reverse=True)[k - 1]


@settings(max_examples=150, deadline=None)
@given(small_batches, st.sampled_from([0.3, 0.5, 2 / 3, 0.75, 0.99, 1.0]))
def test_threshold_matches_brute_force(batch, target):
    conf, correct = batch
    got = threshold_for_accuracy(conf, correct, target)
    want = brute_threshold(conf, correct, target)
    if want is None:
        assert (got.achieved, got.threshold, got.coverage, got.accepted, got.accuracy) == (False, None, 0.0, 0, None)
    else:
        assert got.achieved and (got.threshold, got.coverage) == pytest.approx(want)
        accepted = [ok for c, ok in zip(conf, correct) if c >= got.threshold]
        assert got.accepted == len(accepted) and got.accuracy == pytest.approx(np.mean(accepted))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_random_batches_without_ties_follow_the_per_image_definition(n, seed):
    """Continuous confidences (no ties): the classic top-k definitions, an order-invariant result,
    and E-AURC >= 0."""
    rng = np.random.default_rng(seed)
    conf = rng.random(n)
    correct = rng.random(n) < conf          # confident images are more often right
    order = np.argsort(-conf)
    risk_k = np.cumsum(~correct[order]) / np.arange(1, n + 1)
    assert aurc(conf, correct) == pytest.approx(risk_k.mean())
    n_right = correct.sum()
    oracle = np.mean([max(0, k - n_right) / k for k in range(1, n + 1)])
    assert oracle_aurc(correct) == pytest.approx(oracle)
    assert e_aurc(conf, correct) >= -1e-12
    perm = rng.permutation(n)
    assert aurc(conf[perm], correct[perm]) == pytest.approx(aurc(conf, correct))
    curve = risk_coverage_curve(conf, correct)
    assert np.allclose(curve.risk, risk_k) and np.allclose(curve.threshold, conf[order])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 100), st.integers(0, 2**32 - 1))
def test_compact_curve_is_bounded_and_ends_at_full_coverage(n, steps, seed):
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 20, n) / 20.0    # many ties
    correct = rng.random(n) < 0.8
    points = compact_curve(conf, correct, steps)
    assert 1 <= len(points) <= min(n, steps)
    accepted = [p.accepted for p in points]
    assert accepted == sorted(set(accepted)) and accepted[-1] == n
    assert points[-1].coverage == 1.0 and points[-1].risk == pytest.approx(1 - correct.mean())
    for p in points:
        assert p.accepted == accepted_count(p.coverage, n)


# --- hand-made cases -------------------------------------------------------------------------------
def test_four_images_by_hand():
    conf, correct = [0.6, 0.9, 0.7, 0.8], [True, True, False, True]   # sorted: R R W R
    assert aurc(conf, correct) == pytest.approx((0 + 0 + 1 / 3 + 1 / 4) / 4)
    assert oracle_aurc(correct) == pytest.approx((0 + 0 + 0 + 1 / 4) / 4)
    curve = risk_coverage_curve(conf, correct)
    assert curve.threshold.tolist() == [0.9, 0.8, 0.7, 0.6]
    assert curve.risk.tolist() == pytest.approx([0, 0, 1 / 3, 1 / 4])
    at = accuracy_at_coverage(conf, correct)
    assert [p.accepted for p in at] == [2, 4, 4, 4]          # ceil(0.5*4)=2, ceil(3.2)=4, ...
    assert [p.accuracy for p in at] == pytest.approx([1, 0.75, 0.75, 0.75])
    assert at[0].threshold == 0.8
    t = threshold_for_accuracy(conf, correct, 0.99)
    assert (t.achieved, t.threshold, t.coverage, t.accepted, t.accuracy) == (True, 0.8, 0.5, 2, 1.0)
    t = threshold_for_accuracy(conf, correct, 0.75)           # exactly reached at full coverage
    assert (t.threshold, t.coverage) == (0.6, 1.0)


def test_ties_count_at_their_group_mean():
    conf, correct = [0.9, 0.5, 0.9], [True, True, False]
    curve = risk_coverage_curve(conf, correct)
    assert curve.threshold.tolist() == [0.9, 0.5] and curve.accepted.tolist() == [2, 3]
    assert curve.risk.tolist() == pytest.approx([0.5, 1 / 3])
    assert aurc(conf, correct) == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    one_third = accuracy_at_coverage(conf, correct, (1 / 3,))[0]
    assert (one_third.accepted, one_third.accuracy, one_third.threshold) == (1, 0.5, 0.9)
    assert threshold_for_accuracy(conf, correct, 0.6).threshold == 0.5   # 2/3 at full coverage
    assert not threshold_for_accuracy(conf, correct, 0.9).achieved      # 0.9 cannot split the tie


def test_all_correct_all_wrong_one_image():
    conf = [0.3, 0.9, 0.6]
    assert aurc(conf, [True] * 3) == 0 and e_aurc(conf, [True] * 3) == 0
    t = threshold_for_accuracy(conf, [True] * 3, 1.0)
    assert (t.threshold, t.coverage, t.accuracy) == (0.3, 1.0, 1.0)
    assert aurc(conf, [False] * 3) == 1 and oracle_aurc([False] * 3) == 1 and e_aurc(conf, [False] * 3) == 0
    assert not threshold_for_accuracy(conf, [False] * 3, 1e-9).achieved
    assert aurc([0.7], [True]) == 0 and aurc([0.7], [False]) == 1
    assert [p.accepted for p in accuracy_at_coverage([0.7], [True])] == [1, 1, 1, 1]
    assert threshold_for_accuracy([0.7], [True], 0.99).threshold == 0.7
    assert len(compact_curve([0.7], [True])) == 1


def test_worst_ranking_has_the_largest_e_aurc():
    correct = np.array([True] * 8 + [False] * 2)
    good = np.linspace(1, 0.5, 10)              # the wrong ones least confident: the oracle
    bad = good[::-1]
    assert e_aurc(good, correct) == pytest.approx(0)
    assert e_aurc(bad, correct) > 0.2


def test_report_from_probabilities():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    y = np.array([0, 0, 0, 1])                   # image 1 wrong, at confidence 0.8
    conf, correct = confidence_and_correct(p, y)
    assert conf.tolist() == [0.9, 0.8, 0.6, 0.55] and correct.tolist() == [True, False, True, True]
    report = selective_report(p, y, target_accuracy=0.99)
    d = report.to_dict()
    assert d["n"] == 4 and d["accuracy"] == 0.75 and d["aurc"] == pytest.approx(aurc(conf, correct))
    assert d["target"] == {"target_accuracy": 0.99, "achieved": True, "threshold": 0.9, "coverage": 0.25,
                           "accepted": 1, "accuracy": 1.0}
    assert [q["coverage"] for q in d["at_coverage"]] == [0.5, 0.8, 0.9, 0.95]
    assert len(d["risk_coverage_curve"]) == 4 and selective_report(p, y).target is None
    text = format_summary(report)
    assert "AURC" in text and "confidence >= 0.9000 keeps 25.00%" in text
    all_wrong = selective_report(p, 1 - p.argmax(axis=1), target_accuracy=0.5)
    assert all_wrong.target.achieved is False and "no confidence threshold reaches it" in format_summary(all_wrong)


@pytest.mark.parametrize("call, message", [
    (lambda: aurc([], []), "at least one"),
    (lambda: aurc([0.5, 0.6], [True]), "2 confidences for 1"),
    (lambda: aurc([float("nan")], [True]), "NaN"),
    (lambda: threshold_for_accuracy([0.5], [True], 0.0), "(0, 1]"),
    (lambda: threshold_for_accuracy([0.5], [True], float("nan")), "(0, 1]"),
    (lambda: threshold_for_accuracy([0.5], [True], 1.5), "(0, 1]"),
    (lambda: accuracy_at_coverage([0.5], [True], (0.0,)), "coverage"),
    (lambda: confidence_and_correct(np.zeros((2, 3)), [0]), "1 labels for 2"),
    (lambda: confidence_and_correct(np.zeros(3), [0]), "[N, K]"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        call()


@pytest.mark.training
def test_training_evaluate_prints_the_same_selective_summary(tiny_artifact, sample_archive, capsys):
    """`python -m training.evaluate --target-accuracy` reuses `selective_report` on the test split."""
    import json

    from models.calibration import softmax
    from training.evaluate import evaluate_artifact, main

    assert main([str(tiny_artifact), "--data", str(sample_archive), "--target-accuracy", "0.3"]) == 0
    out = capsys.readouterr().out
    result = evaluate_artifact(str(tiny_artifact), str(sample_archive))
    want = selective_report(softmax(result["logits"], result["temperature"]), result["dataset"].y_test,
                            target_accuracy=0.3)
    assert format_summary(want) in out and "AURC" in out
    assert main([str(tiny_artifact), "--data", str(sample_archive), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["selective"]
    assert got["aurc"] == pytest.approx(want.aurc) and got["target"] is None
