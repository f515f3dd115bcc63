"""Calibration math shared by training, the service and the lab (NumPy only, no TensorFlow)."""

from .conformal import ConformalCalibration, conformal_report, evaluate_sets, split_conformal_report
from .bootstrap import Interval, bootstrap_intervals
from .diagram import reliability_diagram_png
from .metrics import (
    CalibrationMetrics,
    ReliabilityBin,
    adaptive_calibration_error,
    compute_metrics,
    expected_calibration_error,
    log_softmax,
    reliability_bins,
    softmax,
)
from .ood import SCORES as OOD_SCORES, Detection, aupr, auroc, detection, fpr_at_tpr, threshold_at_tpr, uncertainty_scores
from .recalibration import Calibrator, ProfileFit, TooFewImagesError, fit_calibrator, fit_profile, minimum_images
from .temperature import TemperatureFitError, fit_temperature, nll_at_temperature

__all__ = [
    "Calibrator",
    "ConformalCalibration",
    "ProfileFit",
    "TooFewImagesError",
    "conformal_report",
    "evaluate_sets",
    "fit_calibrator",
    "fit_profile",
    "minimum_images",
    "split_conformal_report",
    "OOD_SCORES",
    "Detection",
    "aupr",
    "auroc",
    "detection",
    "fpr_at_tpr",
    "threshold_at_tpr",
    "uncertainty_scores",
    "CalibrationMetrics",
    "Interval",
    "ReliabilityBin",
    "TemperatureFitError",
    "adaptive_calibration_error",
    "bootstrap_intervals",
    "compute_metrics",
    "expected_calibration_error",
    "fit_temperature",
    "log_softmax",
    "nll_at_temperature",
    "reliability_bins",
    "reliability_diagram_png",
    "softmax",
]
