"""Any classifier's outputs as a request: logits or probabilities [N, K] and labels [N].

`POST /v1/calibration/evaluate` serves models that are not served here (PyTorch, JAX, ...).
The body is JSON (`{"logits": [[...]], "labels": [...]}` or `"probabilities"`) or one `.npz`
file with `logits` or `probs` and `y` (loaded with allow_pickle=False, headers checked before
inflating, as for images: `service.inputs.load_npz`). Every problem is an `InputError` (422
unless said otherwise) with a stable code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.inputs import InputError, UploadLimits, check_count, check_labels, labels_from_json, npz_arrays

MIN_CLASSES = 2
MAX_CLASSES = 1000
# Rows of probabilities must sum to 1 within this (float32 softmax outputs sum to 1 +- 1e-6).
SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ClassifierOutputs:
    """Validated float64 scores [N, K]: `kind` says whether they are logits or probabilities."""

    kind: str  # "logits" or "probabilities"
    values: np.ndarray
    labels: np.ndarray


def _matrix(value, name: str, max_rows: int) -> np.ndarray:
    if isinstance(value, list) and any(isinstance(r, list) and any(type(v) is bool for v in r) for r in value):
        raise InputError("invalid_dtype", f"{name}: values must be numbers, not booleans")
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError):
        raise InputError("invalid_shape", f"{name}: ragged rows; expected [N, K]") from None
    if arr.dtype.kind not in "iuf":
        raise InputError("invalid_dtype", f"{name}: values must be real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise InputError("invalid_shape", f"{name}: shape {list(arr.shape)}; expected [N, K]")
    check_count(arr.shape[0], max_rows, "rows")
    k = arr.shape[1]
    if not MIN_CLASSES <= k <= MAX_CLASSES:
        raise InputError("invalid_shape", f"{name}: K = {k} classes; expected {MIN_CLASSES}..{MAX_CLASSES}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise InputError("non_finite_value", f"{name}: contains NaN or infinity")
    return arr


def _check_probabilities(p: np.ndarray, name: str) -> np.ndarray:
    if p.min() < 0 or p.max() > 1:
        raise InputError("invalid_probabilities", f"{name}: values must lie in [0, 1]")
    sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > SUM_TOLERANCE:
        raise InputError("invalid_probabilities",
                         f"{name}: row {worst} sums to {sums[worst]:.6g}; every row must sum to 1 within "
                         f"{SUM_TOLERANCE} (send logits if these are not probabilities)")
    return p / p.sum(axis=1, keepdims=True)


def outputs_from_json(payload: dict, max_rows: int) -> ClassifierOutputs:
    present = [k for k in ("logits", "probabilities") if k in payload]   # null counts: it is no [N, K] array
    if len(present) != 1:
        raise InputError("invalid_request", "send exactly one of 'logits' or 'probabilities' ([N, K]) with 'labels'")
    kind = present[0]
    values = _matrix(payload[kind], kind, max_rows)
    if kind == "probabilities":
        values = _check_probabilities(values, kind)
    return ClassifierOutputs(kind, values, labels_from_json(payload, len(values), values.shape[1]))


def outputs_from_files(files: list[tuple[str, bytes]], limits: UploadLimits) -> ClassifierOutputs:
    if len(files) != 1:
        raise InputError("invalid_request", f"upload exactly one .npz file (logits or probs, and y); got {len(files)}")
    name, data = files[0]
    arrays = npz_arrays(data, name, ("logits", "probs", "y"), limits)
    max_rows = limits.max_images
    present = [k for k in ("logits", "probs") if k in arrays]
    if len(present) != 1:
        raise InputError("invalid_array_file", f"{name}: expected exactly one of the arrays 'logits' or 'probs' "
                                               f"(and 'y'), found {sorted(arrays)}")
    if "y" not in arrays:
        raise InputError("missing_labels", f"{name}: no 'y' array of labels")
    key = present[0]
    kind = "logits" if key == "logits" else "probabilities"
    values = _matrix(arrays[key], f"{name}:{key}", max_rows)
    if kind == "probabilities":
        values = _check_probabilities(values, f"{name}:{key}")
    labels = check_labels(np.asarray(arrays["y"]), len(values), values.shape[1], f"{name}:y")
    return ClassifierOutputs(kind, values, labels)
