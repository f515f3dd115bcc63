"""Recalibration profiles over HTTP: /v1/models/{name}/calibrations (a model's profiles) and
/v1/calibrations (model-independent ones, fitted on a client's logits; any profile by id).

HTTP only: the repository (`service.storage`) runs in a worker thread and its typed errors
become 404 `unknown_calibration`, 409 `calibration_limit_reached` and 503 `storage_unavailable`.
Reading and using a profile needs a read key; creating and deleting one an admin key
(`admin_router`, included with `auth.protect_admin`).
"""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
from fastapi import APIRouter, FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from models.calibration.recalibration import AUTO, DEFAULT_FOLDS, METHODS, TooFewImagesError
from service import logits_inputs, prediction_sets, profile_inputs, profiles
from service.inputs import InputError
from service.profile_schemas import CalibrationApplied, CalibrationProfile, CalibrationProfileList
from service.registry import LoadedModel
from service.rest.errors import error_response, error_responses
from service.rest.requests import in_thread, model_of, on_model_executor, read_payload, settings_of, upload_limits
from service.schemas import CONFORMAL_UNAVAILABLE, EVALUATE_BODY, ErrorResponse
from service.storage import (
    CalibrationRepository,
    LimitReached,
    NotFound,
    ProfileRecord,
    StorageUnavailable,
)

RETRY_AFTER_S = 5  # a database outage: ask again after a few seconds


def _documented(status: int, description: str) -> dict:
    return {status: {"model": ErrorResponse, "description": description}}


NOT_FOUND = _documented(404, "`unknown_calibration`: no profile has this id; `unknown_model`: no loaded model has "
                             "this name")
CONFLICT = _documented(409, "`calibration_model_mismatch`: the profile belongs to another model (or to none); "
                            "`calibration_model_changed`: it was fitted for another version (sha256) of this model; "
                            "`calibration_limit_reached`: CALIB_MAX_CALIBRATIONS profiles are stored")
USE_ERRORS = _documented(409, "`calibration_model_mismatch` / `calibration_model_changed` (calibration=<id>): "
                              "the profile belongs to another model or another version of this one; "
                              + CONFORMAL_UNAVAILABLE[409]["description"])
STORAGE = _documented(503, "`storage_unavailable`: the calibration database cannot be reached (predictions without "
                           "a profile still work; /health/ready says which part is down), with `Retry-After`; "
                           "or `not_ready`")
TOO_FEW = _documented(422, "bad input; `too_few_images`: fewer labelled images than the method and folds need "
                           "(`details.minimum`), `non_finite_value`, `length_mismatch`, `label_out_of_range`, "
                           "`invalid_parameter`, ...")
BODY_ERRORS = error_responses(400, 413, 415)
Method = Literal["temperature", "vector", "dirichlet", "auto"]
assert set(Method.__args__) == {*METHODS, AUTO}  # the math's methods, spelled for OpenAPI

router = APIRouter(prefix="/v1", tags=["calibrations"], responses={**error_responses(422), **STORAGE})
admin_router = APIRouter(prefix="/v1", tags=["calibrations"], responses={**error_responses(422), **STORAGE})

ModelName = Path(description="a model's name, as listed by GET /v1/models", examples=["cifar10-augmix"])
ProfileId = Path(description="a calibration profile's id", examples=["5b0f3c2e-8d1a-4d44-9c3e-0a1b2c3d4e5f"])


class CalibrationMismatch(Exception):
    """A profile used with (or addressed under) a model it was not fitted for: 409."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def repository_of(request: Request) -> CalibrationRepository:
    return request.app.state.calibrations


def cache_of(request: Request) -> profiles.ProfileCache:
    return request.app.state.profile_cache


async def load(request: Request, profile_id: str) -> profiles.LoadedProfile:
    """From the in-memory cache when fresh (no thread hop, no query), else from the repository."""
    cache = cache_of(request)
    return cache.fresh(profile_id) or await in_thread(cache.get, repository_of(request), profile_id)


async def profile_for(request: Request, model: LoadedModel, profile_id: Optional[str]):
    """`calibration=<id>` of predict/evaluate/compare/v2: the loaded profile of this model, or None."""
    if profile_id is None:
        return None
    profile = await load(request, profile_id)
    check_profile_model(profile.record, model)
    return profile


def conformal_of(model: LoadedModel, profile):
    """The conformal calibration prediction sets use: the profile's, else the card's (409
    `conformal_unavailable` when there is none)."""
    if profile is None:
        return prediction_sets.calibration_of(model)
    if profile.conformal is None:
        raise InputError("conformal_unavailable", f"calibration profile {profile.id} has no conformal "
                                                  f"calibration, so it cannot serve prediction sets", 409)
    return profile.conformal


def used(model: LoadedModel, profile) -> dict:
    """The `calibration` block every answer carries."""
    return profiles.card_calibration(model) if profile is None else profile.used()


def profile_body(record: ProfileRecord, conformal: dict | None = None) -> dict:
    model = None if record.model_name is None else {"name": record.model_name, "sha256": record.model_sha256}
    return {"id": record.id, "model": model, "num_classes": record.num_classes, "method": record.method,
            "parameters": record.parameters, "label": record.label, "n": record.n,
            "data_sha256": record.data_sha256, "created_at": record.created_at, "report": record.report,
            "conformal": conformal if conformal is not None else record.report.get("conformal")}


def check_profile_model(record: ProfileRecord, model: LoadedModel) -> None:
    """409 unless `record` was fitted for this very model file (name and sha256)."""
    if record.model_name != model.name:
        whose = "no model (it is model-independent)" if record.model_name is None else f"model {record.model_name!r}"
        raise CalibrationMismatch("calibration_model_mismatch",
                                  f"calibration profile {record.id} belongs to {whose}, not to {model.name!r}")
    sha = model.card.get("model_sha256")
    if record.model_sha256 != sha:
        raise CalibrationMismatch(
            "calibration_model_changed",
            f"calibration profile {record.id} was fitted for {model.name!r} with sha256 "
            f"{(record.model_sha256 or '')[:12]}..., the loaded model is {str(sha)[:12]}...: fit a new profile")


async def _model_profile(request: Request, name: str, profile_id: str):
    model = model_of(request, name)
    record = await in_thread(repository_of(request).get, profile_id)
    if record.model_name != model.name:  # addressed under another model: say whose it is
        check_profile_model(record, model)
    return model, record


# --- a model's profiles --------------------------------------------------------------------------
@router.get("/models/{name}/calibrations", response_model=CalibrationProfileList,
            summary="The calibration profiles of the version of a model being served, oldest first",
            description="A profile belongs to one model file (its sha256): a new version of the model starts "
                        "with none, and a profile of another version is refused (409 "
                        "`calibration_model_changed`). `all_versions=true` lists those of every version.",
            responses={**NOT_FOUND})
async def list_model_calibrations(
    request: Request,
    name: str = ModelName,
    all_versions: bool = Query(False, description="also list the profiles fitted for other versions (other "
                                                  "sha256) of this model"),
) -> dict:
    model = model_of(request, name)
    repository = repository_of(request)
    records = await in_thread(repository.list, model.name)
    if not all_versions:
        records = profiles.of_model_file(records, model.sha256)
    return {"calibrations": [profile_body(r) for r in records], "count": len(records),
            "limit": repository.max_profiles}


@router.get("/models/{name}/calibrations/{profile_id}", response_model=CalibrationProfile,
            summary="One calibration profile of a model", responses={**NOT_FOUND, **CONFLICT})
async def get_model_calibration(request: Request, name: str = ModelName, profile_id: str = ProfileId) -> dict:
    _, record = await _model_profile(request, name, profile_id)
    return profile_body(record)


Label = Query(None, max_length=200, description="a free-text name for the domain, e.g. 'camera B, winter'")
Folds = Query(DEFAULT_FOLDS, ge=2, le=20, description="k of the k-fold cross-fitting of the report and the "
                                                      "conformal scores")
MethodQuery = Query("temperature", description="temperature, vector (per-class scale and bias), dirichlet "
                                               "(ODIR-regularised) or auto (the lowest cross-validated NLL)")


def _fit_error(exc: ValueError) -> InputError:
    return InputError("invalid_input", f"cannot fit a profile on this batch: {exc}")


@admin_router.post("/models/{name}/calibrations", status_code=201, response_model=CalibrationProfile,
                   openapi_extra=EVALUATE_BODY, responses={**NOT_FOUND, **CONFLICT, **TOO_FEW, **BODY_ERRORS},
                   summary="Fit and store a recalibration profile of a model on a labelled batch (admin)",
                   description="The labelled batch in any form evaluate accepts (JSON instances + labels, an "
                               ".npz with x and y, an archive of <class>/<image> folders). Admitted like "
                               "evaluate; a failed fit stores nothing.")
async def create_model_calibration(
    request: Request,
    name: str = ModelName,
    method: Method = MethodQuery,
    label: Optional[str] = Label,
    folds: int = Folds,
    resize: bool = Query(False, description="resize archive images that are not 32x32 RGB"),
    split: Optional[str] = Query(None, description="archive sub-folder holding the class folders, e.g. test"),
    source: Literal["upload", "feedback"] = Query(
        "upload", alias="from", description="upload: fit on the labelled batch in the body; feedback: fit on the "
                                            "predictions of this model that got a label through POST /v1/feedback "
                                            "(their stored logits; no body, no images)"),
    since: Optional[str] = Query(None, description="with from=feedback: only predictions served since this ISO 8601 "
                                                   "time or this long ago (e.g. 2h, 1d); default all that are kept"),
) -> Response:
    from service.rest.models import read_labelled_batch

    settings = settings_of(request)
    model = model_of(request, name)
    if source == "feedback":
        # read the (empty) body here: admission takes the evaluation slot once the body is in, and must
        # do so in the route, not inside the disconnect watcher of the fit
        if await request.body():
            raise InputError("invalid_request", "from=feedback fits on the stored labelled predictions and takes "
                                                "no body; send the batch without from=feedback to fit on it")
        new = await _fit_from_feedback(request, model, method=method, folds=folds, label=label, since=since)
    else:
        if since is not None:
            raise InputError("invalid_parameter", "since applies to from=feedback only")
        x, y = await read_labelled_batch(request, model, resize=resize, split=split)
        try:
            new = await on_model_executor(request, _fit_model, model, x, y, method=method, folds=folds, label=label,
                                          chunk=settings.eval_chunk)
        except TooFewImagesError:
            raise
        except ValueError as exc:
            raise _fit_error(exc) from None
        request.app.state.metrics.images.labels(model.name, "calibrate").inc(len(x))
    stored = await in_thread(repository_of(request).create, new)
    return JSONResponse(_json(profile_body(stored)), status_code=201,
                        headers={"Location": f"/v1/models/{model.name}/calibrations/{stored.id}"})


async def _fit_from_feedback(request: Request, model: LoadedModel, *, method: str, folds: int, label: Optional[str],
                             since: Optional[str]):
    """The profile fitted on the stored labelled predictions of this model file (from=feedback)."""
    from service.durations import parse_since
    from service.rest.monitoring import store_of, writer_of

    store = store_of(request)
    try:
        start = None if since is None else parse_since(since)
    except ValueError as exc:
        raise InputError("invalid_parameter", str(exc)) from None
    writer = writer_of(request)
    if writer is not None:
        await in_thread(writer.flush, 10.0)
    rows = await in_thread(store.labelled, model.name, model.card.get("model_sha256"), since=start,
                           limit=settings_of(request).max_eval_images)
    try:
        return await on_model_executor(request, _fit_feedback, model, rows.logits, rows.probabilities, rows.labels,
                                       method=method, folds=folds, label=label)
    except TooFewImagesError:
        raise
    except ValueError as exc:
        raise _fit_error(exc) from None


def _fit_feedback(model, logits, served, y, *, stop, **kwargs):
    return profiles.fit_feedback_profile(model, logits, served, y, **kwargs)


def _fit_model(model, x, y, *, stop, **kwargs):
    return profiles.fit_model_profile(model, x, y, stop=stop, **kwargs)


def _json(body: dict) -> dict:
    return CalibrationProfile.model_validate(body).model_dump(mode="json")


@admin_router.delete("/models/{name}/calibrations/{profile_id}", status_code=204, response_class=Response,
                     summary="Delete a calibration profile of a model (admin)", responses={**NOT_FOUND, **CONFLICT})
async def delete_model_calibration(request: Request, name: str = ModelName,
                                   profile_id: str = ProfileId) -> Response:
    _, record = await _model_profile(request, name, profile_id)
    await _delete(request, record.id)
    return Response(status_code=204)


async def _delete(request: Request, profile_id: str) -> None:
    await in_thread(repository_of(request).delete, profile_id)
    cache_of(request).evict(profile_id)


# --- any profile by id; model-independent profiles ---------------------------------------------
@router.get("/calibrations", response_model=CalibrationProfileList,
            summary="The model-independent calibration profiles (fitted on a client's logits)")
async def list_calibrations(request: Request) -> dict:
    repository = repository_of(request)
    records = await in_thread(repository.list, None)
    return {"calibrations": [profile_body(r) for r in records], "count": len(records),
            "limit": repository.max_profiles}


@router.get("/calibrations/{profile_id}", response_model=CalibrationProfile,
            summary="Any calibration profile by id (a model's or a model-independent one)", responses=NOT_FOUND)
async def get_calibration(request: Request, profile_id: str = ProfileId) -> dict:
    return profile_body(await in_thread(repository_of(request).get, profile_id))


@admin_router.delete("/calibrations/{profile_id}", status_code=204, response_class=Response,
                     summary="Delete any calibration profile by id (admin)", responses=NOT_FOUND)
async def delete_calibration(request: Request, profile_id: str = ProfileId) -> Response:
    await _delete(request, profile_id)
    return Response(status_code=204)


def _logits_body(labelled: bool) -> dict:
    """The request body of a logits route: exactly one of `logits` / `probabilities` (and, to fit,
    `labels`), as JSON, or one .npz file."""
    one_of = [{"required": ["logits"]}, {"required": ["probabilities"]}]
    properties = {
        "logits": {"type": "array", "items": {"type": "array", "items": {"type": "number"}},
                   "description": "[N, K] raw logits (or send `probabilities` instead)"},
        "probabilities": {"type": "array", "items": {"type": "array", "items": {"type": "number"}},
                          "description": "[N, K] probabilities, rows summing to 1"}}
    if labelled:
        properties["labels"] = {"type": "array", "items": {"type": "integer"}, "description": "[N] class indices"}
    npz = ".npz with `logits` or `probs` [N, K]" + (" and `y` [N]" if labelled else "")
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "properties": properties, "oneOf": one_of,
                                        **({"required": ["labels"]} if labelled else {})}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary", "description": npz}}}}}}}


LOGITS_BODY = _logits_body(labelled=True)
UNLABELLED_LOGITS_BODY = _logits_body(labelled=False)


@admin_router.post("/calibrations", status_code=201, response_model=CalibrationProfile, openapi_extra=LOGITS_BODY,
                   responses={**CONFLICT, **TOO_FEW, **BODY_ERRORS},
                   summary="Fit and store a model-independent profile from any classifier's labelled logits (admin)",
                   description="`logits` or `probabilities` [N, K] (K from 2 to 1,000) and `labels` [N], as JSON "
                               "or an .npz (`logits` or `probs`, and `y`). Admitted like evaluate; a failed fit "
                               "stores nothing.")
async def create_calibration(request: Request, method: Method = MethodQuery, label: Optional[str] = Label,
                             folds: int = Folds) -> Response:
    settings = settings_of(request)
    payload = await read_payload(request, max_files=1)
    if payload.json is not None:
        outputs = await in_thread(logits_inputs.outputs_from_json, payload.json, settings.max_eval_images)
    else:
        outputs = await in_thread(logits_inputs.outputs_from_files, payload.files,
                                  upload_limits(settings, settings.max_eval_images))
    z, y = profile_inputs.as_logits(outputs), outputs.labels
    try:
        new = await on_model_executor(request, _fit_logits, z, y, method=method, folds=folds, label=label)
    except TooFewImagesError:
        raise
    except ValueError as exc:
        raise _fit_error(exc) from None
    stored = await in_thread(repository_of(request).create, new)
    return JSONResponse(_json(profile_body(stored)), status_code=201,
                        headers={"Location": f"/v1/calibrations/{stored.id}"})


def _fit_logits(z, y, *, stop, **kwargs):
    return profiles.fit_logits_profile(z, y, **kwargs)


@router.post("/calibrations/{profile_id}/apply", response_model=CalibrationApplied, openapi_extra=UNLABELLED_LOGITS_BODY,
             responses={**NOT_FOUND, **USE_ERRORS, **BODY_ERRORS},
             summary="Calibrated probabilities (and prediction sets with `coverage`) for logits under a profile",
             description="`logits` (or `probabilities`) [N, K] with the profile's K, as JSON or an .npz; no labels.")
async def apply_calibration(
    request: Request,
    profile_id: str = ProfileId,
    coverage: Optional[float] = Query(None, description="also return split-conformal prediction sets at this "
                                                        "coverage (0 < c < 1), from the profile's own calibration"),
    conformal_method: Optional[Literal["lac", "aps", "raps"]] = Query(
        None, description="the sets' non-conformity score (default lac); needs coverage"),
    mondrian: bool = Query(False, description="class-conditional (Mondrian) sets; needs coverage"),
) -> dict:
    settings = settings_of(request)
    options = prediction_sets.set_options(coverage, conformal_method, mondrian)
    profile = await load(request, profile_id)
    payload = await read_payload(request, max_files=1)
    z = await in_thread(profile_inputs.unlabelled_logits, payload.json, payload.files,
                        limits=upload_limits(settings, settings.max_eval_images))
    if z.shape[1] != profile.record.num_classes:
        raise InputError("class_count_mismatch", f"{z.shape[1]} classes given; profile {profile.id} was fitted "
                                                 f"for K = {profile.record.num_classes}")
    conformal = None if options is None else conformal_of(None, profile)
    p, sets = await in_thread(_apply, profile, z, conformal, options)
    return {"calibration": profile.used(), "n": int(len(z)), "probabilities": p.tolist(),
            "prediction_sets": sets}


def _apply(profile: profiles.LoadedProfile, z: np.ndarray, conformal, options):
    p = profile.calibrator.probabilities(z)
    if options is None:
        return p, None
    classes = [str(k) for k in range(p.shape[1])]   # a model-independent profile knows no class names
    return p, prediction_sets.set_rows(prediction_sets.sets(conformal, p, options), options, classes)


# --- errors --------------------------------------------------------------------------------------
async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
    return error_response(404, "unknown_calibration", exc.message, request=request)


async def _limit(request: Request, exc: LimitReached) -> JSONResponse:
    return error_response(409, "calibration_limit_reached", exc.message, {"limit": exc.limit}, request=request)


async def _mismatch(request: Request, exc: CalibrationMismatch) -> JSONResponse:
    return error_response(409, exc.code, exc.message, request=request)


async def _too_few(request: Request, exc: TooFewImagesError) -> JSONResponse:
    return error_response(422, "too_few_images", str(exc), {"minimum": exc.minimum}, request=request)


async def _unavailable(request: Request, exc: StorageUnavailable) -> JSONResponse:
    response = error_response(503, "storage_unavailable", exc.message, request=request)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def install(app: FastAPI) -> None:
    app.state.profile_cache = profiles.ProfileCache()
    app.add_exception_handler(TooFewImagesError, _too_few)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(LimitReached, _limit)
    app.add_exception_handler(CalibrationMismatch, _mismatch)
    app.add_exception_handler(StorageUnavailable, _unavailable)
