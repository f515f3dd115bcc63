"""tf.data input pipeline: uint8 until batching, per-image flip and pad-crop, prefetch.

Augmentation runs on whole batches with per-image random parameters (vectorised gathers), which
is far cheaper on a 2-core CPU than one small op per image. Pixels stay uint8: the model
normalises them itself.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def random_flip_and_crop(images: tf.Tensor, *, pad: int, seed: tf.Tensor) -> tf.Tensor:
    """Per-image random horizontal flip and random crop after reflect-padding by `pad` pixels."""
    batch = tf.shape(images)[0]
    size = images.shape[1]
    s_flip, s_y, s_x = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    flip = tf.random.stateless_uniform([batch], s_flip) < 0.5
    images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    if pad <= 0:
        return images
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    oy = tf.random.stateless_uniform([batch], s_y, minval=0, maxval=2 * pad + 1, dtype=tf.int32)
    ox = tf.random.stateless_uniform([batch], s_x, minval=0, maxval=2 * pad + 1, dtype=tf.int32)
    rows = oy[:, None] + tf.range(size)[None, :]
    cols = ox[:, None] + tf.range(size)[None, :]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(out, cols, axis=2, batch_dims=1)


def one_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    return tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)


def training_dataset(x: np.ndarray, y: np.ndarray, *, batch_size: int, num_classes: int,
                     seed: int, pad: int = 4, mix_layer=None) -> tf.data.Dataset:
    """Shuffled, augmented batches of (uint8 images, one-hot labels), reshuffled every epoch.

    `mix_layer` (Mixup/CutMix) maps a batch of (images, one-hot labels) to mixed soft labels.
    """
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    counter = tf.data.Dataset.counter()
    ds = tf.data.Dataset.zip((ds, counter))

    def augment(batch, step):
        images, labels = batch
        seed_pair = tf.stack([tf.constant(seed, tf.int64), step])
        images = random_flip_and_crop(images, pad=pad, seed=seed_pair)
        return images, one_hot(labels, num_classes)

    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    if mix_layer is not None:
        ds = ds.map(mix_layer, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(x: np.ndarray, batch_size: int = 1000) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(x).batch(batch_size).prefetch(tf.data.AUTOTUNE)
