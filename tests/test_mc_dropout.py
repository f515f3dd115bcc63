"""MC dropout on the head with BatchNorm in inference mode, vectorised over samples.

The statistical comparison with the naive T-pass loop is in tests/test_service_mc.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.calibration import softmax
from models.calibration.uncertainty import summarize_mc_samples


def _model(dropout: float, seed: int = 0, batchnorm: str = "keras"):
    import keras

    from models.network import NetworkConfig, build_classifier

    keras.utils.set_random_seed(seed)
    cfg = NetworkConfig(width=4, dropout=dropout, batchnorm=batchnorm)
    model = build_classifier(cfg)
    # give BatchNorm non-trivial moving statistics so inference mode is distinguishable
    for layer in model.get_layer("backbone").layers:
        if "bn" in layer.name:
            for w in layer.non_trainable_weights:
                is_mean = "mean" in w.path
                low, high = (-0.2, 0.2) if is_mean else (0.5, 1.5)
                w.assign(np.random.default_rng(1).uniform(low, high, w.shape).astype("float32"))
    return model


def _images(n=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_rate_zero_mc_mean_equals_deterministic_prediction():
    from models.inference import SplitClassifier

    clf = SplitClassifier(_model(dropout=0.0))
    x = _images()
    deterministic = softmax(clf.logits(x))
    mc = summarize_mc_samples(clf.mc_logits(x, n_samples=20, seed=3))
    np.testing.assert_allclose(mc.mean, deterministic, atol=1e-6)
    np.testing.assert_allclose(mc.variance, 0.0, atol=1e-12)
    np.testing.assert_allclose(mc.mutual_information, 0.0, atol=1e-6)


@pytest.mark.parametrize("batchnorm", ["keras", "fused", "custom"])
def test_mc_sampling_leaves_batchnorm_statistics_unchanged(batchnorm):
    from models.inference import SplitClassifier

    model = _model(dropout=0.5, batchnorm=batchnorm)
    before = [w.numpy().copy() for w in model.non_trainable_weights]
    clf = SplitClassifier(model)
    clf.mc_logits(_images(), n_samples=10, seed=0)
    clf.mc_logits_naive(_images(), n_samples=3)
    clf.logits(_images())
    after = [w.numpy() for w in model.non_trainable_weights]
    assert len(before) > 0
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b, a)


def test_dropout_gives_positive_variance_and_reproducible_seeds():
    from models.inference import SplitClassifier

    clf = SplitClassifier(_model(dropout=0.5))
    x = _images(8)
    s1 = clf.mc_logits(x, n_samples=50, seed=11)
    s2 = clf.mc_logits(x, n_samples=50, seed=11)
    s3 = clf.mc_logits(x, n_samples=50, seed=12)
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1, s3)
    assert np.abs(s1).max() > 0
    summary = summarize_mc_samples(s1, temperature=clf.temperature)
    assert summary.variance.shape == (8, 10)
    assert np.all(summary.variance > 0)
    assert np.all(summary.mutual_information > 0)
    np.testing.assert_allclose(summary.mean.sum(axis=1), 1.0, atol=1e-9)


def test_custom_layers_survive_save_and_load(tmp_path):
    import keras

    from models.inference import SplitClassifier

    model = _model(dropout=0.2, batchnorm="custom")
    model.get_layer("temperature").set_temperature(1.7)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True, compile=False)
    x = _images(4)
    a, b = SplitClassifier(model), SplitClassifier(loaded)
    assert b.temperature == pytest.approx(1.7)
    np.testing.assert_allclose(a.logits(x), b.logits(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a.mc_logits(x, 5, seed=2), b.mc_logits(x, 5, seed=2))
