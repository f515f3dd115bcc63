"""Section 5, `smoothing`: label smoothing in the loss, its logit-gap bound, temperature scaling.

Label smoothing with eps over K classes trains against the target q = (1 - eps) * onehot + eps/K.
The cross-entropy to q is minimised by logits whose softmax equals q: every wrong-class logit
equal, and the true-class logit above them by exactly

    gap* = log((1 - eps + eps/K) / (eps/K)),

so the smoothed model's gaps concentrate at or below gap*, while an unsmoothed model's gaps keep
growing (its optimum is at infinity). Keras' `SparseCategoricalCrossentropy` has no
`label_smoothing`, so this module writes the sparse smoothed loss (equal to
`CategoricalCrossentropy(label_smoothing=eps)` on one-hot labels and to torch's
`CrossEntropyLoss(label_smoothing=eps)`; see tests/test_lab_parity.py).

Then temperature scaling as a post-training wrapper: T fitted on a validation split by NLL
(models.calibration.fit_temperature), the trained model wrapped with a `TemperatureScaling` layer,
ECE and reliability diagrams before/after, for the models trained with and without smoothing.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from training.lab.context import lab_network, predict_logits, seed_everything

EPS = 0.1
BATCH = 128
LEARNING_RATE = 2e-3


def gap_bound(eps: float, num_classes: int) -> float:
    return math.log((1.0 - eps + eps / num_classes) / (eps / num_classes))


def sparse_smoothed_crossentropy(labels, logits, eps: float):
    """Per-example loss: (1 - eps) * NLL(true class) + eps * mean_k(-log p_k), labels are ints."""
    from keras import ops

    logp = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    labels = ops.reshape(ops.cast(labels, "int32"), [-1])
    nll = -ops.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    uniform = -ops.mean(logp, axis=-1)
    return (1.0 - eps) * nll + eps * uniform


class SparseSmoothedCrossentropy(keras.losses.Loss):
    """The sparse smoothed cross-entropy as a Keras loss (mean over the batch), integer labels."""

    def __init__(self, eps: float, name: str = "sparse_smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.eps = float(eps)

    def call(self, y_true, y_pred):
        return sparse_smoothed_crossentropy(y_true, y_pred, self.eps)

    def get_config(self):
        return {**super().get_config(), "eps": self.eps}


def logit_gaps(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """True-class logit minus the mean (and minus the max) of the other logits, per example."""
    rows = np.arange(len(labels))
    true = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = np.nan
    return {"to_mean_other": true - np.nanmean(others, axis=1),
            "to_max_other": true - np.nanmax(others, axis=1)}


def train(model, data, x_train, y_train, *, eps: float, epochs: int, seed: int, gap_probe, on_epoch,
          checkpoint=None):
    """`fit` one epoch at a time (the same batches as one multi-epoch `fit`: each epoch iterates
    the reshuffling dataset once more); `on_epoch(epoch, loss, accuracy, probe logits' gaps...)`
    via `measure_gaps`. Resumable per epoch with a `checkpoint` (training.lab.resume)."""
    import tensorflow as tf

    from training.lab.context import advance_epochs
    from training.lab.resume import run_epochs

    ds = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
          .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
          .batch(BATCH).prefetch(tf.data.AUTOTUNE))
    loss = (SparseSmoothedCrossentropy(eps) if eps > 0
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    optimizer = keras.optimizers.Adam(LEARNING_RATE)
    model.compile(optimizer=optimizer, loss=loss,
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=False)   # XLA is slower on this CPU (and slow to compile)

    def one_epoch(epoch):
        logs = model.fit(ds, epochs=1, verbose=0, shuffle=False).history
        return (epoch, float(logs["loss"][0]), float(logs["accuracy"][0]),
                *gap_summary(predict_logits(model, gap_probe[0]), gap_probe[1]))

    run_epochs(checkpoint, model, optimizer, epochs, one_epoch, on_epoch, advance=advance_epochs(ds))


def gap_summary(probe_logits: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Median and 90th percentile of the true-class gap to the mean other logit, and the share of
    probe images at or under the smoothing bound."""
    g = logit_gaps(probe_logits, labels)["to_mean_other"]
    return float(np.median(g)), float(np.percentile(g, 90)), float(np.mean(g <= gap_bound(EPS, probe_logits.shape[1])))


def run(ctx, report) -> None:
    from models.calibration import compute_metrics, fit_temperature, reliability_diagram_png
    from models.layers import TemperatureScaling
    from training.data import train_validation_split

    data = ctx.cifar(report, train_full=8000, test_full=5000)
    epochs = ctx.pick("epochs", quick=2, full=10)
    width = ctx.pick("width", quick=4, full=8)
    n_val = ctx.setting("n_validation", quick=200, full=2000)
    x_train, y_train, x_val, y_val = train_validation_split(
        data.x_train, data.y_train, n_validation=n_val, seed=ctx.seed)
    k = data.num_classes
    bound = gap_bound(EPS, k)
    probe = (x_train[:1000], y_train[:1000])

    seed_everything(ctx.seed)
    template, _ = lab_network(width, k)
    initial = template.get_weights()
    models, per_model = {}, {}
    for name, eps in (("no_smoothing", 0.0), (f"smoothing_{EPS:g}", EPS)):
        model, _ = lab_network(width, k)
        model.set_weights(initial)
        history = {"epoch": [], "train_loss": [], "train_accuracy": [], "median_gap": [],
                   "p90_gap": [], "fraction_gap_below_bound": []}

        def on_epoch(epoch, loss, train_accuracy, median_gap, p90_gap, below, history=history, name=name):
            history["epoch"].append(epoch + 1)
            history["train_loss"].append(loss)
            history["train_accuracy"].append(train_accuracy)
            history["median_gap"].append(median_gap)
            history["p90_gap"].append(p90_gap)
            history["fraction_gap_below_bound"].append(below)
            print(f"[smoothing] {name} epoch {epoch + 1}: loss {loss:.4f} "
                  f"median gap {median_gap:.3f} (bound {bound:.3f})", flush=True)

        train(model, data, x_train, y_train, eps=eps, epochs=epochs, seed=ctx.seed,
              gap_probe=probe, on_epoch=on_epoch, checkpoint=ctx.loop_checkpoint(report, name))
        models[name] = model

        # --- logit gaps on the training probe and the test split
        train_gaps = logit_gaps(predict_logits(model, probe[0]), probe[1])
        test_logits = predict_logits(model, data.x_test)
        test_gaps = logit_gaps(test_logits, data.y_test)

        # --- temperature scaling: fit on validation, wrap the trained model
        val_logits = predict_logits(model, x_val)
        temperature = fit_temperature(val_logits, y_val)
        wrapped = keras.Sequential([model, TemperatureScaling(temperature, name="post_hoc_temperature")])
        scaled = predict_logits(wrapped, data.x_test)
        before = compute_metrics(test_logits, data.y_test)
        after = compute_metrics(test_logits, data.y_test, temperature=temperature)
        wrapped_metrics = compute_metrics(scaled, data.y_test)   # the wrapper's own outputs
        report.png(f"reliability_{name}", reliability_diagram_png(
            before, after, title=f"{name}: test split, T fitted on validation = {temperature:.3f}"))
        per_model[name] = {
            "history": history,
            "train_gap_to_mean_other": _describe(train_gaps["to_mean_other"], bound),
            "train_gap_to_max_other": _describe(train_gaps["to_max_other"], bound),
            "test_gap_to_mean_other": _describe(test_gaps["to_mean_other"], bound),
            "temperature": temperature,
            "wrapper_matches_logits_over_T_max_abs_diff": float(np.max(np.abs(scaled - test_logits / temperature))),
            "wrapper_ece_minus_metric_ece": wrapped_metrics.ece - after.ece,
            "test_before": _brief(before),
            "test_after": _brief(after),
            "_train_gaps": train_gaps["to_mean_other"],
        }

    gaps_for_plot = {n: r.pop("_train_gaps") for n, r in per_model.items()}
    report.figures = {
        "settings": {"eps": EPS, "num_classes": k, "gap_bound": bound, "width": width,
                     "epochs": epochs, "batch_size": BATCH, "adam_lr": LEARNING_RATE,
                     "n_train": int(len(x_train)), "n_validation": int(len(x_val)),
                     "augmentation": "none (so the unsmoothed model can drive its gaps up)"},
        "models": per_model,
    }
    _plot(report, per_model, gaps_for_plot, bound)
    rows = [f"| {n} | {r['test_before']['accuracy']:.4f} | {r['temperature']:.3f} | "
            f"{r['test_before']['ece']:.4f} -> {r['test_after']['ece']:.4f} | "
            f"{r['test_before']['nll']:.4f} -> {r['test_after']['nll']:.4f} | "
            f"{r['train_gap_to_mean_other']['median']:.2f} | "
            f"{r['train_gap_to_mean_other']['fraction_at_or_below_bound']:.3f} |"
            for n, r in per_model.items()]
    report.summary = [
        "## Label smoothing and temperature scaling",
        "",
        f"Residual CNN width {width}, {epochs} epochs without augmentation on {len(x_train)} training "
        f"images ({len(x_val)} held out for the temperature), same initial weights and batches. "
        f"Smoothing eps={EPS} over K={k}: gap bound log((1-eps+eps/K)/(eps/K)) = {bound:.4f}.",
        "",
        "| model | test accuracy | T (validation) | test ECE-15 before -> after | test NLL before -> after | "
        "median train gap | fraction of train gaps <= bound |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Gap = true-class logit minus the mean of the other logits, on 1,000 training images "
        "(test-split gaps are in report.json). The temperature wrapper is "
        "`keras.Sequential([model, TemperatureScaling(T)])`; accuracy is unchanged by construction.",
    ]


def _describe(g: np.ndarray, bound: float) -> dict:
    return {"median": float(np.median(g)), "mean": float(np.mean(g)),
            "p10": float(np.percentile(g, 10)), "p90": float(np.percentile(g, 90)),
            "p99": float(np.percentile(g, 99)), "max": float(np.max(g)),
            "fraction_at_or_below_bound": float(np.mean(g <= bound + 1e-6))}


def _brief(m) -> dict:
    return {"accuracy": m.accuracy, "nll": m.nll, "ece": m.ece, "mce": m.mce, "brier": m.brier,
            "temperature": m.temperature}


def _plot(report, per_model, gaps, bound) -> None:
    fig, axes = report.figure(ncols=2, size=(5.5, 4.2))
    top = max(float(np.percentile(g, 99.5)) for g in gaps.values())
    bins = np.linspace(min(float(g.min()) for g in gaps.values()), max(top, bound * 1.2), 60)
    for name, g in gaps.items():
        axes[0, 0].hist(g, bins=bins, alpha=0.5, label=name)
        h = per_model[name]["history"]
        axes[0, 1].plot(h["epoch"], h["median_gap"], marker="o", label=f"{name} median")
        axes[0, 1].plot(h["epoch"], h["p90_gap"], linestyle="--", label=f"{name} 90th pct")
    axes[0, 0].axvline(bound, color="black", linestyle=":", label=f"bound {bound:.2f}")
    axes[0, 0].set_title("logit gap on training images (after training)")
    axes[0, 0].set_xlabel("true logit - mean other logit")
    axes[0, 1].axhline(bound, color="black", linestyle=":", label=f"bound {bound:.2f}")
    axes[0, 1].set_title("logit gap during training")
    axes[0, 1].set_xlabel("epoch")
    for ax in axes[0]:
        ax.legend(fontsize="small")
    report.png("logit_gaps", fig)
