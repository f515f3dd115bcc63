"""`python -m service` as a child process on a free loopback port.

The benchmarks, the load test and the real-server tests all start the shipped serve
command (`SERVE_COMMAND`, the Dockerfile's CMD) this one way, so what they measure and test is
what ships, and start-up, readiness and shutdown are handled alike.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class ServerError(RuntimeError):
    """The server exited or never became ready; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    """SERVE_COMMAND with this interpreter standing in for the image's `python`."""
    from service.__main__ import SERVE_COMMAND

    return [sys.executable if SERVE_COMMAND[0] == "python" else SERVE_COMMAND[0], *SERVE_COMMAND[1:]]


class ServerProcess:
    """`with ServerProcess(model_dir, **settings) as server:` starts the server, waits until
    `/health/ready` answers 200, and stops it on exit. Extra keyword arguments become `CALIB_*`
    variables (`max_body_bytes=1024` -> `CALIB_MAX_BODY_BYTES=1024`)."""

    def __init__(self, model_dir: str | os.PathLike, *, log_path: str | os.PathLike | None = None,
                 ready_timeout: float = 180, **settings) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout = ready_timeout
        self.env = {**os.environ, "CALIB_MODEL_DIR": str(model_dir), "CALIB_PORT": str(self.port),
                    "CALIB_HOST": "127.0.0.1", "CALIB_LOG_LEVEL": "warning",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                    **{f"CALIB_{k.upper()}": str(v) for k, v in settings.items()}}
        # a file, not a pipe: a chatty server must never block on a full pipe
        self._log = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()
        self.proc: subprocess.Popen | None = None
        self.command = serve_command()     # another server (benchmarks.mlserver_comparison) sets its own
        self.ready_path = "/health/ready"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", errors="replace")[-chars:]

    def start(self) -> "ServerProcess":
        # its own process group: with CALIB_WORKERS > 1 a hung server's workers are killed with it
        self.proc = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=os.name == "posix")
        return self

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"server not ready after {self.ready_timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.3)

    def wait_workers(self, workers: int, timeout: float | None = None) -> set[int]:
        """With CALIB_WORKERS > 1, /health/ready answers once the first worker is up: ask on fresh
        connections until `workers` distinct `X-Served-By` PIDs have answered; returns them."""
        import httpx

        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        pids: set[int] = set()
        while len(pids) < workers:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.url}/health/ready", timeout=5)
                if r.status_code == 200 and "x-served-by" in r.headers:
                    pids.add(int(r.headers["x-served-by"]))
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"{len(pids)} of {workers} workers answered after the timeout:\n"
                                  f"{self.log_tail()}")
            time.sleep(0.05)
        return pids

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self._kill()
                self.proc.wait(10)
        self._log.close()

    def _kill(self) -> None:
        """SIGKILL to the whole process group (the server and any workers it started)."""
        if os.name == "posix":
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
                return
            except ProcessLookupError:
                pass
        self.proc.kill()

    def __enter__(self) -> "ServerProcess":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
