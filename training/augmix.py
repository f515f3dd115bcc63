"""AugMix (Hendrycks et al. 2020) on whole uint8 batches, with per-image random choices.

Why not `keras.layers.AugMix`: it picks one chain of operations per call in Python, so inside a
traced tf.data map the whole run would share one chain, and it mixes with one weight per batch.
Here every image gets its own chains, depths, operations, magnitudes and mixing weights, all from
a stateless seed (reproducible), as in the paper's reference `augmix.py` for CIFAR:

    width 3 chains, depth 1-3 each, operation severity 3, chain weights ~ Dirichlet(1, 1, 1),
    image = (1 - m) * original + m * sum_i w_i chain_i(original),  m ~ Beta(1, 1)

The operations are the paper's CIFAR list (autocontrast, equalize, posterize, rotate, solarize,
shear x/y, translate x/y). They are disjoint from the CIFAR-10-C corruptions by design (the paper
left out contrast, colour, brightness and sharpness for that reason), so the shift benchmark still
measures unseen shift. No Jensen-Shannon consistency loss: it needs three forward passes per
image (3x the training compute; the budget here is 1.5x).

Cost: one pass of each operation group per depth step over the images that chose it
(`tf.dynamic_partition`), so a batch costs about 9 cheap image operations, not 9 x 9.
"""

from __future__ import annotations

import math

import tensorflow as tf

WIDTH = 3           # chains per image
MAX_DEPTH = 3       # operations per chain: uniform in 1..3
SEVERITY = 3        # the paper's default for CIFAR: magnitudes up to 3/10 of each maximum
OPERATIONS = ("autocontrast", "equalize", "posterize", "rotate", "solarize",
              "shear_x", "shear_y", "translate_x", "translate_y")
_GROUPS = ("identity", "autocontrast", "equalize", "posterize", "solarize", "affine")
_GROUP_OF = {name: _GROUPS.index(name) if name in _GROUPS else _GROUPS.index("affine")
             for name in OPERATIONS}


def _level(seed, n):
    """The paper's `sample_level`: uniform in [0.1, severity] (out of 10)."""
    return tf.random.stateless_uniform([n], seed, minval=0.1, maxval=float(SEVERITY))


def _sign(seed, n):
    return tf.where(tf.random.stateless_uniform([n], seed) < 0.5, -1.0, 1.0)


def autocontrast(images: tf.Tensor) -> tf.Tensor:
    """Per image and channel, stretch [min, max] to [0, 255] (PIL ImageOps.autocontrast, cutoff 0)."""
    x = tf.cast(images, tf.float32)
    lo = tf.reduce_min(x, axis=[1, 2], keepdims=True)
    hi = tf.reduce_max(x, axis=[1, 2], keepdims=True)
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
    offset = tf.where(hi > lo, lo, 0.0)
    return tf.cast(tf.clip_by_value(tf.floor((x - offset) * scale), 0.0, 255.0), tf.uint8)


def equalize(images: tf.Tensor) -> tf.Tensor:
    """Per image and channel histogram equalisation, PIL's ImageOps.equalize rule:
    step = (pixels - count of the top used level) // 255, lut[v] = (cdf_before(v) + step // 2) // step;
    a channel with step 0 is left as it is."""
    n, h, w, c = (tf.shape(images)[0], images.shape[1], images.shape[2], images.shape[3])
    x = tf.cast(images, tf.int32)
    planes = tf.reshape(tf.transpose(x, [0, 3, 1, 2]), [n * c, h * w])      # one row per channel
    offsets = tf.range(n * c)[:, None] * 256
    hist = tf.reshape(tf.math.bincount(tf.reshape(planes + offsets, [-1]), minlength=256 * n * c,
                                       maxlength=256 * n * c), [n * c, 256])
    levels = tf.range(256)[None, :]
    top = tf.reduce_max(tf.where(hist > 0, levels, -1), axis=1)              # highest used level
    top_count = tf.gather(hist, top, batch_dims=1)
    step = (h * w - top_count) // 255
    cdf_before = tf.cumsum(hist, axis=1, exclusive=True)
    safe_step = tf.maximum(step, 1)[:, None]
    lut = tf.minimum((cdf_before + safe_step // 2) // safe_step, 255)
    lut = tf.where(step[:, None] > 0, lut, levels)
    out = tf.gather(lut, planes, batch_dims=1)
    return tf.cast(tf.transpose(tf.reshape(out, [n, c, h, w]), [0, 2, 3, 1]), tf.uint8)


def posterize(images: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """Keep the top `bits` bits of each pixel (per image)."""
    shift = tf.cast(8 - bits, tf.uint8)[:, None, None, None]
    return tf.bitwise.left_shift(tf.bitwise.right_shift(images, shift), shift)


def solarize(images: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """Invert the pixels at or above `threshold` (per image), as PIL's ImageOps.solarize."""
    t = tf.cast(threshold, tf.int32)[:, None, None, None]
    x = tf.cast(images, tf.int32)
    return tf.cast(tf.where(x >= t, 255 - x, x), tf.uint8)


def affine(images: tf.Tensor, matrices: tf.Tensor) -> tf.Tensor:
    """Bilinear affine warp with black fill; `matrices` [N, 8] map output to input pixel
    coordinates (tf.raw_ops.ImageProjectiveTransformV3's convention, PIL's `Image.transform`)."""
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32), transforms=tf.cast(matrices, tf.float32),
        output_shape=tf.shape(images)[1:3], fill_value=0.0, interpolation="BILINEAR",
        fill_mode="CONSTANT")
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def affine_matrices(op: tf.Tensor, level: tf.Tensor, sign: tf.Tensor, size: int) -> tf.Tensor:
    """[N, 8] output->input maps for rotate / shear / translate with the paper's magnitudes:
    rotation up to 30 * level/10 degrees about the centre, shear up to 0.3 * level/10,
    translation up to int(size/3 * level/10) pixels."""
    ops = {name: i for i, name in enumerate(OPERATIONS)}
    zero, one = tf.zeros_like(level), tf.ones_like(level)
    degrees = tf.floor(level * 30.0 / 10.0) * sign
    theta = degrees * math.pi / 180.0
    c = (size - 1) / 2.0                      # rotate about the image centre
    cos, sin = tf.cos(theta), tf.sin(theta)
    rotate = tf.stack([cos, -sin, c - cos * c + sin * c, sin, cos, c - sin * c - cos * c, zero, zero], 1)
    shear = level * 0.3 / 10.0 * sign
    shear_x = tf.stack([one, shear, zero, zero, one, zero, zero, zero], 1)
    shear_y = tf.stack([one, zero, zero, shear, one, zero, zero, zero], 1)
    pixels = tf.floor(level * (size / 3.0) / 10.0) * sign
    translate_x = tf.stack([one, zero, pixels, zero, one, zero, zero, zero], 1)
    translate_y = tf.stack([one, zero, zero, zero, one, pixels, zero, zero], 1)
    identity = tf.stack([one, zero, zero, zero, one, zero, zero, zero], 1)
    out = identity
    for name, m in (("rotate", rotate), ("shear_x", shear_x), ("shear_y", shear_y),
                    ("translate_x", translate_x), ("translate_y", translate_y)):
        out = tf.where((op == ops[name])[:, None], m, out)
    return out


def _apply_group(group: int, images, op, level, sign):
    size = images.shape[1]
    if group == _GROUPS.index("autocontrast"):
        return autocontrast(images)
    if group == _GROUPS.index("equalize"):
        return equalize(images)
    if group == _GROUPS.index("posterize"):
        return posterize(images, 4 - tf.cast(tf.floor(level * 4.0 / 10.0), tf.int32))
    if group == _GROUPS.index("solarize"):
        return solarize(images, 256 - tf.cast(tf.floor(level * 256.0 / 10.0), tf.int32))
    if group == _GROUPS.index("affine"):
        return affine(images, affine_matrices(op, level, sign, size))
    return images


def augment_step(images: tf.Tensor, seed: tf.Tensor, active: tf.Tensor) -> tf.Tensor:
    """One operation per image (uniform over OPERATIONS, random magnitude); images where
    `active` is False pass through. Each group runs once over the images that chose it."""
    n = tf.shape(images)[0]
    s_op, s_level, s_sign = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    op = tf.random.stateless_uniform([n], s_op, minval=0, maxval=len(OPERATIONS), dtype=tf.int32)
    level, sign = _level(s_level, n), _sign(s_sign, n)
    group = tf.gather(tf.constant([_GROUP_OF[name] for name in OPERATIONS]), op)
    group = tf.where(active, group, 0)
    index = tf.range(n)
    parts = tf.dynamic_partition(index, group, len(_GROUPS))
    outs = []
    for g, part in enumerate(parts):
        sub = tf.gather(images, part)
        outs.append(_apply_group(g, sub, tf.gather(op, part), tf.gather(level, part),
                                 tf.gather(sign, part)))
    return tf.dynamic_stitch(parts, outs)


def augmix(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """AugMix of a uint8 [N, H, W, C] batch -> uint8, reproducible for a [2] int seed."""
    n = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 2 + WIDTH * (MAX_DEPTH + 1))
    gamma = tf.random.stateless_gamma([n, WIDTH], seeds[0], alpha=1.0)
    weights = gamma / tf.reduce_sum(gamma, axis=1, keepdims=True)       # Dirichlet(1, 1, 1)
    g1 = tf.random.stateless_gamma([n], seeds[1], alpha=1.0)
    g2 = tf.random.stateless_gamma([n], tf.reverse(seeds[1], [0]), alpha=1.0)
    m = g1 / (g1 + g2)                                                    # Beta(1, 1)
    mix = tf.zeros(tf.shape(images), tf.float32)
    k = 2
    for chain in range(WIDTH):
        depth = tf.random.stateless_uniform([n], seeds[k], minval=1, maxval=MAX_DEPTH + 1,
                                            dtype=tf.int32)
        k += 1
        x = images
        for step in range(MAX_DEPTH):
            x = augment_step(x, seeds[k], active=depth > step)
            k += 1
        mix += weights[:, chain, None, None, None] * tf.cast(x, tf.float32)
    mixed = (1.0 - m)[:, None, None, None] * tf.cast(images, tf.float32) + m[:, None, None, None] * mix
    return tf.cast(tf.clip_by_value(tf.round(mixed), 0.0, 255.0), tf.uint8)
