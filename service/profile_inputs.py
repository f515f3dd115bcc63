"""Unlabelled classifier outputs to apply a profile to: `{"logits" | "probabilities": [[...]]}`
or an `.npz` with `logits` or `probs`, validated exactly as `service.logits_inputs` validates
the labelled ones of /v1/calibration/evaluate (same codes), and turned into logits."""

from __future__ import annotations

from typing import Optional

import numpy as np

from service.inputs import InputError, UploadLimits, npz_arrays
from service.logits_inputs import ClassifierOutputs, _check_probabilities, _matrix
from service.profiles import logits_from_probabilities


def as_logits(outputs: ClassifierOutputs) -> np.ndarray:
    """Logits whose softmax is what was sent (log p for probabilities)."""
    return outputs.values if outputs.kind == "logits" else logits_from_probabilities(outputs.values)


def unlabelled_logits(payload: Optional[dict], files: list[tuple[str, bytes]], *,
                      limits: UploadLimits) -> np.ndarray:
    max_rows = limits.max_images
    if payload is not None:
        arrays, names, where = payload, {"logits": "logits", "probabilities": "probabilities"}, ""
    else:
        if len(files) != 1:
            raise InputError("invalid_request", f"upload exactly one .npz file (logits or probs); got {len(files)}")
        name, data = files[0]
        arrays, names, where = npz_arrays(data, name, ("logits", "probs"), limits), \
            {"logits": "logits", "probs": "probabilities"}, f"{name}:"
    present = [k for k in names if k in arrays]   # null counts: it is no [N, K] array
    if len(present) != 1:
        raise InputError("invalid_request", f"send exactly one of {' or '.join(repr(k) for k in names)} ([N, K])")
    key = present[0]
    values = _matrix(arrays[key], f"{where}{key}", max_rows)
    if names[key] == "probabilities":
        values = _check_probabilities(values, f"{where}{key}")
    return as_logits(ClassifierOutputs(names[key], values, np.zeros(len(values), np.int64)))
