"""`service.rest.requests.off_loop`: a small body of the only request in flight is parsed on the
event loop (no thread hop); with other requests in flight, or a large body, it goes to a worker
thread as before. And the in-flight count that decides it goes back to 0 after each request."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from service.http_metrics import MetricsMiddleware, ServiceMetrics
from service.rest.requests import INLINE_BODY_BYTES, off_loop


def _request(in_flight: int) -> SimpleNamespace:
    metrics = SimpleNamespace(in_flight=in_flight)
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(metrics=metrics)))


def _thread_name() -> str:
    return threading.current_thread().name


@pytest.mark.parametrize(("in_flight", "body_bytes", "on_loop"), [
    (1, 12_000, True),                        # alone, a one-image body: on the loop
    (1, INLINE_BODY_BYTES, True),
    (2, 12_000, False),                       # another request in flight: a worker thread
    (64, 12_000, False),
    (1, INLINE_BODY_BYTES + 1, False),        # a large body: a worker thread even alone
])
def test_off_loop_runs_inline_only_alone_and_small(in_flight, body_bytes, on_loop):
    async def main():
        loop_thread = _thread_name()
        ran_on = await off_loop(_request(in_flight), body_bytes, _thread_name)
        return ran_on == loop_thread

    assert asyncio.run(main()) is on_loop


def test_off_loop_passes_arguments_and_raises_the_same_either_way():
    async def main(in_flight):
        assert await off_loop(_request(in_flight), 10, divmod, 7, 2) == (3, 1)
        with pytest.raises(ZeroDivisionError):
            await off_loop(_request(in_flight), 10, divmod, 7, 0)

    for in_flight in (1, 5):
        asyncio.run(main(in_flight))


def test_in_flight_counts_requests_through_the_metrics_middleware():
    app = FastAPI()
    app.state.metrics = ServiceMetrics()
    seen = []

    @app.get("/probe")
    async def probe(request: Request) -> dict:
        seen.append(request.app.state.metrics.in_flight)
        return {}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a failing route still leaves the count balanced")

    app.add_middleware(MetricsMiddleware, fastapi_app=app)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/probe").status_code == 200
        assert client.get("/boom").status_code == 500
        assert client.get("/probe").status_code == 200
    assert seen == [1, 1]
    assert app.state.metrics.in_flight == 0
