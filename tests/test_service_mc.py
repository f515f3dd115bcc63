"""MC dropout done right: vectorised sampling agrees with the naive T-pass loop, dropout is on,
BatchNorm is in inference mode, and serving never moves the BN moving statistics."""

from __future__ import annotations

import numpy as np
import pytest

from models.calibration.uncertainty import summarize_mc_samples
from tests.service_helpers import MODEL

T_VEC = 2000   # vectorised samples are cheap
T_NAIVE = 100  # each naive sample is a full eager forward pass


@pytest.fixture(scope="module")
def batch(sample_data):
    return sample_data.x_test[::15][:20]  # 20 images, two of each class


@pytest.fixture(scope="module")
def naive_logits(split_classifier, batch):
    """T_NAIVE full passes (backbone training=False, head training=True), seeded."""
    clf, _ = split_classifier
    return clf.mc_logits_naive(batch, T_NAIVE, seed=1234)


def test_vectorised_mc_agrees_with_naive_loop(split_classifier, batch, naive_logits):
    """Seeded: same per-class mean (z-test) and variance (ratio) of the calibrated softmax."""
    clf, card = split_classifier
    temperature = card["temperature"]
    vec = summarize_mc_samples(clf.mc_logits(batch, T_VEC, seed=99), temperature)
    naive = summarize_mc_samples(naive_logits, temperature)

    assert vec.variance.sum() > 0 and naive.variance.sum() > 0  # dropout is really sampling
    se = np.sqrt(vec.variance / T_VEC + naive.variance / T_NAIVE) + 1e-9
    z = np.abs(vec.mean - naive.mean) / se
    assert z.max() < 5.0, z.max()  # 200 comparisons; a 5-sigma miss is not chance
    per_image = vec.variance.sum(axis=1) / naive.variance.sum(axis=1)
    assert np.all((per_image > 0.4) & (per_image < 2.5)), per_image
    pooled = vec.variance.sum() / naive.variance.sum()
    assert 0.75 < pooled < 1.33, pooled
    np.testing.assert_allclose(vec.predictive_entropy, naive.predictive_entropy, atol=0.05)
    np.testing.assert_allclose(vec.mutual_information, naive.mutual_information, atol=0.02)


def test_mc_mean_logits_match_deterministic_so_bn_is_in_inference_mode(split_classifier, batch, naive_logits):
    """Inverted dropout before a linear head: E[MC logits] = deterministic logits. With BN in
    training mode the naive loop's features would use batch statistics and miss this badly."""
    clf, _ = split_classifier
    deterministic = clf.logits(batch)
    for samples in (clf.mc_logits(batch, T_VEC, seed=5), naive_logits):
        se = samples.std(axis=0) / np.sqrt(len(samples)) + 1e-6
        assert np.max(np.abs(samples.mean(axis=0) - deterministic) / se) < 5.0


def test_seeded_vectorised_samples_are_reproducible(split_classifier, batch):
    clf, _ = split_classifier
    a, b = clf.mc_logits(batch, 20, seed=3), clf.mc_logits(batch, 20, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, clf.mc_logits(batch, 20, seed=4))


def test_serving_never_changes_batchnorm_statistics(app_client, batch):
    model = app_client.app.state.registry.get(MODEL).classifier.model
    tracked = [w for w in model.weights if "moving" in w.path or "temperature" in w.path]
    assert len([w for w in tracked if "moving_mean" in w.path]) >= 5
    before = [np.array(w.numpy()) for w in tracked]
    every = [np.array(w.numpy()) for w in model.weights]
    for seed in range(3):
        r = app_client.post(f"/v1/models/{MODEL}/predict", json={"instances": batch.tolist()},
                            params={"mc_samples": 200, "seed": seed})
        assert r.status_code == 200
    labels = [i % 10 for i in range(len(batch))]
    assert app_client.post(f"/v1/models/{MODEL}/evaluate",
                           json={"instances": batch.tolist(), "labels": labels}).status_code == 200
    for w, old in zip(tracked, before):
        np.testing.assert_array_equal(w.numpy(), old, err_msg=w.path)
    for w, old in zip(model.weights, every):
        np.testing.assert_array_equal(w.numpy(), old, err_msg=w.path)
