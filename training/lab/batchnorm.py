"""Section 3, `batchnorm`: ExplicitBatchNorm, a GradientTape loop, and the forgotten `training` flag.

`ExplicitBatchNorm` (models.layers) is checked against `keras.layers.BatchNormalization` in both modes,
moving-statistic updates included (tests/test_lab_parity.py, and once more in this run).

The classic bug, in both directions, on the same network, initial weights and batches:

* evaluating in training mode (PyTorch: forgetting `model.eval()`; Keras: `model(x, training=True)`
  at test time): predictions use the test batch's own statistics, so they depend on the batch
  size and composition, and the moving statistics get overwritten;
* training in inference mode (Keras: calling `model(x)` in a custom loop without
  `training=True`; the default `training=None` means inference outside `fit`): the layers
  normalise with the never-updated initial statistics (mean 0, variance 1), i.e. no
  normalisation at all, and the moving statistics never learn the data.
"""

from __future__ import annotations

import numpy as np

from training.lab.context import (accuracy, advance_epochs, lab_network, predict_logits, seed_everything,
                                  tape_training)
from training.lab.resume import run_epochs

BATCH = 128
LEARNING_RATE = 2e-3


def train(model, data, *, epochs: int, seed: int, training_flag: bool | None, log, checkpoint=None) -> None:
    """GradientTape loop; `training_flag` is what the step passes to the model. Resumable per
    epoch with a `checkpoint` (training.lab.resume)."""
    flag = {} if training_flag is None else {"training": training_flag}  # None: the bug, no flag
    ds, train_step, optimizer = tape_training(model, data, seed=seed, batch_size=BATCH,
                                              learning_rate=LEARNING_RATE, **flag)

    def one_epoch(epoch):
        losses = [float(train_step(x, y)) for x, y in ds]
        return epoch, float(np.mean(losses)), accuracy(model, data.x_test, data.y_test, training=False)

    run_epochs(checkpoint, model, optimizer, epochs, one_epoch, log, advance=advance_epochs(ds))


def _running_stats(model):
    return [w for w in model.non_trainable_weights if "running_" in w.path]


def eval_in_training_mode(model, data, seed: int, n_single: int) -> dict:
    """Test accuracy with training=True for several batchings; running stats restored after."""
    saved = [w.numpy() for w in _running_stats(model)]
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(data.x_test))
    by_class = np.argsort(data.y_test, kind="stable")
    results = {"inference_mode": accuracy(model, data.x_test, data.y_test, training=False),
               "single_images_evaluated": int(min(n_single, len(data.x_test)))}
    cases = {"shuffled_batches_of_500": (shuffled, 500), "shuffled_batches_of_32": (shuffled, 32),
             "class_sorted_batches_of_500": (by_class, 500), "single_images": (shuffled[:n_single], 1)}
    for name, (order, size) in cases.items():
        logits = predict_logits(model, data.x_test[order], training=True, batch_size=size)
        results[f"training_mode_{name}"] = float(np.mean(logits.argmax(1) == data.y_test[order]))
    after = [w.numpy() for w in _running_stats(model)]
    results["running_stats_max_relative_change_during_this_eval"] = max(
        float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)) for a, b in zip(after, saved))
    for w, value in zip(_running_stats(model), saved):
        w.assign(value)
    return results


def layer_parity_check(seed: int) -> dict:
    """One ExplicitBatchNorm vs keras BatchNormalization comparison on random data (also a test)."""
    import keras
    import tensorflow as tf

    from models.layers import ExplicitBatchNorm

    x = tf.constant(np.random.default_rng(seed).normal(2.0, 3.0, (64, 8, 8, 16)), tf.float32)
    mine = ExplicitBatchNorm(momentum=0.9, epsilon=1e-5)
    ref = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    out = {}
    for step in range(3):
        a, b = mine(x * (step + 1), training=True), ref(x * (step + 1), training=True)
        out[f"train_step_{step}_max_output_difference"] = float(tf.reduce_max(tf.abs(a - b)))
    out["moving_mean_max_difference"] = float(np.max(np.abs(mine.running_mean.numpy() - ref.moving_mean.numpy())))
    out["moving_variance_max_difference"] = float(
        np.max(np.abs(mine.running_var.numpy() - ref.moving_variance.numpy())))
    out["inference_max_output_difference"] = float(
        tf.reduce_max(tf.abs(mine(x, training=False) - ref(x, training=False))))
    return out


def run(ctx, report) -> None:
    data = ctx.cifar(report, train_full=10000, test_full=5000)
    epochs = ctx.pick("epochs", quick=1, full=4)
    width = ctx.pick("width", quick=4, full=8)

    seed_everything(ctx.seed)
    template, cfg = lab_network(width, data.num_classes, batchnorm="custom")
    initial = template.get_weights()
    probe = data.x_test[:8]
    default_is_inference = bool(np.allclose(template(probe).numpy(), template(probe, training=False).numpy()))

    runs = {"training=True (correct)": True, "no training flag (bug: trains in inference mode)": None}
    curves, models = {}, {}
    for name, flag in runs.items():
        model, _ = lab_network(width, data.num_classes, batchnorm="custom")
        model.set_weights(initial)
        curve = {"epoch": [], "train_loss": [], "test_accuracy_inference_mode": []}

        def log(epoch, loss, acc, curve=curve, name=name):
            curve["epoch"].append(epoch + 1)
            curve["train_loss"].append(loss)
            curve["test_accuracy_inference_mode"].append(acc)
            print(f"[batchnorm] {name} epoch {epoch + 1}: loss {loss:.4f} test acc {acc:.4f}", flush=True)

        train(model, data, epochs=epochs, seed=ctx.seed, training_flag=flag, log=log,
              checkpoint=ctx.loop_checkpoint(report, name))
        curves[name], models[name] = curve, model

    correct, buggy = models.values()
    n_single = ctx.setting("n_single_image_evals", quick=100, full=1000)
    eval_bug = eval_in_training_mode(correct, data, ctx.seed, n_single)
    bug_stats = _running_stats(buggy)
    untouched = max(float(np.max(np.abs(w.numpy() - (0.0 if "mean" in w.path else 1.0))))
                    for w in bug_stats)
    final_ok = curves["training=True (correct)"]["test_accuracy_inference_mode"][-1]
    final_bug = curves["no training flag (bug: trains in inference mode)"]["test_accuracy_inference_mode"][-1]
    report.figures = {
        "settings": {"width": width, "epochs": epochs, "batch_size": BATCH, "adam_lr": LEARNING_RATE,
                     "batchnorm": "ExplicitBatchNorm", "bn_momentum": cfg.bn_momentum, "bn_epsilon": 1e-5},
        "layer_parity_vs_keras": layer_parity_check(ctx.seed),
        "keras_default_training_flag_is_inference": default_is_inference,
        "curves": curves,
        "bug_evaluating_in_training_mode": eval_bug,
        "bug_training_in_inference_mode": {
            "final_test_accuracy_correct": final_ok,
            "final_test_accuracy_bug": final_bug,
            "accuracy_gap": final_ok - final_bug,
            "running_stats_max_distance_from_initial_0_and_1": untouched,
        },
    }
    _plot(report, curves, eval_bug)
    report.summary = [
        "## Batch normalization (ExplicitBatchNorm) and the forgotten `training` flag",
        "",
        f"Residual CNN width {width} with `ExplicitBatchNorm`, GradientTape loop, {epochs} epoch(s), same "
        f"initial weights and batches for both runs. In Keras, `model(x)` without a flag runs in "
        f"inference mode (checked: {default_is_inference}).",
        "",
        "**Evaluating in training mode** (the correctly trained model):",
        "",
        "| evaluation | test accuracy |",
        "| --- | --- |",
        *[f"| {k} | {v:.4f} |" for k, v in eval_bug.items() if k.startswith(("inference", "training_mode"))],
        "",
        f"The evaluation in training mode also rewrote the running statistics (relative change up to "
        f"{eval_bug['running_stats_max_relative_change_during_this_eval']:.1%}; restored afterwards).",
        "",
        f"**Training in inference mode** (no `training=True` in the tape): test accuracy "
        f"{final_bug:.4f} vs {final_ok:.4f} when trained correctly (gap {final_ok - final_bug:+.4f}); its "
        f"running statistics never moved from (0, 1) (max distance {untouched:.2g}).",
    ]


def _plot(report, curves, eval_bug) -> None:
    fig, axes = report.figure(ncols=2, size=(5.5, 4.2))
    for name, c in curves.items():
        axes[0, 0].plot(c["epoch"], c["test_accuracy_inference_mode"], marker="o", label=name)
    axes[0, 0].set_xlabel("epoch")
    axes[0, 0].set_title("test accuracy (inference mode)")
    axes[0, 0].legend(fontsize="small")
    keys = [k for k in eval_bug if k.startswith(("inference", "training_mode"))]
    axes[0, 1].barh(range(len(keys)), [eval_bug[k] for k in keys], color="tab:purple")
    axes[0, 1].set_yticks(range(len(keys)), keys, fontsize="small")
    axes[0, 1].set_xlabel("test accuracy")
    axes[0, 1].set_title("correctly trained model, evaluated in each mode")
    report.png("batchnorm_training_flag", fig)
