"""Train a calibrated CIFAR-10 classifier, top to bottom.

    python -m training.train --data /path/to/cifar10-jpeg --output runs/my-model
    (the shipped model's full command is in the README and in its model card)

1. load CIFAR-10 and split 45,000 train / 5,000 validation (seeded, Guo et al. 2017);
2. train the CNN with label smoothing, a piecewise-linear schedule and a weight penalty
   (airbench backbone: fit its whitening stem on 5,000 training images first);
3. fit the temperature on the validation split (never the test split), and the OOD threshold
   that lets 95% of those images pass;
4. evaluate on the test split before and after temperature scaling;
5. write `model.keras` + model card atomically.

With --distributed, every worker of TF_CONFIG's cluster runs this same script: the strategy
splits each global batch across them and all-reduces the gradients; only the chief writes
(training.distributed, docs/distributed-training.md).
"""

from __future__ import annotations

import os

from training.cli import UsageError, command, invoked_as, setup_tensorflow

setup_tensorflow()

import contextlib
import dataclasses
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np

PROG = invoked_as("training.train", "calib-train")


@command(PROG)
def main(argv=None) -> int:
    from training.config import parse_args

    config = parse_args(argv, prog=PROG)
    run(config)
    return 0


def run(config) -> Path:
    from training.config import DEFAULT_N_VALIDATION, validation_size
    from training.data import load_cifar10, train_validation_split

    started = time.time()
    if Path(config.output).exists() and not config.overwrite:   # before, not after, training
        raise UsageError(f"--output {config.output} already exists; pass --overwrite to replace it")
    if config.distributed:
        from training.distributed import read_tf_config

        read_tf_config()   # a missing or bad TF_CONFIG fails now, not after loading the data

    # 1. Data (before TensorFlow is imported: a bad source fails in a second) ------------------
    data = load_cifar10(config.data)
    n_val = validation_size(config.n_validation, len(data.x_train))
    if config.n_validation is None and n_val != DEFAULT_N_VALIDATION:
        print(f"note: {len(data.x_train)} training images, so {n_val} (10%) are held out for "
              f"validation instead of {DEFAULT_N_VALIDATION}; --n-validation sets the number", flush=True)
    config = dataclasses.replace(config, n_validation=n_val)   # the card records what was used
    x_train, y_train, x_val, y_val = train_validation_split(
        data.x_train, data.y_train, n_validation=n_val, seed=config.seed)
    num_classes = len(data.class_names)
    print(f"data: {data.source}  train {len(x_train)}  validation {len(x_val)}  test {len(data.x_test)}"
          f"  ({time.time() - started:.0f}s)", flush=True)

    import keras

    from models.artifact import save_artifact
    from models.calibration import compute_metrics, fit_temperature
    from models.calibration.ood import fit_ood_threshold
    from models.inference import SplitClassifier
    from models.mixing import CutMix, MixUp
    from models.network import (NetworkConfig, build_backbone, build_classifier, build_head,
                                conv_group_layers, set_whitening)
    from training.optimization import FreezeLayersAfter, Lookahead, build_optimizer
    from training.pipeline import training_dataset

    strategy = None
    if config.distributed:   # before any TensorFlow op: it sets up the collectives
        from training.distributed import (adapt_fit_to_multi_worker, is_chief, multi_worker_strategy,
                                          shard_by_data, write_path)

        strategy = multi_worker_strategy()
        print(f"distributed: {strategy.num_replicas_in_sync} replicas, this worker is "
              f"{'the chief' if is_chief(strategy) else 'not the chief'}", flush=True)
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")

    mix_layer = None
    if config.mix == "mixup":
        mix_layer = MixUp(alpha=config.mix_alpha, seed=config.seed)
    elif config.mix == "cutmix":
        mix_layer = CutMix(alpha=config.mix_alpha, seed=config.seed)
    steps_per_epoch = max(1, len(x_train) // config.batch_size)
    low_res_steps = steps_per_epoch * config.low_res_epochs
    train_ds = training_dataset(x_train, y_train, batch_size=min(config.batch_size, len(x_train)),
                                num_classes=num_classes, seed=config.seed, pad=config.pad,
                                mix_layer=mix_layer, alternate_flip=config.alternate_flip,
                                epochs=config.epochs, low_res_size=config.low_res_size,
                                low_res_steps=low_res_steps, augmix=config.augmix)
    if strategy is not None:   # global batches, each split across the workers
        train_ds = shard_by_data(train_ds)

    # 2. Model and training ----------------------------------------------------------------
    net = NetworkConfig(width=config.width, num_classes=num_classes, dropout=config.dropout,
                        l2=config.l2 if config.optimizer != "adamw" else 0.0, flip_tta=config.flip_tta,
                        arch=config.arch, activation=config.activation, batchnorm=config.batchnorm,
                        bn_momentum=config.bn_momentum,
                        logit_scale=config.logit_scale, translate_tta=config.translate_tta,
                        group_widths=config.group_widths_tuple(), sync_batchnorm=strategy is not None)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():  # mirrored weights
        backbone = build_backbone(net, any_size=low_res_steps > 0)   # any size: low-res crops first
        if net.arch == "airbench":
            set_whitening(backbone, x_train[:5000], eps=config.whiten_eps)
        head = build_head(net, int(backbone.output.shape[-1]))
        train_model = build_classifier(net, test_time_views=False, backbone=backbone, head=head)
        train_model.compile(
            optimizer=build_optimizer(config, steps_per_epoch * config.epochs),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                      label_smoothing=config.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        )
        if strategy is not None:   # Keras 3.15's fit trips over this strategy
            adapt_fit_to_multi_worker(train_model)
    widths = net.group_widths or config.width
    print(f"model: {train_model.count_params():,} parameters, {net.arch}, width {widths}", flush=True)
    validation = None
    validation_freq = validation_epochs(config.epochs, config.validate_every)
    if len(x_val) and validation_freq:
        validation = (x_val, keras.utils.to_categorical(y_val, num_classes))
    fit_started, fit_cpu_started = time.time(), time.process_time()
    total_steps = steps_per_epoch * config.epochs
    callbacks = []
    if config.lookahead:
        callbacks.append(Lookahead(total_steps, start_step=min(3, config.epochs - 1) * steps_per_epoch))
    if net.arch == "airbench" and 0 < config.whiten_bias_epochs < config.epochs:
        callbacks.append(FreezeLayersAfter([backbone.get_layer("whiten")], config.whiten_bias_epochs))
    if config.freeze_group1_epochs:
        callbacks.append(FreezeLayersAfter(conv_group_layers(backbone, 1), config.freeze_group1_epochs))
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        history = train_model.fit(train_ds, epochs=config.epochs, validation_data=validation,
                                  steps_per_epoch=steps_per_epoch, shuffle=False,  # the dataset shuffles
                                  validation_freq=validation_freq or 1, validation_batch_size=1000,
                                  verbose=config.verbose, callbacks=callbacks)
    train_seconds = time.time() - fit_started
    train_cpu_seconds = time.process_time() - fit_cpu_started   # all threads: robust to a busy machine

    # 3. Temperature on the validation split -------------------------------------------------
    if low_res_steps:   # export the usual 32x32 graph: same layers, same weights
        trained, backbone = backbone, build_backbone(net)
        backbone.set_weights(trained.get_weights())
    model = build_classifier(net, backbone=backbone, head=head)  # export graph (flip TTA if on)
    classifier = SplitClassifier(model)
    val_logits = classifier.logits(x_val)
    temperature = fit_temperature(val_logits, y_val)
    classifier.set_temperature(temperature)

    # 4. Test split, before and after -------------------------------------------------------
    test_logits = classifier.logits(data.x_test)
    before = compute_metrics(test_logits, data.y_test, temperature=1.0)
    after = compute_metrics(test_logits, data.y_test, temperature=temperature)
    validation_after = compute_metrics(val_logits, y_val, temperature=temperature)
    wall = time.time() - started
    print(f"temperature {temperature:.4f}  test accuracy {after.accuracy:.4f}  "
          f"ECE-15 {before.ece:.4f} -> {after.ece:.4f}  NLL {before.nll:.4f} -> {after.nll:.4f}"
          f"  wall {wall:.0f}s", flush=True)

    # 5. Artifact (with --distributed: the chief's; the other workers' go to a deleted temp dir) --
    out = Path(config.output)
    card = build_card(config, net, data, temperature, before, after, validation_after, history,
                      train_seconds, wall, train_cpu_seconds=train_cpu_seconds, n_train=len(x_train), n_val=len(x_val),
                      params=model.count_params())
    card["ood_threshold"] = fit_ood_threshold(val_logits, temperature)   # 95% of clean validation pass
    chief = strategy is None or is_chief(strategy)
    with write_path(out, chief) if strategy is not None else contextlib.nullcontext(out) as target:
        save_artifact(model, card, target, overwrite=config.overwrite)
    print(f"artifact written to {out}" if chief else "not the chief: no artifact written", flush=True)
    if chief:   # backbone.tflite + head.npz for the TensorFlow-free serving runtime (CALIB_RUNTIME=litert)
        from training.export_litert import export_litert

        check = export_litert(out)["check"]
        print(f"LiteRT export checked: max |p_litert - p_keras| {check['max_abs_probability_diff']:.2e}", flush=True)
        if len(y_val):   # the conformal calibration set: prediction sets over these validation logits
            from models.conformal_set import save_calibration_set

            save_calibration_set(out, val_logits, y_val, {"data": "validation split",
                                                          "split_seed": card["data"]["split_seed"]})
    return out


def validation_epochs(epochs: int, every: int) -> list[int]:
    """Epochs (1-based) after which `fit` validates: every `every` epochs and after the last one;
    none for `every` = 0 (the temperature fit after training still uses the validation split)."""
    if every == 0:
        return []
    return sorted({*range(every, epochs + 1, every), epochs})


def build_card(config, net, data, temperature, before, after, validation_after, history,
               train_seconds, wall, *, n_train, n_val, params, train_cpu_seconds=None) -> dict:
    import keras
    import tensorflow as tf

    return {
        "name": config.name or Path(config.output).name,
        "task": "image-classification",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "classes": list(data.class_names),
        "input": {"shape": [32, 32, 3], "dtype": "uint8", "range": [0, 255],
                  "layout": "NHWC, RGB, raw pixels (the model normalises)"},
        "temperature": float(temperature),
        "mc_dropout": {"rate": net.dropout, "layer": "head/mc_dropout"},
        "metrics": {
            "test_before_temperature": before.to_dict(),
            "test_after_temperature": after.to_dict(),
            "validation_after_temperature": validation_after.to_dict(),
        },
        "data": {"source": data.source, "checksum": data.checksum, "n_train": n_train,
                 "n_validation": n_val, "n_test": int(len(data.x_test)),
                 "split_seed": config.seed},
        "training": {"config": config.to_dict(), "network": net.to_dict(), "parameters": int(params),
                     "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
                     "train_seconds": round(train_seconds, 1), "wall_seconds": round(wall, 1),
                     "train_cpu_seconds": None if train_cpu_seconds is None else round(train_cpu_seconds, 1),
                     "command": " ".join(["python", "-m", "training.train", *sys.argv[1:]])},
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                     "keras": keras.__version__, "numpy": np.__version__},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }


if __name__ == "__main__":
    sys.exit(main())
