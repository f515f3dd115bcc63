"""How the training command updates weights: schedule, optimizer, and Lookahead averaging.

The schedule is piecewise linear (start -> peak -> end, as fractions of the peak). With start and
end 0 it is the one-cycle ramp of ResNet-9 training; airbench uses start 0.2, a peak at 23% of
training and end 0.07. `bias_lr_scale` gives BatchNorm shifts (`beta`) a larger step, airbench's
"bias scaler", which Keras optimizers cannot express with parameter groups. `MuonSGD` updates the
3x3 convolution filters with Muon (orthogonalised momentum, airbench94_muon) and everything else
with the same SGD.
"""

from __future__ import annotations

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="calibrated_cifar")
class PiecewiseLinearSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear from `start*peak` to `peak` over the warm-up, then linear to `end*peak`."""

    def __init__(self, peak: float, total_steps: int, warmup_fraction: float,
                 start: float = 0.0, end: float = 0.0):
        self.peak, self.total_steps = float(peak), max(1, int(total_steps))
        self.warmup = max(1, int(self.total_steps * warmup_fraction))
        self.start, self.end = float(start), float(end)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        up = self.start + (1.0 - self.start) * step / self.warmup
        frac = keras.ops.minimum(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        down = 1.0 + (self.end - 1.0) * frac
        return self.peak * keras.ops.where(step < self.warmup, up, down)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps,
                "warmup_fraction": self.warmup / self.total_steps, "start": self.start, "end": self.end}


class BiasScaledSGD(keras.optimizers.SGD):
    """SGD whose BatchNorm `beta` variables take steps `bias_lr_scale` times larger."""

    def __init__(self, *args, bias_lr_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias_lr_scale = float(bias_lr_scale)

    def update_step(self, gradient, variable, learning_rate):
        # Keras passes its own variable ("beta") or, on the TF backend, the tf.Variable
        # ("group1_bn1/beta:0"): compare the last path component without the ":0".
        short_name = variable.name.split(":")[0].rsplit("/", 1)[-1]
        if self.bias_lr_scale != 1.0 and short_name == "beta":
            learning_rate = keras.ops.cast(learning_rate, variable.dtype) * self.bias_lr_scale
        return super().update_step(gradient, variable, learning_rate)


def orthogonalize(g, steps: int = 3, eps: float = 1e-7):
    """Newton-Schulz approximation of U V^T for g = U S V^T (Muon's quintic, 3 steps).

    The coefficients push singular values towards ~[0.5, 1.5] rather than exactly 1, which
    airbench94_muon found as good as the exact polar factor and cheaper.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (keras.ops.sqrt(keras.ops.sum(keras.ops.square(g))) + eps)
    wide = g.shape[0] <= g.shape[1]
    if not wide:
        x = keras.ops.transpose(x)
    for _ in range(steps):
        gram = keras.ops.matmul(x, keras.ops.transpose(x))
        poly = b * gram + c * keras.ops.matmul(gram, gram)
        x = a * x + keras.ops.matmul(poly, x)
    return x if wide else keras.ops.transpose(x)


class MuonSGD(BiasScaledSGD):
    """Muon on 4-D convolution kernels, bias-scaled SGD on the rest (airbench94_muon's split).

    For a kernel w [kh, kw, in, out] with gradient g:
      g  <- g minus its component along w. With BatchNorm after the conv the loss gradient has
            none, so this removes exactly the L2 penalty's 2*l2*w, which Muon's own weight
            normalisation makes redundant;
      m  <- mu*m + g;  u = g + mu*m (Nesterov);
      w  <- w * sqrt(out) / |w|  (fixed norm, as airbench94_muon);  w <- w - lr_muon * NS(u).
    `lr_muon` follows the same schedule as the SGD rate: lr_muon = muon_lr * lr / peak_lr.
    """

    def __init__(self, *args, muon_lr: float = 0.24, muon_momentum: float = 0.6,
                 peak_lr: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.momentum:
            raise ValueError("MuonSGD keeps Muon's momentum in SGD's slot: momentum must be > 0")
        self.muon_lr, self.muon_momentum, self.peak_lr = float(muon_lr), float(muon_momentum), float(peak_lr)

    def update_step(self, gradient, variable, learning_rate):
        if len(variable.shape) != 4:
            return super().update_step(gradient, variable, learning_rate)
        ops = keras.ops
        w = ops.convert_to_tensor(variable)
        g = ops.cast(gradient, variable.dtype)
        norm_sq = ops.sum(w * w)
        g = g - ops.sum(g * w) / norm_sq * w
        m = self.momentums[self._get_variable_index(variable)]
        mu = self.muon_momentum
        self.assign(m, m * mu + g)
        u = g + mu * ops.convert_to_tensor(m)
        out_channels = variable.shape[-1]
        update = ops.reshape(orthogonalize(ops.reshape(u, (-1, out_channels))), variable.shape)
        rate = ops.cast(learning_rate, variable.dtype) * (self.muon_lr / self.peak_lr)
        w = w * (out_channels ** 0.5) / ops.sqrt(norm_sq)
        self.assign(variable, w - rate * update)

    def get_config(self):
        return {**super().get_config(), "muon_lr": self.muon_lr,
                "muon_momentum": self.muon_momentum, "peak_lr": self.peak_lr}


def build_optimizer(config, total_steps: int):
    schedule = PiecewiseLinearSchedule(config.learning_rate, total_steps, config.warmup_fraction,
                                       start=config.lr_start_factor, end=config.lr_end_factor)
    if config.optimizer == "adamw":
        opt = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay,
                                     beta_1=config.momentum, epsilon=1e-8)
        # Decay kernels only, as in the AdamW paper's practice: not BN scales/shifts or biases.
        opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
        return opt
    if config.optimizer == "muon":
        return MuonSGD(learning_rate=schedule, momentum=config.momentum, nesterov=True,
                       bias_lr_scale=config.bias_lr_scale, muon_lr=config.muon_lr,
                       muon_momentum=config.muon_momentum, peak_lr=config.learning_rate)
    return BiasScaledSGD(learning_rate=schedule, momentum=config.momentum, nesterov=True,
                         bias_lr_scale=config.bias_lr_scale)


class Lookahead(keras.callbacks.Callback):
    """airbench's Lookahead: every `every` steps, pull the weights into a slow EMA and copy it back.

    The EMA decay ramps up as (step / total)**power, so training moves fast early and averages
    strongly at the end. It covers every float weight, BatchNorm statistics included, and starts
    after `start_step` steps. The weights become the slow average once more when training ends
    (airbench's final `decay=1.0` update); between pulls the fast weights are left alone.
    """

    def __init__(self, total_steps: int, start_step: int, every: int = 5,
                 base_decay: float = 0.95 ** 5, power: float = 3.0):
        super().__init__()
        self.total_steps, self.start_step, self.every = int(total_steps), int(start_step), int(every)
        self.base_decay, self.power = float(base_decay), float(power)
        self.step = 0
        self.slow = None

    checkpoint_name = "lookahead"   # training.checkpoint saves get_state() with every epoch

    def _variables(self):
        return [v for v in self.model.weights if "float" in str(v.dtype)]

    def get_state(self) -> list:
        """[step, *slow weights]: what a resumed run needs to pull exactly as this one would."""
        return [np.array(self.step, np.int64), *(self.slow or [])]

    def set_state(self, arrays) -> None:
        self.step = int(arrays[0])
        self.slow = [np.array(a) for a in arrays[1:]] or None

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step < self.start_step or self.step % self.every:
            return
        if self.slow is None:
            self.slow = [np.array(v.numpy()) for v in self._variables()]
            return
        self._pull(self.base_decay * (self.step / self.total_steps) ** self.power)

    def on_train_end(self, logs=None):
        if self.slow is not None:
            self._pull(1.0)

    def _pull(self, decay: float) -> None:
        for slow, variable in zip(self.slow, self._variables()):
            slow *= decay
            slow += (1.0 - decay) * variable.numpy()
            variable.assign(slow)


class FreezeLayersAfter(keras.callbacks.Callback):
    """Stop training `layers` after `epochs` epochs (airbench trains the whitening bias for 3).

    Besides copying airbench, this saves time: with the stem frozen, backpropagation stops at
    the first conv group and TF skips the gradient with respect to its 31x31 input; freezing
    group 1 as well (FreezeOut, Brock et al. 2017) also skips its filter gradients and the
    input gradient of group 2 (F5's frozen epochs took 0.89x as long in run Z13). A frozen
    BatchNorm runs in inference mode on its moving statistics. The train function is rebuilt
    once, so the next step is traced without the layers' variables; the optimizer keeps its
    state for the rest.
    """

    def __init__(self, layers, epochs: int, initial_epoch: int = 0):
        super().__init__()
        self.layers, self.epochs = list(layers), int(epochs)
        self.initial_epoch = int(initial_epoch)   # a resumed run (training.checkpoint) starts here

    def on_train_begin(self, logs=None):
        if self.initial_epoch >= self.epochs:   # resumed after the freeze: freeze again
            self._freeze()

    def _freeze(self):
        for layer in self.layers:
            layer.trainable = False
        self.model.make_train_function(force=True)

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs and any(layer.trainable for layer in self.layers):
            self._freeze()
