"""Admission control: the limiter (unit), the ASGI middleware (driven directly, no model) and the
whole service over real HTTP (uvicorn on loopback): 503 `overloaded` + Retry-After past the
evaluation slots or the byte budget, predict unaffected, health answering, nothing leaked."""

from __future__ import annotations

import asyncio
import json
import os
import time

import numpy as np
import pytest
from fastapi import FastAPI, Request

from service.admission_limits import ByteBudget, EvaluationGate, Overloaded
from service.rest import errors
from service.rest.admission_middleware import AdmissionMiddleware
from service.settings import Settings
from tests.service_helpers import MODEL, error_of, npz_bytes

EVALUATE = "/v1/models/m/evaluate"


# --- the limiter -----------------------------------------------------------------------------
def test_gate_bounds_running_and_waiting_evaluations():
    async def run():
        gate = EvaluationGate(limit=2, queue=1, timeout=5)
        a, b = await gate.acquire(), await gate.acquire()
        assert (gate.in_flight, gate.waiting) == (2, 0)
        third = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0.01)
        assert gate.waiting == 1 and not third.done()
        with pytest.raises(Overloaded) as exc:
            await gate.acquire()
        assert exc.value.reason == "queue_full" and 1 <= exc.value.retry_after <= 60
        gate.release(a)
        c = await asyncio.wait_for(third, 1)  # the waiter gets the freed slot
        assert (gate.in_flight, gate.waiting) == (2, 0)
        gate.release(b), gate.release(c)
        assert (gate.in_flight, gate.waiting) == (0, 0) and gate.rejected == {"queue_full": 1}

    asyncio.run(run())


def test_gate_queue_timeout_is_overloaded_and_leaves_the_queue():
    async def run():
        gate = EvaluationGate(limit=1, queue=4, timeout=0.05)
        async with gate.slot():
            start = time.monotonic()
            with pytest.raises(Overloaded) as exc:
                await gate.acquire()
            assert exc.value.reason == "queue_timeout" and time.monotonic() - start >= 0.05
            assert (gate.in_flight, gate.waiting) == (1, 0)
        assert gate.in_flight == 0
        async with gate.slot():  # usable again
            assert gate.in_flight == 1

    asyncio.run(run())


def test_gate_cancelled_holders_and_waiters_leak_nothing():
    async def run():
        gate = EvaluationGate(limit=1, queue=2, timeout=5)
        entered = asyncio.Event()

        async def hold():
            async with gate.slot():
                entered.set()
                await asyncio.sleep(60)

        holder = asyncio.ensure_future(hold())
        await entered.wait()
        waiters = [asyncio.ensure_future(gate.acquire()) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert (gate.in_flight, gate.waiting) == (1, 2)
        waiters[0].cancel()  # a queued client goes away
        await asyncio.gather(waiters[0], return_exceptions=True)
        assert gate.waiting == 1
        holder.cancel()  # the running one goes away: its slot passes to the last waiter
        await asyncio.gather(holder, return_exceptions=True)
        token = await asyncio.wait_for(waiters[1], 1)
        gate.release(token)
        assert (gate.in_flight, gate.waiting) == (0, 0)

    asyncio.run(run())


def test_byte_budget_reserves_releases_and_refuses():
    budget = ByteBudget(1000)
    first, second = budget.reservation(), budget.reservation()
    first.reserve(600)
    with pytest.raises(Overloaded) as exc:
        second.reserve(500)
    assert exc.value.reason == "byte_budget" and budget.used == 600 and budget.rejected == 1
    second.reserve(400)
    assert budget.used == 1000
    first.close(), first.close()  # idempotent
    second.close()
    assert budget.used == 0
    alone = budget.reservation()
    alone.reserve(5000)  # larger than the budget, but nothing else is buffered: runs alone
    with pytest.raises(Overloaded):
        budget.reservation().reserve(1)
    alone.close()
    assert budget.used == 0


def test_a_request_charged_chunk_by_chunk_may_grow_past_the_budget_only_alone():
    budget = ByteBudget(1000)
    alone = budget.reservation()
    for _ in range(5):
        alone.reserve(400)  # its own earlier chunks do not count against it
    assert budget.used == 2000
    with pytest.raises(Overloaded):
        budget.reservation().reserve(1)
    alone.close()
    other, second = budget.reservation(), budget.reservation()
    other.reserve(600)
    second.reserve(300)
    with pytest.raises(Overloaded):
        second.reserve(300)  # someone else holds bytes: the total binds
    other.close(), second.close()
    assert budget.used == 0


def test_budget_waiters_get_room_when_it_is_released_and_the_oldest_always_grows():
    async def run():
        budget = ByteBudget(1000, wait_s=5)
        first, second, third = budget.reservation(), budget.reservation(), budget.reservation()
        await first.reserve_waiting(400)
        await second.reserve_waiting(500)
        await first.reserve_waiting(600)  # the oldest: room or not
        waiting = asyncio.ensure_future(third.reserve_waiting(200))  # must wait for room
        await asyncio.sleep(0.05)
        assert not waiting.done()
        first.close()  # 1000 released: the waiter gets its bytes
        await asyncio.wait_for(waiting, 1)
        assert budget.used == 700
        quick = ByteBudget(100, wait_s=0.05)
        holder, late = quick.reservation(), quick.reservation()
        await holder.reserve_waiting(100)
        with pytest.raises(Overloaded):
            await late.reserve_waiting(1)  # nothing released within wait_s
        second.close(), third.close(), holder.close(), late.close()
        assert budget.used == 0 and quick.used == 0

    asyncio.run(run())


def test_predict_work_bound_refuses_beyond_its_total_and_releases():
    from service.admission_limits import PredictWorkBound

    bound = PredictWorkBound(1000)
    with bound.hold(600):
        with pytest.raises(Overloaded) as exc:
            with bound.hold(500):
                pass
        assert exc.value.reason == "predict_work" and exc.value.retry_after >= 1
        with bound.hold(400):
            assert bound.used == 1000
    assert bound.used == 0
    with bound.hold(5000):  # larger than the bound, alone: admitted
        assert bound.used == 5000
    assert bound.used == 0


# --- the middleware, driven as ASGI -------------------------------------------------------------
def _gated_app(**overrides):
    """A bare app with an evaluate route that waits for `release`; the admission middleware on top."""
    settings = Settings(max_concurrent_evaluations=1, evaluation_queue=1, evaluation_queue_timeout_s=5,
                        max_buffered_bytes=10_000, buffer_wait_s=0.2, **overrides)
    app = FastAPI()
    app.state.settings = settings
    app.state.release = None
    app.state.entered = None

    @app.post("/v1/models/{name}/evaluate")
    async def evaluate(request: Request):
        body = await request.body()
        app.state.entered.set()
        await app.state.release.wait()
        return {"bytes": len(body)}

    @app.post("/v1/models/{name}/predict")
    async def predict(request: Request):
        return {"bytes": len(await request.body())}

    errors.install(app)  # as create_app: a client that went away is a 499, never a 500
    app.add_middleware(AdmissionMiddleware, fastapi_app=app)  # as create_app: inside the error handling
    app.middleware_stack = app.build_middleware_stack()
    return app


async def _call(asgi, path, body=b"", *, declared=True, disconnect_after=None, content_type=b"application/json"):
    """Run one request; returns (status, headers, json body or None)."""
    headers = [(b"content-type", content_type)]
    if declared:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers, "root_path": "", "scheme": "http", "server": ("127.0.0.1", 80),
             "http_version": "1.1", "app": asgi}
    sent_body = False
    gone = asyncio.Event()

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnect_after is not None:  # the whole body sent, the client goes away later
            await asyncio.sleep(disconnect_after)
            gone.set()
        await gone.wait()
        return {"type": "http.disconnect"}

    out = {}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            out["body"] = out.get("body", b"") + message.get("body", b"")

    await asgi(scope, receive, send)  # (a 503 from the middleware never reaches the route)
    gone.set()
    if "status" not in out:
        return None, {}, None
    return out["status"], out["headers"], json.loads(out["body"]) if out.get("body") else None


def test_middleware_queue_overflow_and_byte_budget_answer_503_and_release_everything():
    async def run():
        app = asgi = _gated_app()
        app.state.release, app.state.entered = asyncio.Event(), asyncio.Event()
        running = asyncio.ensure_future(_call(asgi, EVALUATE, b"x" * 1000, content_type=b"application/x-npz"))
        await app.state.entered.wait()
        queued = asyncio.ensure_future(_call(asgi, EVALUATE, b"y" * 10, content_type=b"application/x-npz"))
        await asyncio.sleep(0.01)
        assert (asgi.state.admission.gate.in_flight, asgi.state.admission.gate.waiting) == (1, 1)

        status, headers, body = await _call(asgi, EVALUATE, b"z")  # the queue (1) is full
        assert status == 503 and body["error"]["code"] == "overloaded"
        assert body["error"]["details"]["reason"] == "queue_full" and int(headers["retry-after"]) >= 1
        # bytes: the running evaluation holds 2 x 1000; a predict charged 8 x 1100 does not fit ...
        status, headers, body = await _call(asgi, "/v1/models/m/predict", b"p" * 1100)
        assert status == 503 and body["error"]["details"]["reason"] == "byte_budget" and "retry-after" in headers
        status, _, body = await _call(asgi, "/v1/models/m/predict", b"p" * 1100, declared=False)  # chunked too
        assert status == 503 and body["error"]["details"]["reason"] == "byte_budget"
        # ... but a small predict is unaffected
        assert (await _call(asgi, "/v1/models/m/predict", b"p" * 100))[0] == 200

        app.state.release.set()
        assert (await running)[0] == 200 and (await queued)[2] == {"bytes": 10}
        admission = asgi.state.admission
        assert (admission.gate.in_flight, admission.gate.waiting, admission.budget.used) == (0, 0, 0)

    asyncio.run(run())


def test_middleware_client_leaving_the_queue_frees_its_place():
    async def run():
        app = asgi = _gated_app()
        app.state.release, app.state.entered = asyncio.Event(), asyncio.Event()
        running = asyncio.ensure_future(_call(asgi, EVALUATE, b"x", content_type=b"application/x-npz"))
        await app.state.entered.wait()
        status, _, _ = await asyncio.wait_for(_call(asgi, EVALUATE, b"y", disconnect_after=0.05), 2)
        assert status == 499  # counted as "client closed request" (nobody reads it)
        assert (asgi.state.admission.gate.in_flight, asgi.state.admission.gate.waiting) == (1, 0)
        app.state.release.set()
        await running
        admission = asgi.state.admission
        assert (admission.gate.in_flight, admission.gate.waiting, admission.budget.used) == (0, 0, 0)

    asyncio.run(run())


def test_middleware_cancelled_request_releases_slot_and_bytes():
    async def run():
        app = asgi = _gated_app()
        app.state.release, app.state.entered = asyncio.Event(), asyncio.Event()
        task = asyncio.ensure_future(_call(asgi, EVALUATE, b"x" * 100, content_type=b"application/x-npz"))
        await app.state.entered.wait()
        assert asgi.state.admission.gate.in_flight == 1 and asgi.state.admission.budget.used == 200
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        admission = asgi.state.admission
        assert (admission.gate.in_flight, admission.gate.waiting, admission.budget.used) == (0, 0, 0)

    asyncio.run(run())


def test_middleware_lets_requests_without_a_valid_key_pass_to_the_401_without_a_slot_or_bytes():
    """With API keys on, a keyless client cannot fill the evaluation queue or the byte budget."""
    from pydantic import SecretStr

    from service.api_keys import KeyRing

    async def run():
        app = asgi = _gated_app()
        app.state.api_keys = KeyRing([SecretStr("the-key")])
        app.state.release, app.state.entered = asyncio.Event(), asyncio.Event()
        app.state.release.set()  # the bare route stands in for the router: it answers at once
        admission = asgi.state.admission
        seen = []
        real_acquire = admission.gate.acquire

        async def counting_acquire():
            seen.append(1)
            return await real_acquire()

        admission.gate.acquire = counting_acquire
        assert (await _call(asgi, EVALUATE, b"x" * 100_000, content_type=b"application/x-npz"))[0] == 200
        assert seen == [] and admission.budget.used == 0  # passed through: not gated, not charged

        headers_ok = [(b"authorization", b"Bearer the-key")]
        from service.rest.auth import holds_valid_key
        assert holds_valid_key(app.state.api_keys, dict(headers_ok))
        assert holds_valid_key(app.state.api_keys, {b"x-api-key": b"the-key"})
        assert not holds_valid_key(app.state.api_keys, {b"authorization": b"Bearer wrong"})
        assert not holds_valid_key(app.state.api_keys, {b"authorization": b"Basic the-key"})
        assert holds_valid_key(None, {})

    asyncio.run(run())


# --- the service over real HTTP --------------------------------------------------------------
@pytest.fixture(scope="module")
def strict_server(service_model_dir, tmp_path_factory):
    """One evaluation at a time, no queue, a 6 MB byte budget; one image per forward pass, so that
    an evaluation of 1,000 images holds its slot for seconds."""
    from benchmarks.server_process import ServerError, ServerProcess

    try:
        with ServerProcess(service_model_dir, log_path=tmp_path_factory.mktemp("strict") / "server.log",
                           max_concurrent_evaluations=1, evaluation_queue=0, eval_chunk=1,
                           max_buffered_bytes=6_000_000, buffer_wait_s=0.5) as running:
            yield running.url
    except ServerError as exc:
        pytest.fail(str(exc))


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.slow
def test_http_overload_gets_503_with_retry_after_and_everything_is_released(strict_server):
    import httpx

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    # 1,000 images of zeros: a few KB on the wire, ~3 MB charged (what it declares it inflates to)
    heavy = npz_bytes(compressed=True, x=np.zeros((1000, 32, 32, 3), np.uint8), y=np.arange(1000) % 10)
    light = npz_bytes(x=x[:10], y=np.arange(10))
    small = {"instances": x[:1].tolist()}
    large = {"instances": x[:40].tolist()}  # ~8 x 500 KB: over the budget next to the running evaluation
    path = f"/v1/models/{MODEL}"

    async def run():
        async with httpx.AsyncClient(base_url=strict_server, timeout=120) as client:
            first = asyncio.ensure_future(client.post(f"{path}/evaluate", files={"file": ("a.npz", heavy)}))
            for _ in range(200):  # until the first evaluation holds the slot
                await asyncio.sleep(0.05)
                if _metric((await client.get("/metrics")).text, "calib_evaluations_in_flight") == 1:
                    break
            second = await client.post(f"{path}/evaluate", files={"file": ("b.npz", light)})
            over_budget = await client.post(f"{path}/predict?mc_samples=0", json=large)
            predict = await client.post(f"{path}/predict?mc_samples=5", json=small)
            live = await client.get("/health/live")
            metrics_during = (await client.get("/metrics")).text
            first = await first
            after = await client.post(f"{path}/evaluate", files={"file": ("c.npz", light)})
            big_predict_alone = await client.post(f"{path}/predict?mc_samples=0", json=large)
            metrics_after = (await client.get("/metrics")).text
        return first, second, over_budget, predict, live, metrics_during, after, big_predict_alone, metrics_after

    first, second, over_budget, predict, live, during, after, alone, metrics = asyncio.run(run())
    assert first.status_code == 200 and first.json()["n"] == 1000
    error_of(second, 503, "overloaded")
    assert second.json()["error"]["details"]["reason"] == "queue_full" and int(second.headers["retry-after"]) >= 1
    error_of(over_budget, 503, "overloaded")
    assert over_budget.json()["error"]["details"]["reason"] == "byte_budget" and "retry-after" in over_budget.headers
    assert predict.status_code == 200 and live.json() == {"status": "alive"}
    assert _metric(during, "calib_evaluations_in_flight") == 1
    # released: a new evaluation and the large predict (alone now) succeed; gauges back to zero
    assert after.status_code == 200 and alone.status_code == 200
    assert _metric(metrics, "calib_evaluations_in_flight") == 0 and _metric(metrics, "calib_evaluations_queued") == 0
    assert _metric(metrics, "calib_buffered_bytes_reserved") == 0
    assert 'calib_admission_rejections_total{reason="queue_full"} 1.0' in metrics
    assert 'calib_admission_rejections_total{reason="byte_budget"} 1.0' in metrics


@pytest.mark.slow
def test_loadtest_end_to_end_report(service_model_dir, tmp_path, monkeypatch):
    """The soak benchmark for a few seconds with 2 clients against the tiny model: its report."""
    from benchmarks import loadtest

    monkeypatch.setenv("CALIB_MAX_INSTANCES", "64")
    out = tmp_path / "report.json"
    code = loadtest.main(["--model-dir", str(service_model_dir), "--duration", "4", "--warmup", "1",
                          "--clients", "2", "--eval-images", "50", "--overload", "3", "--overload-images", "300",
                          "--json", str(out)])
    report = json.loads(out.read_text())
    soak = report["soak"]
    assert report["model"] == MODEL and code == 0, report["failed_checks"]
    assert soak["5xx"] == 0 and not soak["unexpected"] and not soak["connection_errors"]
    assert soak["requests"] == sum(e["requests"] for e in soak["endpoints"].values()) > 0
    for e in soak["endpoints"].values():
        assert e["p50_ms"] <= e["p95_ms"] <= e["p99_ms"] <= e["max_ms"]
    assert soak["rss_mb"]["after_warmup"] > 0 and soak["rss_mb"]["end"] > 0 and soak["loadgen_cpu_s"] > 0
    assert len(soak["rss_mb"]["idle_series"]) == 5  # after the warm-up and after each of the 4 parts
    over = report["overload"]
    assert sum(over["outcomes"].values()) == 3 and over["outcomes"].get("200 result") == 3
    assert over["live"]["polls"] >= 1 and over["rss_mb"]["peak"] > 0
    assert not os.path.exists(f"/proc/{report['server_pid']}")  # the server it started is gone
