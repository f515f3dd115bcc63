"""`create_app(settings)`: the FastAPI app, its lifespan (model registry, executor, predict
micro-batchers) and wiring."""

from __future__ import annotations

import asyncio
import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from service.admission_limits import PredictWorkBound
from service.api_keys import KeyRing
from service.batching import BatchedPredictor
from service.http_metrics import MetricsMiddleware, ServiceMetrics
from service.model_repository import ModelPoller, ModelRepository, VersionPolicy
from service.monitoring_writer import MonitoringWriter
from service.registry import LoadedModel, load_registry
from service.rest import (auth, calibration, calibrations, errors, health, models, monitoring, repository,
                          ui, v2)
from service.rest.admission_middleware import AdmissionMiddleware
from service.rest.limits import BodyLimitMiddleware
from service.rest.request_id import ServiceApp
from service.rest.served_by import ServedByMiddleware
from service.settings import Settings
from service.storage import SqlCalibrationRepository, StorageUnavailable
from service.storage.monitoring_store import SqlMonitoringStore
from service.version import package_version

logger = logging.getLogger("service")

DESCRIPTION = """Calibrated CIFAR-10 classification over HTTP.

* **predict**: class, calibrated probabilities softmax(logits / T) and MC-dropout uncertainty
  (per-class mean and variance, predictive/expected entropy, mutual information).
* **evaluate**: ECE, MCE, adaptive and classwise ECE, NLL, Brier and reliability bins before and
  after temperature scaling, as JSON or as a reliability-diagram PNG (`format=png`).

Every error is `{"error": {"code": ..., "message": ..., "status": ..., "request_id": ...}}` with a
stable code; every response carries an `X-Request-ID` header (the client's own, if sane).
When the service has API keys, `/v1` (and `/metrics` if so configured) needs
`Authorization: Bearer <key>` or `X-API-Key: <key>`; the health checks stay open.

`/v2` serves the same predictions over the Open Inference Protocol (KServe v2 / Triton REST), with
the protocol's error body `{"error": "<message>"}`: see docs/open-inference-protocol.md.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry = await anyio.to_thread.run_sync(
            lambda: load_registry(settings.model_dir, warmup=settings.warmup,
                                  default=settings.default_model, runtime=settings.runtime,
                                  litert_threads=settings.litert_threads or None,
                                  policy=settings.model_version_policy))
        app.state.registry = registry

        def count_models() -> None:
            app.state.metrics.models_loaded.set(len(registry.models))
            app.state.metrics.load_failures.set(len(registry.failures))

        count_models()
        app.state.model_repository = ModelRepository(registry, VersionPolicy.parse(settings.model_version_policy),
                                                     on_change=count_models)
        if settings.gc_freeze:  # the models live as long as the app: keep full collections off them
            gc.collect()
            gc.freeze()
        app.state.executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="inference")
        predictor = BatchedPredictor([m for versions in registry.loaded.values() for m in versions.values()],
                                     app.state.executor,
                                     max_images=settings.batch_max_images, wait_ms=settings.batch_wait_ms,
                                     observer=app.state.metrics.observe_batch,
                                     stage_observer=app.state.metrics.observe_stage,
                                     policy=settings.batch_policy, mc_chunk_rows=settings.mc_chunk_rows,
                                     max_passes=settings.batch_passes)
        predictor.start()
        app.state.predictor = predictor
        on_retired = _retire_on_loop(asyncio.get_running_loop(), predictor, settings.gc_freeze)
        registry.listeners.append(on_retired)
        poller = None
        if settings.model_poll_s > 0:
            poller = ModelPoller(app.state.model_repository, settings.model_poll_s)
            poller.start()
        metrics = app.state.metrics
        publisher = (asyncio.create_task(metrics.publish_live_gauges())
                     if metrics.multiprocess_dir is not None else None)
        logger.info("serving %d model(s) from %s: %s", len(registry.models), settings.model_dir,
                    ", ".join(registry.names()) or "none")
        # migrations in the background: a database that is down delays nothing (the profile routes
        # retry them on first use and answer 503 storage_unavailable meanwhile)
        migrating = asyncio.create_task(asyncio.to_thread(_prepare_storage, app.state.calibrations))
        writer = _monitoring_writer(app, settings)
        app.state.monitoring_writer = writer
        try:
            yield
        finally:
            if poller is not None:
                await asyncio.to_thread(poller.stop)
            if on_retired in registry.listeners:
                registry.listeners.remove(on_retired)
            if not migrating.done():
                migrating.cancel()
            for stop in app.state.model_work:  # long model work still running gives up at its next chunk
                stop.set()
            if publisher is not None:
                publisher.cancel()
            metrics.close()
            await predictor.aclose()
            if writer is not None:  # after the predictor: every answer given is queued; write it
                await asyncio.to_thread(writer.close)  # before the executor: no batch is submitted to a closed pool
            # off the loop: a cancelled evaluation's 503 is still being written while its chunk ends
            await asyncio.to_thread(app.state.executor.shutdown, wait=True, cancel_futures=True)
            if settings.gc_freeze:
                gc.unfreeze()  # collectable again once the app is gone (tests build many apps)
            app.state.calibrations.close()

    # redirect_slashes=False: no redirect (which would echo the Host header) for a trailing slash;
    # /v1/models/ is a 404 like any unknown path
    app = ServiceApp(title="Calibrated CIFAR-10 service", version=package_version(),
                     description=DESCRIPTION, lifespan=lifespan, redirect_slashes=False)
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    app.state.registry = None
    app.state.model_repository = None
    app.state.predictor = None
    app.state.model_work = set()  # stop events of the evaluate/compare calls in the executor
    app.state.predict_work = PredictWorkBound(settings.max_queued_predict_work)
    app.state.calibrations = SqlCalibrationRepository(settings.storage_url, max_profiles=settings.max_calibrations,
                                                      timeout_s=settings.database_timeout_s)
    app.state.monitoring_store = SqlMonitoringStore(app.state.calibrations)
    app.state.monitoring_writer = None  # started by the lifespan when CALIB_MONITORING is on
    errors.install(app)
    calibrations.install(app)
    repository.install(app)
    monitoring.install(app)
    # any key (read or admin) turns authentication on; admin keys may also create/delete profiles
    keys = KeyRing(settings.all_api_keys + settings.all_admin_api_keys)
    auth.install(app, keys, KeyRing(settings.all_admin_api_keys))
    if settings.docs_require_key:
        auth.protect_docs(app, keys)
    app.include_router(health.router)
    app.include_router(ui.router)  # the dashboard: static files without data, open like the health checks
    app.include_router(health.metrics_router, **(auth.protect(keys) if settings.metrics_require_key else {}))
    app.include_router(models.router, **auth.protect(keys))  # every data-plane router: auth.protect(keys)
    app.include_router(calibrations.router, **auth.protect(keys))
    app.include_router(calibrations.admin_router, **auth.protect_admin(keys))
    app.include_router(calibration.router, **auth.protect(keys))
    app.include_router(monitoring.router, **auth.protect(keys))
    app.include_router(v2.health_router)  # the Open Inference Protocol (/v2): its health stays open too
    app.include_router(v2.router, **v2.protect(keys))
    app.include_router(repository.router, **repository.protect(keys))  # admin scope
    v2.document_400_not_422(app)
    models.document_query_limits(app, settings)
    app.add_middleware(AdmissionMiddleware, fastapi_app=app)  # inside the body limit: 413 before 503
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       read_timeout_s=settings.body_read_timeout_s)
    app.add_middleware(MetricsMiddleware, fastapi_app=app)  # outside the body limit: sees 413s too
    if settings.workers > 1:
        app.add_middleware(ServedByMiddleware)
    # (ServiceApp puts its RequestIdMiddleware outside all of these and Starlette's error handler)
    return app


def _retire_on_loop(loop: asyncio.AbstractEventLoop, predictor: BatchedPredictor, refreeze: bool):
    """The registry's listener for a swapped-out version (called from the thread that swapped):
    on the event loop, its micro-batcher answers what it holds and closes; then, with
    CALIB_GC_FREEZE, the frozen objects are collected once (a retired Keras model is full of
    reference cycles that a frozen heap would keep forever) and the rest frozen again."""

    async def retire(model: LoadedModel) -> None:
        await predictor.retire(model)
        if refreeze:
            await asyncio.to_thread(_refreeze)

    running: set[asyncio.Task] = set()   # the loop keeps only weak references to its tasks

    def start(model: LoadedModel) -> None:
        task = loop.create_task(retire(model))
        running.add(task)
        task.add_done_callback(running.discard)

    def on_retired(model: LoadedModel) -> None:
        try:
            loop.call_soon_threadsafe(start, model)
        except RuntimeError:  # the loop is closed: the app is gone, nothing to retire
            pass

    return on_retired


def _refreeze() -> None:
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _prepare_storage(repository: SqlCalibrationRepository) -> None:
    try:
        repository.ensure_schema()
    except StorageUnavailable:
        logger.warning("calibration storage unavailable at start-up (%s): serving without it, retrying on "
                       "first use", repository.backend)


def _monitoring_writer(app: FastAPI, settings: Settings) -> MonitoringWriter | None:
    """The background writer of the served predictions (None with CALIB_MONITORING=false)."""
    if not settings.monitoring:
        return None
    metrics = app.state.metrics
    writer = MonitoringWriter(app.state.monitoring_store, max_queued_rows=settings.monitoring_queue_rows,
                              flush_rows=settings.monitoring_flush_rows, flush_interval_s=settings.monitoring_flush_s,
                              retention=settings.retention,
                              on_written=lambda model, n: metrics.monitoring_recorded.labels(model).inc(n),
                              on_dropped=lambda reason, n: metrics.monitoring_dropped.labels(reason).inc(n),
                              refresh=monitoring.refresher(app), refresh_every_s=settings.monitoring_gauges_s)
    metrics.watch(metrics.monitoring_queue, lambda: writer.queued_rows)
    return writer.start()
