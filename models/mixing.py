"""Mixup and CutMix as Keras layers on batched (images, one-hot labels) pairs.

They follow the papers: one mixing weight per batch, the batch mixed with a shuffled copy of
itself (Zhang et al. 2018; Yun et al. 2019). Use them in tf.data after batching:
`dataset.batch(128).map(MixUp(alpha=0.2))`. For CutMix the label weight is the pasted area,
after the box is clipped to the image. (`keras.layers.MixUp`/`CutMix` draw one weight per
sample instead and take a dict input.)

Randomness is stateless and keyed on (seed, the batch's content): `ds.map(layer,
num_parallel_calls=AUTOTUNE)` runs calls concurrently and in any order, so a call counter in a
tf.Variable would hand the seeds out in a different order every run (not reproducible). The
batch content is itself reproducible under a seeded shuffle, so the mix is too.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from models.layers import PACKAGE


def _beta_sample(alpha: float, seed) -> tf.Tensor:
    g1 = tf.random.stateless_gamma([], seed, alpha=alpha)
    g2 = tf.random.stateless_gamma([], seed + 1, alpha=alpha)
    return g1 / (g1 + g2)


def _as_bytes(t: tf.Tensor) -> tf.Tensor:
    t = tf.convert_to_tensor(t)
    if t.dtype == tf.uint8:
        return tf.reshape(t, [-1])
    return tf.reshape(tf.bitcast(tf.cast(t, tf.float32), tf.uint8), [-1])


class _BatchMixer(keras.layers.Layer):
    def __init__(self, alpha: float = 1.0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.seed = int(seed)

    def _next_seed(self, images, labels):
        # Stateless seed from (seed, fingerprint of the batch): order-independent, reproducible.
        data = tf.concat([_as_bytes(images), _as_bytes(labels)], axis=0)
        digest = tf.bitcast(tf.fingerprint(data[None, :])[0], tf.int64)
        return tf.stack([tf.constant(self.seed, tf.int64), digest])

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class MixUp(_BatchMixer):
    """x = lam*x + (1-lam)*x[perm], y likewise, lam ~ Beta(alpha, alpha)."""

    def call(self, images, labels):
        seed = self._next_seed(images, labels)
        lam = _beta_sample(self.alpha, seed)
        perm = tf.argsort(tf.random.stateless_uniform([tf.shape(images)[0]], seed + 2))
        x = tf.cast(images, tf.float32)
        mixed = lam * x + (1.0 - lam) * tf.gather(x, perm)
        if images.dtype == tf.uint8:
            mixed = tf.cast(tf.round(mixed), tf.uint8)
        y = tf.cast(labels, tf.float32)
        return mixed, lam * y + (1.0 - lam) * tf.gather(y, perm)


@keras.saving.register_keras_serializable(package=PACKAGE)
class CutMix(_BatchMixer):
    """Paste a box from x[perm]; the label weight is the pasted area fraction."""

    def call(self, images, labels):
        seed = self._next_seed(images, labels)
        lam = _beta_sample(self.alpha, seed)
        shape = tf.shape(images)
        b, h, w = shape[0], shape[1], shape[2]
        perm = tf.argsort(tf.random.stateless_uniform([b], seed + 2))
        cut = tf.sqrt(1.0 - lam)
        ch = tf.cast(tf.cast(h, tf.float32) * cut, tf.int32)
        cw = tf.cast(tf.cast(w, tf.float32) * cut, tf.int32)
        cy = tf.random.stateless_uniform([], seed + 3, maxval=h, dtype=tf.int32)
        cx = tf.random.stateless_uniform([], seed + 4, maxval=w, dtype=tf.int32)
        y0, y1 = tf.clip_by_value(cy - ch // 2, 0, h), tf.clip_by_value(cy + ch // 2, 0, h)
        x0, x1 = tf.clip_by_value(cx - cw // 2, 0, w), tf.clip_by_value(cx + cw // 2, 0, w)
        rows = tf.logical_and(tf.range(h) >= y0, tf.range(h) < y1)
        cols = tf.logical_and(tf.range(w) >= x0, tf.range(w) < x1)
        box = tf.logical_and(rows[:, None], cols[None, :])[None, :, :, None]
        mixed = tf.where(box, tf.gather(images, perm), images)
        pasted = tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(h * w, tf.float32)
        y = tf.cast(labels, tf.float32)
        return mixed, (1.0 - pasted) * y + pasted * tf.gather(y, perm)
