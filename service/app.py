"""`create_app(settings)`: the FastAPI app, its lifespan (model registry, executor) and wiring."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from service.metrics import MetricsMiddleware, ServiceMetrics
from service.registry import load_registry
from service.rest import errors, health, models
from service.rest.limits import BodyLimitMiddleware
from service.settings import Settings

logger = logging.getLogger("service")

DESCRIPTION = """Calibrated CIFAR-10 classification over HTTP.

* **predict**: class, calibrated probabilities softmax(logits / T) and MC-dropout uncertainty
  (per-class mean and variance, predictive/expected entropy, mutual information).
* **evaluate**: ECE, MCE, adaptive and classwise ECE, NLL, Brier and reliability bins before and
  after temperature scaling, as JSON or as a reliability-diagram PNG (`format=png`).

Every error is `{"error": {"code": ..., "message": ..., "status": ...}}` with a stable code.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry = await anyio.to_thread.run_sync(
            lambda: load_registry(settings.model_dir, warmup=settings.warmup))
        app.state.registry = registry
        app.state.metrics.models_loaded.set(len(registry.models))
        app.state.metrics.load_failures.set(len(registry.failures))
        app.state.executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="inference")
        logger.info("serving %d model(s) from %s: %s", len(registry.models), settings.model_dir,
                    ", ".join(registry.names()) or "none")
        try:
            yield
        finally:
            app.state.executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="Calibrated CIFAR-10 service", version="0.1.0", description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    app.state.registry = None
    errors.install(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, fastapi_app=app)  # outermost: sees 413s too
    return app
