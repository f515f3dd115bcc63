"""MC dropout on the head with BatchNorm in inference mode, vectorised over samples, and only
when asked for: plain Keras inference (`predict`, `model(x)`) is deterministic.

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
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), loaded.predict(x, verbose=0))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), a.logits(x) / 1.7, rtol=1e-5, atol=1e-5)


# --- plain Keras inference is deterministic; MC sampling is explicit ------------------------------

def test_plain_keras_inference_is_deterministic_and_equals_the_split_path():
    from models.inference import SplitClassifier

    model = _model(dropout=0.5)
    model.get_layer("temperature").set_temperature(1.3)
    clf = SplitClassifier(model)
    x = _images(32)
    first = model.predict(x, verbose=0)
    np.testing.assert_array_equal(first, model.predict(x, verbose=0))
    for out in (model(x), model(x, training=False)):
        np.testing.assert_allclose(out.numpy(), first, rtol=1e-5, atol=1e-5)
    # the model's output is the temperature-scaled deterministic logits
    np.testing.assert_allclose(first, clf.logits(x) / clf.temperature, rtol=1e-5, atol=1e-5)


def test_training_true_still_drops_units_in_the_head():
    """`fit` and the lab's tape step call the model with training=True: dropout must be on."""
    model = _model(dropout=0.5)
    head = model.get_layer("head")
    features = np.random.default_rng(0).normal(size=(8, int(head.input.shape[-1]))).astype("float32")
    np.testing.assert_array_equal(head(features).numpy(), head(features, training=False).numpy())
    a, b = head(features, training=True).numpy(), head(features, training=True).numpy()
    assert not np.allclose(a, b)
    # through the whole model too (BatchNorm's batch statistics are the same for both calls)
    x = _images(8)
    assert not np.allclose(model(x, training=True).numpy(), model(x, training=True).numpy())


def _exact_head_moments(clf, x):
    """Mean and variance of the MC logits in closed form: inverted dropout before a linear map."""
    from models.layers import MCDropout

    rate = next(layer.rate for layer in clf.head_layers if isinstance(layer, MCDropout))
    dense = clf.head.get_layer("logits")
    scale = float(clf.head.get_layer("logit_scale").scale)
    w = dense.kernel.numpy().astype(np.float64) * scale                    # [D, K]
    f = clf.features(x).astype(np.float64)                                 # [N, D]
    variance = rate / (1.0 - rate) * (f ** 2) @ (w ** 2)                   # [N, K]
    return clf.logits(x), variance


@pytest.mark.slow
def test_explicit_keras_mc_is_seeded_and_agrees_with_the_vectorised_path():
    from models.inference import SplitClassifier

    clf = SplitClassifier(_model(dropout=0.5))
    x = _images(8)
    keras_samples = clf.mc_logits_keras(x, 400, seed=5)
    np.testing.assert_array_equal(keras_samples, clf.mc_logits_keras(x, 400, seed=5))
    assert not np.array_equal(keras_samples, clf.mc_logits_keras(x, 400, seed=6))
    vectorised = clf.mc_logits(x, 4000, seed=1)
    mean, variance = _exact_head_moments(clf, x)
    assert np.all(variance > 0)
    for samples in (keras_samples, vectorised):
        t = len(samples)
        z = np.abs(samples.mean(axis=0) - mean) / np.sqrt(variance / t)
        assert z.max() < 5.0, z.max()                         # 80 comparisons
        ratio = samples.var(axis=0).sum(axis=1) / variance.sum(axis=1)
        assert np.all((ratio > 0.75) & (ratio < 1.33)), ratio
    # and the two paths against each other
    se = np.sqrt(keras_samples.var(axis=0) / 400 + vectorised.var(axis=0) / 4000)
    assert (np.abs(keras_samples.mean(axis=0) - vectorised.mean(axis=0)) / se).max() < 5.0


def test_a_head_with_state_is_rejected():
    """head(training=True) must change nothing but dropout: a BatchNorm in the head would."""
    import keras

    from models.inference import SplitClassifier
    from models.network import NetworkConfig, build_backbone, build_classifier

    cfg = NetworkConfig(width=4, dropout=0.2)
    backbone = build_backbone(cfg)
    head = keras.Sequential([keras.Input(backbone.output.shape[1:]), keras.layers.BatchNormalization(),
                             keras.layers.Dense(10)], name="head")
    with pytest.raises(TypeError, match="training=True"):
        SplitClassifier(build_classifier(cfg, backbone=backbone, head=head))
