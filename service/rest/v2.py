"""/v2: the Open Inference Protocol (KServe v2, Triton, MLServer) REST API beside /v1.

Transport only: the body is parsed off the event loop and checked against the protocol's
models (`service.v2_schemas`), the tensor becomes the same uint8 batch /v1 predicts on
(`service.v2_tensors`), and the prediction runs through the same micro-batched dataplane path
(`BatchedPredictor.predict`), so /v2 probabilities equal /v1's for the same images. Errors under
/v2 use the protocol's `{"error": "<message>"}` body (`service.rest.errors.error_response`).

A model's version is its version folder's number (`<name>/<version>/`, Triton's; the flat layout
is version 1: docs/model-versions.md). For clients that pinned the weights before versions
existed, the first 12 hex digits of a loaded version's model-file SHA-256 name it too.
"""

from __future__ import annotations

import json
import secrets

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from service import dataplane, prediction_sets, v2_binary, v2_tensors
from service.api_keys import KeyRing
from service.inputs import InputError, parse_json_object
from service.registry import LoadedModel, UnknownVersionError
from service.rest import auth, calibrations, monitoring
from service.rest.errors import shown
from service.rest.requests import model_of, off_loop, registry_of, run_predict, settings_of
from service.schemas import _EXAMPLE_IMAGES
from service.v2_schemas import (
    ErrorV2,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    inlined_schema,
)

SERVER_NAME = "calibrated-cifar10"
PLATFORMS = {"keras": "tensorflow_keras", "litert": "tensorflow_lite"}   # by LoadedModel.runtime
# Triton's binary tensor data extension (service.v2_binary), and our own: the `mc_samples` / `seed` /
# `resize` request parameters and the MC-dropout outputs (docs/open-inference-protocol.md).
EXTENSIONS = [v2_binary.EXTENSION, "calibrated_uncertainty"]
VERSION_DIGITS = 12

ERRORS_V2 = {
    400: "the request is not a valid inference request for this model (shape, datatype, data, "
         "parameters, outputs, JSON)",
    404: "no loaded model has this name, or the model has no such version, or no calibration profile has "
         "the id of `parameters.calibration`",
    409: "`parameters.calibration` names a profile of another model, or of another version of this one",
    413: "the body is over CALIB_MAX_BODY_BYTES",
    503: "no model is loaded yet, or the server is overloaded (retry after `Retry-After` seconds), or the "
         "calibration database is down (with `parameters.calibration`)",
}


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorV2, "description": ERRORS_V2[s]} for s in statuses}


health_router = APIRouter(prefix="/v2", tags=["open inference protocol"])  # open, like /health
router = APIRouter(prefix="/v2", tags=["open inference protocol"], responses=_errors(503))

ModelName = Path(description="a model's name (GET /v1/models lists them)", examples=["cifar10-resnet"])
ModelVersion = Path(description="a loaded version of the model: its version folder's number (the flat layout "
                                "is 1), or the first 12 hex digits of its model file's SHA-256")


def protect(keys: KeyRing) -> dict:
    """`auth.protect`, with the 401 documented in the protocol's error shape."""
    kwargs = auth.protect(keys)
    if kwargs:
        kwargs["responses"] = {401: {**auth.UNAUTHORIZED_RESPONSE[401], "model": ErrorV2}}
    return kwargs


def version_of(model: LoadedModel) -> str:
    return getattr(model, "version", "1")


def _model(request: Request, name: str, version: str | None) -> LoadedModel:
    model = model_of(request, name)
    if version is None:
        return model
    registry = registry_of(request)
    try:
        return registry.get(name, version)
    except UnknownVersionError:
        pass
    versions = registry.loaded.get(name, {})
    for loaded in versions.values():   # the 12-digit SHA-256 prefix that named a version before
        if len(version) == VERSION_DIGITS and loaded.sha256[:VERSION_DIGITS] == version:
            return loaded
    raise InputError("unknown_version", f"model {shown(name)} has no loaded version {shown(version)}; its loaded "
                                        f"versions are {registry.versions_of(name)}", 404)


# --- health and server metadata ----------------------------------------------------------------
@health_router.get("/health/live", response_model=ServerLive, summary="Server live (protocol v2)")
async def server_live() -> dict:
    return {"live": True}


@health_router.get("/health/ready", response_model=ServerReady, summary="Server ready (protocol v2)",
                   responses={503: {"model": ServerReady, "description": "no model is loaded"}})
async def server_ready(request: Request):
    registry = getattr(request.app.state, "registry", None)
    if registry is None or not registry.ready:
        return JSONResponse({"ready": False}, status_code=503)
    return {"ready": True}


@router.get("", response_model=ServerMetadata, summary="Server metadata (protocol v2)")
async def server_metadata(request: Request) -> dict:
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}


# --- model metadata and readiness --------------------------------------------------------------
def _metadata(model: LoadedModel, versions: list[str]) -> dict:
    return {"name": model.name, "versions": versions or [version_of(model)], "platform": PLATFORMS[model.runtime],
            "inputs": v2_tensors.input_metadata(), "outputs": v2_tensors.output_metadata(model.num_classes)}


@router.get("/models/{name}", response_model=ModelMetadata, responses=_errors(404),
            summary="Model metadata (protocol v2)")
async def model_metadata(request: Request, name: str = ModelName) -> dict:
    return _metadata(_model(request, name, None), registry_of(request).versions_of(name))


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=_errors(404),
            summary="Model metadata of a version (protocol v2)")
async def model_version_metadata(request: Request, name: str = ModelName, version: str = ModelVersion) -> dict:
    return _metadata(_model(request, name, version), registry_of(request).versions_of(name))


@router.get("/models/{name}/ready", response_model=ModelReady, responses=_errors(404),
            summary="Model ready (protocol v2)")
async def model_ready(request: Request, name: str = ModelName) -> dict:
    return {"name": _model(request, name, None).name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReady, responses=_errors(404),
            summary="Model version ready (protocol v2)")
async def model_version_ready(request: Request, name: str = ModelName, version: str = ModelVersion) -> dict:
    return {"name": _model(request, name, version).name, "ready": True}


# --- inference -----------------------------------------------------------------------------------
_EXAMPLE = {"id": "example-1", "parameters": {"mc_samples": 30, "seed": 7},
            "inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                        "data": [image["b64"] for image in _EXAMPLE_IMAGES]}],
            "outputs": [{"name": "probabilities"}, {"name": "mutual_information"}]}
INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": inlined_schema(InferenceRequest), "example": _EXAMPLE}}}}
INFER_ERRORS = {**_errors(400, 404, 409, 413), 200: {
    "description": f"JSON; with binary outputs requested (`binary_data`, `binary_data_output`), the JSON "
                   f"header of `{v2_binary.HEADER}` bytes followed by the outputs' raw bytes",
    "content": {v2_binary.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/models/{name}/infer", response_model=InferenceResponse, responses=INFER_ERRORS,
             response_model_exclude_none=True, openapi_extra=INFER_BODY, summary="Inference (protocol v2)")
async def infer(request: Request, name: str = ModelName) -> dict:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferenceResponse,
             responses=INFER_ERRORS, response_model_exclude_none=True, openapi_extra=INFER_BODY,
             summary="Inference on a version (protocol v2)")
async def infer_version(request: Request, name: str = ModelName, version: str = ModelVersion) -> dict:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> dict | Response:
    settings = settings_of(request)
    registry_of(request)  # 503 before anything else while the models load
    model = _model(request, name, version)
    body = await request.body()
    header, tail = v2_binary.split_body(body, request.headers.get(v2_binary.HEADER))
    infer_request = await off_loop(request, len(body), _parse, header)
    raw = v2_binary.input_bytes(infer_request, tail)
    opts = v2_tensors.options(infer_request, settings.max_mc_samples)
    profile = await calibrations.profile_for(request, model, _calibration_id(infer_request))
    calibration = None
    if opts.sets is not None:
        calibration = (prediction_sets.calibration_of(model, status=400) if profile is None
                       else calibrations.conformal_of(model, profile))
    binary = v2_binary.binary_outputs(infer_request, opts.outputs)
    x = await off_loop(request, len(body), v2_tensors.images, infer_request, resize=opts.resize,
                       max_instances=settings.max_instances, raw=raw)
    seed = opts.seed
    if seed is None and opts.mc_samples:
        seed = secrets.randbelow(2**31 - 1)
    result = await run_predict(request, model, x, mc_samples=opts.mc_samples, seed=seed,
                               calibrator=None if profile is None else profile.calibrator)
    metrics = request.app.state.metrics
    metrics.images.labels(model.name, "infer_v2").inc(len(x))
    metrics.mc_samples.labels(model.name).inc(opts.mc_samples * len(x))
    parameters = {"temperature": model.temperature, "calibration": profile.id if profile is not None else "card",
                  "calibration_method": "temperature" if profile is None else profile.record.method}
    if opts.mc_samples:
        parameters.update(mc_samples=opts.mc_samples, seed=result.seed)
    mask = None
    if opts.sets is not None:
        mask = prediction_sets.sets(calibration, result.probabilities, opts.sets)
        parameters.update(coverage=opts.sets.coverage, conformal_method=opts.sets.method, mondrian=opts.sets.mondrian)
    ids = monitoring.record(request, model, profile, result, dataplane.ood_flags(model, result.probabilities), mask,
                            None if opts.sets is None else opts.sets.coverage)
    if ids is not None:  # a protocol parameter is a scalar: the ids in batch order, comma-separated
        parameters["prediction_ids"] = ",".join(ids)
    outputs, blobs = await off_loop(request, len(x) * 1024, v2_tensors.output_tensors, result, opts.outputs,
                                    mask, binary)
    response = {"model_name": model.name, "model_version": version_of(model), "parameters": parameters,
                "outputs": outputs}
    if infer_request.id is not None:
        response["id"] = infer_request.id
    if not blobs:  # built to the InferenceResponse schema (tests/test_oip_v2.py checks it): no re-validation
        return JSONResponse(response)
    content, header_length = v2_binary.response_body(response, blobs)
    return Response(content, media_type=v2_binary.MEDIA_TYPE,
                    headers={v2_binary.HEADER: str(header_length)})


def _calibration_id(infer_request: InferenceRequest) -> str | None:
    """`"parameters": {"calibration": "<profile id>"}`: use that profile (None: the card's temperature)."""
    value = (infer_request.parameters or {}).get("calibration")
    if value is not None and not isinstance(value, str):
        raise InputError("invalid_parameter", f"parameters.calibration must be a profile id (a string), "
                                              f"got {value!r}", 400)
    return value


def _parse(body: bytes) -> InferenceRequest:
    payload = parse_json_object(body)
    try:
        return InferenceRequest.model_validate(payload)
    except ValidationError as exc:
        raise InputError("invalid_request", _validation_message(exc), 400) from None


def _validation_message(exc: ValidationError, limit: int = 5) -> str:
    parts = [f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors()[:limit]]
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def document_400_not_422(app) -> None:
    """FastAPI documents a 422 `HTTPValidationError` on every route with parameters; under /v2 the
    service answers those cases with 400 in the protocol's shape (`errors.error_response`), so
    drop the 422 from the /v2 operations and the unused FastAPI schemas from the document."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        spec = generate()
        for path, operations in spec.get("paths", {}).items():
            if path.startswith("/v2"):
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
        if "#/components/schemas/HTTPValidationError" not in json.dumps(spec.get("paths", {})):
            for name in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi
