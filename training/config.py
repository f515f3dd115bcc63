"""Training configuration: one dataclass, filled from the command line, stored in the card."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields


@dataclass
class TrainConfig:
    data: str = "keras"              # "keras", an official archive/folder, or an image tree/.tar.gz
    output: str = "runs/cifar10-resnet"
    name: str = ""                   # model name in the service; defaults to the output folder name
    epochs: int = 16
    batch_size: int = 512
    width: int = 16
    arch: str = "resnet9"            # "resnet9" or "airbench" (whitened stem, see models.network)
    activation: str = "relu"         # "relu", "gelu" or "quick_gelu" (x * sigmoid(1.702 x), faster)
    batchnorm: str = "keras"         # "keras", "fused" (TF's one-kernel op, faster) or "custom"
    whiten_eps: float = 5e-4         # airbench stem: filter gain 1/sqrt(eigenvalue + eps)
    whiten_bias_epochs: int = 0      # airbench stem: freeze its bias after this many epochs (0: never)
    freeze_group1_epochs: int = 0    # airbench: freeze conv group 1 (convs + BN) after N epochs
                                     # (FreezeOut; later steps skip its gradients, ~0.89x the time)
    bn_momentum: float = 0.9
    logit_scale: float = 0.125
    dropout: float = 0.2
    label_smoothing: float = 0.1
    optimizer: str = "sgd"           # "sgd" (Nesterov, L2 kernel_regularizer), "adamw", or "muon"
                                     # (Muon on conv filters, that SGD on the rest)
    learning_rate: float = 0.4       # peak of the piecewise-linear schedule
    warmup_fraction: float = 0.25
    lr_start_factor: float = 0.0     # schedule starts at this fraction of the peak
    lr_end_factor: float = 0.0       # and ends at this fraction
    momentum: float = 0.9
    muon_lr: float = 0.24            # Muon's peak step (airbench94_muon), same schedule shape
    muon_momentum: float = 0.6
    bias_lr_scale: float = 1.0       # BatchNorm shifts step this many times larger (airbench: 64)
    lookahead: bool = False          # airbench's Lookahead EMA of the weights, every 5 steps
    l2: float = 2.5e-4               # kernel_regularizer=L2(l2); gradient 2*l2*w (torch wd 5e-4)
    weight_decay: float = 0.05       # AdamW decoupled decay (only with --optimizer adamw)
    mix: str = "none"                # "none", "mixup" or "cutmix"
    mix_alpha: float = 1.0
    augmix: bool = False             # AugMix every training image (training.augmix; no JSD loss)
    pad: int = 4                     # pad-crop translation in pixels
    low_res_epochs: int = 0          # train the first N epochs on random low_res_size crops
    low_res_size: int = 24           # (a conv's cost scales with the pixels: 24x24 is ~0.56x)
    alternate_flip: bool = False     # airbench: mirror each image in every other epoch
    group_widths: str = ""           # airbench: "32,128,128"; empty means (w, 2w, 2w)
    validate_every: int = 1          # epochs between validation passes (the last epoch always;
                                     # 0: none during fit, the temperature fit still uses the split)
    flip_tta: bool = True
    translate_tta: bool = False      # also average 1-pixel shifted views at test time (3x cost)
    n_validation: int | None = None  # None: 10% of the training images, at most 5000 (CIFAR-10: 5000)
    seed: int = 0
    mixed_precision: bool = False    # mixed_bfloat16 (slow on CPUs without native bf16)
    distributed: bool = False        # MultiWorkerMirroredStrategy from TF_CONFIG (training.distributed);
                                     # --batch-size stays the global batch, only the chief writes
    overwrite: bool = False
    resume: bool = True              # continue from the checkpoint of an interrupted run of this config
                                     # (training.checkpoint); --no-resume discards it and starts afresh
    keep_checkpoint: bool = False    # keep the last checkpoint after the artifact is written
    verbose: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    def group_widths_tuple(self) -> tuple:
        if not self.group_widths:
            return ()
        widths = tuple(int(v) for v in self.group_widths.split(","))
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"group widths must be three positive integers, got {self.group_widths!r}")
        return widths


DEFAULT_N_VALIDATION = 5000   # Guo et al. (2017): 45,000 train / 5,000 validation


def validation_size(requested: int | None, n_images: int) -> int:
    """How many of `n_images` training images to hold out for validation (and the temperature).

    None: 10% of them, at most DEFAULT_N_VALIDATION, so small data (the 2,000-image sample)
    trains without a flag. An explicit number that leaves nothing to train on is a usage error.
    """
    from commandline import CommandError, UsageError

    if requested is None:
        n = min(DEFAULT_N_VALIDATION, n_images // 10)
        if n < 2:
            raise CommandError(f"data too small: {n_images} training images; the temperature fit "
                               f"needs at least 2 validation images, so at least 20 images")
        return n
    if requested >= n_images:
        raise UsageError(f"--n-validation {requested} leaves no training images: the data has "
                         f"{n_images}; pass a smaller --n-validation (e.g. {max(2, n_images // 10)}) "
                         f"or leave it out (10% of the images)")
    return requested


def parse_args(argv=None, *, prog: str = "calib-train") -> TrainConfig:
    from commandline import ArgumentParser

    parser = ArgumentParser(
        prog=prog,
        description="Train a calibrated CIFAR-10 classifier, fit its temperature, write an artifact.")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction)
        elif f.name == "n_validation":
            parser.add_argument(flag, type=int, default=default, metavar="N",
                                help="validation images (default: 10%% of the training images, at most "
                                     f"{DEFAULT_N_VALIDATION})")
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = parser.parse_args(argv)
    config = TrainConfig(**vars(args))
    if config.optimizer not in ("sgd", "adamw", "muon"):
        parser.error("--optimizer must be sgd, adamw or muon")
    if config.arch not in ("resnet9", "airbench"):
        parser.error("--arch must be resnet9 or airbench")
    if config.distributed:   # before the checks below that import Keras
        from training.distributed import unsupported_options

        refused = unsupported_options(config)
        if refused:
            parser.error(f"--distributed does not support {', '.join(refused)}: "
                         "train those recipes in one process")
    if (config.activation, config.batchnorm) != (defaults.activation, defaults.batchnorm):
        # the network's own lists of choices; it imports Keras (seconds): only when needed
        from models.network import ACTIVATIONS, BATCHNORMS

        if config.activation not in ACTIVATIONS:
            parser.error(f"--activation must be one of {', '.join(ACTIVATIONS)}")
        if config.batchnorm not in BATCHNORMS:
            parser.error(f"--batchnorm must be one of {', '.join(BATCHNORMS)}")
    if config.mix not in ("none", "mixup", "cutmix"):
        parser.error("--mix must be none, mixup or cutmix")
    if not 0.0 <= config.label_smoothing < 1.0:
        parser.error("--label-smoothing must be in [0, 1)")
    if config.n_validation is not None and config.n_validation < 2:
        parser.error("--n-validation must be at least 2: the temperature is fitted on those images")
    if config.epochs < 1 or config.batch_size < 1 or config.width < 1:
        parser.error("--epochs, --batch-size and --width must be positive")
    if config.validate_every < 0:
        parser.error("--validate-every must be 0 (no validation passes during fit) or positive")
    if config.whiten_bias_epochs < 0:
        parser.error("--whiten-bias-epochs must be 0 (never freeze) or a positive number of epochs")
    if config.whiten_bias_epochs and config.arch != "airbench":
        parser.error("--whiten-bias-epochs needs --arch airbench (only its stem has a whitening bias)")
    if not 0 <= config.freeze_group1_epochs < config.epochs:
        parser.error("--freeze-group1-epochs must be 0 (never) or fewer than --epochs")
    if config.freeze_group1_epochs and config.arch != "airbench":
        parser.error("--freeze-group1-epochs needs --arch airbench")
    if not 0 <= config.low_res_epochs < config.epochs:
        parser.error("--low-res-epochs must be 0 (off) or fewer than --epochs: the last epochs "
                     "must see whole 32x32 images")
    if config.low_res_epochs and not 12 <= config.low_res_size < 32:
        parser.error("--low-res-size must be between 12 and 31 pixels (the net pools three times)")
    try:
        config.group_widths_tuple()
    except ValueError:
        parser.error("--group-widths must be three positive integers, e.g. 32,128,128")
    return config
