"""/v2/repository: Triton's and MLServer's model repository API, admin scope.

HTTP only: the body is checked, the operation (`service.model_repository.ModelRepository`) runs in
a worker thread, so loading a model (seconds) never holds the event loop, and requests keep being
answered by the version being replaced until the new one is swapped in. Errors use the Open
Inference Protocol's `{"error": "<message>"}` body, as everything under /v2: 404 for a model (or
version) that is not on disk, 409 when the version to load fails to load (the old one keeps
serving; the message says which version serves), 400 for a bad body.
"""

from __future__ import annotations

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from service.api_keys import KeyRing
from service.inputs import InputError, parse_json_object
from service.model_repository import LoadFailed, ModelRepository
from service.rest import auth
from service.rest.errors import error_response
from service.rest.requests import in_thread, registry_of
from service.v2_schemas import (
    ErrorV2,
    RepositoryIndexEntry,
    RepositoryIndexRequest,
    RepositoryLoadRequest,
    RepositoryModelStatus,
    RepositoryUnloadRequest,
    inlined_schema,
)

ERRORS = {
    400: "the body is not a JSON object of the documented shape",
    404: "no model folder of this name in CALIB_MODEL_DIR, or it has no such version",
    409: "the version to load failed to load (tampered or stale files, a missing card, ...): nothing served "
         "changed; the message names the error and the version that keeps serving",
    503: "the models are not loaded yet",
}

router = APIRouter(prefix="/v2/repository", tags=["model repository"],
                   responses={s: {"model": ErrorV2, "description": d} for s, d in ERRORS.items() if s == 503})
ModelName = Path(description="a model folder's name in CALIB_MODEL_DIR", examples=["cifar10-augmix"])


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorV2, "description": ERRORS[s]} for s in statuses}


def protect(keys: KeyRing) -> dict:
    """`auth.protect_admin`, documented in the protocol's error shape: admin keys only."""
    kwargs = auth.protect_admin(keys)
    if kwargs:
        kwargs["responses"] = {401: {**auth.UNAUTHORIZED_RESPONSE[401], "model": ErrorV2},
                               403: {"model": ErrorV2, "description": "a read key: the repository API needs an "
                                                                      "admin key (CALIB_ADMIN_API_KEYS)"}}
    return kwargs


def repository_of(request: Request) -> ModelRepository:
    registry_of(request)  # 503 not_ready while the models load
    return request.app.state.model_repository


async def _body(request: Request, model):
    """The optional JSON body as `model` (an empty body is an empty object)."""
    raw = await request.body()
    payload = {} if not raw.strip() else await in_thread(parse_json_object, raw)
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "body"
        raise InputError("invalid_request", f"{where}: {first['msg']}", 400) from None


def _version(body: RepositoryLoadRequest) -> str | None:
    value = None if body.parameters is None else body.parameters.version
    return None if value is None else str(int(value))


def _optional_body(model) -> dict:
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": inlined_schema(model)}}}}


def _status(repository: ModelRepository, name: str) -> dict:
    serving = repository.registry.models.get(name)
    return {"name": name, "serving": None if serving is None else serving.version,
            "versions": repository.model_index(name)}


@router.post("/index", response_model=list[RepositoryIndexEntry], responses=_errors(400),
             openapi_extra=_optional_body(RepositoryIndexRequest),
             summary="Every model version on disk and its state (Triton's repository index; admin)")
async def index(request: Request) -> list[dict]:
    repository = repository_of(request)
    body = await _body(request, RepositoryIndexRequest)
    return await in_thread(repository.index, bool(body.ready))


@router.post("/models/{name}/load", response_model=RepositoryModelStatus, responses=_errors(400, 404, 409),
             openapi_extra=_optional_body(RepositoryLoadRequest),
             summary="Load or re-load a model from disk, swapping it in without downtime (admin)",
             description="Builds the version off to the side (card, SHA-256, safe_mode Keras or the LiteRT "
                         "export's checksums, a warm-up pass), then swaps it in: requests already running finish "
                         "on the version they started on. Body optional: `{\"parameters\": {\"version\": \"2\"}}` "
                         "loads that version (a roll-back or forward) and pins it.")
async def load(request: Request, name: str = ModelName) -> dict:
    repository = repository_of(request)
    version = _version(await _body(request, RepositoryLoadRequest))
    await in_thread(repository.load, name, version)
    return _status(repository, name)


@router.post("/models/{name}/unload", response_model=RepositoryModelStatus, responses=_errors(400, 404),
             openapi_extra=_optional_body(RepositoryUnloadRequest),
             summary="Stop serving every version of a model (admin)",
             description="Requests already running finish; new ones get 404 until the model is loaded again "
                         "(the poller does not bring it back). The body is optional and ignored.")
async def unload(request: Request, name: str = ModelName) -> dict:
    repository = repository_of(request)
    await _body(request, RepositoryUnloadRequest)
    await in_thread(repository.unload, name)
    return _status(repository, name)


async def _load_failed(request: Request, exc: LoadFailed) -> JSONResponse:
    return error_response(409, "model_load_failed", exc.message,
                          {"name": exc.name, "failed": [{"version": v, "reason": r} for v, r in exc.failed],
                           "serving": exc.serving}, request=request)


def install(app) -> None:
    app.add_exception_handler(LoadFailed, _load_failed)
