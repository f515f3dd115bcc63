"""Training configuration: one dataclass, filled from the command line, stored in the card."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainConfig:
    data: str = "keras"              # "keras", an official archive/folder, or an image tree/.tar.gz
    output: str = "runs/cifar10-resnet"
    name: str = ""                   # model name in the service; defaults to the output folder name
    epochs: int = 16
    batch_size: int = 512
    width: int = 16
    dropout: float = 0.2
    label_smoothing: float = 0.1
    optimizer: str = "sgd"           # "sgd" (Nesterov, with L2 kernel_regularizer) or "adamw"
    learning_rate: float = 0.4       # peak of the one-cycle schedule
    warmup_fraction: float = 0.25
    momentum: float = 0.9
    l2: float = 2.5e-4               # kernel_regularizer=L2(l2); gradient 2*l2*w (torch wd 5e-4)
    weight_decay: float = 0.05       # AdamW decoupled decay (only with --optimizer adamw)
    mix: str = "none"                # "none", "mixup" or "cutmix"
    mix_alpha: float = 1.0
    pad: int = 4                     # pad-crop translation in pixels
    flip_tta: bool = True
    n_validation: int = 5000
    seed: int = 0
    mixed_precision: bool = False    # mixed_bfloat16 (slow on CPUs without native bf16)
    overwrite: bool = False
    verbose: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(
        prog="calib-train",
        description="Train a calibrated CIFAR-10 classifier, fit its temperature, write an artifact.")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = parser.parse_args(argv)
    config = TrainConfig(**vars(args))
    if config.optimizer not in ("sgd", "adamw"):
        parser.error("--optimizer must be sgd or adamw")
    if config.mix not in ("none", "mixup", "cutmix"):
        parser.error("--mix must be none, mixup or cutmix")
    if not 0.0 <= config.label_smoothing < 1.0:
        parser.error("--label-smoothing must be in [0, 1)")
    if config.epochs < 1 or config.batch_size < 1 or config.width < 1:
        parser.error("--epochs, --batch-size and --width must be positive")
    return config
