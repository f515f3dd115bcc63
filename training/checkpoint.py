"""Per-epoch checkpoints, so a training run that is killed resumes where it stopped.

A long run on 2 CPU cores (the full training split: minutes per epoch) can end at any time: a
session closes, a CI job times out, the machine reboots. `EpochCheckpoint` writes, after every
epoch, everything `fit` needs to continue as if it had never stopped:

- the model weights (`model.weights.h5`, `model.save_weights`), BatchNorm statistics included;
- the optimizer's variables (`optimizer.npz`: iteration counter, momentum buffers), restored
  after `optimizer.build(model.trainable_variables)`, so the schedule continues at the right step;
- the model's random-number state (`state.npz`: the dropout SeedGenerator states, which are
  variables but not weights) and the state of callbacks that keep one (Lookahead's slow EMA);
- `meta.json`: the epoch count, the history so far, the seed and the hash of the config.

The data pipeline needs no saved state: its shuffle is seeded and its augmentations are keyed
on (seed, global step) (`training.pipeline`), so rebuilding it and skipping the batches of the
completed epochs gives the very batches an uninterrupted run would see next.

Where: a hidden folder next to the output, `<parent>/.<name>.checkpoint/`, not inside it: the
output folder appears only when the artifact is complete (a model directory the service scans
never holds a half-trained model), and the artifact's atomic replace cannot touch the checkpoint.

Atomic: each epoch is written to a temp folder, every file fsynced, renamed to `epoch-NNNN`, and
only then does the one-line `LATEST` pointer move to it (temp file, fsync, `os.replace`). A kill
at any moment leaves `LATEST` naming a complete epoch folder (or no `LATEST`: start afresh);
stale temp folders and older epochs are removed at the next write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

LATEST = "LATEST"
META = "meta.json"
WEIGHTS = "model.weights.h5"
OPTIMIZER = "optimizer.npz"
STATE = "state.npz"

# Fields that do not change what is trained: where it goes, how it is named and logged, and
# the resume switches themselves. Every other field must match to resume.
NOT_HASHED = ("output", "name", "overwrite", "verbose", "resume", "keep_checkpoint")


def checkpoint_dir(output: str | os.PathLike) -> Path:
    """The checkpoint folder of a run whose artifact goes to `output`."""
    out = Path(output)
    return out.with_name(f".{out.name}.checkpoint")


def config_hash(config) -> str:
    """sha256 of the config fields that change the trained weights (NOT_HASHED left out)."""
    return fingerprint({k: v for k, v in config.to_dict().items() if k not in NOT_HASHED})


def fingerprint(fields: dict) -> str:
    """sha256 of a JSON-able dict of settings (key order does not matter)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    """`path` holds `data` whole or keeps what it held: a temp file beside it, fsynced, then
    `os.replace` (the lab's finished-condition results, the shift benchmark's finished sets)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_variables(model) -> list:
    """The model's variables that are not weights: the SeedGenerator states (dropout)."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def write_checkpoint(folder: Path, model, *, epoch: int, history: dict, config_sha: str, seed: int,
                     callback_states: dict | None = None, optimizer=None) -> Path:
    """Write the state after `epoch` completed epochs atomically; return the epoch folder.
    `optimizer`: a custom loop's own (default: the compiled model's)."""
    optimizer = model.optimizer if optimizer is None else optimizer
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    try:
        model.save_weights(tmp / WEIGHTS)
        np.savez(tmp / OPTIMIZER, *[np.asarray(v.numpy()) for v in optimizer.variables])
        states = {f"rng_{i}": np.asarray(v.numpy()) for i, v in enumerate(_rng_variables(model))}
        for name, arrays in (callback_states or {}).items():
            states.update({f"cb_{name}_{i}": np.asarray(a) for i, a in enumerate(arrays)})
        np.savez(tmp / STATE, **states)
        meta = {"epoch": int(epoch), "history": history, "config_sha256": config_sha, "seed": int(seed),
                "callbacks": {name: len(arrays) for name, arrays in (callback_states or {}).items()}}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        for path in tmp.iterdir():
            _fsync_path(path)
        _fsync_path(tmp)
        target = folder / f"epoch-{epoch:04d}"
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = folder / f".{LATEST}.tmp"
    with open(pointer, "w") as f:
        f.write(target.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, folder / LATEST)
    _fsync_path(folder)
    for old in folder.iterdir():   # earlier epochs and temp folders of an interrupted write
        if old.is_dir() and old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(folder: Path) -> Path | None:
    """The epoch folder `LATEST` names, or None when there is no complete checkpoint."""
    try:
        name = (folder / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    epoch_dir = folder / name
    return epoch_dir if (epoch_dir / META).is_file() else None


def read_meta(epoch_dir: Path) -> dict:
    return json.loads((epoch_dir / META).read_text())


def restore_checkpoint(epoch_dir: Path, model, callbacks=(), optimizer=None) -> dict:
    """Load weights, optimizer variables, RNG and callback states into a compiled `model` (or a
    custom loop's model and its `optimizer`); return the metadata (epoch, history)."""
    meta = read_meta(epoch_dir)
    optimizer = model.optimizer if optimizer is None else optimizer
    optimizer.build(model.trainable_variables)   # before the weights: the .h5 holds its slots too
    model.load_weights(epoch_dir / WEIGHTS)
    with np.load(epoch_dir / OPTIMIZER) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(values) != len(optimizer.variables):
        raise ValueError(f"{epoch_dir}: {len(values)} optimizer variables saved, "
                         f"the optimizer has {len(optimizer.variables)}")
    for variable, value in zip(optimizer.variables, values):
        variable.assign(value)
    with np.load(epoch_dir / STATE) as state:
        for i, variable in enumerate(_rng_variables(model)):
            variable.assign(state[f"rng_{i}"])
        for callback in callbacks:
            name = getattr(callback, "checkpoint_name", None)
            if name is not None and name in meta.get("callbacks", {}):
                callback.set_state([state[f"cb_{name}_{i}"] for i in range(meta["callbacks"][name])])
    return meta


class EpochCheckpoint:
    """Keras callback (built lazily: importing this module does not import Keras) that writes a
    checkpoint at the end of every epoch. `history` is the history restored on resume, so the
    checkpoint, and the card, hold every epoch of the run, not only those since the restart."""

    def __new__(cls, *args, **kwargs):
        import keras

        class _EpochCheckpoint(keras.callbacks.Callback):
            def __init__(self, folder: Path, *, config_sha: str, seed: int, history: dict | None = None,
                         stateful_callbacks=()):
                super().__init__()
                self.folder, self.config_sha, self.seed = Path(folder), config_sha, int(seed)
                self.history = {k: list(v) for k, v in (history or {}).items()}
                self.stateful_callbacks = list(stateful_callbacks)

            def on_epoch_end(self, epoch, logs=None):
                for key, value in (logs or {}).items():
                    self.history.setdefault(key, []).append(float(value))
                states = {cb.checkpoint_name: cb.get_state() for cb in self.stateful_callbacks}
                write_checkpoint(self.folder, self.model, epoch=epoch + 1, history=self.history,
                                 config_sha=self.config_sha, seed=self.seed, callback_states=states)

        return _EpochCheckpoint(*args, **kwargs)
