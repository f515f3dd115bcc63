"""Several server processes on one port (`CALIB_WORKERS` > 1).

uvicorn's own supervisor runs them (no gunicorn: one dependency less, the same `python -m
service` command, and uvicorn >= 0.37 restarts a dead worker, pings hung ones and replaces all of
them on SIGHUP). Its workers are fresh interpreters (spawn), so each one builds the app from this
module's factory and loads the models itself. The parent owns a private prometheus-client
multiprocess directory: set in the environment before any worker imports prometheus_client
(which reads it once, at import), removed when the last worker is gone, so /metrics sums the
workers of this run and never those of an earlier one. A worker that dies before it ever served
stops the server, and `python -m service` exits 1 (a broken app restarted forever helps nobody).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager

logger = logging.getLogger("service.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
APP_FACTORY = "service.workers:worker_app"
# How long a worker may leave the supervisor's ping unanswered before it is killed and replaced:
# uvicorn's 5 s default is too short for a worker busy loading TensorFlow models on a shared CPU.
HEALTHCHECK_TIMEOUT_S = 60


@contextmanager
def metrics_dir():
    """A fresh PROMETHEUS_MULTIPROC_DIR in the environment (inherited by the workers), removed
    afterwards; a value set by the user is replaced for the run (its old files would be summed in)."""
    previous = os.environ.get(MULTIPROC_ENV)
    path = tempfile.mkdtemp(prefix="calib-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


def worker_app():
    """uvicorn's app factory, called in each worker: the settings come from the environment the
    parent checked and passed on; logging is set up as the parent's is (spawn starts it blank)."""
    from commandline import setup_tensorflow

    setup_tensorflow()  # as the parent did: quiet start-up, oneDNN kernels
    from service.__main__ import setup_logging
    from service.app import create_app
    from service.settings import load_settings

    settings = load_settings()
    setup_logging(settings)
    return create_app(settings)


def serve_workers(settings) -> int:
    """Serve with `settings.workers` processes until SIGINT/SIGTERM, then clean up; returns how
    many workers failed to start (uvicorn's supervisor then stops them all, but `uvicorn.run`
    returns normally, so without this count `python -m service` would exit 0)."""
    import uvicorn

    with metrics_dir():
        config = uvicorn.Config(APP_FACTORY, factory=True, workers=settings.workers, host=settings.host,
                                port=settings.port, log_level=settings.log_level,
                                timeout_graceful_shutdown=settings.graceful_timeout_s, access_log=False,
                                timeout_worker_healthcheck=HEALTHCHECK_TIMEOUT_S)
        sock = config.bind_socket()
        try:
            supervisor = _supervisor_class()(config, sockets=[sock])
            supervisor.run()
        finally:
            sock.close()
    return supervisor.failed_at_startup


def _supervisor_class():
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        """uvicorn's supervisor, except that any worker that dies before it ever served stops the
        server as a start-up failure. uvicorn itself only recognises exit code 3 (its lifespan or
        config failures); an exception in the app factory exits 1 and would be restarted forever,
        each time loading TensorFlow again."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ready: set[int] = set()
            self.failed_at_startup = 0

        def keep_subprocess_alive(self) -> None:
            if self.should_exit.is_set():
                return
            for process in self.processes:
                pid = process.process.pid
                if pid in self.ready:
                    continue
                if process.process.exitcode is not None:
                    logger.error("worker process [%s] exited with %s before it served; stopping the server",
                                 pid, process.process.exitcode)
                    self.failed_at_startup += 1
                    self.should_exit.set()
                    return
                if process.is_ready(timeout=1):
                    self.ready.add(pid)
            super().keep_subprocess_alive()

    return Supervisor
