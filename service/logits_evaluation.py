"""Calibration report for any classifier's outputs (`POST /v1/calibration/evaluate`). No HTTP.

The uploaded logits (or probabilities, used as log p) are scored as they are ("uploaded"), and
with `fit_temperature` also at the temperature fitted on the same batch (in-sample: the
figures say how much a temperature could help, not what it will do on new data).

Coverage uses split conformal on the batch itself: a seeded permutation puts floor(N / 2)
images in the calibration half (thresholds) and the rest in the measured half
(`models.calibration.conformal.split_conformal_report`), on the uploaded probabilities as they
are (conformal sets need no calibration). The seed is in the answer, so the split is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from models.calibration import CalibrationMetrics, compute_metrics, reliability_diagram_png, softmax
from models.calibration.conformal import split_conformal_report
from service.dataplane import batch_temperature
from service.inputs import InputError
from service.logits_inputs import ClassifierOutputs

# log p of a probability 0: finite (the metrics need finite inputs), far below any real logit gap.
LOG_FLOOR = np.log(1e-300)


@dataclass(frozen=True)
class OutputsEvaluation:
    kind: str
    n: int
    num_classes: int
    uploaded: CalibrationMetrics
    fitted_temperature: float | None
    after_fitted: CalibrationMetrics | None
    conformal: dict | None


def as_logits(outputs: ClassifierOutputs) -> np.ndarray:
    if outputs.kind == "logits":
        return outputs.values
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(outputs.values), LOG_FLOOR)


def evaluate_outputs(outputs: ClassifierOutputs, *, n_bins: int, fit: bool, coverages: Sequence[float] = (),
                     methods: Sequence[str] = (), mondrian: bool = False, seed: int = 0) -> OutputsEvaluation:
    z, y = as_logits(outputs), outputs.labels
    uploaded = compute_metrics(z, y, n_bins=n_bins)
    fitted, after = batch_temperature(z, y, n_bins) if fit else (None, None)
    conformal = None
    if coverages:
        if len(y) < 2:
            raise InputError("too_few_images", "split conformal coverage needs at least 2 labelled rows "
                                               "(one half calibrates, the other is measured)")
        conformal = split_conformal_report(softmax(z), y, coverages, methods, mondrian, seed=seed)
    return OutputsEvaluation(outputs.kind, len(y), z.shape[1], uploaded, fitted, after, conformal)


def outputs_diagram_png(evaluation: OutputsEvaluation) -> bytes:
    title = f"uploaded {evaluation.kind}: N={evaluation.n}, K={evaluation.num_classes}"
    if evaluation.after_fitted is not None:
        title += (f", fitted T={evaluation.fitted_temperature:.3f}: ECE {evaluation.uploaded.ece:.4f} -> "
                  f"{evaluation.after_fitted.ece:.4f}")
    return reliability_diagram_png(evaluation.uploaded, evaluation.after_fitted, title=title)
