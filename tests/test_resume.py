"""Resumable training (training.checkpoint): a run stopped mid-way and re-run gives the same
weights as one that never stopped; an interrupted checkpoint write leaves the previous one
loadable; a kill -9 of `python -m training.train` resumes and completes the artifact; a checkpoint
of another config is refused with exit 2.

The training runs use the tiny options of conftest's `tiny_artifact` (the fixture folder, width
4, 50-image batches, 100 validation images) for 2-4 epochs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FIXTURE, REPO

TINY = dict(data=str(FIXTURE), batch_size=50, width=4, dropout=0.3, n_validation=100, seed=1, verbose=0)
TINY_ARGS = ["--data", str(FIXTURE), "--batch-size", "50", "--width", "4", "--dropout", "0.3",
             "--n-validation", "100", "--seed", "1", "--verbose", "0"]


class Interrupted(Exception):
    pass


def _weights(artifact: Path) -> list:
    from models.artifact import load_artifact

    return load_artifact(artifact).model.get_weights()


AIRBENCH = dict(arch="airbench", group_widths="4,8,8", lookahead=True, whiten_bias_epochs=1,
                alternate_flip=True, mix="mixup", batch_size=20)   # 10 steps an epoch: Lookahead's
                                                                   # slow EMA exists at the epoch-2 checkpoint


@pytest.mark.training
@pytest.mark.parametrize("options, epochs", [({}, 2), (AIRBENCH, 3)], ids=["resnet9", "airbench-lookahead-freeze-mixup"])
def test_stopped_and_resumed_run_gives_the_same_weights(tmp_path, monkeypatch, options, epochs):
    """Stopped in the middle of the last epoch, re-run: bit-identical weights, card and history."""
    import keras

    import training.train as train
    from training.checkpoint import checkpoint_dir
    from training.config import TrainConfig

    tiny = {**TINY, **options}
    straight = train.run(TrainConfig(output=str(tmp_path / "straight"), epochs=epochs, **tiny),
                         litert_export=False)

    class StopInLastEpoch(keras.callbacks.Callback):   # a crash in the middle of the last epoch
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 1 and self.epoch == epochs - 1:
                raise Interrupted

    original = train.training_callbacks
    monkeypatch.setattr(train, "training_callbacks", lambda *a, **k: [*original(*a, **k), StopInLastEpoch()])
    config = TrainConfig(output=str(tmp_path / "resumed"), epochs=epochs, **tiny)
    with pytest.raises(Interrupted):
        train.run(config, litert_export=False)
    assert not Path(config.output).exists()
    assert (checkpoint_dir(config.output) / f"epoch-{epochs - 1:04d}").is_dir()
    monkeypatch.setattr(train, "training_callbacks", original)
    resumed = train.run(config, litert_export=False)

    assert not checkpoint_dir(config.output).exists()   # removed once the artifact is written
    for a, b in zip(_weights(straight), _weights(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    cards = [json.loads((p / "model_card.json").read_text()) for p in (straight, resumed)]
    assert cards[0]["training"]["history"] == cards[1]["training"]["history"]
    assert len(cards[1]["training"]["history"]["loss"]) == epochs
    assert cards[0]["temperature"] == cards[1]["temperature"]


@pytest.mark.training
def test_killed_after_the_last_epoch_resumes_straight_to_the_artifact(tmp_path, monkeypatch, capsys):
    """Every epoch checkpointed but no artifact yet (killed while calibrating): the re-run trains
    no more and writes the artifact; --keep-checkpoint keeps the checkpoint."""
    import training.train as train
    from training.checkpoint import checkpoint_dir
    from training.config import TrainConfig

    config = TrainConfig(output=str(tmp_path / "run"), epochs=1, keep_checkpoint=True, **TINY)
    original = train.calibrate_on_validation

    def killed(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(train, "calibrate_on_validation", killed)
    with pytest.raises(Interrupted):
        train.run(config, litert_export=False)
    monkeypatch.setattr(train, "calibrate_on_validation", original)
    capsys.readouterr()
    out = train.run(config, litert_export=False)
    assert "resuming from epoch 1 of 1" in capsys.readouterr().out
    card = json.loads((out / "model_card.json").read_text())
    assert len(card["training"]["history"]["loss"]) == 1
    assert (checkpoint_dir(out) / "epoch-0001").is_dir()   # kept: --keep-checkpoint


def _small_compiled_model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dropout(0.5),
                              keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model.fit(np.ones((8, 4)), np.zeros((8, 2)), epochs=1, verbose=0)
    return model


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    from training import checkpoint as ckpt

    model = _small_compiled_model()
    folder = tmp_path / ".run.checkpoint"
    first = ckpt.write_checkpoint(folder, model, epoch=1, history={"loss": [1.0]}, config_sha="abc", seed=0)
    saved = [w.copy() for w in model.get_weights()]
    saved_opt = [np.array(v.numpy()) for v in model.optimizer.variables]
    model.fit(np.ones((8, 4)), np.zeros((8, 2)), epochs=1, verbose=0)   # state moves on

    # killed between the temp write and the rename: the rename never happens
    real_replace = os.replace

    def killed(src, dst):
        if Path(dst).name.startswith("epoch-"):
            raise KeyboardInterrupt   # stands for the SIGKILL: nothing after this point runs
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(folder, model, epoch=2, history={"loss": [1.0, 0.5]}, config_sha="abc", seed=0)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    # a kill -9 would also leave its half-written temp folder behind
    (folder / ".tmp-half").mkdir()
    (folder / ".tmp-half" / ckpt.WEIGHTS).write_bytes(b"\x89HDF truncated")

    assert ckpt.latest_checkpoint(folder) == first
    fresh = _small_compiled_model()
    meta = ckpt.restore_checkpoint(first, fresh)
    assert meta["epoch"] == 1 and meta["history"] == {"loss": [1.0]}
    for a, b in zip(saved, fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, v in zip(saved_opt, fresh.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy())

    second = ckpt.write_checkpoint(folder, model, epoch=2, history={"loss": [1.0, 0.5]}, config_sha="abc", seed=0)
    assert ckpt.latest_checkpoint(folder) == second
    assert sorted(p.name for p in folder.iterdir()) == ["LATEST", "epoch-0002"]   # stale ones removed


def test_a_checkpoint_of_another_config_is_refused(tmp_path, capsys):
    from training.checkpoint import checkpoint_dir, config_hash
    from training.config import TrainConfig
    from training.train import main

    output = tmp_path / "run"
    folder = checkpoint_dir(output) / "epoch-0001"
    folder.mkdir(parents=True)
    theirs = TrainConfig(output=str(output), epochs=3, **TINY)
    (folder / "meta.json").write_text(json.dumps({"epoch": 1, "config_sha256": config_hash(theirs)}))
    (folder.parent / "LATEST").write_text("epoch-0001\n")

    assert main(["--output", str(output), "--epochs", "4", *TINY_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different training config" in err[0] and "--no-resume" in err[0]
    assert (folder / "meta.json").is_file()   # refused, not touched
    # output, name and verbosity are not part of the config hash
    assert config_hash(theirs) == config_hash(TrainConfig(output="elsewhere", epochs=3, name="x",
                                                          **{**TINY, "verbose": 2}))


@pytest.mark.training
@pytest.mark.subprocess
def test_kill_9_in_the_middle_of_training_then_resume(tmp_path):
    from training.checkpoint import checkpoint_dir

    output = tmp_path / "run"
    epochs = 4
    cmd = [sys.executable, "-m", "training.train", "--output", str(output), "--epochs", str(epochs),
           *TINY_ARGS]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    latest = checkpoint_dir(output) / "LATEST"
    child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not latest.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert latest.exists(), child.communicate()[0].decode()[-2000:]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not output.exists()

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    resumed = [line for line in rerun.stdout.splitlines() if line.startswith("resuming from epoch")]
    assert len(resumed) == 1, rerun.stdout
    assert 1 <= int(resumed[0].split()[3]) <= epochs
    card = json.loads((output / "model_card.json").read_text())
    assert len(card["training"]["history"]["loss"]) == epochs
    assert (output / "model.keras").is_file()
    assert not checkpoint_dir(output).exists()


@pytest.mark.training
@pytest.mark.lab
def test_lab_mixing_resumes_per_condition_with_the_same_numbers(tmp_path, monkeypatch, capsys):
    """Section 4 stopped after the first epoch of its third condition, re-run: the finished
    conditions are not retrained, the third continues from epoch 1, and every number matches an
    uninterrupted run."""
    from commandline import UsageError
    from training.lab import mixing
    from training.lab.context import LabContext

    data = LabContext(quick=True).cifar(type("R", (), {})(), train_quick=200, test_quick=100)
    settings = {"data_checksum": "fixture"}
    straight = mixing.compare_accuracy(data, width=4, epochs=2, seed=0)

    real = mixing.EpochCheckpoint

    def crashing(folder, **kwargs):
        callback = real(folder, **kwargs)
        if folder.name == "flips_crops_mixup":
            write = callback.on_epoch_end

            def on_epoch_end(epoch, logs=None):
                write(epoch, logs)
                raise Interrupted

            callback.on_epoch_end = on_epoch_end
        return callback

    root = tmp_path / ".checkpoint"
    monkeypatch.setattr(mixing, "EpochCheckpoint", crashing)
    with pytest.raises(Interrupted):
        mixing.compare_accuracy(data, width=4, epochs=2, seed=0, checkpoint_root=root, settings=settings)
    monkeypatch.setattr(mixing, "EpochCheckpoint", real)
    capsys.readouterr()
    resumed = mixing.compare_accuracy(data, width=4, epochs=2, seed=0, checkpoint_root=root, settings=settings)
    log = capsys.readouterr().out
    assert "baseline: done in an earlier run" in log and "flips_crops: done in an earlier run" in log
    assert "flips_crops_mixup: resuming from epoch 1 of 2" in log
    assert resumed["flips_crops_mixup"]["resumed_from_epoch"] == 1
    for name, result in straight.items():
        for key in ("train_loss", "test_accuracy", "test_loss"):
            assert resumed[name][key] == result[key], (name, key)
    with pytest.raises(UsageError):   # other settings, same folder
        mixing.compare_accuracy(data, width=4, epochs=2, seed=1, checkpoint_root=root, settings=settings)
