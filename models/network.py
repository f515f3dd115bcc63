"""The classifier: a compact CNN backbone with an MC-dropout head.

Two backbones: "resnet9" (Page's DAWNBench ResNet-9 shape) and "airbench" (Jordan's airbench93
shape: a frozen patch-whitening stem and three conv groups, Dirac-initialised), which reaches
a given accuracy in fewer CPU-minutes. The model is built from three named parts so inference
can split it:
  "features"    - the backbone output, one vector per image (averaged over the test-time views:
                  mirror, and optionally 1-pixel shifts),
  "head"        - MCDropout -> Dense, the only stochastic part, sampled T times for MC dropout,
  "temperature" - TemperatureScaling, logits / T.
The service runs the backbone once per image and draws all dropout masks on the head only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
from keras import layers

import numpy as np

from models.layers import (ExplicitBatchNorm, FusedBatchNorm, HorizontalFlip, MCDropout, PatchWhitening,
                          PixelNormalization, ReflectShift, TemperatureScaling, quick_gelu)

IMAGE_SHAPE = (32, 32, 3)


@dataclass(frozen=True)
class NetworkConfig:
    """Everything that shapes the network; stored in the model card."""

    width: int = 32                # channels of the first stage; stages use w, 2w, 4w, 8w
    num_classes: int = 10
    dropout: float = 0.2           # MC-dropout rate on the pooled features
    l2: float = 0.0                # kernel_regularizer=L2(l2) on conv/dense kernels (0 = off)
    batchnorm: str = "keras"       # "keras", "fused" (FusedBatchNorm) or "custom" (ExplicitBatchNorm)
    bn_momentum: float = 0.9
    logit_scale: float = 0.125     # ResNet-9's fixed logit scaling; keeps early logits small
    flip_tta: bool = True          # average backbone features of x and its mirror image
    arch: str = "resnet9"          # "resnet9", or "airbench": whitened 2x2 stem + 3 conv groups
    activation: str = "relu"       # "relu", "gelu" or "quick_gelu" (x * sigmoid(1.702 x))
    translate_tta: bool = False    # also average the views shifted by (1,1) and (-1,-1) pixels
    group_widths: tuple = ()       # airbench: channels of the three groups; () means (w, 2w, 2w)
    sync_batchnorm: bool = False   # "keras" BN: batch statistics over all replicas (multi-worker
                                   # training), so a global batch normalises as in one process

    def to_dict(self) -> dict:
        return asdict(self)


BATCHNORMS = ("keras", "fused", "custom")
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "quick_gelu": quick_gelu}


def _bn(cfg: NetworkConfig, name: str, scale: bool = True):
    if cfg.batchnorm == "custom":
        return ExplicitBatchNorm(momentum=cfg.bn_momentum, epsilon=1e-5, name=name)
    if cfg.batchnorm == "keras":
        return layers.BatchNormalization(momentum=cfg.bn_momentum, epsilon=1e-5, scale=scale, name=name,
                                         synchronized=cfg.sync_batchnorm)
    if cfg.batchnorm == "fused":
        return FusedBatchNorm(momentum=cfg.bn_momentum, epsilon=1e-5, scale=scale, name=name)
    raise ValueError(f"batchnorm must be 'keras', 'fused' or 'custom', got {cfg.batchnorm!r}")


def _activation(cfg: NetworkConfig, name: str):
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {cfg.activation!r}")
    return layers.Activation(ACTIVATIONS[cfg.activation], name=name)


def _conv_bn(x, filters: int, cfg: NetworkConfig, name: str, pool: bool = False):
    reg = keras.regularizers.L2(cfg.l2) if cfg.l2 > 0 else None
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_regularizer=reg,
                      name=f"{name}_conv")(x)
    if pool:
        x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    x = _bn(cfg, f"{name}_bn")(x)
    return _activation(cfg, f"{name}_{cfg.activation}")(x)


def _residual(x, filters: int, cfg: NetworkConfig, name: str):
    y = _conv_bn(x, filters, cfg, f"{name}_a")
    y = _conv_bn(y, filters, cfg, f"{name}_b")
    return layers.Add(name=f"{name}_add")([x, y])


def build_backbone(cfg: NetworkConfig, *, any_size: bool = False) -> keras.Model:
    """uint8 images [B,32,32,3] -> pooled features [B, D].

    `any_size` builds it for images of any height and width (training on smaller crops); its
    weights are the same list as the 32x32 backbone's, so `set_weights` moves them across.
    """
    if cfg.arch not in ("resnet9", "airbench"):
        raise ValueError(f"arch must be 'resnet9' or 'airbench', got {cfg.arch!r}")
    inputs = keras.Input((None, None, 3) if any_size else IMAGE_SHAPE, dtype="uint8", name="pixels")
    if cfg.arch == "airbench":
        return _airbench_backbone(cfg, inputs)
    return _resnet9_backbone(cfg, inputs)


def _resnet9_backbone(cfg: NetworkConfig, inputs) -> keras.Model:
    """ResNet-9 shape (Page's DAWNBench net): widths w, 2w, 4w, 8w; features [B, 8w]."""
    w = cfg.width
    x = PixelNormalization(name="normalize")(inputs)
    x = _conv_bn(x, w, cfg, "prep")
    x = _conv_bn(x, 2 * w, cfg, "stage1", pool=True)
    x = _residual(x, 2 * w, cfg, "res1")
    x = _conv_bn(x, 4 * w, cfg, "stage2", pool=True)
    x = _conv_bn(x, 8 * w, cfg, "stage3", pool=True)
    x = _residual(x, 8 * w, cfg, "res3")
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    return keras.Model(inputs, x, name="backbone")


def _conv_group(x, filters: int, cfg: NetworkConfig, name: str):
    """airbench's block: conv -> pool -> BN -> act -> conv -> BN -> act (BN without scale)."""
    reg = keras.regularizers.L2(cfg.l2) if cfg.l2 > 0 else None
    for i, pool in ((1, True), (2, False)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_regularizer=reg,
                          name=f"{name}_conv{i}")(x)
        if pool:
            x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
        x = _bn(cfg, f"{name}_bn{i}", scale=False)(x)
        x = _activation(cfg, f"{name}_{cfg.activation}{i}")(x)
    return x


def _airbench_backbone(cfg: NetworkConfig, inputs) -> keras.Model:
    """airbench93's shape (Jordan 2024): a frozen 2x2 whitening stem, groups w, 2w, 2w.

    `group_widths` overrides the three widths: on a CPU, channels at 15x15 and 7x7 are cheaper
    per multiply-add than channels at 31x31 (airbench94 itself uses 64, 256, 256).

    Call `set_whitening(backbone, images)` before training. Convolutions start as partial
    identities (Dirac init), an implicit residual path, as in airbench.
    """
    w = cfg.width
    widths = tuple(cfg.group_widths) or (w, 2 * w, 2 * w)
    if len(widths) != 3 or min(widths) < 1:
        raise ValueError(f"group_widths must be three positive channel counts, got {widths!r}")
    x = PixelNormalization(name="normalize")(inputs)
    x = PatchWhitening(2, name="whiten")(x)
    x = _activation(cfg, f"whiten_{cfg.activation}")(x)
    for i, filters in enumerate(widths, start=1):
        x = _conv_group(x, filters, cfg, f"group{i}")
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    backbone = keras.Model(inputs, x, name="backbone")
    _dirac_init(backbone)
    return backbone


def _dirac_init(model: keras.Model) -> None:
    """Make the first C_in filters of every 3x3 conv an identity map (torch.nn.init.dirac_)."""
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D) and layer.kernel_size == (3, 3):
            kernel = np.array(layer.kernel.numpy())
            c_in, c_out = kernel.shape[2], kernel.shape[3]
            n = min(c_in, c_out)
            kernel[:, :, :, :n] = 0.0
            kernel[1, 1, np.arange(n), np.arange(n)] = 1.0
            layer.kernel.assign(kernel)


def conv_group_layers(backbone: keras.Model, index: int) -> list:
    """The layers with weights (convs, BatchNorms) of airbench conv group `index` (1-3)."""
    prefix = f"group{index}_"
    return [layer for layer in backbone.layers if layer.name.startswith(prefix) and layer.weights]


def set_whitening(backbone: keras.Model, images: np.ndarray, eps: float = 5e-4) -> None:
    """Fit the whitening stem's filters on uint8 training images (airbench uses 5,000)."""
    from models.whitening import patch_whitening_kernel

    stem = backbone.get_layer("whiten")
    normalized = keras.ops.convert_to_numpy(backbone.get_layer("normalize")(images))
    stem.set_filters(patch_whitening_kernel(normalized, stem.kernel_size, eps))


def build_head(cfg: NetworkConfig, feature_dim: int) -> keras.Sequential:
    """Pooled features -> logits. MC dropout sits here, after the convolutional backbone."""
    reg = keras.regularizers.L2(cfg.l2) if cfg.l2 > 0 else None
    return keras.Sequential(
        [
            keras.Input((feature_dim,), name="features_in"),
            MCDropout(cfg.dropout, name="mc_dropout"),
            layers.Dense(cfg.num_classes, kernel_regularizer=reg, name="logits"),
            layers.Rescaling(cfg.logit_scale, name="logit_scale"),
            layers.Activation("linear", dtype="float32", name="logits_f32"),
        ],
        name="head",
    )


def _tta_view_groups(inputs, flip: bool, translate: bool) -> list[list]:
    """Test-time views whose backbone features are averaged (airbench's TTA levels 1 and 2).

    Features are averaged within each group, then the groups are averaged. With `translate`,
    the unshifted views form one group and the (1,1)/(-1,-1) reflect-shifted views the other,
    so each half carries half the weight, as in airbench, and every view runs the backbone once.
    """
    base = [inputs]
    if flip:
        base.append(HorizontalFlip(name="mirror")(inputs))
    if not translate:
        return [base]
    shifted = []
    for dy, name in ((1, "shift_pos"), (-1, "shift_neg")):
        view = ReflectShift(dy, dy, name=name)(inputs)
        shifted.append(view)
        if flip:
            shifted.append(HorizontalFlip(name=f"mirror_{name}")(view))
    return [base, shifted]


def _averaged_features(backbone: keras.Model, groups: list[list]):
    """Mean of the backbone features within each view group, then across groups."""
    if len(groups) == 1 and len(groups[0]) == 1:
        return layers.Identity(name="features")(backbone(groups[0][0]))
    if len(groups) == 1:
        return layers.Average(name="features")([backbone(v) for v in groups[0]])
    means = [layers.Average(name=f"views{i}_mean")([backbone(v) for v in views]) if len(views) > 1
             else backbone(views[0]) for i, views in enumerate(groups)]
    return layers.Average(name="features")(means)


def build_classifier(cfg: NetworkConfig, *, test_time_views: bool = True,
                     backbone: keras.Model | None = None, head: keras.Model | None = None,
                     temperature: float = 1.0) -> keras.Model:
    """Assemble pixels -> features -> head -> logits / T.

    Training uses `test_time_views=False` (one view: augmentation already flips and shifts);
    the exported model reuses the same trained backbone and head with the config's views.
    """
    backbone = backbone or build_backbone(cfg)
    feature_dim = int(backbone.output.shape[-1])
    head = head or build_head(cfg, feature_dim)
    inputs = keras.Input(backbone.input.shape[1:], dtype="uint8", name="pixels")
    groups = _tta_view_groups(inputs, cfg.flip_tta and test_time_views,
                              cfg.translate_tta and test_time_views)
    features = _averaged_features(backbone, groups)
    logits = head(features)
    outputs = TemperatureScaling(temperature, name="temperature")(logits)
    return keras.Model(inputs, outputs, name="calibrated_classifier")
