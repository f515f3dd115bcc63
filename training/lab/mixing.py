"""Section 4, `mixing`: Mixup and CutMix in a tf.data pipeline, checked and compared.

1. Label statistics of the project's layers (models.mixing: one lambda per batch, the batch mixed
   with a permutation of itself) against Keras' built-in `keras.layers.MixUp` / `CutMix`
   (one lambda per sample, dict input {"images", "labels"}), on probe batches where every sample
   has its own class and a constant pixel value, so each sample's label weights and pasted
   pixel fraction can be read off exactly.
2. Accuracy: baseline (no augmentation), flips + crops, + Mixup, + CutMix; same network, same
   initial weights, same seed, `dataset.batch(128).map(layer)` with one-hot soft labels.

The lab's protocol is 30 epochs each on full CIFAR-10; this section takes `--epochs`, `--width`,
`--train-size` and `--data`, and the report records what was actually run.

Such a run takes hours on 2 CPU cores, so part 2 resumes (training.checkpoint): every condition
checkpoints after each epoch into `<report folder>/.checkpoint/<condition>/` and leaves its
result there when done; re-running the same command skips the finished conditions and continues
the interrupted one from its last epoch, with the same batches and the same final numbers as an
uninterrupted run. Other settings in the same report folder are refused (exit 2).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np

from training.checkpoint import (EpochCheckpoint, fingerprint, latest_checkpoint, read_meta, restore_checkpoint,
                                 write_atomically)
from training.lab.context import lab_network, seed_everything

BATCH = 128
MIXUP_ALPHA = 1.0       # Zhang et al. use alpha = 1 on CIFAR-10
CUTMIX_ALPHA = 1.0      # Yun et al.: alpha = 1
PAD = 4
LEARNING_RATE = 2e-3
# airbench: the shipped models' whitening stem eps (--whiten-eps 0.05). airbench's own 5e-4 amplifies
# the high-frequency patch directions that the JPEG copy of CIFAR-10 nearly lacks by up to ~40x
# (reports/lab/README.md); a first full-scale run with it overfit (flips + crops: 98% train, 73% test).
WHITEN_EPS = 0.05


# --- 1. label statistics ----------------------------------------------------------------------

def probe_batch(batch: int = BATCH):
    """Sample i: a constant image of value i and class i of `batch` classes."""
    import tensorflow as tf

    images = np.repeat(np.arange(batch, dtype=np.uint8), 32 * 32 * 3).reshape(batch, 32, 32, 3)
    labels = tf.one_hot(np.arange(batch), batch)
    return tf.constant(images), labels


def _read_off(images_in, labels_in, images_out, labels_out) -> dict[str, np.ndarray]:
    y_in, y_out = np.asarray(labels_in), np.asarray(labels_out, dtype=np.float64)
    own = (y_out * y_in).sum(axis=1)                       # weight left on the sample's own class
    x_in = np.asarray(images_in)[..., 0].astype(np.float64)
    x_out = np.asarray(images_out)[..., 0].astype(np.float64)
    pasted = (np.abs(x_out - x_in) > 0.5).mean(axis=(1, 2))  # fraction of pixels replaced
    unpermuted = own > 1.0 - 1e-6                           # sample paired with itself
    return {"own_weight": own, "pasted_fraction": pasted, "label_sum": y_out.sum(axis=1),
            "paired_with_itself": unpermuted}


def _ours(layer):
    return lambda x, y: layer(x, y)


def _keras(layer):
    def apply(x, y):
        out = layer({"images": x, "labels": y})
        return out["images"], out["labels"]
    return apply


def label_statistics(seed: int, n_batches: int) -> dict:
    import keras

    from models.mixing import CutMix, MixUp

    images, labels = probe_batch()
    layers = {
        "ours_MixUp": _ours(MixUp(MIXUP_ALPHA, seed=seed)),
        "ours_CutMix": _ours(CutMix(CUTMIX_ALPHA, seed=seed)),
        "keras_MixUp": _keras(keras.layers.MixUp(alpha=MIXUP_ALPHA, seed=seed)),
        "keras_CutMix": _keras(keras.layers.CutMix(factor=1.0, seed=seed)),
    }
    out = {}
    for name, layer in layers.items():
        rows = []
        for b in range(n_batches):
            # a different batch each time (our layers key their randomness on the batch content)
            shift = (b * 7) % BATCH
            x = np.roll(np.asarray(images), shift, axis=0)
            y = np.roll(np.asarray(labels), shift, axis=0)
            x_out, y_out = layer(x, y)
            rows.append(_read_off(x, y, x_out, y_out))
        own = np.stack([r["own_weight"] for r in rows])             # [batches, B]
        pasted = np.stack([r["pasted_fraction"] for r in rows])
        mixed = ~np.stack([r["paired_with_itself"] for r in rows])
        lam = np.where(mixed, own, np.nan)
        with warnings.catch_warnings():        # a batch where nothing was mixed has no std
            warnings.simplefilter("ignore", RuntimeWarning)
            per_batch_std = np.nanstd(lam, axis=1)
        stats = {
            "batches": n_batches,
            "label_sum_max_deviation_from_1": float(np.max(np.abs(np.stack([r["label_sum"] for r in rows]) - 1))),
            "mean_own_weight": float(np.nanmean(lam)),
            "std_own_weight_overall": float(np.nanstd(lam)),
            "mean_within_batch_std_of_lambda": float(np.nanmean(per_batch_std)),
            "lambda_is_per_batch": bool(np.nanmax(per_batch_std) < 1e-6),
        }
        if "CutMix" in name:
            gap = np.abs((1.0 - own) - pasted)[mixed]
            stats["label_weight_vs_pasted_pixel_fraction_max_abs_difference"] = float(gap.max())
            stats["label_weight_vs_pasted_pixel_fraction_mean_abs_difference"] = float(gap.mean())
        out[name] = stats
    return out


# --- 2. accuracy comparison -------------------------------------------------------------------

CONDITIONS = ("baseline", "flips_crops", "flips_crops_mixup", "flips_crops_cutmix")


def condition_dataset(name: str, data, seed: int, epochs: int, start_epoch: int = 0, batch: int = BATCH):
    """All `epochs` of one condition in one pass (`fit(..., steps_per_epoch=...)`), the first
    `start_epoch` epochs skipped before augmentation: a resumed condition sees the batches an
    uninterrupted one would (the shuffle is seeded, the crops keyed on the global step)."""
    import tensorflow as tf

    from models.mixing import CutMix, MixUp
    from training.pipeline import one_hot, training_dataset

    if name == "baseline":
        steps = len(data.x_train) // batch
        return (tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
                .shuffle(len(data.x_train), seed=seed, reshuffle_each_iteration=True)
                .batch(batch, drop_remainder=True)
                .repeat(epochs)
                .skip(start_epoch * steps)
                .map(lambda x, y: (x, one_hot(y, data.num_classes)))
                .prefetch(tf.data.AUTOTUNE))
    mix_layer = {"flips_crops": None, "flips_crops_mixup": MixUp(MIXUP_ALPHA, seed=seed),
                 "flips_crops_cutmix": CutMix(CUTMIX_ALPHA, seed=seed)}[name]
    return training_dataset(data.x_train, data.y_train, batch_size=batch, num_classes=data.num_classes,
                            seed=seed, pad=PAD, mix_layer=mix_layer, epochs=epochs, start_epoch=start_epoch)


def calibration_figures(model, data, batch: int) -> dict:
    """Test-set calibration of a trained condition: ECE-15 and NLL with the raw logits, and after
    a temperature fitted on the held-out validation images (when the run holds some out)."""
    from models.calibration import compute_metrics, fit_temperature

    def logits(x):
        return np.asarray(model.predict(x, batch_size=max(batch, 500), verbose=0), np.float64)

    test_logits = logits(data.x_test)
    raw = compute_metrics(test_logits, data.y_test, n_bins=15)
    out = {"test_ece15_before_temperature": raw.ece, "test_nll_before_temperature": raw.nll}
    if data.x_val is not None:
        val_logits = logits(data.x_val)
        t = fit_temperature(val_logits, data.y_val)
        scaled = compute_metrics(test_logits, data.y_test, temperature=t, n_bins=15)
        out.update(temperature=t, validation_accuracy=float((val_logits.argmax(1) == data.y_val).mean()),
                   test_ece15_after_temperature=scaled.ece, test_nll_after_temperature=scaled.nll)
    return {k: float(v) for k, v in out.items()}


def compare_accuracy(data, *, width: int, epochs: int, seed: int, checkpoint_root: Path | None = None,
                     settings: dict | None = None, arch: str = "resnet9", group_widths: tuple = (),
                     batch: int = BATCH) -> dict:
    """Train the four conditions from the same initial weights. With `checkpoint_root`, each
    condition checkpoints every epoch and resumes (see the module docstring); `settings` (what
    the numbers depend on besides width, epochs and seed: data checksum, sizes) must match."""
    import keras

    from commandline import UsageError
    from models.network import set_whitening

    seed_everything(seed)
    template, _ = lab_network(width, data.num_classes, arch=arch, group_widths=group_widths)
    if arch == "airbench":       # the whitening stem is fitted once, on training images, as airbench does
        set_whitening(template.get_layer("backbone"), data.x_train[:5000], eps=WHITEN_EPS)
    initial = template.get_weights()
    test = (data.x_test, keras.utils.to_categorical(data.y_test, data.num_classes))
    steps_per_epoch = len(data.x_train) // batch
    steps = epochs * steps_per_epoch
    results = {}
    for name in CONDITIONS:
        started = time.time()
        folder = None if checkpoint_root is None else Path(checkpoint_root) / name
        network = ({} if arch == "resnet9" else
                   {"arch": arch, "group_widths": list(group_widths), "whiten_eps": WHITEN_EPS})
        sha = fingerprint({"condition": name, "width": width, "epochs": epochs, "seed": seed,
                           "lr": LEARNING_RATE, "batch": batch, **network, **(settings or {})})
        done = None if folder is None else folder / "result.json"
        if done is not None and done.is_file():
            saved = json.loads(done.read_text())
            if saved["config_sha256"] != sha:
                raise UsageError(f"{folder} holds a result of other settings; use another --out")
            results[name] = saved["result"]
            print(f"[mixing] {name}: done in an earlier run (test acc "
                  f"{results[name]['final_test_accuracy']:.4f})", flush=True)
            continue
        latest = None if folder is None else latest_checkpoint(folder)
        if latest is not None and read_meta(latest)["config_sha256"] != sha:
            raise UsageError(f"{folder} holds the checkpoint of other settings; use another --out")
        start_epoch = read_meta(latest)["epoch"] if latest is not None else 0
        seed_everything(seed)
        model, _ = lab_network(width, data.num_classes, arch=arch, group_widths=group_widths)
        model.set_weights(initial)
        model.compile(optimizer=keras.optimizers.Adam(
                          keras.optimizers.schedules.CosineDecay(LEARNING_RATE, max(steps, 1))),
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                      jit_compile=False)   # XLA is slower on this CPU (and slow to compile)
        callbacks, history = [], {}
        if latest is not None:
            history = restore_checkpoint(latest, model)["history"]
            print(f"[mixing] {name}: resuming from epoch {start_epoch} of {epochs}", flush=True)
        if folder is not None:
            callbacks.append(EpochCheckpoint(folder, config_sha=sha, seed=seed, history=history))
        ds = condition_dataset(name, data, seed, epochs, start_epoch, batch)
        hist = model.fit(ds, epochs=epochs, initial_epoch=start_epoch, steps_per_epoch=steps_per_epoch,
                         validation_data=test, validation_batch_size=1000, shuffle=False,  # ds shuffles
                         verbose=0, callbacks=callbacks)
        h = callbacks[0].history if callbacks else hist.history
        results[name] = {
            "train_loss": h["loss"], "train_accuracy_on_augmented": h["accuracy"],
            "test_accuracy": h["val_accuracy"], "test_loss": h["val_loss"],
            "final_test_accuracy": h["val_accuracy"][-1], "seconds": round(time.time() - started, 1),
            "resumed_from_epoch": start_epoch,
            "calibration": calibration_figures(model, data, batch),
        }
        if done is not None:
            write_atomically(done, json.dumps({"config_sha256": sha, "result": results[name]}).encode())
        print(f"[mixing] {name}: test acc {h['val_accuracy'][-1]:.4f} ({time.time() - started:.0f}s)",
              flush=True)
    return results


def run(ctx, report) -> None:
    data = ctx.cifar(report, train_full=10000, test_full=10000)
    epochs = ctx.pick("epochs", quick=1, full=3)
    width = ctx.pick("width", quick=4, full=8)
    arch = ctx.pick("arch", quick="resnet9", full="resnet9")
    group_widths = tuple(ctx.pick("group_widths", quick=(), full=()) or ())
    batch = ctx.pick("batch_size", quick=BATCH, full=BATCH)
    n_batches = ctx.setting("label_probe_batches", quick=5, full=50)

    stats = label_statistics(ctx.seed, n_batches)
    sizes = {"train": len(data.x_train), "test": len(data.x_test)}
    if data.x_val is not None:
        sizes["validation"] = len(data.x_val)
    results = compare_accuracy(data, width=width, epochs=epochs, seed=ctx.seed,
                               checkpoint_root=report.out_dir / ".checkpoint",
                               settings={"data_checksum": report.data["checksum"], **sizes},
                               arch=arch, group_widths=group_widths, batch=batch)
    report.figures = {
        "settings": {"batch_size": BATCH, "mixup_alpha": MIXUP_ALPHA, "cutmix_alpha": CUTMIX_ALPHA,
                     "keras_cutmix_factor": 1.0, "pad": PAD, "adam_lr_cosine": LEARNING_RATE,
                     "epochs": epochs, "width": width, "arch": arch, "group_widths": list(group_widths),
                     "batch_size_used": batch, **({"whiten_eps": WHITEN_EPS} if arch == "airbench" else {}),
                     "protocol_note": "lab protocol is 30 epochs on full CIFAR-10; this run used the "
                                      "epochs/width/data recorded here"},
        "label_statistics": stats,
        "accuracy": results,
    }
    _plot(report, results, stats)
    s = stats
    report.summary = [
        "## Mixup and CutMix",
        "",
        f"{_network_name(arch, width, group_widths)}, {epochs} epoch(s) per variant on "
        f"{len(data.x_train):,} training images (test: {len(data.x_test):,}"
        f"{'' if data.x_val is None else f', temperature fitted on {len(data.x_val):,} held-out validation images'}), "
        f"Adam {LEARNING_RATE} with cosine decay, batch {batch}, "
        f"identical initial weights; mixing layers applied as `dataset.batch({batch}).map(layer)` "
        f"(training.pipeline). {_protocol_note(epochs, len(data.x_train), data.x_val)}",
        "",
        *_accuracy_table(results),
        "",
        f"### Label statistics ({n_batches} probe batches of {BATCH})",
        "",
        "| layer | lambda per batch? | mean lambda | within-batch std of lambda | label sums - 1 | "
        "CutMix: label weight vs pasted pixels (max abs diff) |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {n} | {v['lambda_is_per_batch']} | {v['mean_own_weight']:.3f} | "
          f"{v['mean_within_batch_std_of_lambda']:.3f} | {v['label_sum_max_deviation_from_1']:.1e} | "
          f"{format(v['label_weight_vs_pasted_pixel_fraction_max_abs_difference'], '.4f') if 'CutMix' in n else '-'} |"
          for n, v in s.items()],
        "",
        "Differences: the project's layers take `(images, labels)` and draw one lambda per batch (the "
        "papers' recipe); Keras' layers take a dict `{'images', 'labels'}`, draw one lambda per sample, "
        "return float images, and Keras' CutMix draws its Beta parameter itself from U(0, factor) per "
        "call (factor is not alpha) and sets the label weight from the continuous box area, while the "
        "pasted pixels are whole pixels, so its label weights deviate from the pasted fraction; ours "
        "use the clipped integer box and match exactly.",
    ]


def _network_name(arch: str, width: int, group_widths: tuple) -> str:
    if arch == "airbench":
        return f"The airbench backbone (groups {', '.join(map(str, group_widths or (width, 2 * width, 2 * width)))})"
    return f"Residual CNN width {width}"


def _accuracy_table(results: dict) -> list[str]:
    """One row per condition; the calibration columns when the run measured them."""
    cal = all("calibration" in r for r in results.values())
    after = cal and all("test_ece15_after_temperature" in r["calibration"] for r in results.values())
    head = "| variant | final test accuracy | train loss (last epoch) |"
    if cal:
        head += " test ECE-15 | test NLL |"
    if after:
        head += " temperature | ECE-15 after T | NLL after T |"
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for n, r in results.items():
        row = f"| {n} | {r['final_test_accuracy']:.4f} | {r['train_loss'][-1]:.4f} |"
        if cal:
            c = r["calibration"]
            row += f" {100 * c['test_ece15_before_temperature']:.2f}% | {c['test_nll_before_temperature']:.3f} |"
            if after:
                row += (f" {c['temperature']:.3f} | {100 * c['test_ece15_after_temperature']:.2f}% |"
                        f" {c['test_nll_after_temperature']:.3f} |")
        rows.append(row)
    return rows


def _protocol_note(epochs: int, n_train: int, x_val=None) -> str:
    """How this run relates to the lab's protocol (30 epochs on the full training split)."""
    held_out = 0 if x_val is None else len(x_val)
    if epochs >= 30 and n_train + held_out >= 50000:
        split = "" if not held_out else f" ({n_train:,} train / {held_out:,} validation)"
        return f"This is the lab's protocol: 30 epochs on the full training split{split}."
    return (f"The lab's protocol is 30 epochs on the full training split; this run used {epochs} "
            f"epoch(s) on {n_train:,} images, a seeded subset, to fit 2 CPU cores.")


def _plot(report, results, stats) -> None:
    fig, axes = report.figure(ncols=2, size=(5.5, 4.2))
    for name, r in results.items():
        epochs = range(1, len(r["test_accuracy"]) + 1)
        axes[0, 0].plot(epochs, r["test_accuracy"], marker="o", label=name)
        axes[0, 1].plot(epochs, r["train_loss"], marker="o", label=name)
    axes[0, 0].set_title("test accuracy")
    axes[0, 1].set_title("training loss (on mixed labels where mixed)")
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.legend(fontsize="small")
    report.png("accuracy_curves", fig)
