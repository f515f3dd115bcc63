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


def test_each_test_time_view_runs_the_backbone_once():
    """Six distinct views: the unshifted pair carries half the weight without being run twice."""
    cfg = NetworkConfig(width=4, arch="airbench", translate_tta=True, dropout=0.0)
    backbone = build_backbone(cfg)
    build_classifier(cfg, backbone=backbone)
    assert len(backbone._inbound_nodes) == 6   # one graph node per backbone call
    mirror_only = build_backbone(cfg)
    build_classifier(NetworkConfig(width=4, arch="airbench", dropout=0.0), backbone=mirror_only)
    assert len(mirror_only._inbound_nodes) == 2


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
    callback.on_epoch_end(0)                              # an epoch end leaves the fast weights
    np.testing.assert_allclose(kernel.numpy(), 5.0)
    callback.on_train_end()                               # end of training: weights = slow average
    np.testing.assert_allclose(kernel.numpy(), 3.0)


def test_freeze_layers_after_stops_them_together_and_trains_the_rest():
    from training.optimization import FreezeLayersAfter

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="first"),
                              keras.layers.BatchNormalization(name="norm"),
                              keras.layers.Dense(2, name="second")])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    snapshots = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots.append({"first": np.array(model.get_layer("first").kernel.numpy()),
                              "mean": np.array(model.get_layer("norm").moving_mean.numpy()),
                              "second": np.array(model.get_layer("second").kernel.numpy())})

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 3)), rng.normal(size=(64, 2))
    initial = np.array(model.get_layer("first").kernel.numpy())
    frozen = [model.get_layer("first"), model.get_layer("norm")]
    model.fit(x, y, batch_size=16, epochs=4, verbose=0,
              callbacks=[FreezeLayersAfter(frozen, epochs=2), Record()])
    assert not np.allclose(snapshots[1]["first"], initial)                 # trained in epochs 1-2
    np.testing.assert_array_equal(snapshots[3]["first"], snapshots[1]["first"])   # then frozen,
    np.testing.assert_array_equal(snapshots[3]["mean"], snapshots[1]["mean"])     # BN statistics too
    assert not np.allclose(snapshots[3]["second"], snapshots[1]["second"])  # the rest trains on
    assert not any(layer.trainable for layer in frozen)


@pytest.mark.training
def test_airbench_recipe_trains_end_to_end(sample_archive, tmp_path):
    from models.artifact import load_artifact, read_card
    from training.config import parse_args
    from training.evaluate import card_mismatches, evaluate_artifact
    from training.train import run

    out = tmp_path / "air"
    config = parse_args([
        "--data", str(sample_archive), "--output", str(out), "--epochs", "2", "--batch-size", "50",
        "--width", "4", "--arch", "airbench", "--bias-lr-scale", "64", "--lookahead",
        "--lr-start-factor", "0.2", "--lr-end-factor", "0.07", "--translate-tta",
        "--group-widths", "4,8,6", "--alternate-flip", "--validate-every", "0", "--whiten-bias-epochs", "1",
        "--freeze-group1-epochs", "1", "--activation", "quick_gelu", "--batchnorm", "fused", "--low-res-epochs", "1",
        "--n-validation", "100", "--seed", "3", "--verbose", "0"])  # 200 of the 300 fixture images train
    run(config)
    card = read_card(out)
    network = card["training"]["network"]
    assert (network["arch"], network["activation"], network["batchnorm"]) == ("airbench", "quick_gelu", "fused")
    assert network["translate_tta"] is True
    assert network["group_widths"] == [4, 8, 6]
    assert len(card["training"]["history"]["loss"]) == 2
    assert "val_loss" not in card["training"]["history"]      # no validation passes during fit
    assert card["training"]["config"]["low_res_epochs"] == 1   # epoch 1 on 24x24 crops
    assert card["training"]["config"]["freeze_group1_epochs"] == 1   # then group 1 frozen
    assert tuple(load_artifact(out).model.input.shape) == (None, 32, 32, 3)
    assert card["metrics"]["validation_after_temperature"]["n"] == 100   # but T was fitted on it
    assert np.isfinite(card["training"]["history"]["loss"]).all()
    assert card_mismatches(evaluate_artifact(str(out), str(sample_archive))) == []
    load_artifact(out)


def test_validation_epochs_every_n_and_always_the_last_or_none():
    from training.train import validation_epochs

    assert validation_epochs(12, 100) == [12]
    assert validation_epochs(5, 2) == [2, 4, 5]
    assert validation_epochs(4, 1) == [1, 2, 3, 4]
    assert validation_epochs(12, 0) == []


def test_group_widths_set_the_three_conv_groups():
    backbone = build_backbone(NetworkConfig(width=4, arch="airbench", group_widths=(4, 16, 12)))
    assert [backbone.get_layer(f"group{i}_conv2").filters for i in (1, 2, 3)] == [4, 16, 12]
    assert backbone.output.shape[-1] == 12
    with pytest.raises(ValueError, match="group_widths"):
        build_backbone(NetworkConfig(width=4, arch="airbench", group_widths=(4, 16)))


def test_conv_group_layers_are_the_groups_convs_and_batchnorms():
    from models.network import conv_group_layers

    backbone = build_backbone(NetworkConfig(width=4, arch="airbench", group_widths=(4, 16, 12)))
    assert [layer.name for layer in conv_group_layers(backbone, 1)] == [
        "group1_conv1", "group1_bn1", "group1_conv2", "group1_bn2"]


def _flip_history(ds, left_value):
    """image tag -> list of 'was mirrored' per appearance; the tag sits in the top-left pixel."""
    seen = {}
    for images, _ in ds:
        for im in images.numpy():
            mirrored = im[5, 0, 0] != left_value
            tag = int(im[0, 31, 0] if mirrored else im[0, 0, 0])
            seen.setdefault(tag, []).append(bool(mirrored))
    return seen


def test_alternate_flip_mirrors_each_image_in_every_other_epoch():
    from training.pipeline import training_dataset

    x = np.zeros((12, 32, 32, 3), np.uint8)
    x[:, :, :16] = 200                                     # bright left half shows the orientation
    x[:, 0, 0, 0] = np.arange(12) + 1                      # a tag per image
    ds = training_dataset(x, np.arange(12) % 10, batch_size=4, num_classes=10, seed=5, pad=0,
                          alternate_flip=True, epochs=5)
    seen = _flip_history(ds, left_value=200)
    assert sorted(seen) == list(range(1, 13))
    for flips in seen.values():
        assert len(flips) == 5
        assert all(a != b for a, b in zip(flips, flips[1:]))   # strictly alternating
    assert {flips[0] for flips in seen.values()} == {True, False}  # random phase per image
    with pytest.raises(ValueError, match="epochs"):
        training_dataset(x, np.arange(12) % 10, batch_size=4, num_classes=10, seed=5,
                         alternate_flip=True)


def test_multi_epoch_dataset_draws_fresh_crops_every_epoch():
    """With `epochs`, the step counter runs on, so epoch 2 does not replay epoch 1's crops."""
    import tensorflow as tf

    from training.pipeline import training_dataset

    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    ds = training_dataset(x, np.zeros(8, np.int64), batch_size=8, num_classes=10, seed=1, pad=2,
                          epochs=3)
    batches = [images.numpy() for images, _ in ds]
    assert len(batches) == 3
    # The same 8 images each epoch (one batch), but the augmented pixels differ between epochs.
    sums = [np.sort(b.reshape(8, -1).astype(np.int64).sum(1)) for b in batches]
    assert not all(np.array_equal(sums[0], s) for s in sums[1:])
    assert isinstance(ds, tf.data.Dataset)


def test_low_res_steps_are_random_crops_of_the_padded_images_then_full_size():
    from training.pipeline import training_dataset

    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    ds = training_dataset(x, np.zeros(8, np.int64), batch_size=4, num_classes=10, seed=1, pad=2,
                          epochs=2, low_res_size=24, low_res_steps=3)
    batches = [images.numpy() for images, _ in ds]
    assert [b.shape[1:3] for b in batches] == [(24, 24)] * 3 + [(32, 32)]
    padded = [np.pad(im, [(2, 2), (2, 2), (0, 0)], mode="reflect") for im in (*x, *x[:, :, ::-1])]
    windows = {padded_im[oy:oy + 24, ox:ox + 24].tobytes()
               for padded_im in padded for oy in range(13) for ox in range(13)}
    crops = [crop.tobytes() for b in batches[:3] for crop in b]
    assert all(c in windows for c in crops)               # each one a window of a (mirrored) image
    offsets = {(oy, ox) for padded_im in padded for oy in range(13) for ox in range(13)
               if padded_im[oy:oy + 24, ox:ox + 24].tobytes() in crops}
    assert len(offsets) > 3                               # at random places, not one fixed window


def test_any_size_backbone_trains_on_small_crops_and_moves_its_weights_to_32px():
    cfg = NetworkConfig(width=4, arch="airbench", group_widths=(4, 8, 6))
    images = np.random.default_rng(2).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    flexible = build_backbone(cfg, any_size=True)
    set_whitening(flexible, images)
    assert tuple(flexible.input.shape) == (None, None, None, 3)
    small = keras.ops.convert_to_numpy(flexible(images[:, 4:28, 4:28], training=False))
    assert small.shape == (6, 6) and np.isfinite(small).all()
    fixed = build_backbone(cfg)
    fixed.set_weights(flexible.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fixed(images, training=False)),
                               keras.ops.convert_to_numpy(flexible(images, training=False)),
                               rtol=1e-6, atol=1e-6)


def test_orthogonalize_keeps_singular_vectors_and_flattens_singular_values():
    from training.optimization import orthogonalize

    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    v, _ = np.linalg.qr(rng.normal(size=(72, 16)))
    g = (u * np.geomspace(1.0, 20.0, 16)) @ v.T            # condition number 20
    for matrix, left, right in [(g, u, v), (g.T, v, u)]:   # wide and tall
        x = keras.ops.convert_to_numpy(orthogonalize(keras.ops.convert_to_tensor(matrix.astype(np.float32))))
        core = left.T @ x @ right                          # diagonal if singular vectors are kept
        assert np.abs(core - np.diag(np.diag(core))).max() < 1e-3
        assert 0.6 < np.diag(core).min() and np.diag(core).max() < 1.3   # 1..20 squeezed to ~0.7..1.2


def _muon_step(kernel, gradient, **kw):
    from training.optimization import MuonSGD

    var = keras.Variable(kernel, name="kernel")
    opt = MuonSGD(learning_rate=0.5, momentum=0.85, nesterov=True, muon_lr=0.2, peak_lr=0.5, **kw)
    opt.apply_gradients([(keras.ops.convert_to_tensor(gradient), var)])
    return var.numpy()


def test_muon_normalises_conv_kernels_and_ignores_radial_gradients():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
    # A gradient along w (an L2 penalty's 2*l2*w) moves nothing but the norm: w -> w*sqrt(8)/|w|.
    np.testing.assert_allclose(_muon_step(w, 3.0 * w), w * np.sqrt(8) / np.linalg.norm(w), rtol=1e-5)
    # A tangential gradient: the step is lr_muon * (an orthogonalised matrix) and goes downhill.
    g = rng.normal(size=w.shape).astype(np.float32)
    g -= (g * w).sum() / (w * w).sum() * w
    new = _muon_step(w, g)
    start = w * np.sqrt(8) / np.linalg.norm(w)
    step = (start - new).reshape(-1, 8)
    s = np.linalg.svd(step, compute_uv=False)
    assert 0.2 * 0.3 < s.min() and s.max() < 0.2 * 1.6 * (1 + 0.6)   # lr 0.2, Nesterov factor
    assert (step * g.reshape(-1, 8)).sum() > 0


def test_muon_leaves_dense_kernels_and_biases_to_sgd():
    from training.optimization import MuonSGD

    dense = keras.Variable(np.ones((4, 2), np.float32), name="kernel")
    beta = keras.Variable(np.zeros(3, np.float32), name="beta")
    opt = MuonSGD(learning_rate=0.1, momentum=0.9, nesterov=False, bias_lr_scale=10.0,
                  muon_lr=0.2, peak_lr=0.1)
    opt.apply_gradients([(np.full((4, 2), 1.0, np.float32), dense), (np.ones(3, np.float32), beta)])
    np.testing.assert_allclose(dense.numpy(), 1.0 - 0.1)          # plain SGD step
    np.testing.assert_allclose(beta.numpy(), -0.1 * 10.0)          # bias-scaled SGD step
    with pytest.raises(ValueError, match="momentum"):
        MuonSGD(learning_rate=0.1, momentum=0.0)


@pytest.mark.training
def test_muon_inside_fit_keeps_conv_kernel_norms_near_sqrt_out():
    """Through `fit` the TF backend hands the optimizer tf.Variables: the 4-D test still routes."""
    from training.optimization import MuonSGD

    keras.utils.set_random_seed(0)
    net = NetworkConfig(width=4, arch="airbench", group_widths=(4, 8, 8), l2=1e-3)
    model = build_classifier(net, test_time_views=False)
    set_whitening(model.get_layer("backbone"), np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    model.compile(optimizer=MuonSGD(learning_rate=0.05, momentum=0.85, nesterov=True, muon_lr=0.05, peak_lr=0.05),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    convs = [l for l in model.get_layer("backbone").layers if isinstance(l, keras.layers.Conv2D)]
    for conv in convs:                                     # start far from norm sqrt(out)
        conv.kernel.assign(conv.kernel.numpy() * 3.0)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
    y = keras.utils.to_categorical(rng.integers(0, 10, 128), 10)
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    for conv in convs:
        out = conv.kernel.shape[-1]
        norm = np.linalg.norm(conv.kernel.numpy())
        assert abs(norm / np.sqrt(out) - 1.0) < 0.3, (conv.name, norm)
