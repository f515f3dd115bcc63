"""Stopping and failing to start, as an operator sees them from outside the process.

* SIGTERM during a long evaluation: the port stops accepting at once, the evaluation gets
  CALIB_GRACEFUL_TIMEOUT_S, then stops at its next chunk with a JSON 503 `shutting_down`, and the
  process ends soon after (before this, it ran the whole evaluation first).
* With CALIB_WORKERS=2, a worker that cannot start stops the server with a non-zero exit and a
  message (before this, uvicorn's supervisor returned normally, `python -m service` exited 0;
  and a worker whose app factory raised was restarted forever).
The dataplane's `stop` event is checked in-process too.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.server_process import REPO, ServerProcess, serve_command

pytestmark = pytest.mark.server

EVAL_IMAGES = 20_000  # with CALIB_EVAL_CHUNK=1: 20,000 forward passes, far longer than the timeout
GRACEFUL_S = 1.0


def _npz(n: int) -> bytes:
    rng = np.random.default_rng(0)
    x = np.repeat(rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8), n, axis=0)  # compresses well
    buf = io.BytesIO()
    np.savez_compressed(buf, x=x, y=np.arange(n) % 10)
    return buf.getvalue()


def _in_flight(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("calib_evaluations_in_flight "):
            return float(line.split()[1])
    return 0.0


def test_dataplane_stops_between_chunks(tiny_artifact):
    from service import dataplane
    from service.registry import load_registry

    model = next(iter(load_registry(tiny_artifact, warmup=False).models.values()))
    x = np.zeros((6, 32, 32, 3), np.uint8)
    y = np.arange(6) % 10
    stop = threading.Event()
    assert dataplane.evaluate(model, x, y, n_bins=5, fit=False, chunk=2, stop=stop).n == 6
    calls = []
    real = model.classifier.logits

    def counting(images, batch_size=500):
        calls.append(len(images))
        if len(calls) == 2:
            stop.set()  # set during the second chunk: the third never runs
        return real(images, batch_size)

    model.classifier.logits = counting
    with pytest.raises(dataplane.WorkCancelled):
        dataplane.evaluate(model, x, y, n_bins=5, fit=False, chunk=2, stop=stop)
    assert calls == [2, 2]
    with pytest.raises(dataplane.WorkCancelled):
        dataplane.compare(model, x, x, mc_samples=0, seed=None, chunk=2, stop=stop)


def test_sigterm_during_a_long_evaluation_stops_within_the_graceful_timeout(tiny_artifact, tmp_path):
    server = ServerProcess(tiny_artifact, log_path=tmp_path / "server.log", ready_timeout=600,
                           graceful_timeout_s=GRACEFUL_S, eval_chunk=1, max_eval_images=EVAL_IMAGES,
                           log_level="info")
    body = _npz(EVAL_IMAGES)
    answer: dict = {}

    def evaluate() -> None:
        try:
            r = httpx.post(f"{server.url}/v1/models/{answer['model']}/evaluate", files={"file": ("val.npz", body)},
                           timeout=300)
            answer["status"], answer["json"] = r.status_code, r.json()
        except Exception as exc:  # reported by the asserts below
            answer["exception"] = repr(exc)

    with server:
        answer["model"] = httpx.get(f"{server.url}/health/ready", timeout=10).json()["models"][0]
        client = threading.Thread(target=evaluate)
        client.start()
        deadline = time.monotonic() + 120
        while _in_flight(server.url) < 1:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.05)
        time.sleep(0.5)  # the upload is parsed and the chunks are running
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)

        refused = None  # new connections are refused while the evaluation still has its grace time
        while time.monotonic() - sent < 5:
            try:
                httpx.get(f"{server.url}/health/live", timeout=0.5)
            except httpx.TransportError:
                refused = time.monotonic() - sent
                break
            time.sleep(0.05)
        try:
            code = server.proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 60 s after SIGTERM:\n{server.log_tail()}")
        exited = time.monotonic() - sent
        client.join(30)
        log = server.log_tail(20_000)

    assert refused is not None and refused < GRACEFUL_S, (refused, log)
    # a clean stop: uvicorn re-raises the SIGTERM it handled once it is done, so the status is
    # "ended by SIGTERM", after the shutdown completed
    assert code == -signal.SIGTERM, log
    assert "Application shutdown complete" in log and "Traceback" not in log
    # the graceful timeout, then one chunk (one image) and the shutdown: seconds, not the evaluation
    assert exited < GRACEFUL_S + 10, (exited, log)
    assert "timeout graceful shutdown exceeded" in log  # uvicorn cancelled it: it was still running
    assert answer.get("status") == 503, (answer, log)
    error = answer["json"]["error"]
    assert error["code"] == "shutting_down" and error["status"] == 503
    assert "CALIB_GRACEFUL_TIMEOUT_S" in error["message"]


def _worker_breaker(tmp_path: Path) -> Path:
    """A sitecustomize that gives only uvicorn's spawned workers an invalid setting, so their app
    factory fails while the parent's settings check passes: a worker that cannot start."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if '--multiprocessing-fork' in sys.argv:  # a spawned worker, not the parent\n"
        "    os.environ['CALIB_MAX_BINS'] = '0'\n")
    return folder


def test_a_worker_that_cannot_start_stops_the_server_with_a_nonzero_exit(tiny_artifact, tmp_path):
    env = {**os.environ, "CALIB_MODEL_DIR": str(tiny_artifact), "CALIB_WORKERS": "2",
           "CALIB_HOST": "127.0.0.1", "CALIB_PORT": "0", "CALIB_WARMUP": "false",
           "PYTHONPATH": os.pathsep.join([str(_worker_breaker(tmp_path)), str(REPO)])}
    try:
        done = subprocess.run(serve_command(), cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                              start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the server kept running with workers that cannot start:\n{exc.stderr}")
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "worker process(es) failed to start" in last and "the server stopped" in last, done.stderr[-3000:]
    assert "before it served" in done.stderr
    assert "CALIB_MAX_BINS" in done.stderr  # the worker's own reason is in the log above the message
