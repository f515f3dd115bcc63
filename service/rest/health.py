"""Liveness, readiness and the Prometheus scrape endpoint: cheap, always on the event loop."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.rest.errors import error_response, error_responses
from service.schemas import Liveness, Readiness

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
            responses=error_responses(503))
async def ready(request: Request):
    registry = getattr(request.app.state, "registry", None)
    failed = [] if registry is None else [{"path": f.path, "error": f.error} for f in registry.failures]
    if registry is None or not registry.ready:
        return error_response(503, "not_ready", "no model is loaded"
                              + (f"; {len(failed)} artifact(s) failed to load" if failed else ""),
                              {"failed": failed}, request=request)
    return {"status": "ready", "models": registry.names(), "failed": failed}


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
