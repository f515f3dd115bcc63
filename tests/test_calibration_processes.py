"""Calibration profiles across real processes, on a SQLite file and on the real PostgreSQL:
a restarted `python -m service` still has them; two processes writing at once keep the count
and the CALIB_MAX_CALIBRATIONS limit exact; `kill -9` of a writer, or of the server in the
middle of a fit, loses nothing already committed and leaves no half profile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.server_process import ServerProcess
from service.storage import SqlCalibrationRepository
from tests.service_helpers import npz_bytes
from tests.storage_fixtures import database_url, postgres_server, postgres_url, sqlite_url  # noqa: F401

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CONFORMAL = b"conformal-bytes-" * 64

# A writer process: creates profiles until told how many, printing each committed id (flushed),
# or "limit" when CALIB_MAX_CALIBRATIONS stops it. argv: url, max_profiles, attempts, start_at
WRITER = r"""
import sys, time
from service.storage import LimitReached, NewProfile, SqlCalibrationRepository
url, limit, attempts, start_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
repo = SqlCalibrationRepository(url, max_profiles=limit, timeout_s=30)
repo.ensure_schema()
while time.time() < start_at:
    time.sleep(0.001)
for i in range(attempts):
    new = NewProfile(model_name="m", model_sha256="a" * 64, num_classes=10, method="temperature",
                     parameters={"temperature": 1.0 + i}, n=100 + i, data_sha256="b" * 64,
                     report={"i": i, "pad": "x" * 2000}, label=f"writer {i}", conformal=%r)
    try:
        print(repo.create(new).id, flush=True)
    except LimitReached:
        print("limit", flush=True)
""" % CONFORMAL


def _writer(url: str, limit: int, attempts: int, start_at: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, url, str(limit), str(attempts), str(start_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _complete(repo: SqlCalibrationRepository, profile_id: str) -> None:
    got = repo.get(profile_id)
    assert got.conformal == CONFORMAL and got.report["pad"] == "x" * 2000 and got.label.startswith("writer")
    assert got.parameters == {"temperature": 1.0 + got.report["i"]} and got.n == 100 + got.report["i"]


def test_two_processes_writing_at_once_keep_count_and_limit(database_url):
    limit, attempts = 25, 20
    SqlCalibrationRepository(database_url, max_profiles=limit).ensure_schema()
    start_at = time.time() + 3   # both processes imported and connected by then: they write together
    procs = [_writer(database_url, limit, attempts, start_at) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    lines = [line for out, _ in outputs for line in out.split()]
    ids = [line for line in lines if line != "limit"]
    assert len(ids) == limit and len(set(ids)) == limit              # every success is a distinct row
    assert lines.count("limit") == 2 * attempts - limit               # and every refusal is the limit
    assert all(len(out.split()) == attempts for out, _ in outputs)    # no other outcome
    repo = SqlCalibrationRepository(database_url, max_profiles=limit)
    assert repo.count() == limit
    assert sorted(r.id for r in repo.list("m")) == sorted(ids)
    for profile_id in ids:
        _complete(repo, profile_id)


def test_kill_9_of_a_writer_loses_nothing_committed(database_url):
    repo = SqlCalibrationRepository(database_url, max_profiles=10_000)
    repo.ensure_schema()
    proc = _writer(database_url, 10_000, 5_000, 0)
    committed = []
    while len(committed) < 20:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-2000:]
        committed.append(line.strip())
    proc.send_signal(signal.SIGKILL)   # somewhere in the middle of the next transactions
    proc.wait(30)
    rows = repo.list("m")
    # every printed id was committed before it was printed; at most one more made it
    assert set(committed) <= {r.id for r in rows} and len(committed) <= len(rows) <= len(committed) + 1
    for row in rows:
        _complete(repo, row.id)   # no half profile
    if database_url.startswith("sqlite"):
        from sqlalchemy import text

        with repo.engine.connect() as connection:
            assert connection.execute(text("PRAGMA integrity_check")).scalar() == "ok"


# --- the real server ------------------------------------------------------------------------------

def _server_settings(url: str) -> dict:
    return {"database_url": url, "warmup": "false", "max_calibrations": 100}


def _logits_batch(n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 4
    y = z.argmax(1)
    flip = rng.random(n) < 0.3
    y[flip] = rng.integers(0, k, int(flip.sum()))
    return z, y


def test_profiles_survive_a_server_restart(service_model_dir, database_url, sample_data):
    z, y = _logits_batch(300, 5)
    x, labels = sample_data.x_test, sample_data.y_test
    with ServerProcess(service_model_dir, **_server_settings(database_url)) as server:
        free = httpx.post(f"{server.url}/v1/calibrations", params={"label": "before restart"},
                          json={"logits": z.tolist(), "labels": y.tolist()}, timeout=120)
        assert free.status_code == 201, free.text
        model = httpx.post(f"{server.url}/v1/models/tiny/calibrations", params={"method": "vector"},
                           files={"file": ("b.npz", npz_bytes(x=x, y=labels))}, timeout=300)
        assert model.status_code == 201, model.text
        before = httpx.post(f"{server.url}/v1/models/tiny/predict",
                            params={"calibration": model.json()["id"], "mc_samples": 5, "seed": 1},
                            json={"instances": x[:3].tolist()}, timeout=60).json()
        assert httpx.get(f"{server.url}/health/ready").json()["storage"]["status"] == "ready"
    with ServerProcess(service_model_dir, **_server_settings(database_url)) as server:
        assert httpx.get(f"{server.url}/v1/calibrations/{free.json()['id']}").json() == free.json()
        assert httpx.get(f"{server.url}/v1/models/tiny/calibrations").json()["calibrations"] == [model.json()]
        after = httpx.post(f"{server.url}/v1/models/tiny/predict",
                           params={"calibration": model.json()["id"], "mc_samples": 5, "seed": 1},
                           json={"instances": x[:3].tolist()}, timeout=60).json()
        for body in (before, after):   # each answer has new monitoring ids
            for p in body["predictions"]:
                assert len(p.pop("prediction_id")) == 32
        assert after == before


def test_kill_9_in_the_middle_of_a_fit_keeps_what_was_committed(service_model_dir, database_url):
    small_z, small_y = _logits_batch(300, 5)
    big_z, big_y = _logits_batch(20_000, 40, seed=1)   # dirichlet, 1,640 parameters x 6 fits: seconds
    body = npz_bytes(logits=big_z, y=big_y)
    with ServerProcess(service_model_dir, **_server_settings(database_url)) as server:
        kept = httpx.post(f"{server.url}/v1/calibrations", json={"logits": small_z.tolist(),
                                                                  "labels": small_y.tolist()}, timeout=120)
        assert kept.status_code == 201, kept.text
        outcome = {}

        def fit():
            try:
                outcome["response"] = httpx.post(f"{server.url}/v1/calibrations", params={"method": "dirichlet"},
                                                 files={"file": ("big.npz", body)}, timeout=300)
            except httpx.TransportError as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=fit)
        thread.start()
        time.sleep(4)                      # the upload is in, the fit is running
        assert thread.is_alive(), outcome  # still fitting when the process dies
        os.killpg(server.pid, signal.SIGKILL)
        thread.join(60)
        assert "error" in outcome          # the client saw the connection die, not an answer
    with ServerProcess(service_model_dir, **_server_settings(database_url)) as server:
        listed = httpx.get(f"{server.url}/v1/calibrations").json()
        assert listed["calibrations"] == [kept.json()]   # the committed one, and no half of the other
