"""Clients of the calibration service: httpx only (no TensorFlow, no service code).

    from clients import CalibClient
    with CalibClient("http://127.0.0.1:8000") as c:
        result = c.predict(["cat.png"], mc_samples=100)
        report = c.evaluate("validation.npz", bins=15)
        ood = c.compare("cifar-test.npz", "svhn.npz")   # AUROC etc. per uncertainty score
        sets = c.predict(["cat.png"], coverage=0.9)      # conformal prediction sets
        any_model = c.calibrate_evaluate("logits.npz", coverage=0.9)   # any classifier's logits

An API key (when the service has keys) comes from `api_key=...` or the env CALIB_API_KEY.

`python -m clients --help` is the command-line client; `evaluate_with_curl.sh` needs curl only.
"""

from clients.client import DEFAULT_URL, AsyncCalibClient, CalibClient
from clients.types import (
    AccuracyThreshold,
    AuthenticationError,
    CalibrationMetrics,
    CalibrationProfile,
    CalibrationUsed,
    ClientError,
    CoveragePoint,
    ComparisonReport,
    ConformalResult,
    EvaluationReport,
    ModelInfo,
    OODFlag,
    OutputsReport,
    Prediction,
    PredictionSet,
    PredictResult,
    ReportWarning,
    SelectiveReport,
    ScoreSeparation,
    ServiceError,
    TransportError,
    Uncertainty,
)

__all__ = [
    "DEFAULT_URL",
    "AccuracyThreshold",
    "AsyncCalibClient",
    "AuthenticationError",
    "CalibClient",
    "CalibrationMetrics",
    "CalibrationProfile",
    "CalibrationUsed",
    "ClientError",
    "CoveragePoint",
    "ComparisonReport",
    "ConformalResult",
    "EvaluationReport",
    "ModelInfo",
    "OODFlag",
    "OutputsReport",
    "PredictResult",
    "Prediction",
    "PredictionSet",
    "ReportWarning",
    "SelectiveReport",
    "ScoreSeparation",
    "ServiceError",
    "TransportError",
    "Uncertainty",
]
