"""Conformal prediction sets for served models: the request's options, the sets, the evaluate block.

Domain logic on NumPy arrays (no HTTP): /v1 predict and evaluate and /v2 infer share it. The
calibration set is the card's (`LoadedModel.conformal`, the validation split's logits at the
card's temperature); a caller with another calibration (e.g. a recalibration profile) passes its
own `ConformalCalibration` and probabilities. The math is `models.calibration.conformal`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from models.calibration.conformal import METHODS, ConformalCalibration, check_coverage, evaluate_sets
from service.inputs import InputError

DEFAULT_METHOD = "lac"
__all__ = ["METHODS", "SetOptions", "calibration_of", "coverage_levels", "evaluate_block", "set_options",
           "set_rows", "sets"]
MAX_COVERAGE_LEVELS = 20
CARD_SOURCE = "card validation split"


@dataclass(frozen=True)
class SetOptions:
    """What a request asked for: one coverage level, a score, and the class-conditional option."""

    coverage: float
    method: str = DEFAULT_METHOD
    mondrian: bool = False


def coverage_value(value, where: str = "coverage", status: int = 422) -> float:
    try:
        return check_coverage(value)
    except ValueError as exc:
        raise InputError("invalid_coverage", f"{where}: {exc}", status) from None


def method_value(value, where: str = "conformal_method", status: int = 422) -> str:
    if value not in METHODS:
        raise InputError("invalid_parameter", f"{where} must be one of {list(METHODS)}, got {value!r}", status)
    return value


def set_options(coverage, method: str | None = None, mondrian: bool = False, *,
                status: int = 422, prefix: str = "") -> SetOptions | None:
    """Checked options (None when no coverage was asked for); InputError `invalid_coverage` else."""
    if coverage is None:
        if method is not None or mondrian:
            raise InputError("needs_coverage", f"{prefix}conformal_method and {prefix}mondrian need "
                                                  f"{prefix}coverage", status)
        return None
    return SetOptions(coverage_value(coverage, f"{prefix}coverage", status),
                      method_value(DEFAULT_METHOD if method is None else method, f"{prefix}conformal_method", status),
                      bool(mondrian))


def coverage_levels(values: Iterable, status: int = 422) -> list[float]:
    """Several coverage levels (evaluate), each in (0, 1), at most MAX_COVERAGE_LEVELS, no repeats."""
    levels = [coverage_value(v, "coverage", status) for v in values]
    if len(levels) > MAX_COVERAGE_LEVELS:
        raise InputError("invalid_coverage", f"at most {MAX_COVERAGE_LEVELS} coverage levels, got {len(levels)}",
                         status)
    return sorted(set(levels))


def calibration_of(model, status: int = 409) -> ConformalCalibration:
    """The model's conformal calibration set, or InputError `conformal_unavailable`."""
    calibration = getattr(model, "conformal", None)
    if calibration is None:
        raise InputError("conformal_unavailable",
                         f"model {model.name!r} has no usable conformal calibration set (its artifact lacks "
                         f"a current calibration_set.npz: run python -m training.fit_conformal), so it cannot "
                         f"serve prediction sets", status)
    return calibration


def sets(calibration: ConformalCalibration, probabilities: np.ndarray, options: SetOptions) -> np.ndarray:
    """Boolean mask [N, K] of the prediction sets."""
    return calibration.prediction_sets(probabilities, options.coverage, options.method, options.mondrian)


def set_rows(mask: np.ndarray, options: SetOptions, classes: Sequence[str]) -> list[dict]:
    """One `prediction_set` object per image: indices, labels, coverage, method, mondrian."""
    rows = []
    for row in mask:
        idx = np.flatnonzero(row).tolist()
        rows.append({"indices": idx, "labels": [classes[i] for i in idx], "coverage": options.coverage,
                     "method": options.method, "mondrian": options.mondrian})
    return rows


def evaluate_block(calibration: ConformalCalibration, probabilities: np.ndarray, labels: np.ndarray,
                   coverages: Sequence[float], methods: Sequence[str], mondrian: bool,
                   source: str = CARD_SOURCE) -> dict:
    """The evaluate report's `conformal` block: where the calibration set comes from, its size, and
    one result per (coverage, method), measured on the uploaded labelled batch."""
    return {"calibration": {"source": source, "n": calibration.n},
            "results": evaluate_sets(calibration, probabilities, labels, coverages, methods, mondrian)}
