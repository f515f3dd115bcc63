"""Triton's binary tensor data extension (`binary_tensor_data`) for /v2 infer: raw tensor bytes
after the JSON, both ways.

Why: `tritonclient[http]` sends and asks for binary tensors by default, and a batch of images as
JSON numbers is four to five times larger and slow to parse.

The wire format, as tritonclient[http] writes and reads it (Triton's
`docs/protocol/extension_binary_data.md`):
- Request: the body is a JSON header of `Inference-Header-Content-Length` bytes, then the raw
  bytes of every input whose `parameters` carry `binary_data_size`, in the order of `inputs`, each
  exactly that long. Such an input has no `data`. Fixed-size types are little-endian and row-major;
  a BYTES element is its length as 4 bytes little-endian, then its bytes (here: a PNG or JPEG file,
  not base64).
- Response: an output is sent binary when its request entry has `parameters.binary_data` true, or,
  when it does not say, when the request's `binary_data_output` parameter is true. Its JSON entry
  then carries `parameters.binary_data_size` instead of `data`, the JSON's length goes in the
  response's `Inference-Header-Content-Length` header, and the outputs' bytes follow it in order.

Every problem is a 400 `InputError`. Nothing here imports FastAPI.
"""

from __future__ import annotations

import json
import struct

from service.inputs import InputError
from service.v2_schemas import InferenceRequest

EXTENSION = "binary_tensor_data"
HEADER = "Inference-Header-Content-Length"
SIZE = "binary_data_size"
MEDIA_TYPE = "application/octet-stream"
_LENGTH = struct.Struct("<I")


def bad(message: str, code: str = "invalid_binary_data") -> InputError:
    return InputError(code, message, 400)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) of a request body; all JSON when the header is absent."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not text.isdigit() or not 0 < int(text) <= len(body):
        raise bad(f"{HEADER}: {header_length!r}; expected the JSON header's length in bytes, "
                  f"1..{len(body)} (the body's length)")
    n = int(text)
    return body[:n], body[n:]


def input_bytes(request: InferenceRequest, tail: bytes) -> dict[str, bytes]:
    """Each binary input's bytes by input name; checks that the sizes account for the whole tail."""
    raw: dict[str, bytes] = {}
    offset = 0
    for tensor in request.inputs:
        size = (tensor.parameters or {}).get(SIZE)
        if size is None:
            if tensor.data is None:
                raise bad(f"input {tensor.name!r} has neither 'data' nor parameters.{SIZE}",
                          "invalid_request")
            continue
        if type(size) is not int or size < 0:
            raise bad(f"input {tensor.name!r}: parameters.{SIZE} must be a whole number of bytes, got {size!r}")
        if tensor.data is not None:
            raise bad(f"input {tensor.name!r} has both 'data' and parameters.{SIZE}: send one of them")
        if offset + size > len(tail):
            raise bad(f"input {tensor.name!r}: {SIZE}={size} but only {len(tail) - offset} bytes follow "
                      f"the JSON header (is {HEADER} right?)")
        raw[tensor.name] = tail[offset:offset + size]
        offset += size
    if offset != len(tail):
        raise bad(f"{len(tail) - offset} bytes after the JSON header are not claimed by any input's "
                  f"parameters.{SIZE} (is {HEADER} right?)")
    return raw


def byte_elements(raw: bytes, n: int, name: str) -> list[bytes]:
    """A binary BYTES tensor's n elements (each a 4-byte little-endian length, then its bytes)."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise bad(f"{name}[{len(elements)}]: the element's 4-byte length is cut off")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise bad(f"{name}[{len(elements)}]: length {length} but only {len(raw) - offset} bytes remain")
        elements.append(raw[offset:offset + length])
        offset += length
    if len(elements) != n:
        raise bad(f"{name}: the binary data holds {len(elements)} elements; the shape needs {n}",
                  "length_mismatch")
    return elements


def binary_outputs(request: InferenceRequest, names: tuple[str, ...]) -> frozenset[str]:
    """The outputs to send as binary: per output `binary_data`, else the request's
    `binary_data_output` (default false)."""
    default = (request.parameters or {}).get("binary_data_output", False)
    if not isinstance(default, bool):
        raise bad(f"parameters.binary_data_output must be a boolean, got {default!r}", "invalid_parameter")
    chosen = {}
    for output in request.outputs or []:
        flag = (output.parameters or {}).get("binary_data")
        if flag is not None and not isinstance(flag, bool):
            raise bad(f"output {output.name!r}: parameters.binary_data must be a boolean, got {flag!r}",
                      "invalid_parameter")
        chosen[output.name] = flag
    return frozenset(n for n in names if (default if chosen.get(n) is None else chosen[n]))


def response_body(response: dict, blobs: list[bytes]) -> tuple[bytes, int]:
    """The response's JSON header followed by the binary outputs; and the header's length."""
    header = json.dumps(response, separators=(",", ":")).encode()
    return b"".join([header, *blobs]), len(header)
