"""The airbench-style recipe's pieces: whitening stem, Dirac init, shifted TTA views, schedule,
bias-scaled SGD, Lookahead, and an artifact round trip of the airbench architecture."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from models.network import NetworkConfig, build_backbone, build_classifier, set_whitening  # noqa: E402
from models.whitening import image_patches, patch_whitening_kernel  # noqa: E402


def correlated_images(n=200, seed=0):
    """Images whose neighbouring pixels and channels are strongly correlated, like photos."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 33, 33, 1))
    smooth = (base[:, :-1, :-1] + base[:, 1:, :-1] + base[:, :-1, 1:] + base[:, 1:, 1:]) / 4
    return np.concatenate([smooth, 0.8 * smooth + 0.2 * rng.normal(size=smooth.shape),
                           rng.normal(size=smooth.shape) * 0.3 + smooth], axis=-1).astype(np.float32)


def test_whitening_filters_decorrelate_patches():
    images = correlated_images()
    kernel = patch_whitening_kernel(images, kernel_size=2, eps=1e-6)
    assert kernel.shape == (2, 2, 3, 24)
    patches = image_patches(images, 2)
    before = np.cov(patches, rowvar=False)
    assert np.abs(before - np.diag(np.diag(before))).max() > 0.1     # the input is correlated
    whitened = patches @ kernel.reshape(12, 24)[:, :12]
    second_moment = whitened.T @ whitened / len(whitened)
    np.testing.assert_allclose(second_moment, np.eye(12), atol=1e-3)
    np.testing.assert_allclose(kernel.reshape(12, 24)[:, 12:], -kernel.reshape(12, 24)[:, :12])


def test_whitening_layer_is_the_numpy_patch_product():
    from models.layers import PatchWhitening

    images = correlated_images(8)
    layer = PatchWhitening(2)
    layer.build(images.shape)
    kernel = patch_whitening_kernel(images, 2)
    layer.set_filters(kernel)
    out = keras.ops.convert_to_numpy(layer(images))
    expected = (image_patches(images, 2) @ kernel.reshape(12, 24)).reshape(8, 31, 31, 24)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert [w.name for w in layer.trainable_weights] == ["bias"]    # the filters stay frozen


def test_whitening_needs_enough_patches():
    with pytest.raises(ValueError, match="patches"):
        patch_whitening_kernel(np.zeros((1, 2, 2, 3), np.float32), kernel_size=2)


def test_reflect_shift_matches_numpy():
    from models.layers import ReflectShift

    x = np.arange(2 * 5 * 5 * 3, dtype=np.float32).reshape(2, 5, 5, 3)
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="reflect")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(ReflectShift(1, 1)(x)), padded[:, :5, :5])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(ReflectShift(-1, -1)(x)), padded[:, 2:, 2:])
    assert keras.ops.convert_to_numpy(ReflectShift(1, 1)(x))[0, 1, 1, 0] == x[0, 0, 0, 0]


def test_dirac_init_makes_convs_start_as_identities():
    backbone = build_backbone(NetworkConfig(width=4, arch="airbench"))
    conv = backbone.get_layer("group2_conv1")            # 4 -> 8 channels
    kernel = conv.kernel.numpy()
    identity = np.zeros((3, 3, 4, 4), np.float32)
    identity[1, 1, np.arange(4), np.arange(4)] = 1.0
    np.testing.assert_array_equal(kernel[..., :4], identity)
    assert np.abs(kernel[..., 4:]).sum() > 0                  # the extra filters stay random


def test_translate_tta_averages_six_views_with_airbench_weights():
    from models.layers import HorizontalFlip, ReflectShift

    cfg = NetworkConfig(width=4, arch="airbench", translate_tta=True, dropout=0.0)
    model = build_classifier(cfg)
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    backbone = model.get_layer("backbone")
    feats = lambda v: keras.ops.convert_to_numpy(backbone(v, training=False))  # noqa: E731
    pair = lambda v: (feats(v) + feats(HorizontalFlip()(v))) / 2  # noqa: E731
    expected = 0.5 * pair(x) + 0.25 * pair(ReflectShift(1, 1)(x)) + 0.25 * pair(ReflectShift(-1, -1)(x))
    view = keras.Model(model.inputs, model.get_layer("features").output)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(view(x)), expected, rtol=1e-5, atol=1e-5)
    training_graph = build_classifier(cfg, test_time_views=False, backbone=backbone,
                                      head=model.get_layer("head"))
    single = keras.Model(training_graph.inputs, training_graph.get_layer("features").output)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(single(x)), feats(x), rtol=1e-5, atol=1e-6)


def test_airbench_artifact_round_trip(tmp_path):
    from models.artifact import load_artifact, save_artifact
    from models.inference import SplitClassifier

    cfg = NetworkConfig(width=4, arch="airbench", activation="gelu", translate_tta=True)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    backbone = build_backbone(cfg)
    set_whitening(backbone, x)
    model = build_classifier(cfg, backbone=backbone, temperature=0.7)
    save_artifact(model, {"name": "air", "temperature": 0.7}, tmp_path / "air")
    loaded = SplitClassifier(load_artifact(tmp_path / "air").model)
    original = SplitClassifier(model)
    np.testing.assert_allclose(loaded.logits(x), original.logits(x), rtol=1e-5, atol=1e-5)
    whiten = load_artifact(tmp_path / "air").model.get_layer("backbone").get_layer("whiten")
    np.testing.assert_allclose(whiten.kernel.numpy(), backbone.get_layer("whiten").kernel.numpy())


def test_piecewise_linear_schedule():
    from training.optimization import PiecewiseLinearSchedule

    s = PiecewiseLinearSchedule(2.0, total_steps=100, warmup_fraction=0.25, start=0.2, end=0.1)
    values = [float(s(step)) for step in (0, 25, 100, 200)]
    np.testing.assert_allclose(values, [0.4, 2.0, 0.2, 0.2], rtol=1e-6)
    assert float(s(10)) == pytest.approx(0.4 + 1.6 * 10 / 25)
    one_cycle = PiecewiseLinearSchedule(1.0, total_steps=10, warmup_fraction=0.5)
    assert float(one_cycle(0)) == 0.0 and float(one_cycle(10)) == 0.0


def test_bias_scaled_sgd_scales_only_batchnorm_shifts():
    from training.optimization import BiasScaledSGD

    layer = keras.layers.BatchNormalization()
    layer.build((None, 3))
    dense = keras.layers.Dense(3)
    dense.build((None, 3))
    variables = [layer.gamma, layer.beta, dense.kernel]
    before = [v.numpy().copy() for v in variables]
    grads = [keras.ops.ones_like(v) for v in variables]
    BiasScaledSGD(learning_rate=0.01, bias_lr_scale=64.0).apply_gradients(zip(grads, variables))
    steps = [b - v.numpy() for b, v in zip(before, variables)]
    np.testing.assert_allclose(steps[0], 0.01, rtol=1e-5)     # gamma: plain step
    np.testing.assert_allclose(steps[1], 0.64, rtol=1e-5)     # beta: 64x
    np.testing.assert_allclose(steps[2], 0.01, rtol=1e-5)     # kernels: plain step


def test_lookahead_pulls_weights_into_the_slow_average():
    from training.optimization import Lookahead

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    callback = Lookahead(total_steps=10, start_step=0, every=1, base_decay=0.5, power=0.0)
    callback.set_model(model)
    kernel = model.layers[0].kernel
    kernel.assign(np.full((2, 1), 2.0, np.float32))
    callback.on_train_batch_end(0)                        # first pull: snapshot only
    np.testing.assert_allclose(kernel.numpy(), 2.0)
    kernel.assign(np.full((2, 1), 4.0, np.float32))
    callback.on_train_batch_end(1)                        # slow = 0.5*2 + 0.5*4 = 3, copied back
    np.testing.assert_allclose(kernel.numpy(), 3.0)
    kernel.assign(np.full((2, 1), 5.0, np.float32))
    callback.on_epoch_end(0)                              # end of epoch: weights = slow average
    np.testing.assert_allclose(kernel.numpy(), 3.0)


def test_airbench_recipe_trains_end_to_end(sample_archive, tmp_path):
    from models.artifact import load_artifact, read_card
    from training.config import parse_args
    from training.evaluate import card_mismatches, evaluate_artifact
    from training.train import run

    out = tmp_path / "air"
    config = parse_args([
        "--data", str(sample_archive), "--output", str(out), "--epochs", "2", "--batch-size", "100",
        "--width", "4", "--arch", "airbench", "--bias-lr-scale", "64", "--lookahead",
        "--lr-start-factor", "0.2", "--lr-end-factor", "0.07", "--translate-tta",
        "--n-validation", "200", "--seed", "3", "--verbose", "0"])
    run(config)
    card = read_card(out)
    assert card["training"]["network"]["arch"] == "airbench"
    assert card["training"]["network"]["translate_tta"] is True
    assert len(card["training"]["history"]["loss"]) == 2
    assert np.isfinite(card["training"]["history"]["loss"]).all()
    assert card_mismatches(evaluate_artifact(str(out), str(sample_archive))) == []
    load_artifact(out)
