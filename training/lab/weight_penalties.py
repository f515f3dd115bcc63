"""Section 1, `weight-decay`: three ways to put a weight penalty into Keras training.

The same network, the same initial weights and the same batches, trained four ways:

  none         SGD (momentum 0.9), no penalty;
  l2_fit       `kernel_regularizer=regularizers.L2(lam)`: the penalty lam*sum(w**2) sits in
               `model.losses` and `model.fit` adds it to the loss (gradient 2*lam*w);
  manual_tape  no regularizer; lam*sum(w**2) over the same kernels added by hand inside a
               `GradientTape` loop (identical gradients, so identical training up to rounding);
  adamw        `optimizers.AdamW(weight_decay=wd)`: decoupled decay w -= lr*wd*w each step, not
               a loss term (kernels only, like the penalties; BN and biases excluded).

The per-step shrink factors are matched: 2*lr_sgd*lam == lr_adam*wd. Parity with the
definitions (and with PyTorch) is tested in tests/test_lab_parity.py.
"""

from __future__ import annotations

import time

import numpy as np

from training.lab.context import (accuracy, epoch_batches, global_norm, kernel_weights,
                                  lab_network, seed_everything)
from training.lab.resume import run_epochs

LAM = 2e-3          # L2 coefficient: penalty LAM*sum(w**2)
SGD_LR = 0.05
ADAM_LR = 2e-3
WEIGHT_DECAY = 2 * SGD_LR * LAM / ADAM_LR   # = 0.1: same per-step shrink as the L2 penalty
BATCH = 128


def cross_entropy():
    import keras

    return keras.losses.CategoricalCrossentropy(from_logits=True)


def l2_penalty(model, lam: float):
    """lam * sum(w**2) over the kernels: exactly what `regularizers.L2(lam)` computes."""
    import tensorflow as tf

    return lam * tf.add_n([tf.reduce_sum(tf.square(w)) for w in kernel_weights(model)])


def _train_fit(model, optimizer, data, epochs, seed, log, measure, checkpoint=None):
    """`model.fit`, one call per epoch on our own seeded order, so every variant sees the same
    batches (keyed on the epoch, so a resumed run needs no `advance`). `log(epoch, loss,
    *measure())` after each epoch; resumable with a `checkpoint` (training.lab.resume)."""
    import keras

    model.compile(optimizer=optimizer, loss=cross_entropy(), jit_compile=False)  # as the tape loop
    onehot = keras.utils.to_categorical(data.y_train, data.num_classes)

    def one_epoch(epoch):
        order = np.concatenate(epoch_batches(len(data.x_train), BATCH, seed, epoch))
        hist = model.fit(data.x_train[order], onehot[order], batch_size=BATCH, epochs=1,
                         shuffle=False, verbose=0)
        return epoch, hist.history["loss"][0], *measure()

    run_epochs(checkpoint, model, optimizer, epochs, one_epoch, log)


def _train_tape(model, optimizer, data, epochs, seed, log, lam, measure, checkpoint=None):
    """A GradientTape loop that adds the penalty by hand (otherwise as `_train_fit`)."""
    import keras
    import tensorflow as tf

    loss_fn = cross_entropy()
    onehot = keras.utils.to_categorical(data.y_train, data.num_classes)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits) + l2_penalty(model, lam)
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights))
        return loss

    def one_epoch(epoch):
        losses, sizes = [], []
        for index in epoch_batches(len(data.x_train), BATCH, seed, epoch):
            losses.append(float(step(tf.constant(data.x_train[index]), tf.constant(onehot[index]))))
            sizes.append(len(index))
        return epoch, float(np.average(losses, weights=sizes)), *measure()

    run_epochs(checkpoint, model, optimizer, epochs, one_epoch, log)


def _first_step_gradient_gap(data, width, initial, lam) -> float:
    """Max |grad(regularizer model) - grad(manual penalty model)| on the first batch."""
    import keras
    import tensorflow as tf

    reg_model, _ = lab_network(width, data.num_classes, l2=lam)
    plain_model, _ = lab_network(width, data.num_classes)
    reg_model.set_weights(initial)
    plain_model.set_weights(initial)
    index = epoch_batches(len(data.x_train), BATCH, 0, 0)[0]
    x = tf.constant(data.x_train[index])
    y = tf.constant(keras.utils.to_categorical(data.y_train[index], data.num_classes))
    loss_fn = cross_entropy()
    with tf.GradientTape() as tape:
        loss = loss_fn(y, reg_model(x, training=True)) + tf.add_n(reg_model.losses)
    g_reg = tape.gradient(loss, reg_model.trainable_weights)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, plain_model(x, training=True)) + l2_penalty(plain_model, lam)
    g_man = tape.gradient(loss, plain_model.trainable_weights)
    return max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(g_reg, g_man))


def run(ctx, report) -> None:
    import keras

    data = ctx.cifar(report, train_full=10000, test_full=5000)
    epochs = ctx.pick("epochs", quick=1, full=3)
    width = ctx.pick("width", quick=4, full=8)
    ctx.setting("lam", quick=LAM, full=LAM)
    ctx.setting("adamw_weight_decay", quick=WEIGHT_DECAY, full=WEIGHT_DECAY)

    seed_everything(ctx.seed)
    template, _ = lab_network(width, data.num_classes)
    initial = template.get_weights()

    variants = {
        "none": dict(l2=0.0, trainer="fit",
                     optimizer=lambda: keras.optimizers.SGD(SGD_LR, momentum=0.9)),
        "l2_fit": dict(l2=LAM, trainer="fit",
                       optimizer=lambda: keras.optimizers.SGD(SGD_LR, momentum=0.9)),
        "manual_tape": dict(l2=0.0, trainer="tape",
                            optimizer=lambda: keras.optimizers.SGD(SGD_LR, momentum=0.9)),
        "adamw": dict(l2=0.0, trainer="fit", optimizer=lambda: _adamw()),
    }
    results, final_weights = {}, {}
    for name, spec in variants.items():
        started = time.time()
        model, _ = lab_network(width, data.num_classes, l2=spec["l2"])
        model.set_weights(initial)
        curve = {"epoch": [], "train_loss": [], "test_accuracy": [], "kernel_norm": []}

        def measure(model=model):
            return accuracy(model, data.x_test, data.y_test), global_norm(kernel_weights(model))

        def log(epoch, loss, test_accuracy, kernel_norm, curve=curve, name=name):
            curve["epoch"].append(epoch + 1)
            curve["train_loss"].append(loss)
            curve["test_accuracy"].append(test_accuracy)
            curve["kernel_norm"].append(kernel_norm)
            print(f"[weight-decay] {name} epoch {epoch + 1}: loss {loss:.4f} "
                  f"test acc {curve['test_accuracy'][-1]:.4f} |w| {curve['kernel_norm'][-1]:.3f}",
                  flush=True)

        checkpoint = ctx.loop_checkpoint(report, name)
        if spec["trainer"] == "fit":
            _train_fit(model, spec["optimizer"](), data, epochs, ctx.seed, log, measure, checkpoint)
        else:
            _train_tape(model, spec["optimizer"](), data, epochs, ctx.seed, log, LAM, measure, checkpoint)
        final_weights[name] = [np.asarray(w) for w in model.get_weights()]
        results[name] = {
            "curve": curve,
            "final_test_accuracy": curve["test_accuracy"][-1],
            "final_kernel_norm": curve["kernel_norm"][-1],
            "kernel_norms_by_layer": {w.path: float(np.linalg.norm(w.numpy()))
                                      for w in kernel_weights(model)},
            "seconds": round(time.time() - started, 1),
        }

    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(final_weights["l2_fit"], final_weights["manual_tape"]))
    first_gap = _first_step_gradient_gap(data, width, initial, LAM)
    report.figures = {
        "settings": {"lam": LAM, "sgd_lr": SGD_LR, "sgd_momentum": 0.9, "adam_lr": ADAM_LR,
                     "adamw_weight_decay": WEIGHT_DECAY, "batch_size": BATCH, "epochs": epochs,
                     "width": width, "initial_kernel_norm": global_norm(
                         [w for w, v in zip(initial, template.weights) if v.path.endswith("kernel")])},
        "variants": results,
        "regularizer_vs_manual": {"first_batch_max_gradient_difference": first_gap,
                                  "final_max_weight_difference": diff},
    }
    _plot(report, results)
    report.summary = [
        "## Weight penalties: regularizer, manual penalty, AdamW",
        "",
        f"Residual CNN width {width}, {epochs} epoch(s), batch {BATCH}, identical initial weights and "
        f"batch order. L2 lam={LAM} with SGD lr={SGD_LR} (momentum 0.9); AdamW lr={ADAM_LR}, "
        f"weight_decay={WEIGHT_DECAY:g} (same per-step shrink 2*lr*lam = lr*wd).",
        "",
        "| variant | final test accuracy | final kernel norm |",
        "| --- | --- | --- |",
        *[f"| {n} | {r['final_test_accuracy']:.4f} | {r['final_kernel_norm']:.3f} |"
          for n, r in results.items()],
        "",
        regularizer_vs_manual_sentence(first_gap, diff),
    ]


def regularizer_vs_manual_sentence(first_gap: float, weight_diff: float) -> str:
    """What the two measured differences say, in words that match them (0 means identical)."""
    lead = "`kernel_regularizer=L2(lam)` (fit) vs the hand-written penalty (GradientTape): "
    if first_gap == 0.0 and weight_diff == 0.0:
        return lead + ("identical first-batch gradients and, after training, bit-identical weights "
                       "(both differences are exactly 0).")
    gradients = ("identical first-batch gradients" if first_gap == 0.0 else
                 f"first-batch gradients differ by at most {first_gap:.2e}")
    weights = ("after training the weights are bit-identical" if weight_diff == 0.0 else
               f"after training the weights differ by at most {weight_diff:.2e}")
    why = (" (float rounding of a different summation order, amplified by training)"
           if weight_diff != 0.0 else "")
    return f"{lead}{gradients}; {weights}{why}."


def _adamw():
    import keras

    opt = keras.optimizers.AdamW(learning_rate=ADAM_LR, weight_decay=WEIGHT_DECAY)
    # Decay kernels only, like the L2 penalties (Keras would otherwise decay every variable).
    opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return opt


def _plot(report, results) -> None:
    fig, axes = report.figure(ncols=3)
    for name, r in results.items():
        c = r["curve"]
        # manual_tape lies exactly on l2_fit: draw it dashed so both stay visible
        style = dict(marker="x", linestyle="--") if name == "manual_tape" else dict(marker="o")
        axes[0, 0].plot(c["epoch"], c["train_loss"], label=name, **style)
        axes[0, 1].plot(c["epoch"], c["test_accuracy"], label=name, **style)
        axes[0, 2].plot(c["epoch"], c["kernel_norm"], label=name, **style)
    for ax, title in zip(axes[0], ("training loss (incl. penalty)", "test accuracy",
                                   "global kernel L2 norm")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize="small")
    report.png("curves", fig)
