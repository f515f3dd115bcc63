"""tf.data input pipeline: uint8 until batching, per-image flip and pad-crop, prefetch.

Augmentation runs on whole batches with per-image random parameters (vectorised gathers), which
is far cheaper on a 2-core CPU than one small op per image. Pixels stay uint8: the model
normalises them itself.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from training.augmix import augmix as augmix_batch


def random_flip_and_crop(images: tf.Tensor, *, pad: int, seed: tf.Tensor,
                         flip: tf.Tensor | None = None, size: int | None = None) -> tf.Tensor:
    """Per-image horizontal flip (random unless `flip` is given) and a random `size` x `size`
    crop (default: the input size) after reflect-padding by `pad` pixels."""
    batch = tf.shape(images)[0]
    in_size = images.shape[1]
    size = in_size if size is None else int(size)
    s_flip, s_y, s_x = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    if flip is None:
        flip = tf.random.stateless_uniform([batch], s_flip) < 0.5
    images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    if pad <= 0 and size == in_size:
        return images
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT") if pad > 0 else images
    span = in_size + 2 * pad - size + 1           # number of crop positions per axis
    oy = tf.random.stateless_uniform([batch], s_y, minval=0, maxval=span, dtype=tf.int32)
    ox = tf.random.stateless_uniform([batch], s_x, minval=0, maxval=span, dtype=tf.int32)
    rows = oy[:, None] + tf.range(size)[None, :]
    cols = ox[:, None] + tf.range(size)[None, :]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(out, cols, axis=2, batch_dims=1)


def one_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    return tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)


def training_dataset(x: np.ndarray, y: np.ndarray, *, batch_size: int, num_classes: int,
                     seed: int, pad: int = 4, mix_layer=None,
                     alternate_flip: bool = False, epochs: int | None = None,
                     low_res_size: int = 0, low_res_steps: int = 0,
                     augmix: bool = False, start_epoch: int = 0) -> tf.data.Dataset:
    """Shuffled, augmented batches of (uint8 images, one-hot labels), reshuffled every epoch.

    `mix_layer` (Mixup/CutMix) maps a batch of (images, one-hot labels) to mixed soft labels.
    `alternate_flip` is airbench's derandomised flip: each image gets a random flip phase once,
    then is mirrored in every other epoch, so any two consecutive epochs show both orientations.
    With `epochs`, the dataset holds all epochs in one pass (`fit(..., steps_per_epoch=...)`), so
    the step counter and with it the random crops and the flip phase run on across epochs;
    without it, each iteration is one epoch and the counter starts again at 0.
    With `low_res_steps`, the first that many batches are random `low_res_size` crops (as
    cuda-convnet trained on 24x24 crops of CIFAR): a convolution's cost scales with the pixels,
    so early epochs cost about (size/32)**2 of a full one. Objects keep their scale (crops, not
    resizing), and the full-size epochs that follow adapt the net to whole images.
    With `augmix`, every image is then replaced by its AugMix (`training.augmix`), on its own
    seed stream, so the flips and crops are the same with and without it.
    With `start_epoch` (a resumed run, `training.checkpoint`; needs `epochs`), the batches of the
    first `start_epoch` epochs are skipped before augmentation: the seeded shuffle and the step
    counter run on exactly as in an uninterrupted run, so epoch k sees the same images in the same
    order with the same crops. Skipping costs only the shuffle and batch copies (no augmentation).
    """
    phase = np.random.default_rng(seed).integers(0, 2, len(x), dtype=np.int64)
    steps_per_epoch = max(1, len(x) // batch_size)
    ds = tf.data.Dataset.from_tensor_slices((x, y, phase))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    if epochs is not None:
        ds = ds.repeat(epochs)
    elif alternate_flip:
        raise ValueError("alternate_flip needs `epochs`: the epoch is counted across the whole run")
    counter = tf.data.Dataset.counter()
    ds = tf.data.Dataset.zip((ds, counter))
    if start_epoch:
        if epochs is None:
            raise ValueError("start_epoch needs `epochs`: the skipped batches are counted across the run")
        ds = ds.skip(start_epoch * steps_per_epoch)

    def augment(batch, step):
        images, labels, image_phase = batch
        seed_pair = tf.stack([tf.constant(seed, tf.int64), step])
        flip = None
        if alternate_flip:
            flip = tf.math.floormod(image_phase + step // steps_per_epoch, 2) == 1

        def crop(size=None):
            return random_flip_and_crop(images, pad=pad, seed=seed_pair, flip=flip, size=size)

        if low_res_steps > 0:
            images = tf.cond(step < low_res_steps, lambda: crop(low_res_size), crop)
        else:
            images = crop()
        if augmix:
            images = augmix_batch(images, tf.stack([tf.constant(seed + 7919, tf.int64), step]))
        return images, one_hot(labels, num_classes)

    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    if mix_layer is not None:
        ds = ds.map(mix_layer, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)

