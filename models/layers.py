"""Custom Keras layers the classifier is built from, all registered for serialisation.

They live in one module so `keras.saving.load_model(..., safe_mode=True)` finds every one of
them by importing `models.layers`: nothing custom is ever loaded through a lambda or pickle.
"""

from __future__ import annotations

import keras
from keras import ops

PACKAGE = "calibrated_cifar"

# Per-channel statistics of the CIFAR-10 training set (official data), on the 0..255 scale.
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)


@keras.saving.register_keras_serializable(package=PACKAGE)
class PixelNormalization(keras.layers.Layer):
    """Raw uint8 pixels in, standardised floats out.

    Normalisation lives inside the model so the service feeds raw 0..255 pixels and can never
    disagree with training about preprocessing.
    """

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        mean = ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
        std = ops.convert_to_tensor(self.std, dtype=self.compute_dtype)
        return (x - mean) / std

    def get_config(self):
        return {**super().get_config(), "mean": list(self.mean), "std": list(self.std)}


@keras.saving.register_keras_serializable(package=PACKAGE)
class HorizontalFlip(keras.layers.Layer):
    """Deterministic left-right flip (for flip test-time augmentation inside the model)."""

    def call(self, inputs):
        return ops.flip(inputs, axis=2)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ReflectShift(keras.layers.Layer):
    """Shift images by (dy, dx) pixels with a reflected border (translate test-time augmentation)."""

    def __init__(self, dy: int, dx: int, **kwargs):
        super().__init__(**kwargs)
        self.dy, self.dx = int(dy), int(dx)

    def call(self, inputs):
        pad = max(abs(self.dy), abs(self.dx))
        if pad == 0:
            return inputs
        height, width = inputs.shape[1], inputs.shape[2]
        padded = ops.pad(inputs, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="reflect")
        top, left = pad - self.dy, pad - self.dx
        return padded[:, top:top + height, left:left + width, :]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "dy": self.dy, "dx": self.dx}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PatchWhitening(keras.layers.Layer):
    """A k x k 'valid' convolution with frozen patch-whitening filters and a trainable bias.

    The filters (see `models.whitening`) are set from training images with `set_filters`
    before training; they are a non-trainable weight, so they are saved with the model.
    """

    def __init__(self, kernel_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = int(kernel_size)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        filters = 2 * channels * self.kernel_size ** 2
        self.kernel = self.add_weight(name="kernel", trainable=False, initializer="glorot_uniform",
                                      shape=(self.kernel_size, self.kernel_size, channels, filters))
        self.bias = self.add_weight(name="bias", shape=(filters,), initializer="zeros")

    def set_filters(self, kernel) -> None:
        self.kernel.assign(ops.convert_to_tensor(kernel, dtype=self.kernel.dtype))

    def call(self, inputs):
        x = ops.conv(ops.cast(inputs, self.compute_dtype), ops.cast(self.kernel, self.compute_dtype),
                     padding="valid")
        return x + ops.cast(self.bias, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        k = self.kernel_size
        valid = lambda n: None if n is None else n - k + 1
        return (input_shape[0], valid(input_shape[1]), valid(input_shape[2]),
                2 * int(input_shape[-1]) * k * k)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package=PACKAGE)
class MCDropout(keras.layers.Layer):
    """The head's dropout; Monte Carlo samples are drawn only when asked for explicitly.

    It honours `training` like `keras.layers.Dropout`: `fit` drops units, while `predict`,
    `model(x)` and `model(x, training=False)` are deterministic, as Keras' inference contract
    requires. MC dropout must sample while BatchNorm stays in inference mode, which
    `model(x, training=True)` cannot give; `models.inference.SplitClassifier` therefore samples
    the head alone (`head(features, training=True)` after `backbone(x, training=False)`, or its
    vectorised stateless masks). Its own class (not `Dropout`) keeps existing .keras files loading.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if training and self.rate > 0.0:
            return keras.random.dropout(inputs, self.rate, seed=self.seed_generator)
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TemperatureScaling(keras.layers.Layer):
    """Post-hoc calibration: divides logits by a fitted temperature T (Guo et al. 2017).

    T is a non-trainable weight, so it is saved inside `model.keras` and can be set after
    training without rebuilding the model. It never changes the arg-max, hence accuracy.
    """

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self._initial_temperature = float(temperature)
        self.temperature = self.add_weight(
            name="temperature",
            shape=(),
            initializer=keras.initializers.Constant(self._initial_temperature),
            trainable=False,
            dtype="float32",
        )

    def call(self, logits):
        return ops.cast(logits, "float32") / self.temperature

    def set_temperature(self, temperature: float) -> None:
        if not (temperature > 0.0 and temperature < float("inf")):
            raise ValueError(f"temperature must be positive and finite, got {temperature}")
        self.temperature.assign(float(temperature))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "temperature": float(keras.ops.convert_to_numpy(self.temperature))}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ExplicitBatchNorm(keras.layers.Layer):
    """Batch normalisation written out in plain ops: gamma, beta, running mean and variance.

    Branches on `training` exactly like `keras.layers.BatchNormalization`: batch statistics and
    a moving-average update in training, the running statistics in inference. The lab's
    batchnorm section and `--batchnorm custom` use it as a readable reference; the shipped
    models use Keras' layer or `FusedBatchNorm`. Named `MyBatchNorm` before 0.2; files saved
    under that name still load (the alias below).
    """

    def __init__(self, num_features: int | None = None, momentum=0.99, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.num_features = num_features
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        n = int(input_shape[-1])
        if self.num_features is not None and self.num_features != n:
            raise ValueError(f"ExplicitBatchNorm expects {self.num_features} features, got {n}")
        self.num_features = n
        self.gamma = self.add_weight(name="gamma", shape=(n,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(n,), initializer="zeros")
        self.running_mean = self.add_weight(
            name="running_mean", shape=(n,), initializer="zeros", trainable=False
        )
        self.running_var = self.add_weight(
            name="running_var", shape=(n,), initializer="ones", trainable=False
        )

    def call(self, inputs, training=None):
        x = ops.cast(inputs, self.compute_dtype)
        axes = list(range(len(x.shape) - 1))
        if training and self.trainable:   # a frozen BN runs in inference mode, as Keras' does
            mean = ops.mean(ops.cast(x, "float32"), axis=axes)
            var = ops.var(ops.cast(x, "float32"), axis=axes)
            m = self.momentum
            self.running_mean.assign(m * self.running_mean + (1.0 - m) * mean)
            self.running_var.assign(m * self.running_var + (1.0 - m) * var)
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.gamma * ops.rsqrt(var + self.epsilon)
        shift = self.beta - mean * scale
        return x * ops.cast(scale, x.dtype) + ops.cast(shift, x.dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "num_features": self.num_features,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
        }


# Artifacts saved before the rename name the layer "calibrated_cifar>MyBatchNorm".
keras.saving.get_custom_objects()[f"{PACKAGE}>MyBatchNorm"] = ExplicitBatchNorm


@keras.saving.register_keras_serializable(package=PACKAGE)
class FusedBatchNorm(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` computed by TensorFlow's one-kernel fused op.

    Keras 3 normalises with separate moments, rsqrt, multiply and add ops, each a pass over the
    activations; on a memory-bound 2-core CPU the fused kernel (and its fused gradient) is ~1.8x
    faster. Same weights, same `training` branches, same moving-average update; only 4-D float32
    NHWC inputs take the fused path, anything else falls back to the Keras implementation.
    """

    def call(self, inputs, training=None, mask=None):
        import tensorflow as tf

        if (mask is not None or len(inputs.shape) != 4 or self.axis not in (-1, 3)
                or inputs.dtype != tf.float32):
            return super().call(inputs, training=training, mask=mask)
        channels = int(inputs.shape[-1])
        gamma = self.gamma if self.scale else tf.ones((channels,), tf.float32)
        beta = self.beta if self.center else tf.zeros((channels,), tf.float32)
        if training and self.trainable:   # a frozen BN runs in inference mode, as Keras' does
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True)
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
            self.moving_variance.assign(self.moving_variance * m + variance * (1.0 - m))
            return y
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, mean=self.moving_mean, variance=self.moving_variance,
            epsilon=self.epsilon, data_format="NHWC", is_training=False)
        return y


@keras.saving.register_keras_serializable(package=PACKAGE)
def quick_gelu(x):
    """GELU's sigmoid form, x * sigmoid(1.702 x) (Hendrycks & Gimpel 2016; CLIP uses it).

    Within 0.02 of the erf form everywhere, but three elementwise passes instead of erf's many:
    on this memory-bound CPU its forward + backward is ~1.5x faster than exact GELU.
    """
    return x * ops.sigmoid(1.702 * x)
