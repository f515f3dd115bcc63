"""The classifier: a compact residual CNN (ResNet-9 shape) with an MC-dropout head.

The model is built from three named parts so inference can split it:
  "features"    - the backbone output, one vector per image (after flip averaging if enabled),
  "head"        - MCDropout -> Dense, the only stochastic part, sampled T times for MC dropout,
  "temperature" - TemperatureScaling, logits / T.
The service runs the backbone once per image and draws all dropout masks on the head only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
from keras import layers

from models.layers import HorizontalFlip, MCDropout, MyBatchNorm, PixelNormalization, TemperatureScaling

IMAGE_SHAPE = (32, 32, 3)


@dataclass(frozen=True)
class NetworkConfig:
    """Everything that shapes the network; stored in the model card."""

    width: int = 32                # channels of the first stage; stages use w, 2w, 4w, 8w
    num_classes: int = 10
    dropout: float = 0.2           # MC-dropout rate on the pooled features
    l2: float = 0.0                # kernel_regularizer=L2(l2) on conv/dense kernels (0 = off)
    batchnorm: str = "keras"       # "keras" (fused) or "custom" (MyBatchNorm)
    bn_momentum: float = 0.9
    logit_scale: float = 0.125     # ResNet-9's fixed logit scaling; keeps early logits small
    flip_tta: bool = True          # average backbone features of x and its mirror image

    def to_dict(self) -> dict:
        return asdict(self)


def _bn(cfg: NetworkConfig, name: str):
    if cfg.batchnorm == "custom":
        return MyBatchNorm(momentum=cfg.bn_momentum, epsilon=1e-5, name=name)
    if cfg.batchnorm == "keras":
        return layers.BatchNormalization(momentum=cfg.bn_momentum, epsilon=1e-5, name=name)
    raise ValueError(f"batchnorm must be 'keras' or 'custom', got {cfg.batchnorm!r}")


def _conv_bn(x, filters: int, cfg: NetworkConfig, name: str, pool: bool = False):
    reg = keras.regularizers.L2(cfg.l2) if cfg.l2 > 0 else None
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_regularizer=reg,
                      name=f"{name}_conv")(x)
    if pool:
        x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    x = _bn(cfg, f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _residual(x, filters: int, cfg: NetworkConfig, name: str):
    y = _conv_bn(x, filters, cfg, f"{name}_a")
    y = _conv_bn(y, filters, cfg, f"{name}_b")
    return layers.Add(name=f"{name}_add")([x, y])


def build_backbone(cfg: NetworkConfig) -> keras.Model:
    """uint8 images [B,32,32,3] -> pooled features [B, 8*width]."""
    w = cfg.width
    inputs = keras.Input(IMAGE_SHAPE, dtype="uint8", name="pixels")
    x = PixelNormalization(name="normalize")(inputs)
    x = _conv_bn(x, w, cfg, "prep")
    x = _conv_bn(x, 2 * w, cfg, "stage1", pool=True)
    x = _residual(x, 2 * w, cfg, "res1")
    x = _conv_bn(x, 4 * w, cfg, "stage2", pool=True)
    x = _conv_bn(x, 8 * w, cfg, "stage3", pool=True)
    x = _residual(x, 8 * w, cfg, "res3")
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    return keras.Model(inputs, x, name="backbone")


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


def build_classifier(cfg: NetworkConfig, *, flip_tta: bool | None = None,
                     backbone: keras.Model | None = None, head: keras.Model | None = None,
                     temperature: float = 1.0) -> keras.Model:
    """Assemble pixels -> features -> head -> logits / T.

    Training uses `flip_tta=False` (augmentation already flips); the exported model reuses the
    same trained backbone and head with `flip_tta=cfg.flip_tta`.
    """
    flip_tta = cfg.flip_tta if flip_tta is None else flip_tta
    backbone = backbone or build_backbone(cfg)
    feature_dim = int(backbone.output.shape[-1])
    head = head or build_head(cfg, feature_dim)
    inputs = keras.Input(IMAGE_SHAPE, dtype="uint8", name="pixels")
    if flip_tta:
        mirrored = HorizontalFlip(name="mirror")(inputs)
        features = layers.Average(name="features")([backbone(inputs), backbone(mirrored)])
    else:
        features = layers.Identity(name="features")(backbone(inputs))
    logits = head(features)
    outputs = TemperatureScaling(temperature, name="temperature")(logits)
    return keras.Model(inputs, outputs, name="calibrated_classifier")
