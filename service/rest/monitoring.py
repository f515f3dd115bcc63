"""Monitoring over HTTP: GET /v1/models/{name}/monitoring (and its timeline), POST /v1/feedback,
and `record`, which predict (/v1 and /v2) calls to queue what it served.

HTTP only: the window is read through `service.storage.monitoring_store` in a worker thread, the
figures come from `service.monitoring`, and the store's typed feedback errors become 404
`unknown_prediction`, 409 `feedback_exists` and 422 `invalid_label` (the database down: 503
`storage_unavailable`, as for the profiles).
"""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse

from service import monitoring
from service.durations import parse_window
from service.feedback import MAX_INDEX, feedback_items
from service.inputs import InputError
from service.monitoring_writer import MonitoringWriter, served_batch
from service.rest import calibrations
from service.rest.errors import error_response, error_responses
from service.rest.request_id import current_request_id
from service.rest.requests import in_thread, model_of, read_payload, settings_of
from service.schemas import ErrorResponse
from service.storage.monitoring_store import FeedbackExists, LabelOutOfRange, SqlMonitoringStore, UnknownPrediction

CARD = "card"   # the calibration label of the card's temperature (gauges, answers)
MAX_BUCKETS = 500


def _documented(status: int, description: str) -> dict:
    return {status: {"model": ErrorResponse, "description": description}}


DISABLED = _documented(409, "`monitoring_disabled`: CALIB_MONITORING=false, nothing is recorded")
STORAGE = _documented(503, "`storage_unavailable`: the database is down (predict is not affected)")

router = APIRouter(prefix="/v1", tags=["monitoring"], responses={**error_responses(422), **STORAGE})
ModelName = Path(description="a model's name, as listed by GET /v1/models", examples=["cifar10-augmix"])
CalibrationQuery = Query(None, description="a calibration profile's id: the predictions served with it, against "
                                           "its own reference; default: those served with the card's temperature")


def version_of(model) -> str:
    return str(getattr(model, "version", "1"))


def writer_of(request: Request) -> Optional[MonitoringWriter]:
    return request.app.state.monitoring_writer


def store_of(request: Request) -> SqlMonitoringStore:
    if not settings_of(request).monitoring:
        raise InputError("monitoring_disabled", "monitoring is off (CALIB_MONITORING=false): no prediction is "
                                                "recorded, so there is no window and nothing to label", 409)
    return request.app.state.monitoring_store


# --- recording (called by predict) ------------------------------------------------------------
def record(request: Request, model, profile, result, ood, set_mask=None, set_coverage=None) -> Optional[list[str]]:
    """Queue the answer's rows for the writer and return their prediction ids (None when monitoring
    is off). Never waits, never fails the predict: a full queue is counted as dropped."""
    writer = writer_of(request)
    if writer is None:
        return None
    batch = served_batch(model, calibration_id=None if profile is None else profile.id,
                         request_id=current_request_id.get(), probabilities=result.probabilities,
                         logits=result.logits, entropy=ood.values, ood_flags=ood.flags, set_mask=set_mask,
                         set_coverage=set_coverage)
    writer.submit(batch)
    return batch.prediction_ids


# --- the verdict --------------------------------------------------------------------------------
def _calibration_block(model, profile) -> dict:
    return calibrations.used(model, profile)


def _reference(model, profile):
    if profile is None:
        return monitoring.reference_of(model.conformal, "card validation split")
    return monitoring.reference_of(profile.conformal, f"profile {profile.id} fit images")


async def _window_rows(request: Request, model, profile, window_text: Optional[str]):
    settings = settings_of(request)
    store = store_of(request)
    try:
        window = parse_window(window_text) if window_text is not None else parse_window(str(settings.monitoring_window))
    except ValueError as exc:
        raise InputError("invalid_parameter", f"window: {exc}") from None
    writer = writer_of(request)
    if writer is not None:
        await in_thread(writer.flush, 5.0)   # what was just served belongs in the window
    limit = settings.monitoring_max_window
    if window.kind == "count":
        rows = await in_thread(store.window, model.name, version_of(model), None if profile is None else profile.id,
                               last=min(int(window.value), limit), limit=limit)
    else:
        from datetime import datetime, timedelta, timezone

        since = datetime.now(timezone.utc) - timedelta(seconds=window.value)
        rows = await in_thread(store.window, model.name, version_of(model), None if profile is None else profile.id,
                               since=since, limit=limit)
    return window, rows


def _report(request: Request, model, profile, window, rows) -> dict:
    thresholds = monitoring.Thresholds.from_settings(settings_of(request))
    figures = monitoring.report(rows, _reference(model, profile), thresholds, monitoring.expected_ood_share(model))
    body = {"model": model.name, "version": version_of(model), "calibration": _calibration_block(model, profile),
            "window": {"kind": window.kind, "value": window.text if window.kind == "duration" else int(window.value),
                       "seconds": window.value if window.kind == "duration" else None, "predictions": len(rows),
                       "start": rows.created_at[0].isoformat() if len(rows) else None,
                       "end": rows.created_at[-1].isoformat() if len(rows) else None},
            **figures}
    return body


@router.get("/models/{name}/monitoring", summary="Is the model still calibrated? The served window against the "
                                                 "validation split, and against the labels fed back",
            responses={**error_responses(404), **DISABLED})
async def get_monitoring(
    request: Request,
    name: str = ModelName,
    calibration: Optional[str] = CalibrationQuery,
    window: Optional[str] = Query(None, pattern=r"^0*[1-9][0-9]*[smhdw]?$",
                                  description="the last N predictions (e.g. 500) or a duration (15m, 2h, 1d); "
                                              "default CALIB_MONITORING_WINDOW predictions"),
) -> dict:
    model = model_of(request, name)
    store_of(request)
    profile = await calibrations.profile_for(request, model, calibration)
    spec, rows = await _window_rows(request, model, profile, window)
    body = await in_thread(_report, request, model, profile, spec, rows)
    request.app.state.metrics.observe_monitoring(model.name, version_of(model), CARD if profile is None else profile.id,
                                                 body)
    return body


@router.get("/models/{name}/monitoring/timeline", summary="The monitoring figures per bucket of predictions, "
                                                          "oldest first (the dashboard's plot)",
            responses={**error_responses(404), **DISABLED})
async def get_timeline(
    request: Request,
    name: str = ModelName,
    calibration: Optional[str] = CalibrationQuery,
    bucket: int = Query(200, ge=1, description="predictions per point"),
    buckets: int = Query(20, ge=1, le=MAX_BUCKETS, description="points (the newest ones)"),
) -> dict:
    settings = settings_of(request)
    model = model_of(request, name)
    store_of(request)
    if bucket * buckets > settings.monitoring_max_window:
        raise InputError("invalid_parameter", f"bucket x buckets = {bucket * buckets} is over "
                                              f"CALIB_MONITORING_MAX_WINDOW={settings.monitoring_max_window}")
    profile = await calibrations.profile_for(request, model, calibration)
    _, rows = await _window_rows(request, model, profile, str(bucket * buckets))
    thresholds = monitoring.Thresholds.from_settings(settings)
    points = await in_thread(monitoring.timeline, rows, _reference(model, profile), thresholds,
                             monitoring.expected_ood_share(model), bucket, buckets)
    return {"points": points}


# --- feedback -----------------------------------------------------------------------------------
@router.post("/feedback", summary="True labels for earlier predictions (by prediction_id, or request_id and index)",
             responses={**error_responses(400, 413, 415),
                        **_documented(404, "`unknown_prediction`: no stored prediction has this id (or request id "
                                           "and index): unknown, not recorded (dropped), or past retention"),
                        **_documented(409, "`feedback_exists`: the prediction already has a label (the first is "
                                           "kept); `monitoring_disabled`")},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"type": "object", "required": ["feedback"], "properties": {"feedback": {
                     "type": "array", "minItems": 1, "items": {"oneOf": [
                         {"type": "object", "required": ["prediction_id", "label"], "additionalProperties": False,
                          "properties": {"prediction_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                                         "label": {"type": "integer", "minimum": 0}}},
                         {"type": "object", "required": ["request_id", "index", "label"],
                          "additionalProperties": False,
                          "properties": {"request_id": {"type": "string", "pattern": "^[A-Za-z0-9._:+/=-]{1,128}$"},
                                         "index": {"type": "integer", "minimum": 0, "maximum": MAX_INDEX - 1},
                                         "label": {"type": "integer", "minimum": 0}}}]}}}},
                 "example": {"feedback": [{"prediction_id": "0f8e2a4c9b7d4e61a3c5b2d1e0f9a8b7", "label": 3},
                                          {"request_id": "my-call-17", "index": 0, "label": 5}]}}}}})
async def post_feedback(request: Request) -> dict:
    settings = settings_of(request)
    store = store_of(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (ctype == "application/json" or ctype.endswith("+json")):
        raise InputError("unsupported_media_type", f"Content-Type {ctype or 'none'}: send the feedback as "
                                                   f"application/json", 415)
    payload = await read_payload(request, max_files=1)
    items = await in_thread(feedback_items, payload.json, settings.max_eval_images)
    writer = writer_of(request)
    if writer is not None:
        await in_thread(writer.flush, 10.0)   # a prediction still in the writer's queue is found too
    stored = await in_thread(store.apply_feedback, items)
    return {"stored": len(stored),
            "feedback": [{"prediction_id": s.prediction_id, "model": s.model_name, "version": s.model_version,
                          "label": s.label, "predicted_class": s.predicted_class,
                          "correct": s.predicted_class == s.label} for s in stored]}


# --- gauges refreshed by the writer ----------------------------------------------------------------
def refresher(app: FastAPI):
    """The writer's periodic gauge refresh: the default window of each (model, version, calibration)
    that served predictions since the last one (a profile only while it is in the cache)."""
    def refresh(keys: set) -> None:
        registry = app.state.registry
        settings = app.state.settings
        store = app.state.monitoring_store
        thresholds = monitoring.Thresholds.from_settings(settings)
        for name, version, calibration_id in keys:
            model = registry.models.get(name) if registry is not None else None
            if model is None or version_of(model) != version:
                continue
            profile = None
            if calibration_id is not None:
                profile = app.state.profile_cache.fresh(calibration_id)
                if profile is None:
                    continue
            rows = store.window(name, version, calibration_id, last=settings.monitoring_window)
            figures = monitoring.report(rows, _reference(model, profile), thresholds,
                                        monitoring.expected_ood_share(model))
            figures["window"] = {"predictions": len(rows)}
            app.state.metrics.observe_monitoring(name, version, calibration_id or CARD, figures)
    return refresh


# --- errors ---------------------------------------------------------------------------------------
async def _unknown(request: Request, exc: UnknownPrediction) -> JSONResponse:
    return error_response(404, "unknown_prediction", exc.message, {"position": exc.position}, request=request)


async def _exists(request: Request, exc: FeedbackExists) -> JSONResponse:
    return error_response(409, "feedback_exists", exc.message, {"position": exc.position}, request=request)


async def _label(request: Request, exc: LabelOutOfRange) -> JSONResponse:
    return error_response(422, "invalid_label", exc.message, {"position": exc.position,
                                                               "num_classes": exc.num_classes}, request=request)


def install(app: FastAPI) -> None:
    app.add_exception_handler(UnknownPrediction, _unknown)
    app.add_exception_handler(FeedbackExists, _exists)
    app.add_exception_handler(LabelOutOfRange, _label)
