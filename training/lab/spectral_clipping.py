"""Section 6, `spectral-clipping`: spectral normalization in a GAN critic, and gradient clipping.

Part A. A small GAN on a 2-D toy distribution (8 Gaussians on a ring). Every Dense of the
discriminator is wrapped in `keras.layers.SpectralNormalization`. Keras' wrapper runs one power
iteration per call *in training mode only* and writes kernel / sigma back into the kernel
variable; the optimizer then takes a step on that kernel, so the stored kernel can sit slightly
above 1 until the next training-mode call. After training we compute each layer's largest
singular value by SVD, as stored and after one more training-mode call, and check <= 1.05. The
same discriminator without the wrapper, trained identically, is the control.

Part B. Gradient clipping on a 20-layer ReLU MLP with no normalisation (2-D spirals), plain SGD
so the step the optimizer actually took is -lr * (clipped gradient): read it back from the
weights and compare with the raw gradient. Keras' `clipnorm` clips every tensor separately,
`global_clipnorm` rescales all tensors by one factor (torch's `clip_grad_norm_`), `clipvalue`
clips every element: only the global rescaling keeps the direction (cosine 1).
"""

from __future__ import annotations

import numpy as np

SN_TOLERANCE = 1.05
GAN_BATCH = 256
NOISE_DIM = 8
MLP_DEPTH = 20
MLP_WIDTH = 64
CLIP_LR = 0.02


# --- Part A: spectral normalization ----------------------------------------------------------

def ring_of_gaussians(n: int, rng: np.random.Generator, modes: int = 8, radius: float = 2.0,
                      std: float = 0.05) -> np.ndarray:
    k = rng.integers(0, modes, n)
    angle = 2 * np.pi * k / modes
    centers = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return (centers + rng.normal(0, std, (n, 2))).astype(np.float32)


def discriminator(spectral: bool):
    import keras
    from keras import layers

    def dense(units, name):
        d = layers.Dense(units, name=name)
        return layers.SpectralNormalization(d, name=f"sn_{name}") if spectral else d

    return keras.Sequential([keras.Input((2,)), dense(128, "d1"), layers.LeakyReLU(0.2),
                             dense(128, "d2"), layers.LeakyReLU(0.2), dense(1, "d3")],
                            name="discriminator_sn" if spectral else "discriminator_plain")


def generator():
    import keras
    from keras import layers

    return keras.Sequential([keras.Input((NOISE_DIM,)), layers.Dense(128, activation="relu"),
                             layers.Dense(128, activation="relu"), layers.Dense(2)], name="generator")


def train_gan(spectral: bool, steps: int, seed: int):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    gen, disc = generator(), discriminator(spectral)
    g_opt = keras.optimizers.Adam(1e-3, beta_1=0.5)
    d_opt = keras.optimizers.Adam(1e-3, beta_1=0.5)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    rng = np.random.default_rng(seed)

    @tf.function
    def d_step(real, z):
        with tf.GradientTape() as tape:
            fake = gen(z, training=True)
            d_real, d_fake = disc(real, training=True), disc(fake, training=True)
            d_loss = bce(tf.ones_like(d_real), d_real) + bce(tf.zeros_like(d_fake), d_fake)
        d_opt.apply_gradients(zip(tape.gradient(d_loss, disc.trainable_weights), disc.trainable_weights))
        return d_loss

    @tf.function
    def g_step(z):
        with tf.GradientTape() as tape:
            d_fake = disc(gen(z, training=True), training=True)
            g_loss = bce(tf.ones_like(d_fake), d_fake)      # non-saturating generator loss
        g_opt.apply_gradients(zip(tape.gradient(g_loss, gen.trainable_weights), gen.trainable_weights))
        return g_loss

    def batch():
        real = ring_of_gaussians(GAN_BATCH, rng)
        z = rng.normal(size=(GAN_BATCH, NOISE_DIM)).astype(np.float32)
        return tf.constant(real), tf.constant(z)

    losses = []
    for _ in range(steps):
        real, z = batch()
        losses.append([float(d_step(real, z)), float(g_step(z))])
    # One more discriminator update and nothing after it: the optimizer has just moved the
    # normalised kernels, which is when the stored kernel can exceed sigma = 1.
    d_step(*batch())
    return gen, disc, np.array(losses)


def dense_kernels(disc):
    """(name, kernel variable, wrapper or None) for each Dense in the discriminator."""
    import keras

    found = []
    for layer in disc.layers:
        if isinstance(layer, keras.layers.SpectralNormalization):
            found.append((layer.name, layer.layer.kernel, layer))
        elif isinstance(layer, keras.layers.Dense):
            found.append((layer.name, layer.kernel, None))
    return found


def singular_values(disc) -> dict:
    import tensorflow as tf

    out = {}
    for name, kernel, wrapper in dense_kernels(disc):
        stored = float(np.linalg.svd(kernel.numpy(), compute_uv=False)[0])
        # as stored right after the last optimizer step, i.e. as used at inference (training=False)
        entry = {"sigma_max_stored": stored}
        if wrapper is not None:
            # one more training-mode call: power iteration + kernel <- kernel / sigma
            wrapper(tf.zeros((1, wrapper.kernel_shape[0])), training=True)
            entry["sigma_max_after_training_mode_call"] = float(
                np.linalg.svd(kernel.numpy(), compute_uv=False)[0])
            entry["within_tolerance"] = bool(stored <= SN_TOLERANCE
                                             and entry["sigma_max_after_training_mode_call"] <= SN_TOLERANCE)
        out[name] = entry
    return out


def input_gradient_norm(disc, points: np.ndarray) -> float:
    import tensorflow as tf

    x = tf.constant(points)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = disc(x, training=False)
    return float(tf.reduce_max(tf.norm(tape.gradient(y, x), axis=1)))


def mode_coverage(samples: np.ndarray, modes: int = 8, radius: float = 2.0, tolerance: float = 0.25) -> dict:
    """Fraction of samples within `tolerance` (5 std) of a mode centre, and how many modes they hit."""
    angle = 2 * np.pi * np.arange(modes) / modes
    centers = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    d = np.linalg.norm(samples[:, None, :] - centers[None], axis=2)
    near = d.min(axis=1) < tolerance
    return {"fraction_near_a_mode": float(near.mean()),
            "modes_covered": int(len(np.unique(d.argmin(axis=1)[near]))) if near.any() else 0}


# --- Part B: gradient clipping -------------------------------------------------------------

def spirals(n: int, rng: np.random.Generator, classes: int = 3):
    k = rng.integers(0, classes, n)
    r = rng.uniform(0.1, 1.0, n)
    t = 4.0 * r + 2 * np.pi * k / classes + rng.normal(0, 0.15, n)
    x = np.stack([r * np.cos(t), r * np.sin(t)], axis=1).astype(np.float32) * 3
    return x, k.astype(np.int64)


def deep_mlp(seed: int):
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    hidden = [layers.Dense(MLP_WIDTH, activation="relu", kernel_initializer="he_normal")
              for _ in range(MLP_DEPTH - 1)]
    return keras.Sequential([keras.Input((2,)), *hidden, layers.Dense(3, kernel_initializer="he_normal")],
                            name="deep_mlp_no_norm")


def train_clipped(option: dict, initial, x, y, steps: int, seed: int):
    """Plain SGD with one clipping option; per step: raw and applied gradient norms, cosine."""
    import keras
    import tensorflow as tf

    model = deep_mlp(seed)
    model.set_weights(initial)
    opt = keras.optimizers.SGD(CLIP_LR, **option)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_weights

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, variables)
        before = [tf.identity(v) for v in variables]
        opt.apply_gradients(zip(grads, variables))
        applied = [(b - v) / CLIP_LR for b, v in zip(before, variables)]  # = clipped gradient
        raw = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
        app = tf.concat([tf.reshape(a, [-1]) for a in applied], 0)
        cos = tf.reduce_sum(raw * app) / (tf.norm(raw) * tf.norm(app) + 1e-30)
        per_tensor_raw = tf.stack([tf.norm(g) for g in grads])
        per_tensor_app = tf.stack([tf.norm(a) for a in applied])
        return loss, tf.norm(raw), tf.norm(app), cos, per_tensor_raw, per_tensor_app

    rng = np.random.default_rng(seed)
    rec = {k: [] for k in ("loss", "raw_norm", "applied_norm", "cosine")}
    per_tensor_raw, per_tensor_app = [], []
    for _ in range(steps):
        idx = rng.integers(0, len(x), 128)
        loss, rn, an, cos, ptr, pta = step(tf.constant(x[idx]), tf.constant(y[idx]))
        for k, v in zip(rec, (loss, rn, an, cos)):
            rec[k].append(float(v))
        per_tensor_raw.append(ptr.numpy())
        per_tensor_app.append(pta.numpy())
    logits = model(tf.constant(x), training=False).numpy()
    rec["final_train_accuracy"] = float(np.mean(logits.argmax(1) == y))
    return {k: np.array(v) if isinstance(v, list) else v for k, v in rec.items()}, \
        np.array(per_tensor_raw), np.array(per_tensor_app)


def run(ctx, report) -> None:
    gan_steps = ctx.setting("gan_steps", quick=100, full=3000)
    clip_steps = ctx.setting("clip_steps", quick=40, full=600)
    rng = np.random.default_rng(ctx.seed)

    # --- A. spectral normalization
    gan = {}
    for name, spectral in (("spectral_norm", True), ("plain", False)):
        gen, disc, losses = train_gan(spectral, gan_steps, ctx.seed)
        z = rng.normal(size=(2000, NOISE_DIM)).astype(np.float32)
        samples = gen(z, training=False).numpy()
        grid = np.stack(np.meshgrid(np.linspace(-3, 3, 41), np.linspace(-3, 3, 41)), -1).reshape(-1, 2)
        sv = singular_values(disc)
        product = float(np.prod([v.get("sigma_max_after_training_mode_call", v["sigma_max_stored"])
                                 for v in sv.values()]))
        gan[name] = {
            "final_d_loss": float(losses[-50:, 0].mean()), "final_g_loss": float(losses[-50:, 1].mean()),
            "singular_values": sv,
            "lipschitz_upper_bound_product_of_sigmas": product,
            "max_input_gradient_norm_on_grid": input_gradient_norm(disc, grid.astype(np.float32)),
            "generated": mode_coverage(samples),
            "_samples": samples, "_disc": disc, "_losses": losses,
        }
        print(f"[spectral-clipping] GAN {name}: sigmas "
              + ", ".join(f"{k} {v['sigma_max_stored']:.3f}" for k, v in sv.items()), flush=True)
    sn_ok = all(v["within_tolerance"] for v in gan["spectral_norm"]["singular_values"].values())

    # --- B. gradient clipping
    x, y = spirals(3000, rng)
    initial = deep_mlp(ctx.seed).get_weights()
    unclipped = train_clipped({}, initial, x, y, clip_steps, ctx.seed)
    # thresholds: half the median raw norms over the unclipped run's first 20 steps
    global_c = float(np.median(unclipped[0]["raw_norm"][:20])) * 0.5
    tensor_c = float(np.median(unclipped[1][:20])) * 0.5
    value_c = tensor_c / MLP_WIDTH * 2.0
    options = {"none": {}, "clipnorm (per tensor)": {"clipnorm": tensor_c},
               "global_clipnorm": {"global_clipnorm": global_c}, "clipvalue": {"clipvalue": value_c}}
    clip, per_tensor = {}, {}
    for name, option in options.items():
        rec, ptr, pta = (unclipped if not option
                         else train_clipped(option, initial, x, y, clip_steps, ctx.seed))
        clipped_frac = float(np.mean(rec["applied_norm"] < rec["raw_norm"] * (1 - 1e-4)))
        clip[name] = {
            "option": option,
            "final_train_accuracy": rec["final_train_accuracy"],
            "final_loss_last20_mean": float(rec["loss"][-20:].mean()),
            "raw_norm": _quantiles(rec["raw_norm"]),
            "applied_norm": _quantiles(rec["applied_norm"]),
            "cosine_raw_vs_applied": {"min": float(rec["cosine"].min()), "mean": float(rec["cosine"].mean()),
                                      "max": float(rec["cosine"].max())},
            "fraction_of_steps_clipped": clipped_frac,
            "max_per_tensor_applied_norm": float(pta.max()),
        }
        per_tensor[name] = (rec, ptr, pta)
        print(f"[spectral-clipping] clip {name}: cos mean {rec['cosine'].mean():.4f} "
              f"min {rec['cosine'].min():.4f}; acc {rec['final_train_accuracy']:.3f}", flush=True)

    report.data = {"source": "synthetic: 8-Gaussian ring (GAN), 3-arm spirals (clipping), generated "
                             f"with numpy seed {ctx.seed}", "used": {"gan_steps": gan_steps,
                                                                     "clip_steps": clip_steps}}
    _plot(report, gan, per_tensor)
    report.figures = {
        "settings": {"sn_tolerance": SN_TOLERANCE, "gan_steps": gan_steps, "gan_batch": GAN_BATCH,
                     "clip_steps": clip_steps, "mlp_depth": MLP_DEPTH, "mlp_width": MLP_WIDTH,
                     "sgd_lr": CLIP_LR, "thresholds": {"global_clipnorm": global_c, "clipnorm": tensor_c,
                                                       "clipvalue": value_c},
                     "threshold_rule": "half the median raw global / per-tensor norm over the first "
                                       "20 steps of the unclipped run; clipvalue = 2 * clipnorm / 64"},
        "spectral_normalization": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
                                   for k, v in gan.items()},
        "spectral_norm_all_layers_within_tolerance": sn_ok,
        "gradient_clipping": clip,
    }
    sn_rows = [f"| {layer} | {v['sigma_max_stored']:.4f} | {v['sigma_max_after_training_mode_call']:.4f} | "
               f"{gan['plain']['singular_values'][layer.replace('sn_', '')]['sigma_max_stored']:.4f} |"
               for layer, v in gan["spectral_norm"]["singular_values"].items()]
    report.summary = [
        "## Spectral normalization and gradient clipping",
        "",
        f"GAN on an 8-Gaussian ring, {gan_steps} steps, batch {GAN_BATCH}, Adam 1e-3 (beta_1 0.5). "
        f"Largest singular value per Dense by SVD (tolerance {SN_TOLERANCE}; all within: {sn_ok}). "
        f"Training ends with a discriminator optimizer step, so 'stored' is the kernel the optimizer "
        f"has just moved away from its normalised value (what inference, training=False, uses):",
        "",
        "| layer | SN: stored kernel, right after the last optimizer step | SN: after one more "
        "training-mode call | no SN (control) |",
        "| --- | --- | --- | --- |",
        *sn_rows,
        "",
        f"Max |grad_x D| on a grid: SN {gan['spectral_norm']['max_input_gradient_norm_on_grid']:.3f} "
        f"(bound: product of sigmas {gan['spectral_norm']['lipschitz_upper_bound_product_of_sigmas']:.3f}) "
        f"vs plain {gan['plain']['max_input_gradient_norm_on_grid']:.3f}. Generated samples near a "
        f"mode: SN {gan['spectral_norm']['generated']['fraction_near_a_mode']:.2f} "
        f"({gan['spectral_norm']['generated']['modes_covered']}/8 modes), plain "
        f"{gan['plain']['generated']['fraction_near_a_mode']:.2f} "
        f"({gan['plain']['generated']['modes_covered']}/8).",
        "",
        f"Gradient clipping: {MLP_DEPTH}-layer ReLU MLP (width {MLP_WIDTH}, no normalisation), plain SGD "
        f"lr {CLIP_LR}, {clip_steps} steps, same initial weights and batches. The applied step is "
        f"read back from the weights.",
        "",
        "| option | steps clipped | raw norm median | applied norm median | cos(raw, applied) min / mean |"
        " final train acc |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {n} | {c['fraction_of_steps_clipped']:.2f} | {c['raw_norm']['median']:.3f} | "
          f"{c['applied_norm']['median']:.3f} | {c['cosine_raw_vs_applied']['min']:.5f} / "
          f"{c['cosine_raw_vs_applied']['mean']:.5f} | {c['final_train_accuracy']:.3f} |"
          for n, c in clip.items()],
        "",
        "Global-norm clipping rescales the whole gradient by one factor (cosine 1 up to float "
        "rounding of reading the step back); per-tensor `clipnorm` rescales layers by different "
        "factors and `clipvalue` clips coordinates, both turn the direction.",
    ]


def _quantiles(v: np.ndarray) -> dict:
    return {"min": float(v.min()), "median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
            "max": float(v.max())}


def _plot(report, gan, per_tensor) -> None:
    import tensorflow as tf

    fig, axes = report.figure(ncols=2, size=(5.0, 4.6))
    xs = np.linspace(-3, 3, 121)
    grid = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2).astype(np.float32)
    for ax, name in zip(axes[0], ("spectral_norm", "plain")):
        g = gan[name]
        d = g["_disc"](tf.constant(grid), training=False).numpy().reshape(len(xs), len(xs))
        ax.contourf(xs, xs, d, levels=20, cmap="coolwarm")
        real = ring_of_gaussians(500, np.random.default_rng(1))
        ax.scatter(real[:, 0], real[:, 1], s=3, c="black", label="real")
        ax.scatter(g["_samples"][:500, 0], g["_samples"][:500, 1], s=3, c="lime", label="generated")
        ax.set_title(f"discriminator logit, {name}")
        ax.legend(fontsize="small", loc="upper right")
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
    report.png("gan_discriminators", fig)

    fig, axes = report.figure(ncols=3, size=(5.0, 4.0))
    logs = {n: (np.log10(r[0]["raw_norm"]), np.log10(r[0]["applied_norm"])) for n, r in per_tensor.items()}
    everything = np.concatenate([np.concatenate(v) for v in logs.values()])
    bins = np.linspace(everything.min() - 0.05, everything.max() + 0.05, 50)
    for name, (rec, ptr, pta) in per_tensor.items():
        axes[0, 0].hist(logs[name][0], bins=bins, histtype="step", linewidth=1.5, label=name)
        axes[0, 1].hist(logs[name][1], bins=bins, histtype="step", linewidth=1.5, label=name)
        axes[0, 2].plot(np.clip(1 - rec["cosine"], 1e-9, None), label=name)
    axes[0, 0].set_title("log10 raw global gradient norm")
    axes[0, 1].set_title("log10 applied (clipped) global norm")
    axes[0, 2].set_title("1 - cos(raw, applied) per step")
    axes[0, 2].set_yscale("log")
    axes[0, 2].set_xlabel("step")
    for ax in axes[0]:
        ax.legend(fontsize="small")
    report.png("gradient_clipping", fig)
