"""Recalibration profiles over HTTP: /v1/models/{name}/calibrations (a model's profiles) and
/v1/calibrations (model-independent ones, fitted on a client's logits; any profile by id).

HTTP only: the repository (`service.storage`) runs in a worker thread and its typed errors
become 404 `unknown_calibration`, 409 `calibration_limit_reached` and 503 `storage_unavailable`.
Reading and using a profile needs a read key; creating and deleting one an admin key
(`admin_router`, included with `auth.protect_admin`).
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Path, Request, Response
from fastapi.responses import JSONResponse

from service.profile_schemas import CalibrationProfile, CalibrationProfileList
from service.registry import LoadedModel
from service.rest.errors import error_response, error_responses
from service.rest.requests import in_thread, model_of
from service.schemas import ErrorResponse
from service.storage import (
    CalibrationRepository,
    LimitReached,
    NotFound,
    ProfileRecord,
    StorageUnavailable,
)

RETRY_AFTER_S = 5  # a database outage: ask again after a few seconds


def _documented(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


NOT_FOUND = {404: _documented("`unknown_calibration`: no profile has this id; `unknown_model`: no loaded model "
                              "has this name")}
CONFLICT = {409: _documented("`calibration_model_mismatch`: the profile belongs to another model (or to none); "
                             "`calibration_model_changed`: it was fitted for another version (sha256) of this "
                             "model; `calibration_limit_reached`: CALIB_MAX_CALIBRATIONS profiles are stored")}
STORAGE = {503: _documented("`storage_unavailable`: the calibration database cannot be reached (predictions "
                            "without a profile still work; /health/ready says which part is down), with "
                            "`Retry-After`; or `not_ready`")}

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
            summary="The calibration profiles of a model (every version of it), oldest first",
            responses={**NOT_FOUND})
async def list_model_calibrations(request: Request, name: str = ModelName) -> dict:
    model = model_of(request, name)
    repository = repository_of(request)
    records = await in_thread(repository.list, model.name)
    return {"calibrations": [profile_body(r) for r in records], "count": len(records),
            "limit": repository.max_profiles}


@router.get("/models/{name}/calibrations/{profile_id}", response_model=CalibrationProfile,
            summary="One calibration profile of a model", responses={**NOT_FOUND, **CONFLICT})
async def get_model_calibration(request: Request, name: str = ModelName, profile_id: str = ProfileId) -> dict:
    _, record = await _model_profile(request, name, profile_id)
    return profile_body(record)


@admin_router.delete("/models/{name}/calibrations/{profile_id}", status_code=204, response_class=Response,
                     summary="Delete a calibration profile of a model (admin)", responses={**NOT_FOUND, **CONFLICT})
async def delete_model_calibration(request: Request, name: str = ModelName,
                                   profile_id: str = ProfileId) -> Response:
    _, record = await _model_profile(request, name, profile_id)
    await in_thread(repository_of(request).delete, record.id)
    return Response(status_code=204)


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
    await in_thread(repository_of(request).delete, profile_id)
    return Response(status_code=204)


# --- errors --------------------------------------------------------------------------------------
async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
    return error_response(404, "unknown_calibration", exc.message, request=request)


async def _limit(request: Request, exc: LimitReached) -> JSONResponse:
    return error_response(409, "calibration_limit_reached", exc.message, {"limit": exc.limit}, request=request)


async def _mismatch(request: Request, exc: CalibrationMismatch) -> JSONResponse:
    return error_response(409, exc.code, exc.message, request=request)


async def _unavailable(request: Request, exc: StorageUnavailable) -> JSONResponse:
    response = error_response(503, "storage_unavailable", exc.message, request=request)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def install(app: FastAPI) -> None:
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(LimitReached, _limit)
    app.add_exception_handler(CalibrationMismatch, _mismatch)
    app.add_exception_handler(StorageUnavailable, _unavailable)
