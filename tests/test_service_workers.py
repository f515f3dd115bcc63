"""CALIB_WORKERS: several server processes on one port. The setting's validation, the private
prometheus multiprocess directory, and a real two-worker server: both workers serve, /metrics
sums both whichever answers, and shutdown leaves no process and no directory behind."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pydantic
import pytest

from service.http_metrics import forget_dead_processes
from service.settings import Settings
from service.workers import MULTIPROC_ENV, metrics_dir

pytestmark = pytest.mark.server


# --- the setting ---------------------------------------------------------------------------------

def test_workers_default_is_one_process():
    assert Settings().workers == 1


@pytest.mark.parametrize("value", [1, 2, 32])
def test_workers_accepts_one_to_thirty_two(monkeypatch, value):
    monkeypatch.setenv("CALIB_WORKERS", str(value))
    assert Settings().workers == value


@pytest.mark.parametrize("value", ["0", "-1", "33", "two", "1.5"])
def test_bad_workers_value_is_rejected(monkeypatch, value):
    monkeypatch.setenv("CALIB_WORKERS", value)
    with pytest.raises(pydantic.ValidationError):
        Settings()


@pytest.mark.parametrize("value", ["0", "33"])
def test_bad_workers_value_exits_2_with_one_line(tmp_path, value):
    env = {**os.environ, "CALIB_WORKERS": value, "CALIB_MODEL_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "service"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith("python -m service: error: bad setting CALIB_WORKERS=")


# --- the multiprocess directory -------------------------------------------------------------------

def test_metrics_dir_is_private_and_removed(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv(MULTIPROC_ENV, "/somewhere/stale")
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    with metrics_dir() as path:
        assert os.environ[MULTIPROC_ENV] == path and os.path.dirname(path) == str(tmp_path)
        open(os.path.join(path, "counter_123.db"), "wb").close()
    assert not os.path.exists(path) and os.environ[MULTIPROC_ENV] == "/somewhere/stale"


def test_dead_workers_leave_the_live_gauges(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead = int(finished.stdout)
    names = [f"gauge_liveall_{dead}.db", f"gauge_livesum_{dead}.db", f"counter_{dead}.db",
             f"gauge_liveall_{os.getpid()}.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    forget_dead_processes(str(tmp_path))
    # the dead worker's live gauges go, its counters stay counted; a live worker keeps its gauge
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


# --- a real two-worker server ---------------------------------------------------------------------

def _predict_count(text: str, model: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "calib_http_requests_total"
               and s.labels.get("endpoint") == "/v1/models/{name}/predict" and s.labels.get("model") == model)


def _models_loaded(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels.get("pid"): s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "calib_models_loaded"}


def test_two_workers_share_the_port_and_the_metrics(tiny_artifact, tmp_path):
    from benchmarks.server_process import ServerError, ServerProcess

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    server = ServerProcess(tiny_artifact, log_path=tmp_path / "server.log", ready_timeout=900,
                           workers=2, warmup="false")
    server.env["TMPDIR"] = str(scratch)  # where the service makes its multiprocess directory (and
    # TensorFlow its autograph files)
    try:
        with server:
            workers = server.wait_workers(2, timeout=900)
            assert len(workers) == 2 and server.pid not in workers
            assert len(list(scratch.glob("calib-metrics-*"))) == 1
            model = httpx.get(f"{server.url}/health/ready", timeout=10).json()["models"][0]

            image = [[[(x * 7 + y * 3 + c) % 256 for c in range(3)] for y in range(32)] for x in range(32)]

            def predict(_) -> str:  # a fresh connection each time: the kernel picks the worker
                r = httpx.post(f"{server.url}/v1/models/{model}/predict", params={"mc_samples": 0},
                               json={"instances": [image]}, timeout=60)
                assert r.status_code == 200, r.text
                return r.headers["x-served-by"]

            served: list[str] = []
            with ThreadPoolExecutor(8) as pool:
                while len(served) < 400 and min(served.count(str(p)) for p in workers) < 3:
                    served += pool.map(predict, range(16))
            assert {int(p) for p in served} == workers, served  # both served (>= 3 each)

            # whichever worker answers the scrape, it counts the requests of both
            scrapes: dict[str, str] = {}
            for _ in range(200):
                r = httpx.get(f"{server.url}/metrics", timeout=10)
                scrapes.setdefault(r.headers["x-served-by"], r.text)
                if len(scrapes) == 2:
                    break
            assert {int(p) for p in scrapes} == workers
            for text in scrapes.values():
                assert _predict_count(text, model) == len(served)
                assert _models_loaded(text) == {str(p): 1.0 for p in workers}  # per worker readiness
    except ServerError as exc:
        pytest.fail(str(exc))
    assert server.proc.returncode == 0, server.log_tail() if not server._log.closed else ""
    for pid in workers:  # the workers exited with the server ...
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert list(scratch.glob("calib-metrics-*")) == []  # ... and the multiprocess directory went with them
