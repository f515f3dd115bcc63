"""FusedBatchNorm and quick_gelu: the faster stand-ins must compute what they replace."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from models.layers import FusedBatchNorm, quick_gelu  # noqa: E402
from models.network import NetworkConfig, build_backbone, build_classifier, set_whitening  # noqa: E402


def _pair(scale: bool, momentum: float = 0.6):
    """A Keras BatchNormalization and a FusedBatchNorm with equal, non-trivial weights."""
    rng = np.random.default_rng(0)
    ref = keras.layers.BatchNormalization(momentum=momentum, epsilon=1e-5, scale=scale)
    fused = FusedBatchNorm(momentum=momentum, epsilon=1e-5, scale=scale)
    for layer in (ref, fused):
        layer.build((None, 5, 5, 6))
    for w_ref, w_fused in zip(ref.weights, fused.weights):
        low, high = (0.5, 1.5) if ("variance" in w_ref.path or "gamma" in w_ref.path) else (-0.5, 0.5)
        value = rng.uniform(low, high, w_ref.shape).astype("float32")
        w_ref.assign(value)
        w_fused.assign(value)
    return ref, fused


def _grads(layer, x):
    import tensorflow as tf

    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        # nonlinear in y: through batch statistics a linear loss has an input gradient of ~0
        loss = tf.reduce_sum(tf.sin(y) * tf.range(1.0, 1.0 + y.shape[-1]))
    return y.numpy(), [g.numpy() for g in tape.gradient(loss, [x, *layer.trainable_variables])]


@pytest.mark.parametrize("scale", [True, False])
def test_fused_batchnorm_trains_like_keras_batchnorm(scale):
    x = np.random.default_rng(1).normal(2.0, 3.0, (16, 5, 5, 6)).astype("float32")
    ref, fused = _pair(scale)
    y_ref, g_ref = _grads(ref, x)
    y_fused, g_fused = _grads(fused, x)
    np.testing.assert_allclose(y_fused, y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_fused, g_ref):                      # input, (gamma,) beta
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    np.testing.assert_allclose(fused.moving_mean.numpy(), ref.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    # TensorFlow's fused op hands back the unbiased batch variance (n / (n - 1)) for the moving
    # average; Keras 3 uses the biased one. Both normalise the batch with the biased variance.
    batch_var = x.reshape(-1, 6).var(axis=0)
    start = _pair(scale)[0].moving_variance.numpy()
    np.testing.assert_allclose(fused.moving_variance.numpy(),
                               0.6 * start + 0.4 * batch_var * n / (n - 1), rtol=1e-4)
    np.testing.assert_allclose(ref.moving_variance.numpy(), 0.6 * start + 0.4 * batch_var, rtol=1e-4)


def test_fused_batchnorm_inference_frozen_and_fallback_paths_match_keras():
    x = np.random.default_rng(2).normal(0.0, 2.0, (4, 5, 5, 6)).astype("float32")
    ref, fused = _pair(scale=True)
    np.testing.assert_allclose(fused(x, training=False), ref(x, training=False), rtol=1e-5, atol=1e-5)
    fused.trainable = False                     # frozen: inference mode even with training=True
    before = fused.moving_mean.numpy().copy()
    np.testing.assert_allclose(fused(x, training=True), ref(x, training=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fused.moving_mean.numpy(), before)
    flat_ref, flat_fused = (keras.layers.BatchNormalization(epsilon=1e-5),
                            FusedBatchNorm(epsilon=1e-5))        # 2-D input: the Keras path
    v = x.reshape(-1, 6)
    np.testing.assert_allclose(flat_fused(v, training=True), flat_ref(v, training=True), rtol=1e-5, atol=1e-5)


def test_quick_gelu_is_close_to_exact_gelu():
    x = np.linspace(-8.0, 8.0, 4001).astype("float32")
    exact = keras.ops.convert_to_numpy(keras.activations.gelu(x, approximate=False))
    quick = keras.ops.convert_to_numpy(quick_gelu(x))
    assert np.abs(quick - exact).max() < 0.021
    assert np.abs(quick - exact).max() > 1e-3          # a different function, not an alias
    np.testing.assert_allclose(quick[x > 6], x[x > 6], rtol=1e-4)


@pytest.mark.training
def test_artifact_with_fast_layers_round_trips_under_safe_mode(tmp_path):
    from models.artifact import load_artifact, save_artifact
    from models.inference import SplitClassifier

    cfg = NetworkConfig(width=4, arch="airbench", activation="quick_gelu", batchnorm="fused",
                        translate_tta=True, dropout=0.0)
    x = np.random.default_rng(3).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    backbone = build_backbone(cfg)
    set_whitening(backbone, x)
    model = build_classifier(cfg, backbone=backbone, temperature=0.8)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    model.fit(x, keras.utils.to_categorical(np.arange(24) % 10, 10), epochs=1, verbose=0)  # moves BN stats
    save_artifact(model, {"name": "fast", "temperature": 0.8}, tmp_path / "fast")
    loaded = load_artifact(tmp_path / "fast").model
    bn = loaded.get_layer("backbone").get_layer("group1_bn1")
    assert isinstance(bn, FusedBatchNorm)
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               backbone.get_layer("group1_bn1").moving_variance.numpy())
    np.testing.assert_allclose(SplitClassifier(loaded).logits(x), SplitClassifier(model).logits(x),
                               rtol=1e-5, atol=1e-5)
