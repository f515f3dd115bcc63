"""Labelled logits or probabilities from a client's own classifier (any K from 2 to 1,000), as
JSON `{"logits" | "probabilities": [[...]], "labels": [...]}` or an `.npz` with `logits` or
`probs` and `y`: parsed into float64 logits and int64 labels, every problem an `InputError`
(422 with a stable code). No HTTP here."""

from __future__ import annotations

from typing import Optional

import numpy as np

from service.inputs import InputError, check_count, check_labels, load_npz
from service.profiles import MAX_CLASSES, logits_from_probabilities

SUM_TOLERANCE = 1e-4
LOGIT_KEYS = ("logits",)
PROBABILITY_KEYS = ("probabilities", "probs")


def _matrix(value, name: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiu":
            raise InputError("invalid_dtype", f"{name}: numbers expected, got dtype {value.dtype}")
        arr = value.astype(np.float64)
    else:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise InputError("invalid_dtype", f"'{name}' must be a list of rows of numbers") from None
    if arr.ndim != 2:
        raise InputError("invalid_shape", f"'{name}' must be 2-D [N, K], got shape {list(arr.shape)}")
    if not 2 <= arr.shape[1] <= MAX_CLASSES:
        raise InputError("invalid_shape", f"'{name}': K = {arr.shape[1]} classes; 2 to {MAX_CLASSES} accepted")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise InputError("non_finite_values", f"'{name}' holds {bad} NaN or infinite value(s)")
    return arr


def logits_of(arrays: dict, *, max_rows: int, where: str = "body") -> tuple[np.ndarray, str]:
    """(float64 logits [N, K], 'logits' | 'probabilities') from the one input array present."""
    logit_keys = [k for k in LOGIT_KEYS if arrays.get(k) is not None]
    prob_keys = [k for k in PROBABILITY_KEYS if arrays.get(k) is not None]
    if len(logit_keys) + len(prob_keys) != 1:
        raise InputError("invalid_request", f"{where}: send exactly one of 'logits' or 'probabilities' "
                                            f"('probs' in an .npz)")
    if logit_keys:
        z = _matrix(arrays[logit_keys[0]], logit_keys[0])
        check_count(len(z), max_rows, "rows")
        return z, "logits"
    p = _matrix(arrays[prob_keys[0]], prob_keys[0])
    check_count(len(p), max_rows, "rows")
    if p.min() < 0 or p.max() > 1 or np.abs(p.sum(axis=1) - 1).max() > SUM_TOLERANCE:
        raise InputError("invalid_probabilities", f"'{prob_keys[0]}': every row must lie in [0, 1] and sum to 1 "
                                                  f"(within {SUM_TOLERANCE:g})")
    return logits_from_probabilities(p), "probabilities"


def labels_of(arrays: dict, n: int, num_classes: int, key: str) -> np.ndarray:
    labels = arrays.get(key)
    if labels is None:
        raise InputError("missing_labels", f"'{key}': one class index per row is needed")
    if isinstance(labels, list) and any(type(v) is bool for v in labels):
        raise InputError("invalid_dtype", "labels: class indices must be integers, not booleans")
    try:
        arr = np.asarray(labels)
    except (ValueError, OverflowError):
        raise InputError("invalid_dtype", f"'{key}' must be a flat list of class indices") from None
    return check_labels(arr, n, num_classes, key)


def labelled_logits(payload: Optional[dict], files: list[tuple[str, bytes]], *, max_rows: int,
                    max_array_bytes: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(logits, labels, input kind) from a JSON object or one uploaded .npz."""
    if payload is not None:
        z, kind = logits_of(payload, max_rows=max_rows)
        return z, labels_of(payload, len(z), z.shape[1], "labels"), kind
    if len(files) != 1:
        raise InputError("invalid_request", f"upload one .npz file (logits or probs, and y), got {len(files)} files")
    name, data = files[0]
    arrays = load_npz(data, name, max_array_bytes)
    z, kind = logits_of(arrays, max_rows=max_rows, where=name)
    return z, labels_of(arrays, len(z), z.shape[1], "y"), kind


def unlabelled_logits(payload: Optional[dict], files: list[tuple[str, bytes]], *, max_rows: int,
                      max_array_bytes: int) -> np.ndarray:
    """Logits [N, K] (or probabilities turned into logits) to apply a profile to."""
    if payload is not None:
        return logits_of(payload, max_rows=max_rows)[0]
    if len(files) != 1:
        raise InputError("invalid_request", f"upload one .npz file (logits or probs), got {len(files)} files")
    name, data = files[0]
    return logits_of(load_npz(data, name, max_array_bytes), max_rows=max_rows, where=name)[0]
