"""Reading request bodies (JSON or multipart) and running work off the event loop.

Parsing runs in AnyIO's thread pool and the model in the app's own small executor, so neither
a 10,000-image evaluation nor a big JSON body stalls the loop that answers health checks.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, TypeVar

import anyio
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batching import BatchedPredictor
from service.dataplane import WorkCancelled
from service.inputs import InputError, UploadLimits, declared_uncompressed_bytes, parse_json_object
from service.registry import LoadedModel, ModelRegistry
from service.rest.errors import Unavailable
from service.settings import Settings

T = TypeVar("T")
SHUTTING_DOWN = ("the server is stopping and this request ran past its graceful timeout "
                 "(CALIB_GRACEFUL_TIMEOUT_S); retry on another instance")


@dataclass
class Payload:
    """Either `json` (a dict) or `files` [(filename, bytes)] from a multipart upload; `fields`
    holds each file's form field name (an endpoint with two batches tells them apart by it)."""

    json: dict | None = None
    files: list[tuple[str, bytes]] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    body_bytes: int = 0   # of a JSON body (service.rest.requests.off_loop decides by it)


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def upload_limits(settings: Settings, max_images: int) -> UploadLimits:
    """What a route's uploaded files may hold: an array may take 8x the body limit, and all
    archives and .npz of the request inflate to at most CALIB_MAX_UNCOMPRESSED_BYTES."""
    return UploadLimits(max_images=max_images, max_array_bytes=8 * settings.max_body_bytes,
                        max_uncompressed_bytes=settings.uncompressed_cap)


async def charge_uncompressed(request: Request, files: list[tuple[str, bytes]]) -> None:
    """Admission charges what the .npz uploads declare they inflate to, before they are
    inflated (503 overloaded when the budget cannot hold it). Read from the zip directories."""
    reservation = request.scope.get("calib.reservation")
    if reservation is None:
        return
    declared = await in_thread(declared_uncompressed_bytes, files)
    if declared:
        await reservation.reserve_waiting(min(declared, settings_of(request).uncompressed_cap))


def registry_of(request: Request) -> ModelRegistry:
    """The loaded registry; 503 `not_ready` while the lifespan has not loaded it yet."""
    registry = request.app.state.registry
    if registry is None:
        raise Unavailable("not_ready", "the models are not loaded yet; retry shortly")
    return registry


def predictor_of(request: Request) -> BatchedPredictor:
    return request.app.state.predictor


def model_of(request: Request, name: str) -> LoadedModel:
    return registry_of(request).get(name)


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """CPU-bound parsing in a worker thread."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


INLINE_BODY_BYTES = 64 * 1024  # a one-image JSON body is ~12 KB: parsed in well under a millisecond


async def off_loop(request: Request, body_bytes: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`in_thread`, except for a small body while this request is the only one in flight: then
    `fn` runs on the event loop at once. Each hop to a worker thread and back costs two thread
    wake-ups, which a lone client waits for (/v2 paid three per request: one client's p50 went
    from 1.26x to ~1.0x MLServer's, reports/service-throughput-2026-12-07.md); with others in
    flight the hop stays, so a parse never delays their I/O."""
    metrics = getattr(request.app.state, "metrics", None)
    if body_bytes <= INLINE_BODY_BYTES and metrics is not None and metrics.in_flight <= 1:
        return fn(*args, **kwargs)
    return await in_thread(fn, *args, **kwargs)


@asynccontextmanager
async def stop_on_disconnect(request: Request, stop: threading.Event) -> AsyncIterator[Callable[[], bool]]:
    """While the block runs, a client disconnect sets `stop` (the model work gives up at its next
    chunk). Yields `gone()`: whether the client went away. Only after the body is read: then the
    next ASGI message can only be the disconnect."""
    disconnected = asyncio.Event()

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
                stop.set()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        yield disconnected.is_set
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def run_predict(request: Request, model: LoadedModel, x, *, mc_samples: int, seed: int | None,
                      calibrator=None):
    """`BatchedPredictor.predict` within the predict work bound (503 overloaded beyond it), given up
    at its next chunk when the client disconnects (ClientDisconnect: counted as 499). `calibrator`:
    a recalibration profile's, instead of the card's temperature."""
    settings = settings_of(request)
    stop = threading.Event()
    with request.app.state.predict_work.hold(len(x) * max(1, mc_samples)):
        async with stop_on_disconnect(request, stop) as gone:
            try:
                return await predictor_of(request).predict(model, x, mc_samples=mc_samples, seed=seed,
                                                           mc_chunk_rows=settings.mc_chunk_rows, stop=stop,
                                                           calibrator=calibrator)
            except WorkCancelled:
                if gone():
                    raise ClientDisconnect() from None
                raise


async def on_model_executor(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Long model work (`fn` takes a `stop` event) in the app's bounded inference executor.

    uvicorn cancels the requests still running when the server stops and its graceful timeout
    (CALIB_GRACEFUL_TIMEOUT_S) is over. A thread cannot be cancelled, so `stop` is set and `fn`
    gives up at its next chunk, which lets the process exit; the client gets 503 `shutting_down`
    (JSON, as every error) instead of uvicorn's plain-text 500 for a cancelled request."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    running: set = request.app.state.model_work
    running.add(stop)
    try:
        async with stop_on_disconnect(request, stop) as gone:
            try:
                return await loop.run_in_executor(request.app.state.executor,
                                                  functools.partial(fn, *args, stop=stop, **kwargs))
            except WorkCancelled:
                if gone():  # the client went away: its evaluation stopped at the next chunk
                    raise ClientDisconnect() from None
                raise
    except asyncio.CancelledError:
        stop.set()
        task = asyncio.current_task()
        if task is None or task.cancelling() != 1:
            raise  # cancelled more than once: not ours to turn into an answer
        task.uncancel()
        raise Unavailable("shutting_down", SHUTTING_DOWN) from None
    except WorkCancelled:  # the lifespan stopped it before uvicorn cancelled the request
        raise Unavailable("shutting_down", SHUTTING_DOWN) from None
    finally:
        running.discard(stop)


async def read_payload(request: Request, *, max_files: int) -> Payload:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        body = await request.body()
        return Payload(json=await off_loop(request, len(body), parse_json_object, body), body_bytes=len(body))
    if ctype == "multipart/form-data":
        parts = await _read_files(request, max_files)
        return Payload(files=[(name, data) for _, name, data in parts], fields=[key for key, _, _ in parts])
    shown = ctype or request.headers.get("content-type") or "none"
    raise InputError("unsupported_media_type",
                     f"Content-Type {shown}: send application/json or multipart/form-data", 415)


async def _read_files(request: Request, max_files: int) -> list[tuple[str, str, bytes]]:
    """[(form field, filename, bytes)] of the file parts."""
    try:
        form = await request.form(max_files=max_files, max_fields=100)
    except StarletteHTTPException as exc:
        detail = str(exc.detail)
        if "Too many files" in detail:
            raise InputError("too_many_instances", f"{detail} (CALIB_MAX_INSTANCES)") from None
        raise InputError("malformed_multipart", f"cannot parse the multipart body: {detail}", 400) from None
    try:
        files = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((key, value.filename or key, await value.read()))
    finally:
        await form.close()
    if not files:
        raise InputError("empty_batch", "the multipart body has no file part")
    return files
