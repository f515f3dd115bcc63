"""`python -m training.train --distributed`: two workers on 127.0.0.1 train what one process trains.

Two worker processes (TF_CONFIG cluster of two, task index 0 and 1) and one ordinary process
train the same recipe on the fixture (global batch 50, seed 1, 1 epoch of 4 steps, no dropout:
each worker would draw its dropout masks from the same seed stream, so they cannot equal the
single run's). The workers see the single run's batches split in halves (same seeded shuffle and
augmentation, auto-shard DATA; checked image by image) and normalise with statistics over both
halves (synchronized BN), so they compute the same steps up to float arithmetic. Not bit-equal:
synchronized BN takes the variance as E[x^2]-E[x]^2 where the single process's BN uses a
two-pass variance, and the sums run in another order; near-constant channels turn these ~1e-7
differences into larger ones, and SGD at the default peak rate 0.4 amplifies them step by step
(measured: with synchronized BN in both runs the step losses agree to 6e-6 for 3 steps, then
the weights part). Hence the small peak rate 0.02 here: the test checks the split and the
all-reduce, not the recipe.
Measured (this recipe, 2-core AMD EPYC, TF 2.21 / Keras 3.15.1): max abs difference of the
losses 6.7e-5 (train, of 2.417) and 8.3e-5 (validation), accuracy 0, validation accuracy
0.02 (2 of 100 near-tied images), trained weights 2.1e-3 (|w| up to ~1.4).
Tolerances: losses rtol 1e-4 (a wrong data order, e.g. training starting on the second
shuffle, moved the first step's loss by 4e-2), accuracies 0.03, weights atol 5e-3 (about 2x
the measured). The fitted temperature is left out of the weights: it is fitted after training
on a near-flat NLL of an untrained net, so it moves with tiny logit changes.
Only the chief (worker 0) writes --output; worker 1 writes to a temporary directory it deletes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.training

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 420   # seconds for all three processes together (about 1 minute on an idle 2-core machine)
RECIPE = ["--arch", "resnet9", "--optimizer", "sgd", "--width", "4", "--epochs", "1", "--batch-size", "50",
          "--n-validation", "100", "--dropout", "0", "--seed", "1", "--verbose", "0",
          "--learning-rate", "0.02"]
RTOL, ATOL = 1e-4, 1e-5          # losses
WEIGHT_ATOL = 5e-3               # trained weights (|w| up to ~1.4)
ACCURACY_ATOL = 0.03             # 3 of the 100 validation images


def free_ports(n: int) -> list[int]:
    """Ports nobody listens on right now (bound together, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_training(data: Path, output: Path, log: Path, *extra: str, tf_config: dict | None = None):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.Popen([sys.executable, "-m", "training.train", "--data", str(data),
                             "--output", str(output), *RECIPE, *extra],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_all(procs: dict, logs: dict) -> None:
    """Wait for every process within TIMEOUT; on a failure or timeout kill the rest (a worker
    whose peer died waits in a collective forever) and show the logs."""
    deadline = time.monotonic() + TIMEOUT
    pending = dict(procs)
    try:
        while pending:
            for name, proc in list(pending.items()):
                if proc.poll() is not None:
                    del pending[name]
                    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{logs[name].read_text()}"
            assert time.monotonic() < deadline, f"still running after {TIMEOUT}s: {sorted(pending)}"
            time.sleep(0.5)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def weights(artifact: Path) -> list[np.ndarray]:
    from models.artifact import load_artifact

    return [np.asarray(w) for w in load_artifact(artifact).model.get_weights()]


def test_two_workers_train_the_single_process_model_and_only_the_chief_writes(tmp_path, sample_data_dir):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    shared, single = tmp_path / "shared" / "model", tmp_path / "single" / "model"
    logs = {name: tmp_path / f"{name}.log" for name in ("single", "worker0", "worker1")}
    procs = {"single": start_training(sample_data_dir, single, logs["single"])}
    for index in (0, 1):
        procs[f"worker{index}"] = start_training(
            sample_data_dir, shared, logs[f"worker{index}"], "--distributed",
            tf_config={"cluster": cluster, "task": {"type": "worker", "index": index}})
    wait_all(procs, logs)

    # only the chief's artifact, nothing else, at the shared --output
    assert sorted(p.name for p in shared.parent.iterdir()) == ["model"]
    assert "no artifact written" in logs["worker1"].read_text()
    one, two = (json.loads((d / "model_card.json").read_text()) for d in (single, shared))
    assert two["training"]["config"]["distributed"] and not one["training"]["config"]["distributed"]
    assert two["training"]["network"]["sync_batchnorm"]

    h1, h2 = one["training"]["history"], two["training"]["history"]
    assert set(h1) == set(h2) and len(h1["loss"]) == 1
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(h2[key], h1[key], rtol=RTOL, atol=ATOL, err_msg=key)
    for key in ("accuracy", "val_accuracy"):   # counts of images: near-ties may flip
        np.testing.assert_allclose(h2[key], h1[key], atol=ACCURACY_ATOL, err_msg=key)
    w1, w2 = weights(single), weights(shared)
    assert [w.shape for w in w1] == [w.shape for w in w2]
    # the last weight is the temperature, fitted after training (compared through the losses)
    for a, b in zip(w1[:-1], w2[:-1]):
        np.testing.assert_allclose(b, a, atol=WEIGHT_ATOL)
    print("max abs diff: weights", max(float(np.abs(a - b).max()) for a, b in zip(w1[:-1], w2[:-1])),
          "history", {k: float(np.abs(np.subtract(h1[k], h2[k])).max()) for k in h1})


def test_distributed_refuses_recipes_it_cannot_reproduce(capsys):
    import pytest

    from training.config import parse_args

    for flags, fragment in ((["--optimizer", "muon"], "--optimizer muon"),
                            (["--lookahead"], "--lookahead"),
                            (["--batchnorm", "fused"], "--batchnorm fused"),
                            (["--mixed-precision"], "--mixed-precision")):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["--distributed", *flags])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--distributed does not support" in err and fragment in err, err
    assert parse_args(["--distributed"]).distributed   # the default recipe (resnet9, SGD) is fine


def test_distributed_without_tf_config_is_a_usage_error(tmp_path, sample_data_dir):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    out = subprocess.run([sys.executable, "-m", "training.train", "--data", str(sample_data_dir),
                          "--output", str(tmp_path / "m"), "--distributed"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and "needs TF_CONFIG" in out.stderr, out.stderr
    bad = {**env, "TF_CONFIG": json.dumps({"cluster": {"worker": ["127.0.0.1:1"]},
                                           "task": {"type": "worker", "index": 3}})}
    out = subprocess.run([sys.executable, "-m", "training.train", "--data", str(sample_data_dir),
                          "--output", str(tmp_path / "m"), "--distributed"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=bad)
    assert out.returncode == 2 and "is not in its cluster" in out.stderr, out.stderr
