"""Parity and equivalence checks behind the lab (training/lab): Keras against its own definitions,
against the project's layers, and against PyTorch (those tests skip when torch is absent)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

pytestmark = pytest.mark.lab

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _mlp(seed=0, *, l2=0.0, bias_l2=0.0, sizes=(5, 7, 3)):
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(l2) if l2 else None
    breg = keras.regularizers.L2(bias_l2) if bias_l2 else None
    return keras.Sequential([
        keras.Input((sizes[0],)),
        keras.layers.Dense(sizes[1], activation="tanh", kernel_regularizer=reg, bias_regularizer=breg,
                           bias_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=seed)),
        keras.layers.Dense(sizes[2], kernel_regularizer=reg, bias_regularizer=breg,
                           bias_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=seed + 1)),
    ])


def _batches(n_steps, seed=0, n=16, d=5, k=3):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, k, n)) for _ in range(n_steps)]


def _keras_steps(model, optimizer, batches, *, add_model_losses=False):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for x, y in batches:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
            if add_model_losses and model.losses:
                loss = loss + tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights))
    return [w.numpy() for w in model.trainable_weights]


def _torch_mlp(torch, keras_model):
    layers = []
    dense = [l for l in keras_model.layers if isinstance(l, keras.layers.Dense)]
    for i, d in enumerate(dense):
        kernel, bias = (w.numpy() for w in d.weights)
        lin = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(kernel.T.copy()))
            lin.bias.copy_(torch.from_numpy(bias.copy()))
        layers.append(lin)
        if i < len(dense) - 1:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def _torch_steps(torch, model, optimizer, batches):
    loss_fn = torch.nn.CrossEntropyLoss()
    for x, y in batches:
        optimizer.zero_grad()
        loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    out = []
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            out += [layer.weight.detach().numpy().T, layer.bias.detach().numpy()]
    return out


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


# --- 1. weight penalties ---------------------------------------------------------------------

def test_regularizer_and_manual_penalty_give_identical_gradients():
    from training.lab.context import lab_network
    from training.lab.weight_penalties import l2_penalty

    lam = 3e-3
    keras.utils.set_random_seed(0)
    reg_model, _ = lab_network(2, 10, l2=lam)
    plain_model, _ = lab_network(2, 10)
    plain_model.set_weights(reg_model.get_weights())
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    y = tf.one_hot(rng.integers(0, 10, 8), 10)
    ce = keras.losses.CategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss_a = ce(y, reg_model(x, training=True)) + tf.add_n(reg_model.losses)
    g_a = tape.gradient(loss_a, reg_model.trainable_weights)
    with tf.GradientTape() as tape:
        loss_b = ce(y, plain_model(x, training=True)) + l2_penalty(plain_model, lam)
    g_b = tape.gradient(loss_b, plain_model.trainable_weights)
    assert len(reg_model.losses) == len([w for w in reg_model.trainable_weights if w.path.endswith("kernel")])
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    for a, b in zip(g_a, g_b):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def test_l2_regularizer_value_and_gradient_definition():
    lam = 0.01
    w = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
    with tf.GradientTape() as tape:
        penalty = keras.regularizers.L2(lam)(w)
    np.testing.assert_allclose(float(penalty), lam * float(np.sum(w.numpy() ** 2)), rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(penalty, w).numpy(), 2 * lam * w.numpy(), rtol=1e-6)


def test_l2_with_plain_sgd_equals_decoupled_decay_of_2_lam():
    lam, lr = 0.02, 0.1
    batches = _batches(5)
    coupled = _mlp(l2=lam)
    initial = coupled.get_weights()
    w_coupled = _keras_steps(coupled, keras.optimizers.SGD(lr), batches, add_model_losses=True)

    def decoupled(weight_decay):
        model = _mlp()
        model.set_weights(initial)
        opt = keras.optimizers.SGD(lr, weight_decay=weight_decay)
        opt.exclude_from_weight_decay(var_names=["bias"])   # the regularizer is on kernels only
        return _keras_steps(model, opt, batches)

    assert _max_diff(w_coupled, decoupled(2 * lam)) < 1e-6
    assert _max_diff(w_coupled, decoupled(lam)) > 1e-4     # lam instead of 2*lam: different


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_adamw_matches_torch_once_hyperparameters_are_aligned(torch, steps, eps):
    # Aligned: weight_decay (Keras 0.004 -> 0.01) and epsilon (1e-7 -> 1e-8); both decay every
    # variable. Keras adds its epsilon to sqrt(v) before bias correction ("epsilon hat"), torch
    # after, i.e. Keras' eps equals torch's eps * sqrt(1 - beta_2**t): with eps=0 the two updates
    # are the same formula, with 1e-8 they differ far below 1e-6 unless a gradient is ~1e-7.
    lr, wd = 1e-3, 0.01
    batches = _batches(steps, seed=1)
    km = _mlp(seed=1)
    tm = _torch_mlp(torch, km)
    w_keras = _keras_steps(km, keras.optimizers.AdamW(lr, weight_decay=wd, epsilon=eps), batches)
    w_torch = _torch_steps(torch, tm, torch.optim.AdamW(tm.parameters(), lr=lr, weight_decay=wd, eps=eps),
                           batches)
    assert _max_diff(w_keras, w_torch) < 1e-6


def test_adamw_defaults_differ_between_keras_and_torch(torch):
    sig = inspect.signature(keras.optimizers.AdamW.__init__).parameters
    assert sig["weight_decay"].default == 0.004 and sig["epsilon"].default == 1e-7
    tsig = inspect.signature(torch.optim.AdamW.__init__).parameters
    assert tsig["weight_decay"].default == 0.01 and tsig["eps"].default == 1e-8
    batches = _batches(3, seed=2)
    km = _mlp(seed=2)
    tm = _torch_mlp(torch, km)
    w_keras = _keras_steps(km, keras.optimizers.AdamW(1e-2), batches)
    w_torch = _torch_steps(torch, tm, torch.optim.AdamW(tm.parameters(), lr=1e-2), batches)
    assert _max_diff(w_keras, w_torch) > 1e-6


def test_sgd_with_l2_matches_torch_sgd_weight_decay(torch):
    lr, wd, momentum = 0.05, 0.01, 0.9
    batches = _batches(5, seed=3)
    # torch's weight_decay adds wd*w to every parameter's gradient = L2(wd/2) on kernels and biases
    km = _mlp(seed=3, l2=wd / 2, bias_l2=wd / 2)
    tm = _torch_mlp(torch, km)
    w_keras = _keras_steps(km, keras.optimizers.SGD(lr, momentum=momentum), batches, add_model_losses=True)
    w_torch = _torch_steps(torch, tm, torch.optim.SGD(tm.parameters(), lr=lr, momentum=momentum,
                                                      weight_decay=wd), batches)
    assert _max_diff(w_keras, w_torch) < 1e-6


# --- label smoothing --------------------------------------------------------------------------

def test_sparse_crossentropy_has_no_label_smoothing():
    assert "label_smoothing" not in inspect.signature(keras.losses.SparseCategoricalCrossentropy).parameters
    assert "label_smoothing" in inspect.signature(keras.losses.CategoricalCrossentropy).parameters


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_sparse_smoothed_loss_equals_categorical_label_smoothing(eps):
    from training.lab.smoothing import SparseSmoothedCrossentropy

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (64, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    ours = float(SparseSmoothedCrossentropy(eps)(labels, logits))
    ref = float(keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=eps)(
        tf.one_hot(labels, 10), logits))
    assert abs(ours - ref) < 1e-5


@pytest.mark.parametrize("eps", [0.1, 0.25])
def test_label_smoothing_matches_torch(torch, eps):
    from training.lab.smoothing import SparseSmoothedCrossentropy

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (64, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    keras_value = float(keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=eps)(
        tf.one_hot(labels, 10), logits))
    torch_value = float(torch.nn.CrossEntropyLoss(label_smoothing=eps)(
        torch.from_numpy(logits), torch.from_numpy(labels)))
    assert abs(keras_value - torch_value) < 5e-6
    assert abs(float(SparseSmoothedCrossentropy(eps)(labels, logits)) - torch_value) < 5e-6


@pytest.mark.parametrize("eps,k", [(0.1, 10), (0.2, 5), (0.05, 100)])
def test_smoothed_loss_is_minimised_at_the_logit_gap_bound(eps, k):
    from training.lab.smoothing import gap_bound, sparse_smoothed_crossentropy

    bound = gap_bound(eps, k)
    gaps = np.array([bound - 0.5, bound - 0.05, bound, bound + 0.05, bound + 0.5], np.float32)
    logits = np.zeros((len(gaps), k), np.float32)
    logits[:, 0] = gaps
    losses = sparse_smoothed_crossentropy(np.zeros(len(gaps), np.int64), logits, eps).numpy()
    assert np.argmin(losses) == 2
    # and the gradient at the bound vanishes
    z = tf.Variable(logits[2:3])
    with tf.GradientTape() as tape:
        loss = sparse_smoothed_crossentropy(np.zeros(1, np.int64), z, eps)
    assert float(tf.reduce_max(tf.abs(tape.gradient(loss, z)))) < 1e-5


# --- dropout ----------------------------------------------------------------------------------

def test_keras_dropout_is_inverted_and_preserves_the_expectation():
    from models.layers import MCDropout

    p = 0.3
    x = np.ones((400, 500), np.float32)
    for layer in (keras.layers.Dropout(p, seed=1), MCDropout(p, seed=1)):
        y = layer(x, training=True).numpy()
        kept = y[y != 0]
        np.testing.assert_allclose(kept, 1.0 / (1.0 - p), rtol=1e-6)
        assert abs(y.mean() - 1.0) < 0.01
        assert abs((y == 0).mean() - p) < 0.01
    # in inference (training=False or no flag) both are the identity: MC sampling is explicit
    for layer in (keras.layers.Dropout(p, seed=2), MCDropout(p, seed=2)):
        np.testing.assert_array_equal(layer(x, training=False).numpy(), x)
        np.testing.assert_array_equal(layer(x).numpy(), x)


def test_dropout_scaling_matches_torch(torch):
    p = 0.3
    torch.manual_seed(0)
    t = torch.nn.Dropout(p)
    t.train()
    ty = t(torch.ones(400, 500)).numpy()
    ky = keras.layers.Dropout(p, seed=0)(np.ones((400, 500), np.float32), training=True).numpy()
    np.testing.assert_allclose(np.unique(ty[ty != 0]), np.unique(ky[ky != 0]), rtol=1e-6)
    assert abs(ty.mean() - ky.mean()) < 0.02
    t.eval()
    np.testing.assert_array_equal(t(torch.ones(3, 4)).numpy(), np.ones((3, 4), np.float32))


# --- batch normalization ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(32, 6, 6, 8), (64, 12)])
@pytest.mark.parametrize("momentum,epsilon", [(0.9, 1e-5), (0.99, 1e-3)])
def test_explicit_batchnorm_equals_keras_batchnorm_in_both_modes(shape, momentum, epsilon):
    from models.layers import ExplicitBatchNorm

    rng = np.random.default_rng(0)
    mine = ExplicitBatchNorm(momentum=momentum, epsilon=epsilon)
    ref = keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon)
    x0 = rng.normal(1.5, 2.0, shape).astype(np.float32)
    mine.build(shape)
    ref.build(shape)
    gamma = rng.normal(1, 0.2, shape[-1]).astype(np.float32)
    beta = rng.normal(0, 0.2, shape[-1]).astype(np.float32)
    mine.gamma.assign(gamma); ref.gamma.assign(gamma)
    mine.beta.assign(beta); ref.beta.assign(beta)
    for step in range(4):
        x = x0 * (1 + step) + step
        np.testing.assert_allclose(mine(x, training=True).numpy(), ref(x, training=True).numpy(),
                                   rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(mine.running_mean.numpy(), ref.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mine.running_var.numpy(), ref.moving_variance.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mine(x, training=False).numpy(), ref(x, training=False).numpy(),
                                   rtol=1e-4, atol=2e-5)
    # inference mode leaves the moving statistics alone
    before = mine.running_mean.numpy().copy()
    mine(x0, training=False)
    np.testing.assert_array_equal(mine.running_mean.numpy(), before)


def test_frozen_explicit_batchnorm_runs_in_inference_mode_like_keras():
    """Fine-tuning semantics: with trainable=False, training=True uses and keeps the running stats."""
    from models.layers import ExplicitBatchNorm

    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, (16, 5)).astype(np.float32)
    mine, ref = ExplicitBatchNorm(momentum=0.9, epsilon=1e-5), keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    for layer in (mine, ref):
        layer.build(x.shape)
        layer(x, training=True)                      # move the running statistics off their init
        layer.trainable = False
    before = mine.running_mean.numpy().copy()
    np.testing.assert_allclose(mine(x, training=True).numpy(), ref(x, training=True).numpy(), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(mine(x, training=True).numpy(), mine(x, training=False).numpy())
    np.testing.assert_array_equal(mine.running_mean.numpy(), before)


def test_calling_a_model_without_training_flag_is_inference_mode():
    from training.lab.context import lab_network

    keras.utils.set_random_seed(0)
    model, _ = lab_network(2, 10, batchnorm="custom")
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(model(x).numpy(), model(x, training=False).numpy())
    assert not np.allclose(model(x).numpy(), model(x, training=True).numpy())


# --- Mixup / CutMix ----------------------------------------------------------------------------

def _read(layer_out, x, y):
    from training.lab.mixing import _read_off

    return _read_off(x, y, *layer_out)


@pytest.mark.parametrize("alpha", [0.4, 1.0, 3.0])
def test_cutmix_label_weight_equals_pasted_area(alpha):
    from models.mixing import CutMix
    from training.lab.mixing import probe_batch

    x, y = probe_batch(64)
    layer = CutMix(alpha, seed=3)
    seen_mixed = 0
    for shift in range(10):
        xs, ys = tf.roll(x, shift, 0), tf.roll(y, shift, 0)
        r = _read(layer(xs, ys), xs, ys)
        np.testing.assert_allclose(1.0 - r["own_weight"], r["pasted_fraction"], atol=1e-6)
        np.testing.assert_allclose(r["label_sum"], 1.0, atol=1e-6)
        seen_mixed += int((~r["paired_with_itself"]).sum())
    assert seen_mixed > 0


def test_mixup_uses_one_lambda_per_batch_and_soft_labels_sum_to_one():
    from models.mixing import MixUp
    from training.lab.mixing import probe_batch

    x, y = probe_batch(64)
    r = _read(MixUp(1.0, seed=0)(x, y), x, y)
    lam = r["own_weight"][~r["paired_with_itself"]]
    assert lam.size and np.ptp(lam) < 1e-6
    np.testing.assert_allclose(r["label_sum"], 1.0, atol=1e-6)


def test_keras_builtin_mixing_layers_draw_lambda_per_sample():
    from training.lab.mixing import label_statistics

    stats = label_statistics(seed=0, n_batches=3)
    assert stats["ours_MixUp"]["lambda_is_per_batch"] and stats["ours_CutMix"]["lambda_is_per_batch"]
    assert not stats["keras_MixUp"]["lambda_is_per_batch"]
    assert not stats["keras_CutMix"]["lambda_is_per_batch"]
    assert stats["ours_CutMix"]["label_weight_vs_pasted_pixel_fraction_max_abs_difference"] < 1e-6


@pytest.mark.parametrize("name", ["MixUp", "CutMix"])
def test_mixing_layers_work_in_tf_data_and_are_reproducible(name):
    import models.mixing as mixing

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (128 * 6, 8, 8, 3), dtype=np.uint8)
    y = tf.one_hot(np.arange(len(x)) % 10, 10)

    def labels():
        layer = getattr(mixing, name)(1.0, seed=5)
        ds = (tf.data.Dataset.from_tensor_slices((x, y)).batch(128)
              .map(layer, num_parallel_calls=tf.data.AUTOTUNE))
        out = [(a.numpy(), b.numpy()) for a, b in ds]
        assert all(a.dtype == np.uint8 and a.shape == (128, 8, 8, 3) and b.shape == (128, 10)
                   for a, b in out)
        return np.concatenate([b for _, b in out])

    first = labels()
    assert first.max(axis=1).min() < 1.0            # something got mixed
    np.testing.assert_allclose(first.sum(axis=1), 1.0, atol=1e-6)
    for _ in range(3):
        np.testing.assert_array_equal(labels(), first)


# --- spectral normalization and clipping --------------------------------------------------------

def test_spectral_normalization_only_updates_in_training_mode_and_converges_to_one():
    keras.utils.set_random_seed(0)
    sn = keras.layers.SpectralNormalization(keras.layers.Dense(16), power_iterations=1)
    x = np.ones((2, 8), np.float32)
    sn(x)  # build
    sn.layer.kernel.assign(sn.layer.kernel * 5.0)
    before = sn.layer.kernel.numpy().copy()
    sn(x, training=False)
    np.testing.assert_array_equal(sn.layer.kernel.numpy(), before)
    for _ in range(30):
        sn(x, training=True)
    assert abs(np.linalg.svd(sn.layer.kernel.numpy(), compute_uv=False)[0] - 1.0) < 1e-3


def _grads_and_step(option, grads):
    variables = [tf.Variable(np.zeros_like(g)) for g in grads]
    keras.optimizers.SGD(1.0, **option).apply_gradients(zip([tf.constant(g) for g in grads], variables))
    return [-v.numpy() for v in variables]


def test_keras_clipping_options_are_per_tensor_global_and_elementwise():
    rng = np.random.default_rng(0)
    grads = [rng.normal(0, s, shape).astype(np.float32) for s, shape in ((3.0, (4, 5)), (0.1, (5,)), (1.0, (5, 2)))]
    per_tensor = _grads_and_step({"clipnorm": 1.0}, grads)
    for g, c in zip(grads, per_tensor):
        np.testing.assert_allclose(c, tf.clip_by_norm(g, 1.0).numpy(), rtol=1e-5, atol=1e-7)
    global_ = _grads_and_step({"global_clipnorm": 1.0}, grads)
    expected, _ = tf.clip_by_global_norm(grads, 1.0)
    for e, c in zip(expected, global_):
        np.testing.assert_allclose(c, e.numpy(), rtol=1e-5, atol=1e-7)
    value = _grads_and_step({"clipvalue": 0.5}, grads)
    for g, c in zip(grads, value):
        np.testing.assert_allclose(c, np.clip(g, -0.5, 0.5), rtol=1e-6)

    flat = lambda gs: np.concatenate([g.ravel() for g in gs])  # noqa: E731
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cos(flat(grads), flat(global_)) > 1 - 1e-6
    assert cos(flat(grads), flat(per_tensor)) < 0.999
    assert cos(flat(grads), flat(value)) < 0.999


def test_global_clipnorm_matches_torch_clip_grad_norm(torch):
    rng = np.random.default_rng(1)
    grads = [rng.normal(0, 2.0, shape).astype(np.float32) for shape in ((6, 3), (3,), (3, 2))]
    params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.from_numpy(g.copy())
    torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
    keras_clipped = _grads_and_step({"global_clipnorm": 1.0}, grads)
    for p, k in zip(params, keras_clipped):
        np.testing.assert_allclose(p.grad.numpy(), k, rtol=1e-5, atol=1e-7)
