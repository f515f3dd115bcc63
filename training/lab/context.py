"""What a lab run is given: its arguments, its data, its seed, and a few shared helpers.

`--quick` picks each section's small settings (the repository's 600-image test fixture, 1-2 epochs, tiny
widths) so all six sections finish in a couple of minutes; otherwise a section uses its own
defaults unless `--epochs`, `--width`, `--train-size` or `--test-size` say otherwise. Whatever
was picked is written into the report's `arguments`, so a report says exactly what ran.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.lab.report import portable_path

REPO = Path(__file__).resolve().parents[2]
# --quick without --data: the 600 real CIFAR-10 JPEGs the repository ships for its tests
QUICK_SAMPLE = REPO / "tests" / "data" / "cifar10-fixture"


@dataclass
class LabContext:
    quick: bool = False
    data: str | None = None          # None: the repo's test fixture with --quick, else "keras"
    epochs: int | None = None
    width: int | None = None
    train_size: int | None = None    # a seeded subset of the training split (None: all)
    test_size: int | None = None
    seed: int = 0
    artifact: str | None = None      # a trained model artifact for the dropout section's MC part
    arch: str | None = None          # "resnet9" (the lab's residual CNN) or "airbench" (the shipped backbone)
    group_widths: tuple | None = None  # airbench: channels of its three groups
    validation_size: int | None = None  # held out of the training split (temperature fitting)
    batch_size: int | None = None
    picked: dict[str, Any] = field(default_factory=dict)

    @property
    def data_source(self) -> str:
        if self.data:
            return self.data
        return str(QUICK_SAMPLE) if self.quick else "keras"

    def _portable_description(self, description: str) -> str:
        """The loader's description names the path it opened; a report shows it as typed."""
        if self.data_source == "keras":
            return description
        opened = str(Path(self.data_source))
        return description.replace(opened, portable_path(opened))

    def pick(self, name: str, *, quick, full):
        """The user's value for `name` if given, else the section's quick or full default."""
        given = getattr(self, name, None)
        value = given if given is not None else (quick if self.quick else full)
        self.picked[name] = value
        return value

    def setting(self, name: str, *, quick, full):
        """A section constant that differs between quick and full runs (recorded, not a flag)."""
        value = quick if self.quick else full
        self.picked[name] = value
        return value

    def loop_checkpoint(self, report, variant: str, **settings):
        """The per-epoch checkpoint of one training loop of this section (training.lab.resume),
        keyed on the section's settings picked so far, the data checksum and `settings`."""
        import re

        from training.lab.resume import LoopCheckpoint

        picked = {k: v for k, v in self.picked.items() if k != "data"}   # the data by checksum, not path
        data = getattr(report, "data", None) or {}
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", variant).strip("_")
        return LoopCheckpoint(report.out_dir / ".checkpoint", name,
                              {**picked, "data_checksum": data.get("checksum"), **settings}, self.seed)

    def cifar(self, report, *, train_quick=None, train_full=None, test_quick=None, test_full=None,
              validation_quick=None, validation_full=None):
        """CIFAR-10 arrays (seeded subsets if sizes are set); records the provenance in `report`.

        With a validation size, that many images of the (subset) training split are held out by
        `training.data.train_validation_split` (seeded): 5,000 of 50,000 is Guo et al.'s 45,000/5,000.
        """
        from training.data import train_validation_split

        data = _load(self.data_source)
        self.picked["data"] = portable_path(self.data_source)
        n_train = self.pick("train_size", quick=train_quick, full=train_full)
        n_test = self.pick("test_size", quick=test_quick, full=test_full)
        n_val = self.pick("validation_size", quick=validation_quick, full=validation_full)
        x_train, y_train = _subset(data.x_train, data.y_train, n_train, self.seed)
        x_test, y_test = _subset(data.x_test, data.y_test, n_test, self.seed + 1)
        x_val = y_val = None
        if n_val:
            x_train, y_train, x_val, y_val = train_validation_split(x_train, y_train, n_validation=n_val,
                                                                    seed=self.seed)
        used = {"train": int(len(x_train)), "test": int(len(x_test))}
        if x_val is not None:
            used["validation"] = int(len(x_val))
        report.data = {"source": self._portable_description(data.source), "checksum": data.checksum,
                       "available": {"train": int(len(data.x_train)), "test": int(len(data.x_test))},
                       "used": used, "subset_seed": self.seed}
        return Cifar(x_train, y_train, x_test, y_test, len(data.class_names), x_val, y_val)


@dataclass(frozen=True)
class Cifar:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None


@functools.lru_cache(maxsize=2)
def _load(source: str):
    from training.data import load_cifar10

    return load_cifar10(source)


def _subset(x: np.ndarray, y: np.ndarray, n: int | None, seed: int):
    if n is None or n >= len(x):
        return x, y
    index = np.sort(np.random.default_rng(seed).permutation(len(x))[:n])
    return x[index], y[index]


# --- helpers shared by the CIFAR sections -------------------------------------------------

def seed_everything(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)


def lab_network(width: int, num_classes: int, *, dropout: float = 0.0, l2: float = 0.0,
                batchnorm: str = "keras", arch: str = "resnet9", group_widths: tuple = ()):
    """The project's network (models.network), training graph: no flip TTA. `arch="airbench"`
    is the shipped models' backbone; call `set_whitening` on its "backbone" layer before training."""
    from models.network import NetworkConfig, build_classifier

    cfg = NetworkConfig(width=width, num_classes=num_classes, dropout=dropout, l2=l2,
                        batchnorm=batchnorm, flip_tta=False, arch=arch, group_widths=tuple(group_widths))
    return build_classifier(cfg, test_time_views=False), cfg


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int):
    """Index batches of one epoch: a permutation seeded by (seed, epoch); last batch may be short."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


_PREDICTORS: dict[tuple[int, bool], tuple[object, object]] = {}


_NO_FLAG = object()


def tape_training(model, data, *, seed: int, batch_size: int, learning_rate: float,
                  training=_NO_FLAG):
    """Augmented batches and a GradientTape step (Adam, soft-label cross-entropy).

    `training` is passed to the model exactly as given; leave it out to call `model(x)` with no
    flag at all (Keras then runs BatchNorm in inference mode: the forgotten-flag bug).
    """
    import keras
    import tensorflow as tf

    from training.pipeline import training_dataset

    ds = training_dataset(data.x_train, data.y_train, batch_size=batch_size,
                          num_classes=data.num_classes, seed=seed, pad=2)
    optimizer = keras.optimizers.Adam(learning_rate)
    loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x) if training is _NO_FLAG else model(x, training=training)
            loss = loss_fn(y, logits)
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights))
        return loss

    return ds, train_step, optimizer


def advance_epochs(ds):
    """`advance` for `run_epochs` over a dataset iterated once per epoch: its seeded reshuffle
    depends on how often it was iterated, so a resumed loop iterates the finished epochs first."""
    def advance(epochs: int) -> None:
        for _ in range(epochs):
            for _ in ds:
                pass
    return advance


def compiled_call(model, *, training: bool):
    """`model(x, training=training)` as a tf.function, built once per model and flag."""
    import tensorflow as tf

    key = (id(model), bool(training))
    if key not in _PREDICTORS or _PREDICTORS[key][0] is not model:
        fn = tf.function(lambda x: model(x, training=training), reduce_retracing=True)
        _PREDICTORS[key] = (model, fn)
    return _PREDICTORS[key][1]


def predict_logits(model, x: np.ndarray, *, training: bool = False, batch_size: int = 500):
    """Logits in chunks of `batch_size`, with an explicit `training` flag (see batchnorm.py)."""
    import tensorflow as tf

    call = compiled_call(model, training=training)
    out = [call(tf.convert_to_tensor(x[i:i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float64)


def accuracy(model, x: np.ndarray, y: np.ndarray, **kwargs) -> float:
    return float(np.mean(predict_logits(model, x, **kwargs).argmax(axis=1) == y))


def kernel_weights(model):
    """The conv/dense kernels (what `kernel_regularizer` penalises), by path."""
    return [w for w in model.trainable_weights if w.path.endswith("kernel")]


def global_norm(weights) -> float:
    """sqrt(sum of squares) over Keras variables or NumPy arrays."""
    arrays = [w.numpy() if hasattr(w, "numpy") else np.asarray(w) for w in weights]
    return float(np.sqrt(sum(np.sum(np.square(a)) for a in arrays)))
