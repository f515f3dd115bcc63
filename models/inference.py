"""Inference on a calibrated classifier split into backbone and head.

The deterministic prediction is what plain Keras gives (`model.predict(x)` / `model(x)` are the
same logits divided by T): `MCDropout` only drops when `training=True`.
MC dropout is always asked for explicitly, with BatchNorm in inference mode:
- fast (the service): the backbone runs once per image; the T dropout masks are drawn for the
  head only, in one batched computation over [T*B, D] tiled features, with a stateless RNG so a
  seed reproduces the samples (`mc_logits`, `mc_logits_from_features`);
- plain Keras reference: `backbone(x, training=False)`, then `head(features, training=True)` once
  per sample (`mc_logits_keras`; `mc_logits_naive` reruns the backbone too, as a naive loop would).
  The head is MCDropout -> Dense -> rescaling, so `training=True` there changes only dropout.
"""

from __future__ import annotations

import numpy as np
import keras
import tensorflow as tf

from models.calibration.uncertainty import MCSummary, chunked_mc_summary, mc_seed_pair
from models.layers import MCDropout, TemperatureScaling


class SplitClassifier:
    """Backbone/head view of a model built by `models.network.build_classifier`."""

    runtime = "keras"

    def __init__(self, model: keras.Model):
        self.model = model
        self.backbone = keras.Model(model.inputs, model.get_layer("features").output,
                                    name="backbone_view")
        self.head = model.get_layer("head")
        self.head_layers = list(self.head.layers)
        stateful = [layer.name for layer in self.head_layers if layer.non_trainable_weights]
        if stateful:  # e.g. a BatchNorm: head(training=True) would use batch statistics
            raise TypeError(f"head layers {stateful} have state that training=True would change")
        temperature_layer = model.get_layer("temperature")
        if not isinstance(temperature_layer, TemperatureScaling):
            raise TypeError("layer 'temperature' is not a TemperatureScaling layer")
        self._temperature_layer = temperature_layer
        self._features_fn = tf.function(lambda x: self.backbone(x, training=False),
                                        reduce_retracing=True)
        self._head_fn = tf.function(self._head_deterministic, reduce_retracing=True)
        self._mc_fn = tf.function(self._head_sampled, reduce_retracing=True)

    @property
    def temperature(self) -> float:
        return float(keras.ops.convert_to_numpy(self._temperature_layer.temperature))

    @property
    def num_classes(self) -> int:
        return int(self.model.output.shape[-1])

    def set_temperature(self, temperature: float) -> None:
        self._temperature_layer.set_temperature(temperature)

    # --- deterministic path -------------------------------------------------------------
    def _head_deterministic(self, features):
        # MCDropout is the identity in inference mode (inverted dropout: its expectation)
        return tf.cast(self.head(features, training=False), tf.float32)

    def features(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """uint8 [N,32,32,3] -> float32 features [N, D], in chunks of `batch_size`."""
        chunks = [self._features_fn(tf.convert_to_tensor(images[i:i + batch_size], tf.uint8)).numpy()
                  for i in range(0, len(images), batch_size)]
        if not chunks:
            return np.zeros((0, int(self.backbone.output.shape[-1])), np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def head_logits(self, features: np.ndarray) -> np.ndarray:
        return self._head_fn(tf.convert_to_tensor(features, tf.float32)).numpy()

    def logits(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """Uncalibrated deterministic logits [N, K] (divide by `temperature` to calibrate)."""
        return self.head_logits(self.features(images, batch_size))

    # --- MC dropout -----------------------------------------------------------------------
    def _head_sampled(self, features, n_samples, seed):
        b = tf.shape(features)[0]
        x = tf.tile(features, [n_samples, 1])  # [T*B, D], sample-major
        for index, layer in enumerate(self.head_layers):
            if isinstance(layer, MCDropout):
                if layer.rate > 0.0:
                    u = tf.random.stateless_uniform(tf.shape(x), seed=seed + index)
                    keep = tf.cast(u >= layer.rate, x.dtype)
                    x = x * keep / (1.0 - layer.rate)
                continue
            x = layer(x, training=False)
        x = tf.cast(x, tf.float32)
        return tf.reshape(x, [n_samples, b, -1])

    def mc_logits_from_features(self, features: np.ndarray, n_samples: int, seed: int = 0) -> np.ndarray:
        """[T, B, K] uncalibrated logits from T dropout masks on the head."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        seed_pair = tf.constant(mc_seed_pair(seed), tf.int64)
        return self._mc_fn(tf.convert_to_tensor(features, tf.float32), tf.constant(n_samples),
                           seed_pair).numpy()

    def mc_summary_from_features(self, features: np.ndarray, n_samples: int, seed: int, temperature: float,
                                 chunk_rows: int = 65_536) -> MCSummary:
        """`summarize_mc_samples` of T head samples, at most `chunk_rows` (T x images) rows per
        call so memory stays bounded for any batch (`chunked_mc_summary`: chunk c draws with
        seed + 1_000_003 * c)."""
        return chunked_mc_summary(self.mc_logits_from_features, features, n_samples, seed, temperature, chunk_rows)

    def mc_logits(self, images: np.ndarray, n_samples: int, seed: int = 0) -> np.ndarray:
        return self.mc_logits_from_features(self.features(images), n_samples, seed)

    def mc_logits_keras(self, images: np.ndarray, n_samples: int, seed: int | None = None) -> np.ndarray:
        """[T, N, K] uncalibrated logits the plain Keras way: features once, then T calls of
        `head(features, training=True)`. `seed` restarts the MCDropout seed generators."""
        features = tf.convert_to_tensor(self.features(images))
        self._reseed_dropout(seed)
        return np.stack([self._head_sample(features) for _ in range(n_samples)])

    def mc_logits_naive(self, images: np.ndarray, n_samples: int, seed: int | None = None) -> np.ndarray:
        """Reference: T full forward passes (backbone in inference mode, head with dropout on).
        Slow by design: the backbone reruns for every sample."""
        x = tf.convert_to_tensor(images, tf.uint8)
        self._reseed_dropout(seed)
        return np.stack([self._head_sample(self.backbone(x, training=False)) for _ in range(n_samples)])

    def _head_sample(self, features) -> np.ndarray:
        return keras.ops.convert_to_numpy(self.head(features, training=True)).astype(np.float32)

    def _reseed_dropout(self, seed: int | None) -> None:
        if seed is None:
            return
        for layer in self.head_layers:
            if isinstance(layer, MCDropout):
                state = layer.seed_generator.state
                state.assign(np.array([int(seed), 0], dtype=state.dtype))
