"""Open Inference Protocol tensors <-> the arrays the dataplane takes and gives.

Input: one tensor `images`, either pixels (`UINT8` or `FP32`, whole numbers 0..255, shape
[N, 32, 32, 3], data flat in row-major order or nested) or encoded images (`BYTES`, shape [N],
each element the base64 text of a PNG or JPEG file: JSON strings must be text, and base64 is
what KServe's and Triton's image examples send). With the binary tensor data extension
(`service.v2_binary`) the same tensors arrive as raw bytes instead (BYTES elements as the files
themselves), and outputs can leave as raw little-endian FP32. Pixels go through the same checks as /v1
(`service.inputs.check_pixels`), images through the same decoder, so both APIs see the same
uint8 batch for the same images. Output: named FP32 tensors, flat row-major data.

Every problem is an `InputError` with status 400 (the protocol's status for a bad request).
Nothing here imports FastAPI or TensorFlow.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
from dataclasses import dataclass

import numpy as np

from service import dataplane, inputs, prediction_sets, v2_binary
from service.inputs import IMAGE_SHAPE, InputError
from service.v2_schemas import InferenceRequest, RequestInput

INPUT_NAME = "images"
PIXEL_DATATYPES = ("UINT8", "FP32")
BYTES = "BYTES"
PROBABILITIES = "probabilities"
# MC-dropout outputs: (name, per-class?) -> attribute of models.calibration.uncertainty.MCSummary
MC_OUTPUTS = {"mc_mean": ("mean", True), "mc_variance": ("variance", True),
              "predictive_entropy": ("predictive_entropy", False),
              "expected_entropy": ("expected_entropy", False),
              "mutual_information": ("mutual_information", False)}
# With parameters.coverage: the conformal prediction sets as a BOOL mask [N, K] (docs/conformal.md).
PREDICTION_SET = "prediction_set"
OUTPUT_NAMES = (PROBABILITIES, *MC_OUTPUTS, PREDICTION_SET)
MIN_MC_SAMPLES = 2  # one sample has no variance and no mutual information


def bad(code: str, message: str) -> InputError:
    return InputError(code, message, 400)


@dataclass(frozen=True)
class InferOptions:
    """The request's parameters, checked. `seed` None: the caller draws one (MC only)."""

    mc_samples: int
    seed: int | None
    resize: bool
    outputs: tuple[str, ...]
    sets: prediction_sets.SetOptions | None = None  # parameters.coverage (+ conformal_method, mondrian)


def options(request: InferenceRequest, max_mc_samples: int) -> InferOptions:
    params = request.parameters or {}
    mc_samples = 0
    if "mc_samples" in params:
        mc_samples = _int_param(params, "mc_samples")
        if not MIN_MC_SAMPLES <= mc_samples <= max_mc_samples:
            raise bad("mc_samples_out_of_range",
                      f"parameters.mc_samples={mc_samples}; expected {MIN_MC_SAMPLES}..{max_mc_samples} "
                      f"(omit it for no MC dropout)")
    seed = None
    if "seed" in params:
        seed = _int_param(params, "seed")
        if not 0 <= seed < 2**31 - 1:
            raise bad("invalid_parameter", f"parameters.seed={seed}; expected 0..{2**31 - 2}")
    resize = params.get("resize", False)
    if not isinstance(resize, bool):
        raise bad("invalid_parameter", f"parameters.resize must be a boolean, got {resize!r}")
    mondrian = params.get("mondrian", False)
    if not isinstance(mondrian, bool):
        raise bad("invalid_parameter", f"parameters.mondrian must be a boolean, got {mondrian!r}")
    coverage = params.get("coverage")
    if isinstance(coverage, bool) or not (coverage is None or isinstance(coverage, (int, float))):
        raise bad("invalid_coverage", f"parameters.coverage must be a number in (0, 1), got {coverage!r}")
    sets = prediction_sets.set_options(coverage, params.get("conformal_method"), mondrian, status=400,
                                       prefix="parameters.")
    return InferOptions(mc_samples, seed, resize, _requested_outputs(request, mc_samples, sets is not None), sets)


def _int_param(params: dict, name: str) -> int:
    value = params[name]
    if type(value) is not int:  # bool is an int subclass; 2.0 and "2" are not integers either
        raise bad("invalid_parameter", f"parameters.{name} must be an integer, got {value!r}")
    return value


def _requested_outputs(request: InferenceRequest, mc_samples: int, sets: bool = False) -> tuple[str, ...]:
    if request.outputs is None:
        return ((PROBABILITIES, *MC_OUTPUTS) if mc_samples else (PROBABILITIES,)) + ((PREDICTION_SET,) if sets else ())
    names = [o.name for o in request.outputs]
    if not names:
        raise bad("invalid_request", "'outputs' is empty: omit it for the default outputs")
    for name in names:
        if name not in OUTPUT_NAMES:
            raise bad("unknown_output", f"unknown output {name!r}; the model's outputs: {list(OUTPUT_NAMES)}")
        if name in MC_OUTPUTS and not mc_samples:
            raise bad("invalid_parameter", f"output {name!r} needs MC dropout: set parameters.mc_samples "
                                           f"({MIN_MC_SAMPLES} or more)")
        if name == PREDICTION_SET and not sets:
            raise bad("needs_coverage", f"output {name!r} needs parameters.coverage")
    if len(set(names)) != len(names):
        raise bad("invalid_request", f"an output is requested twice: {names}")
    return tuple(names)


# --- input ------------------------------------------------------------------------------------
def images(request: InferenceRequest, *, resize: bool, max_instances: int,
           raw: dict[str, bytes] | None = None) -> np.ndarray:
    """The request's one input tensor -> uint8 [N, 32, 32, 3]. `raw`: binary inputs' bytes by name
    (`v2_binary.input_bytes`); an input found there has no JSON `data`."""
    if len(request.inputs) != 1:
        raise bad("invalid_request", f"{len(request.inputs)} input tensors; the model takes exactly one, "
                                     f"{INPUT_NAME!r}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise bad("unknown_input", f"input {tensor.name!r}; the model's input is {INPUT_NAME!r}")
    binary = (raw or {}).get(tensor.name)
    if binary is None and tensor.data is None:
        raise bad("invalid_request", f"input {tensor.name!r} has no 'data' (and no binary data)")
    if tensor.datatype in PIXEL_DATATYPES:
        return _pixels(tensor, max_instances, binary)
    if tensor.datatype == BYTES:
        return _encoded_images(tensor, resize, max_instances, binary)
    raise bad("invalid_dtype", f"datatype {tensor.datatype!r}; expected one of "
                               f"{[*PIXEL_DATATYPES, BYTES]}")


def _batch_size(tensor: RequestInput, expected_rest: tuple[int, ...], max_instances: int) -> int:
    shape = tuple(tensor.shape)
    if len(shape) != 1 + len(expected_rest) or shape[1:] != expected_rest:
        want = ", ".join(["N", *map(str, expected_rest)])
        raise bad("invalid_shape", f"{tensor.datatype} shape {list(shape)}; expected [{want}]")
    inputs.check_count(shape[0], max_instances, "images")
    return shape[0]


def _array(tensor: RequestInput, n_elements: int) -> np.ndarray:
    """`data` (flat or nested like `shape`) as a flat array, its element count checked."""
    try:
        arr = np.asarray(tensor.data)
    except (ValueError, OverflowError, TypeError, RecursionError):
        raise bad("invalid_data", f"{tensor.name}: 'data' is ragged or holds values that are not "
                                  f"{tensor.datatype} elements") from None
    if arr.size != n_elements:
        raise bad("length_mismatch", f"{tensor.name}: 'data' has {arr.size} elements; shape "
                                     f"{list(tensor.shape)} needs {n_elements}")
    if arr.ndim not in (1, len(tensor.shape)):
        raise bad("invalid_shape", f"{tensor.name}: nested 'data' of shape {list(arr.shape)} does not match "
                                   f"shape {list(tensor.shape)}; send it flat or nested like the shape")
    if arr.ndim > 1 and list(arr.shape) != list(tensor.shape):
        raise bad("invalid_shape", f"{tensor.name}: nested 'data' of shape {list(arr.shape)}; "
                                   f"the tensor's shape is {list(tensor.shape)}")
    return arr.reshape(-1)


def _pixels(tensor: RequestInput, max_instances: int, binary: bytes | None) -> np.ndarray:
    n = _batch_size(tensor, IMAGE_SHAPE, max_instances)
    if binary is not None:
        return _binary_pixels(tensor, n, binary)
    arr = _array(tensor, n * math.prod(IMAGE_SHAPE))
    if arr.dtype.kind not in "iuf" or bool in _leaf_types(tensor.data):
        raise bad("invalid_dtype", f"{tensor.name}: {tensor.datatype} data must be numbers 0..255")
    if tensor.datatype == "UINT8" and arr.dtype.kind == "f":
        raise bad("invalid_dtype", f"{tensor.name}: UINT8 data must be integers 0..255 (send fractional "
                                   f"values as FP32)")
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32)  # what an FP32 tensor holds
    try:
        pixels = inputs.check_pixels(arr.reshape(n, *IMAGE_SHAPE), tensor.name)
    except InputError as exc:
        raise bad(exc.code, exc.message) from None
    return pixels


def _binary_pixels(tensor: RequestInput, n: int, binary: bytes) -> np.ndarray:
    dtype = np.dtype(np.uint8 if tensor.datatype == "UINT8" else "<f4")
    need = n * math.prod(IMAGE_SHAPE) * dtype.itemsize
    if len(binary) != need:
        raise bad("length_mismatch", f"{tensor.name}: binary_data_size is {len(binary)} bytes; shape "
                                     f"{list(tensor.shape)} of {tensor.datatype} needs {need}")
    arr = np.frombuffer(binary, dtype).reshape(n, *IMAGE_SHAPE)
    try:
        return inputs.check_pixels(arr, tensor.name)
    except InputError as exc:
        raise bad(exc.code, exc.message) from None


def _leaf_types(data: list) -> set[type]:
    """The Python types of the elements of flat or (regularly) nested `data`."""
    level = data
    while level and isinstance(level[0], list):
        level = list(itertools.chain.from_iterable(level))
    return set(map(type, level))


def _encoded_images(tensor: RequestInput, resize: bool, max_instances: int,
                    binary: bytes | None) -> np.ndarray:
    n = _batch_size(tensor, (), max_instances)
    if binary is not None:
        files = v2_binary.byte_elements(binary, n, tensor.name)
        return _decoded(files, tensor.name, resize)
    if len(tensor.data) != n:
        raise bad("length_mismatch", f"{tensor.name}: 'data' has {len(tensor.data)} elements; shape "
                                     f"{list(tensor.shape)} needs {n}")
    files = []
    for i, element in enumerate(tensor.data):
        where = f"{tensor.name}[{i}]"
        if not isinstance(element, str):
            raise bad("invalid_dtype", f"{where}: BYTES elements must be strings (base64 of a PNG or JPEG "
                                       f"file), got {type(element).__name__}")
        try:
            files.append(base64.b64decode(element, validate=True))
        except (binascii.Error, ValueError):
            raise bad("invalid_base64", f"{where}: not valid base64") from None
    return _decoded(files, tensor.name, resize)


def _decoded(files: list[bytes], name: str, resize: bool) -> np.ndarray:
    out = np.empty((len(files), *IMAGE_SHAPE), np.uint8)
    for i, encoded in enumerate(files):
        try:
            out[i] = inputs.decode_upload_image(encoded, f"{name}[{i}]", resize=resize)
        except InputError as exc:
            raise bad(exc.code, exc.message) from None
    return out


# --- output -----------------------------------------------------------------------------------
def output_tensors(prediction: dataplane.Prediction, names: tuple[str, ...],
                   set_mask: np.ndarray | None = None, binary: frozenset[str] = frozenset(),
                   ) -> tuple[list[dict], list[bytes]]:
    """The requested outputs as protocol tensors (FP32; the prediction set BOOL; flat row-major
    data), and the raw little-endian bytes of those named in `binary` (BOOL: one byte each), whose
    tensors carry `binary_data_size` instead of `data`, in output order."""
    tensors, blobs = [], []
    for name in names:
        if name == PREDICTION_SET:
            values, datatype, wire = np.asarray(set_mask, bool), "BOOL", np.uint8
        else:
            values = prediction.probabilities if name == PROBABILITIES else getattr(prediction.mc, MC_OUTPUTS[name][0])
            values, datatype, wire = np.asarray(values, np.float32), "FP32", "<f4"
        tensor = {"name": name, "shape": list(values.shape), "datatype": datatype}
        if name in binary:
            blobs.append(values.astype(wire).tobytes())
            tensor["parameters"] = {v2_binary.SIZE: len(blobs[-1])}
        else:
            tensor["data"] = values.reshape(-1).tolist()
        tensors.append(tensor)
    return tensors, blobs


def output_metadata(num_classes: int) -> list[dict]:
    return [{"name": name, "datatype": "BOOL" if name == PREDICTION_SET else "FP32",
             "shape": [-1, num_classes] if name in (PROBABILITIES, PREDICTION_SET) or MC_OUTPUTS[name][1] else [-1]}
            for name in OUTPUT_NAMES]


def input_metadata() -> list[dict]:
    return [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, *IMAGE_SHAPE]}]
