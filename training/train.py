"""Train a calibrated CIFAR-10 classifier, top to bottom.

    python -m training.train --data /path/to/cifar10-jpeg --output runs/my-model
    (the shipped model's full command is in the README and in its model card)

1. load CIFAR-10 and split 45,000 train / 5,000 validation (seeded, Guo et al. 2017);
2. train the CNN with label smoothing, a piecewise-linear schedule and a weight penalty
   (airbench backbone: fit its whitening stem on 5,000 training images first);
3. fit the temperature on the validation split (never the test split), and the OOD threshold
   that lets 95% of those images pass;
4. evaluate on the test split before and after temperature scaling;
5. write `model.keras` + model card atomically;
6. export the backbone for the LiteRT runtime (backbone.tflite + head.npz).

`run` calls one function per step (`load_splits`, `train_network`, `calibrate_on_validation`,
`write_artifact`, `export_for_litert`), so each reads on its own.

With --distributed, every worker of TF_CONFIG's cluster runs this same script: the strategy
splits each global batch across them and all-reduces the gradients; only the chief writes
(training.distributed, docs/distributed-training.md).
"""

from __future__ import annotations

import os

from commandline import UsageError, command, invoked_as, setup_tensorflow

setup_tensorflow()

import contextlib
import dataclasses
import datetime
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np

PROG = invoked_as("training.train", "calib-train")


@command(PROG)
def main(argv=None) -> int:
    from training.config import parse_args

    config = parse_args(argv, prog=PROG)
    run(config)
    return 0


@dataclasses.dataclass
class Splits:
    """The images of one run: train and validation (split seeded by config.seed), and the test split."""

    data: object                # training.data.CifarData: test split, class names, source, checksum
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.data.class_names)


@dataclasses.dataclass
class Fitted:
    """What training produced: the trained backbone and head, and how long fit took."""

    net: object                 # models.network.NetworkConfig
    backbone: object
    head: object
    history: object
    train_seconds: float
    train_cpu_seconds: float    # all threads: robust to a busy machine


@dataclasses.dataclass
class Calibrated:
    """The export model with its fitted temperature, and its (uncalibrated) logits."""

    model: object
    temperature: float
    val_logits: np.ndarray
    test_logits: np.ndarray


def run(config, *, litert_export: bool = True) -> Path:
    """Train, calibrate, evaluate and write one artifact: the steps of the module docstring.

    `litert_export=False` skips step 6 (backbone.tflite + head.npz): the Keras artifact is complete
    without it, and the tests that do not serve with LiteRT save its cost (5-11 s here)."""
    started = time.time()
    check_before_loading(config)
    config, splits = load_splits(config, started)
    strategy = distribution_strategy(config)
    fitted = train_network(config, splits, strategy)
    calibrated = calibrate_on_validation(fitted, splits)
    out = write_artifact(config, splits, fitted, calibrated, strategy, started)
    if litert_export and (strategy is None or _is_chief(strategy)):
        export_for_litert(out)
    if strategy is None and not config.keep_checkpoint:   # the artifact is complete: nothing to resume
        import shutil

        from training.checkpoint import checkpoint_dir

        shutil.rmtree(checkpoint_dir(config.output), ignore_errors=True)
    return out


def check_before_loading(config) -> None:
    """Usage errors that must fail now, not after loading the data or training."""
    if Path(config.output).exists() and not config.overwrite:
        raise UsageError(f"--output {config.output} already exists; pass --overwrite to replace it")
    check_checkpoint(config)
    if config.distributed:
        from training.distributed import read_tf_config

        read_tf_config()   # a missing or bad TF_CONFIG fails now, not after loading the data


def check_checkpoint(config) -> None:
    """A checkpoint next to --output must be of this config (else exit 2 now, before any work);
    --no-resume discards it. With --distributed there is no checkpoint (not yet supported)."""
    import shutil

    from training.checkpoint import checkpoint_dir, config_hash, latest_checkpoint, read_meta

    folder = checkpoint_dir(config.output)
    if not config.resume or config.distributed:
        if folder.exists() and not config.distributed:
            shutil.rmtree(folder)
            print(f"--no-resume: removed the checkpoint {folder}", flush=True)
        return
    latest = latest_checkpoint(folder)
    if latest is not None and read_meta(latest)["config_sha256"] != config_hash(config):
        raise UsageError(f"{folder} holds the checkpoint of a different training config; use another "
                         f"--output, or pass --no-resume to discard it")


def load_splits(config, started: float):
    """1. Data, before TensorFlow is imported (a bad source fails in a second). Returns the config
    with the validation size actually used (the card records it) and the splits."""
    from training.config import DEFAULT_N_VALIDATION, validation_size
    from training.data import load_cifar10, train_validation_split

    data = load_cifar10(config.data)
    n_val = validation_size(config.n_validation, len(data.x_train))
    if config.n_validation is None and n_val != DEFAULT_N_VALIDATION:
        print(f"note: {len(data.x_train)} training images, so {n_val} (10%) are held out for "
              f"validation instead of {DEFAULT_N_VALIDATION}; --n-validation sets the number", flush=True)
    config = dataclasses.replace(config, n_validation=n_val)
    splits = Splits(data, *train_validation_split(data.x_train, data.y_train, n_validation=n_val,
                                                  seed=config.seed))
    print(f"data: {data.source}  train {len(splits.x_train)}  validation {len(splits.x_val)}  "
          f"test {len(data.x_test)}  ({time.time() - started:.0f}s)", flush=True)
    return config, splits


def distribution_strategy(config):
    """With --distributed, the multi-worker strategy (before any TensorFlow op: it sets up the
    collectives); else None. Then the seed and the precision policy."""
    import keras

    strategy = None
    if config.distributed:
        from training.distributed import is_chief, multi_worker_strategy

        strategy = multi_worker_strategy()
        print(f"distributed: {strategy.num_replicas_in_sync} replicas, this worker is "
              f"{'the chief' if is_chief(strategy) else 'not the chief'}", flush=True)
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    return strategy


def _in_scope(strategy):
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def _is_chief(strategy) -> bool:
    from training.distributed import is_chief

    return is_chief(strategy)


def _steps(config, splits: Splits) -> tuple[int, int]:
    """(steps per epoch, steps on low-resolution crops)."""
    steps_per_epoch = max(1, len(splits.x_train) // config.batch_size)
    return steps_per_epoch, steps_per_epoch * config.low_res_epochs


def input_pipeline(config, splits: Splits, strategy, start_epoch: int = 0):
    """The augmented training batches (global batches split across workers when distributed)."""
    from models.mixing import CutMix, MixUp
    from training.pipeline import training_dataset

    mix_layer = None
    if config.mix == "mixup":
        mix_layer = MixUp(alpha=config.mix_alpha, seed=config.seed)
    elif config.mix == "cutmix":
        mix_layer = CutMix(alpha=config.mix_alpha, seed=config.seed)
    _, low_res_steps = _steps(config, splits)
    train_ds = training_dataset(splits.x_train, splits.y_train,
                                batch_size=min(config.batch_size, len(splits.x_train)),
                                num_classes=splits.num_classes, seed=config.seed, pad=config.pad,
                                mix_layer=mix_layer, alternate_flip=config.alternate_flip,
                                epochs=config.epochs, low_res_size=config.low_res_size,
                                low_res_steps=low_res_steps, augmix=config.augmix,
                                start_epoch=start_epoch)
    if strategy is not None:
        from training.distributed import shard_by_data

        train_ds = shard_by_data(train_ds)
    return train_ds


def network_config(config, splits: Splits, strategy):
    from models.network import NetworkConfig

    return NetworkConfig(width=config.width, num_classes=splits.num_classes, dropout=config.dropout,
                         l2=config.l2 if config.optimizer != "adamw" else 0.0, flip_tta=config.flip_tta,
                         arch=config.arch, activation=config.activation, batchnorm=config.batchnorm,
                         bn_momentum=config.bn_momentum,
                         logit_scale=config.logit_scale, translate_tta=config.translate_tta,
                         group_widths=config.group_widths_tuple(), sync_batchnorm=strategy is not None)


def compiled_training_model(config, net, splits: Splits, strategy):
    """Backbone, head and the compiled training graph (no test-time views), weights mirrored
    across workers when distributed."""
    import keras

    from models.network import build_backbone, build_classifier, build_head, set_whitening
    from training.optimization import build_optimizer

    steps_per_epoch, low_res_steps = _steps(config, splits)
    with _in_scope(strategy):
        backbone = build_backbone(net, any_size=low_res_steps > 0)   # any size: low-res crops first
        if net.arch == "airbench":
            set_whitening(backbone, splits.x_train[:5000], eps=config.whiten_eps)
        head = build_head(net, int(backbone.output.shape[-1]))
        train_model = build_classifier(net, test_time_views=False, backbone=backbone, head=head)
        train_model.compile(
            optimizer=build_optimizer(config, steps_per_epoch * config.epochs),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                      label_smoothing=config.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        )
        if strategy is not None:   # Keras 3.15's fit trips over this strategy
            from training.distributed import adapt_fit_to_multi_worker

            adapt_fit_to_multi_worker(train_model)
    print(f"model: {train_model.count_params():,} parameters, {net.arch}, "
          f"width {net.group_widths or config.width}", flush=True)
    return backbone, head, train_model


def training_callbacks(config, net, backbone, steps_per_epoch: int, initial_epoch: int = 0) -> list:
    """Lookahead and the layer freezes the config asks for (a resumed run re-freezes the layers
    frozen before `initial_epoch`)."""
    from models.network import conv_group_layers
    from training.optimization import FreezeLayersAfter, Lookahead

    callbacks = []
    if config.lookahead:
        callbacks.append(Lookahead(steps_per_epoch * config.epochs,
                                   start_step=min(3, config.epochs - 1) * steps_per_epoch))
    if net.arch == "airbench" and 0 < config.whiten_bias_epochs < config.epochs:
        callbacks.append(FreezeLayersAfter([backbone.get_layer("whiten")], config.whiten_bias_epochs,
                                           initial_epoch))
    if config.freeze_group1_epochs:
        callbacks.append(FreezeLayersAfter(conv_group_layers(backbone, 1), config.freeze_group1_epochs,
                                           initial_epoch))
    return callbacks


def train_network(config, splits: Splits, strategy) -> Fitted:
    """2. Build the network and fit it on the training split."""
    import keras

    from models.network import build_backbone

    from training.checkpoint import checkpoint_dir, latest_checkpoint, read_meta

    folder = checkpoint_dir(config.output)
    latest = latest_checkpoint(folder) if strategy is None else None   # no checkpoint when distributed
    initial_epoch = read_meta(latest)["epoch"] if latest is not None else 0
    train_ds = input_pipeline(config, splits, strategy, start_epoch=initial_epoch)
    net = network_config(config, splits, strategy)
    backbone, head, train_model = compiled_training_model(config, net, splits, strategy)
    steps_per_epoch, low_res_steps = _steps(config, splits)
    callbacks = training_callbacks(config, net, backbone, steps_per_epoch, initial_epoch)
    history_so_far = {}
    if latest is not None:
        from training.checkpoint import restore_checkpoint

        history_so_far = restore_checkpoint(latest, train_model, callbacks)["history"]
        print(f"resuming from epoch {initial_epoch} of {config.epochs} ({latest})", flush=True)
    if strategy is None:
        from training.checkpoint import EpochCheckpoint, config_hash

        checkpoint = EpochCheckpoint(folder, config_sha=config_hash(config), seed=config.seed,
                                     history=history_so_far,
                                     stateful_callbacks=[c for c in callbacks if hasattr(c, "get_state")])
        callbacks.append(checkpoint)
    validation = None
    validation_freq = validation_epochs(config.epochs, config.validate_every)
    if len(splits.x_val) and validation_freq:
        validation = (splits.x_val, keras.utils.to_categorical(splits.y_val, splits.num_classes))
    fit_started, fit_cpu_started = time.time(), time.process_time()
    with _in_scope(strategy):
        history = train_model.fit(train_ds, epochs=config.epochs, initial_epoch=initial_epoch,
                                  validation_data=validation,
                                  steps_per_epoch=steps_per_epoch, shuffle=False,  # the dataset shuffles
                                  validation_freq=validation_freq or 1, validation_batch_size=1000,
                                  verbose=config.verbose,
                                  callbacks=callbacks)
    if strategy is None:   # the whole run's history, the epochs before a resume included
        history = types.SimpleNamespace(history=checkpoint.history)
    train_seconds = time.time() - fit_started
    train_cpu_seconds = time.process_time() - fit_cpu_started
    if low_res_steps:   # export the usual 32x32 graph: same layers, same weights
        trained, backbone = backbone, build_backbone(net)
        backbone.set_weights(trained.get_weights())
    return Fitted(net, backbone, head, history, train_seconds, train_cpu_seconds)


def calibrate_on_validation(fitted: Fitted, splits: Splits) -> Calibrated:
    """3. The export graph (test-time views if configured) with its temperature fitted on the
    validation split, never the test split (set in the model: it is saved with it); then the
    test split's logits for step 4."""
    from models.calibration import fit_temperature
    from models.inference import SplitClassifier
    from models.network import build_classifier

    model = build_classifier(fitted.net, backbone=fitted.backbone, head=fitted.head)
    classifier = SplitClassifier(model)
    val_logits = classifier.logits(splits.x_val)
    temperature = fit_temperature(val_logits, splits.y_val)
    classifier.set_temperature(temperature)
    return Calibrated(model, temperature, val_logits, classifier.logits(splits.data.x_test))


def write_artifact(config, splits: Splits, fitted: Fitted, calibrated: Calibrated, strategy,
                   started: float) -> Path:
    """4. Test metrics before and after the temperature, and 5. the artifact, written atomically
    (with --distributed: the chief's; the other workers' go to a deleted temp dir)."""
    from models.artifact import save_artifact
    from models.calibration import compute_metrics
    from models.calibration.ood import fit_ood_threshold

    data, temperature = splits.data, calibrated.temperature
    test_logits, val_logits = calibrated.test_logits, calibrated.val_logits
    before = compute_metrics(test_logits, data.y_test, temperature=1.0)
    after = compute_metrics(test_logits, data.y_test, temperature=temperature)
    validation_after = compute_metrics(val_logits, splits.y_val, temperature=temperature)
    wall = time.time() - started
    print(f"temperature {temperature:.4f}  test accuracy {after.accuracy:.4f}  "
          f"ECE-15 {before.ece:.4f} -> {after.ece:.4f}  NLL {before.nll:.4f} -> {after.nll:.4f}"
          f"  wall {wall:.0f}s", flush=True)
    out = Path(config.output)
    card = build_card(config, fitted.net, data, temperature, before, after, validation_after,
                      fitted.history, fitted.train_seconds, wall,
                      train_cpu_seconds=fitted.train_cpu_seconds, n_train=len(splits.x_train),
                      n_val=len(splits.x_val), params=calibrated.model.count_params())
    card["ood_threshold"] = fit_ood_threshold(val_logits, temperature)   # 95% of clean validation pass
    chief = strategy is None or _is_chief(strategy)
    if strategy is not None:
        from training.distributed import write_path

        target_context = write_path(out, chief)
    else:
        target_context = contextlib.nullcontext(out)
    with target_context as target:
        save_artifact(calibrated.model, card, target, overwrite=config.overwrite)
    print(f"artifact written to {out}" if chief else "not the chief: no artifact written", flush=True)
    if chief and len(splits.y_val):   # the conformal calibration set: prediction sets over these logits
        from models.conformal_set import save_calibration_set

        save_calibration_set(out, val_logits, splits.y_val, {"data": "validation split",
                                                             "split_seed": card["data"]["split_seed"]})
    return out


def export_for_litert(out: Path) -> None:
    """6. backbone.tflite + head.npz for the TensorFlow-free serving runtime (CALIB_RUNTIME=litert)."""
    from training.export_litert import export_litert

    check = export_litert(out)["check"]
    print(f"LiteRT export checked: max |p_litert - p_keras| {check['max_abs_probability_diff']:.2e}", flush=True)


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
