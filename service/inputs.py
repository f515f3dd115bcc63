"""Payloads -> validated arrays. Every problem is an `InputError` with a stable code.

The HTTP layer turns an InputError into a 4xx JSON body, so bad input can never surface as
a 500. Nothing here imports TensorFlow or FastAPI; parsing is pure NumPy/Pillow and runs in a
worker thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import json
import zipfile
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from imagedata import DataSourceError, decode_image, read_labelled_images_from_bytes
from imagedata.arrays import ArrayLimits, load_npy, load_npz, npz_declared_bytes

IMAGE_SHAPE = (32, 32, 3)
PIXELS = 32 * 32 * 3
NPY_MAGIC = b"\x93NUMPY"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class InputError(ValueError):
    """Bad client input: `code` is stable (documented), `message` is for humans."""

    def __init__(self, code: str, message: str, status: int = 422):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


# --- JSON --------------------------------------------------------------------------------
def parse_json_object(body: bytes) -> dict:
    if not body:
        raise InputError("malformed_json", "the request body is empty; expected a JSON object", 400)
    try:
        value = json.loads(body)
    except RecursionError:
        raise InputError("malformed_json", "the JSON body is nested too deeply", 400) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int of more than 4,300 digits
        reason = (str(exc).splitlines() or ["invalid"])[0][:200]
        raise InputError("malformed_json", f"the body is not valid JSON: {reason}", 400) from None
    if not isinstance(value, dict):
        raise InputError("malformed_json", f"expected a JSON object, got {type(value).__name__}", 400)
    return value


def instances_from_json(payload: dict, *, resize: bool, max_instances: int) -> np.ndarray:
    """`{"instances": [...]}` -> uint8 [N,32,32,3]; each instance a nested array or {"b64": ...}."""
    if "instances" not in payload:
        raise InputError("invalid_request", "the JSON object needs an 'instances' list")
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise InputError("invalid_request", f"'instances' must be a list, got {type(instances).__name__}")
    check_count(len(instances), max_instances)
    out = np.empty((len(instances), *IMAGE_SHAPE), np.uint8)
    for i, inst in enumerate(instances):
        out[i] = _instance(inst, i, resize)
    return out


def _instance(inst: Any, index: int, resize: bool) -> np.ndarray:
    where = f"instance {index}"
    if isinstance(inst, dict):
        if set(inst) != {"b64"} or not isinstance(inst["b64"], str):
            raise InputError("invalid_instance",
                             f"{where}: an object instance must be {{\"b64\": \"<base64 PNG/JPEG>\"}}")
        try:
            data = base64.b64decode(inst["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise InputError("invalid_base64", f"{where}: 'b64' is not valid base64") from None
        return decode_upload_image(data, where, resize=resize)
    if not isinstance(inst, list):
        raise InputError("invalid_instance",
                         f"{where}: expected a 32x32x3 array of 0..255 or {{\"b64\": ...}}, "
                         f"got {type(inst).__name__}")
    try:
        arr = np.asarray(inst)
    except ValueError:
        raise InputError("invalid_shape", f"{where}: ragged array; expected shape [32, 32, 3]") from None
    except OverflowError:
        raise InputError("value_out_of_range", f"{where}: a value is outside 0..255") from None
    if arr.dtype == object and all(type(v) is int for v in arr.ravel()):
        raise InputError("value_out_of_range", f"{where}: a value is outside 0..255")  # beyond int64
    if arr.shape != IMAGE_SHAPE:
        raise InputError("invalid_shape", f"{where}: shape {list(arr.shape)}; expected [32, 32, 3]")
    if arr.dtype.kind in "iuf" and bool in _leaf_types(inst):  # NumPy turned true/false into 1/0
        raise InputError("invalid_dtype", f"{where}: pixel values must be numbers 0..255, not booleans")
    return check_pixels(arr[None], where)[0]


def _leaf_types(pixels: list) -> set[type]:
    """The Python types of the values of a nested [32][32][3] list (its shape already checked)."""
    return set(map(type, itertools.chain.from_iterable(itertools.chain.from_iterable(pixels))))


def labels_from_json(payload: dict, n: int, num_classes: int) -> np.ndarray:
    if payload.get("labels") is None:
        raise InputError("missing_labels", "evaluation needs 'labels': one class index per instance")
    labels = payload["labels"]
    if not isinstance(labels, list):
        raise InputError("invalid_request", f"'labels' must be a list, got {type(labels).__name__}")
    if any(type(v) is bool for v in labels):  # np.asarray would read [true, 3] as [1, 3]
        raise InputError("invalid_dtype", "labels: class indices must be integers, not booleans")
    try:
        arr = np.asarray(labels)
    except (ValueError, OverflowError):
        raise InputError("invalid_dtype", "'labels' must be a flat list of class indices") from None
    return check_labels(arr, n, num_classes)


# --- array validation ---------------------------------------------------------------------
def check_count(n: int, limit: int, what: str = "instances") -> None:
    if n == 0:
        raise InputError("empty_batch", f"no {what}: the batch is empty")
    if n > limit:
        raise InputError("too_many_instances", f"{n} {what}; at most {limit} per request")


def check_pixels(arr: np.ndarray, where: str) -> np.ndarray:
    """Any numeric [N,32,32,3] (or one [32,32,3]) of whole numbers 0..255 -> uint8."""
    if arr.dtype.kind not in "iuf":
        raise InputError("invalid_dtype",
                         f"{where}: pixel values must be numbers 0..255, got dtype {arr.dtype}")
    shape = list(arr.shape)
    if arr.shape == IMAGE_SHAPE:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != IMAGE_SHAPE:
        raise InputError("invalid_shape", f"{where}: shape {shape}; expected [N, 32, 32, 3] (or [32, 32, 3])")
    if arr.size == 0:
        raise InputError("empty_batch", f"{where}: the batch is empty")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise InputError("non_finite_value", f"{where}: contains NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 255:
            raise InputError("value_out_of_range", f"{where}: values span {lo:g}..{hi:g}; expected 0..255")
        if not np.all(arr == np.round(arr)):
            raise InputError("invalid_dtype",
                             f"{where}: pixel values must be whole numbers 0..255 (raw pixels, not "
                             f"normalised floats)")
    else:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise InputError("value_out_of_range", f"{where}: values span {lo}..{hi}; expected 0..255")
    return arr.astype(np.uint8)


def check_labels(arr: np.ndarray, n: int, num_classes: int, where: str = "labels") -> np.ndarray:
    if arr.dtype.kind == "f":
        if not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise InputError("invalid_dtype", f"{where}: class indices must be whole numbers")
    elif arr.dtype.kind not in "iu":
        raise InputError("invalid_dtype", f"{where}: class indices must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise InputError("invalid_shape", f"{where}: shape {list(arr.shape)}; expected [N]")
    if len(arr) != n:
        raise InputError("length_mismatch", f"{where}: {len(arr)} labels for {n} images")
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        bad = arr.min() if arr.min() < 0 else arr.max()
        raise InputError("label_out_of_range",
                         f"{where}: label {int(bad)} outside 0..{num_classes - 1} (the model has "
                         f"{num_classes} classes)")
    return arr.astype(np.int64)


# --- files -----------------------------------------------------------------------------------
def file_kind(filename: str, head: bytes) -> str:
    """'npy', 'npz', 'archive' or 'image', from the name, else from the first bytes."""
    lower = (filename or "").lower()
    if lower.endswith(".npy"):
        return "npy"
    if lower.endswith(".npz"):
        return "npz"
    if lower.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    if lower.endswith(IMAGE_SUFFIXES):
        return "image"
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(b"PK"):
        return "npz" if _zip_is_npz(head) else "archive"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "archive"
    return "image"


def _zip_is_npz(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def decode_upload_image(data: bytes, name: str, *, resize: bool) -> np.ndarray:
    try:
        return decode_image(data, name=name, resize=resize)
    except DataSourceError as exc:
        raise from_data_source_error(exc, "undecodable_image") from None


# DataSourceError.code -> (API code, status, hint); the codes not listed get the caller's default.
_API_CODES = {
    "undecodable_image": ("undecodable_image", 422, ""),
    "wrong_image_size": ("wrong_image_size", 422, " (pass resize=true to resize)"),
    "unsupported_image_mode": ("unsupported_image_mode", 422, " (pass resize=true to convert)"),
    "image_too_large": ("image_too_large", 422, ""),
    "too_many_images": ("too_many_instances", 422, ""),
    "invalid_array_file": ("invalid_array_file", 422, ""),
    "invalid_dtype": ("invalid_dtype", 422, ""),
    "member_too_large": ("payload_too_large", 413, ""),
    "archive_too_large": ("payload_too_large", 413, " (CALIB_MAX_UNCOMPRESSED_BYTES)"),
    "array_too_large": ("payload_too_large", 413, " (CALIB_MAX_UNCOMPRESSED_BYTES)"),
}


def from_data_source_error(exc: DataSourceError, default: str) -> InputError:
    """The readers' machine-readable code -> the API's stable code and status."""
    code, status, hint = _API_CODES.get(exc.code, (default, 422, ""))
    return InputError(code, str(exc) + hint, status)


@dataclass(frozen=True)
class UploadLimits:
    """What the files of one request may hold: `max_images` per batch, `max_array_bytes` per
    array, `max_uncompressed_bytes` for what the archives and .npz of the request inflate to."""

    max_images: int
    max_array_bytes: int
    max_uncompressed_bytes: int

    def arrays(self) -> ArrayLimits:
        return ArrayLimits(self.max_images, self.max_array_bytes, self.max_uncompressed_bytes)


def _arrays(load, *args) -> dict[str, np.ndarray] | np.ndarray:
    try:
        return load(*args)
    except DataSourceError as exc:
        raise from_data_source_error(exc, "invalid_array_file") from None


def npz_arrays(data: bytes, name: str, keys: Sequence[str], limits: UploadLimits) -> dict[str, np.ndarray]:
    """The members `keys` of an .npz that are present, read header-first within `limits`."""
    return _arrays(load_npz, data, name, tuple(keys), limits.arrays())


def read_npy(data: bytes, name: str, limits: UploadLimits) -> np.ndarray:
    return _arrays(load_npy, data, name, limits.arrays())


def images_from_npz(data: bytes, name: str, limits: UploadLimits) -> np.ndarray:
    """`x`, or the only array: nothing else of the file is inflated."""
    arrays = _arrays(load_npz, data, name, ("x",), limits.arrays())
    if "x" in arrays:
        return arrays["x"]
    from imagedata.arrays import npz_members

    keys = _arrays(npz_members, data, name)
    if len(keys) == 1:
        return _arrays(load_npz, data, name, keys, limits.arrays())[keys[0]]
    raise InputError("invalid_array_file", f"{name}: expected an array named 'x', found {sorted(keys)[:20]}")


def labelled_from_npz(data: bytes, name: str, limits: UploadLimits) -> tuple[np.ndarray, np.ndarray]:
    """`x` and `y`: nothing else of the file is inflated."""
    arrays = _arrays(load_npz, data, name, ("x", "y"), limits.arrays())
    if "x" not in arrays:
        from imagedata.arrays import npz_members

        found = sorted(_arrays(npz_members, data, name))[:20]
        raise InputError("invalid_array_file", f"{name}: expected arrays 'x' and 'y', found {found}")
    if "y" not in arrays:
        raise InputError("missing_labels", f"{name}: no 'y' array of labels next to 'x'")
    return arrays["x"], arrays["y"]


def declared_uncompressed_bytes(files: list[tuple[str, bytes]]) -> int:
    """What the .npz uploads of a request declare they inflate to (their `x` and `y`), from the
    zip directories alone: admission charges it before anything is inflated. Archives of image
    files decode to 3 KiB an image, within the charge of their own bytes; 0 when unreadable (the
    parser then refuses the file)."""
    total = 0
    for name, data in files:
        if file_kind(name, data[:512]) == "npz":
            try:
                total += npz_declared_bytes(data, name, ("x", "y"))
            except DataSourceError:
                pass
    return total


def labelled_from_archive(data: bytes, name: str, *, class_names: Sequence[str], split: str | None,
                          resize: bool, limits: UploadLimits) -> tuple[np.ndarray, np.ndarray]:
    """An image-folder archive (`<class>/<image>`); folders must be among the model's classes."""
    try:
        x, y, _ = read_labelled_images_from_bytes(data, name, class_names=list(class_names), split=split,
                                                  resize=resize, max_images=limits.max_images,
                                                  max_total_bytes=limits.max_uncompressed_bytes)
    except DataSourceError as exc:
        raise from_data_source_error(exc, "invalid_archive") from None
    except ValueError as exc:  # bad `split`
        raise InputError("invalid_parameter", str(exc)) from None
    return x, y


# --- query parameters --------------------------------------------------------------------
def check_mc_samples(value: int, maximum: int) -> int:
    if not 0 <= value <= maximum:
        raise InputError("mc_samples_out_of_range", f"mc_samples={value}; expected 0..{maximum}")
    return value


def check_bins(value: int, maximum: int) -> int:
    if not 1 <= value <= maximum:
        raise InputError("bins_out_of_range", f"bins={value}; expected 1..{maximum}")
    return value


def check_seed(value: int | None) -> int | None:
    if value is not None and not 0 <= value < 2**31 - 1:
        raise InputError("invalid_parameter", f"seed={value}; expected 0..{2**31 - 2}")
    return value


# --- multipart uploads -------------------------------------------------------------------
def images_from_files(files: list[tuple[str, bytes]], *, resize: bool, limits: UploadLimits) -> np.ndarray:
    """Predict uploads: image files, or .npy/.npz arrays of [N,32,32,3] (or one [32,32,3]).
    The arrays of all files together may inflate to at most `limits.max_uncompressed_bytes`."""
    parts, total, inflated = [], 0, 0
    max_instances = limits.max_images
    for name, data in files:
        kind = file_kind(name, data[:512])
        left = UploadLimits(max_instances - total, limits.max_array_bytes,
                            max(0, limits.max_uncompressed_bytes - inflated))
        if kind == "image":
            arr = decode_upload_image(data, name, resize=resize)[None]
        elif kind == "npy":
            raw = read_npy(data, name, left)
            inflated += raw.nbytes
            arr = check_pixels(raw, name)
        elif kind == "npz":
            raw = images_from_npz(data, name, left)
            inflated += raw.nbytes
            arr = check_pixels(raw, name)
        else:
            raise InputError("unsupported_file", f"{name}: an archive; predict takes image files or "
                             f".npy/.npz arrays (labelled archives go to /evaluate)")
        total += len(arr)
        if total > max_instances:
            raise InputError("too_many_instances", f"more than {max_instances} images; at most "
                             f"{max_instances} per request")
        parts.append(arr)
    check_count(total, max_instances)
    return np.concatenate(parts)


def labelled_from_files(files: list[tuple[str, bytes]], *, class_names: Sequence[str], split: str | None,
                        resize: bool, limits: UploadLimits) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate uploads: one .npz with `x` and `y`, or one image-folder archive."""
    if len(files) != 1:
        raise InputError("invalid_request", f"upload exactly one file (.npz with x and y, or an "
                         f"image-folder .tar.gz/.zip); got {len(files)}")
    name, data = files[0]
    kind = file_kind(name, data[:512])
    if kind == "npz":
        x, y = labelled_from_npz(data, name, limits)
        x = check_pixels(x, f"{name}:x")
        check_count(len(x), limits.max_images, "images")
        return x, check_labels(y, len(x), len(class_names), f"{name}:y")
    if kind == "archive":
        x, y = labelled_from_archive(data, name, class_names=class_names, split=split, resize=resize,
                                     limits=limits)
        check_count(len(x), limits.max_images, "images")
        return x, y
    raise InputError("missing_labels", f"{name}: this file carries no labels; upload an .npz with "
                     f"x and y, or an archive of <class>/<image> folders")


# --- two unlabelled batches (compare) ----------------------------------------------------------
BATCH_FIELDS = ("in_distribution", "suspect")


def _in_batch(field: str, parse, *args, **kwargs) -> np.ndarray:
    """Run a parser on one batch; its errors name the batch they are about."""
    try:
        return parse(*args, **kwargs)
    except InputError as exc:
        raise InputError(exc.code, f"{field}: {exc.message}", exc.status) from None


def batches_from_json(payload: dict, *, resize: bool, max_images: int) -> tuple[np.ndarray, np.ndarray]:
    """`{"in_distribution": [...], "suspect": [...]}`, each a list of instances as in predict."""
    missing = [f for f in BATCH_FIELDS if payload.get(f) is None]
    if missing:
        raise InputError("missing_batch", f"the JSON object needs {' and '.join(map(repr, missing))}: "
                         f"lists of images, as 'instances' in predict")
    out = []
    for field in BATCH_FIELDS:
        if not isinstance(payload[field], list):
            raise InputError("invalid_request", f"'{field}' must be a list, got {type(payload[field]).__name__}")
        out.append(_in_batch(field, instances_from_json, {"instances": payload[field]}, resize=resize,
                             max_instances=max_images))
    return out[0], out[1]


def batches_from_files(files: list[tuple[str, bytes]], fields: list[str], *, resize: bool,
                       limits: UploadLimits) -> tuple[np.ndarray, np.ndarray]:
    """Multipart: the file parts of the `in_distribution` and `suspect` fields (each field may be
    repeated), each batch read as predict reads its uploads."""
    unexpected = sorted(set(fields) - set(BATCH_FIELDS))
    if unexpected:
        raise InputError("unexpected_field", f"unknown file field(s) {unexpected}; send the batches as "
                         f"{' and '.join(BATCH_FIELDS)}")
    missing = [f for f in BATCH_FIELDS if f not in fields]
    if missing:
        raise InputError("missing_batch", f"no file in the {' and '.join(missing)} field(s); send both "
                         f"{' and '.join(BATCH_FIELDS)}")
    out = []
    for field in BATCH_FIELDS:
        group = [f for f, name in zip(files, fields) if name == field]
        out.append(_in_batch(field, images_from_files, group, resize=resize, limits=limits))
    return out[0], out[1]


def check_compare_mc_samples(value: int, maximum: int) -> int:
    """0 (no MC) or 2..maximum: the mutual information of one sample is always zero."""
    if value == 1 or not 0 <= value <= maximum:
        raise InputError("mc_samples_out_of_range", f"mc_samples={value}; expected 0 (no MC) or 2..{maximum} "
                         f"(the mutual information needs at least two samples)")
    return value
