"""Liveness, readiness and the Prometheus scrape endpoint: cheap, always on the event loop."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from service.rest.errors import error_response, error_responses
from service.schemas import Liveness, Readiness

STORAGE_CHECK_TIMEOUT_S = 1.5  # under the readiness probe's 3 s timeout (deploy/kubernetes)
router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["health"])  # apart: CALIB_METRICS_REQUIRE_KEY puts it behind the API key


@router.get("/health/live", response_model=Liveness, summary="The process is up")
async def live() -> dict:
    return {"status": "alive"}


# HEAD too: probes (and load balancers) that check with HEAD get 200, not 405
@router.head("/health/live", response_class=Response, summary="The process is up (no body)",
             responses={200: {"description": "alive", "content": {"application/json": {}}}})
async def live_head() -> Response:
    return Response(media_type="application/json")


@router.get("/health/ready", response_model=Readiness, summary="At least one model is loaded",
            description="200 once a model is loaded; `storage` says whether the calibration database answers "
                        "(when it does not, predictions without a profile are still served, so the answer "
                        "stays 200 with `storage.status` `unavailable`)",
            responses=error_responses(503))
async def ready(request: Request):
    registry = getattr(request.app.state, "registry", None)
    failed = [] if registry is None else [_failure(f) for f in registry.failures]
    storage = await storage_status(request.app)
    if registry is None or not registry.ready:
        return error_response(503, "not_ready", "no model is loaded"
                              + (f"; {len(failed)} artifact(s) failed to load" if failed else ""),
                              {"failed": failed, "storage": storage}, request=request)
    return {"status": "ready", "models": registry.names(), "failed": failed, "storage": storage}


def _failure(failure) -> dict:
    """path and error; with the model's name and version when a version folder failed to load."""
    out = {"path": failure.path, "error": failure.error}
    if failure.name is not None:
        out.update(name=failure.name, version=failure.version)
    return out


async def storage_status(app) -> dict | None:
    """{"status": "ready" | "unavailable", "backend", "message"?} of the calibration database."""
    from service.storage import StorageUnavailable

    repository = getattr(app.state, "calibrations", None)
    if repository is None:
        return None
    try:
        await asyncio.wait_for(asyncio.to_thread(repository.check), STORAGE_CHECK_TIMEOUT_S)
    except StorageUnavailable as exc:
        return {"status": "unavailable", "backend": repository.backend, "message": exc.message}
    except asyncio.TimeoutError:
        return {"status": "unavailable", "backend": repository.backend,
                "message": f"the calibration database did not answer within {STORAGE_CHECK_TIMEOUT_S:g} s"}
    return {"status": "ready", "backend": repository.backend}


@metrics_router.get("/metrics", summary="Prometheus metrics", response_class=Response,
                    responses={200: {"description": "the Prometheus text exposition format",
                                     "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


@metrics_router.head("/metrics", summary="Prometheus metrics (headers only)", response_class=Response,
                     responses={200: {"description": "the headers of the Prometheus text exposition",
                                      "content": {"text/plain": {}}}})
async def metrics_head(request: Request) -> Response:
    return Response(media_type=request.app.state.metrics.render()[1])
