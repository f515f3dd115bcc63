"""Pydantic models of the Open Inference Protocol (KServe "v2") REST messages.

Field names and JSON shapes follow the protocol's REST specification
(kserve/open-inference-protocol, specification/protocol/inference_rest.md). The request model is
strict, so what it accepts is exactly what its published JSON schema allows (the fuzz test sends
schema-breaking bodies and expects a 4xx); everything model-specific (datatype, shape, data, our
parameters) is checked in `service.v2_tensors` and answered with 400 and a message.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

# $parameter = $string : $string | $number | $boolean
ParameterValue = Union[StrictBool, StrictInt, StrictFloat, StrictStr]
Parameters = dict[str, ParameterValue]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class RequestInput(_Strict):
    name: str = Field(description="the input tensor's name: `images`", json_schema_extra={"enum": ["images"]})
    shape: list[Annotated[int, Field(ge=0)]] = Field(
        description="[N, 32, 32, 3] for UINT8 / FP32 pixels, [N] for BYTES (encoded images)",
        json_schema_extra={"minItems": 1, "maxItems": 4})
    datatype: str = Field(description="UINT8 or FP32 (pixel values 0..255, RGB, HWC) or BYTES "
                                      "(base64 strings of PNG/JPEG files)",
                          json_schema_extra={"enum": ["UINT8", "FP32", "BYTES"]})
    parameters: Optional[Parameters] = Field(
        None, description="`binary_data_size`: the tensor is sent as that many raw bytes after the JSON "
                          "(binary tensor data extension; no `data` then)")
    data: Optional[list[Any]] = Field(
        None, description="the tensor's elements in row-major order, flat or nested (required unless "
                          "parameters.binary_data_size is given)")


# The outputs a request may name (service.v2_tensors.OUTPUT_NAMES, which a test keeps equal): the
# document lists them; the server's own check answers an unknown one (400, naming the outputs).
REQUESTABLE_OUTPUTS = ["probabilities", "mc_mean", "mc_variance", "predictive_entropy", "expected_entropy",
                       "mutual_information", "prediction_set"]


class RequestOutput(_Strict):
    name: str = Field(description="an output named in the model metadata (the MC outputs need "
                                  "parameters.mc_samples)", json_schema_extra={"enum": REQUESTABLE_OUTPUTS})
    parameters: Optional[Parameters] = Field(
        None, description="`binary_data` (bool): return this output as raw bytes after the JSON (binary "
                          "tensor data extension); other parameters are ignored")


class InferenceRequest(_Strict):
    id: Optional[str] = Field(None, description="echoed in the response")
    parameters: Optional[Parameters] = Field(
        None, description="`mc_samples` (int 2..CALIB_MAX_MC_SAMPLES: also return the MC-dropout outputs), "
                          "`seed` (int, the dropout masks' seed; random if omitted, returned in the "
                          "response parameters), `resize` (bool: resize BYTES images that are not 32x32 "
                          "RGB), `coverage` (0 < c < 1: also return `prediction_set`, the conformal sets as a "
                          "BOOL mask [N, K]) with `conformal_method` (lac, aps, raps) and `mondrian` (bool), "
                          "`binary_data_output` (bool: outputs that do not say otherwise are returned as raw "
                          "bytes); other parameters are ignored")
    inputs: list[RequestInput] = Field(description="exactly one input tensor, `images`")
    outputs: Optional[list[RequestOutput]] = Field(
        None, min_length=1, description="the outputs to return (default: `probabilities`, plus the MC outputs when "
                          "mc_samples is given)")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Optional[Parameters] = Field(
        None, description="`binary_data_size`: the output's raw bytes follow the JSON (no `data` then)")
    data: Optional[list[Union[float, bool]]] = Field(None, description="row-major, flat (booleans for BOOL "
                                                                      "tensors)")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: Optional[str] = None
    id: Optional[str] = Field(None, description="the request's `id`, if it had one")
    parameters: Optional[Parameters] = Field(
        None, description="`temperature`; with MC dropout also `mc_samples` and `seed` (send it back to "
                          "reproduce the MC outputs); with coverage also `coverage`, `conformal_method`, "
                          "`mondrian`")
    outputs: list[ResponseOutput]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size (the batch dimension)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the loaded versions (version folder numbers; the flat layout is \"1\")")
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ErrorV2(BaseModel):
    """The protocol's error object: a message only (the request ID is in the X-Request-ID header)."""

    error: str


def inlined_schema(model: type[BaseModel]) -> dict:
    """`model`'s JSON schema with its `$defs` substituted in place: a request body published with
    `openapi_extra` cannot point into `components`, and a `#/$defs/...` reference would resolve
    against the OpenAPI document's root, not the schema's. The request models are not recursive."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve({**defs[ref.rsplit("/", 1)[1]],
                                **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


# --- the model repository extension (Triton's /v2/repository, admin scope) ------------------------
class RepositoryIndexRequest(_Strict):
    ready: Optional[bool] = Field(None, description="true: only the versions that are READY")


VersionNumber = Union[Annotated[StrictInt, Field(ge=1)], Annotated[StrictStr, Field(pattern=r"^[1-9][0-9]{0,17}$")]]


class RepositoryLoadParameters(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid")   # Triton's `config` / `file:` overrides: 400
    version: Optional[VersionNumber] = Field(
        None, description="load this version (a positive integer or its string) and serve it, pinned: the "
                          "poller leaves the model alone until a load without a version; without it, the "
                          "version policy's newest version is loaded (or re-loaded)")


class RepositoryLoadRequest(_Strict):
    parameters: Optional[RepositoryLoadParameters] = None


class RepositoryUnloadRequest(_Strict):
    parameters: Optional[dict[str, ParameterValue]] = Field(
        None, description="accepted and ignored (Triton's `unload_dependents`: a model here has none)")


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str = Field(description="the version folder's number (the flat layout: \"1\")")
    state: str = Field(description="READY, UNAVAILABLE or LOADING")
    reason: str = Field(description="why it is not READY (its load error, `unloaded`, or the version policy); "
                                    "for a READY version, a failed re-load of it, else empty")


class RepositoryModelStatus(BaseModel):
    name: str
    serving: Optional[str] = Field(description="the version requests without a version get; null when "
                                               "none is loaded")
    versions: list[RepositoryIndexEntry]
