"""Pydantic models of the responses (and hand-written request schemas for the OpenAPI doc).

The request bodies are parsed by `service.inputs`, not by FastAPI, because one endpoint takes
JSON or multipart; their schemas are still published so the generated docs show both forms.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from service.profile_schemas import CalibrationUsed


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable error code, e.g. 'invalid_shape'")
    message: str = Field(description="what was wrong, for humans")
    status: int
    details: Optional[dict[str, Any]] = None
    request_id: Optional[str] = Field(None, description="this request's ID, as in the X-Request-ID response "
                                                        "header and the server's access log")


class ErrorResponse(BaseModel):
    error: ErrorBody


class LoadFailureOut(BaseModel):
    path: str
    error: str
    name: Optional[str] = Field(None, description="the model (folder) the failed version belongs to")
    version: Optional[str] = Field(None, description="the version that failed to load (its old version, if "
                                                     "any, keeps serving)")


class StorageStatus(BaseModel):
    status: str = Field(description="'ready' or 'unavailable': the calibration profiles' database")
    backend: str = Field(description="sqlite or postgresql")
    message: Optional[str] = None


class Readiness(BaseModel):
    status: str = Field(description="'ready'")
    models: list[str]
    failed: list[LoadFailureOut]
    storage: Optional[StorageStatus] = Field(None, description="the calibration database; when it is down only "
                                                               "the calibration-profile routes answer 503")


class Liveness(BaseModel):
    status: str = "alive"


class OODThreshold(BaseModel):
    """The card's `ood_threshold` block (written by `python -m training.fit_ood_threshold`)."""

    score: str = Field(description="the score flagged on: 'predictive_entropy' of the calibrated probabilities")
    threshold: float = Field(description="an image is flagged when its score is above this (nats)")
    tpr: float = Field(description="share of clean validation images that pass (score <= threshold), e.g. 0.95")
    n_images: int = Field(description="validation images the threshold was fitted on")
    data: str = Field(description="what it was fitted on, e.g. 'validation split'")
    temperature: float = Field(description="the temperature T it was fitted at; a card whose T differs "
                                           "has a stale threshold, which the service ignores")


OOD_THRESHOLD_NOTE = ("null when the card has no ood_threshold (older models) or an unusable one: "
                      "predictions then carry no OOD flag ('flag': null)")


class ModelSummary(BaseModel):
    name: str
    version: Optional[str] = Field(None, description="the version served by default (the newest loaded)")
    loaded_versions: list[str] = Field(default_factory=list, description="every loaded version (more than one "
                                                                          "with CALIB_MODEL_VERSION_POLICY all or "
                                                                          "specific)")
    classes: list[str]
    temperature: float
    input: dict[str, Any]
    mc_dropout: Optional[dict[str, Any]] = None
    metrics: dict[str, Any] = Field(description="test-split metrics before/after temperature")
    ood_threshold: Optional[OODThreshold] = Field(None, description=OOD_THRESHOLD_NOTE)
    runtime: Literal["keras", "litert"] = Field(
        "keras", description="what serves this model: keras (TensorFlow) or litert (backbone.tflite + the "
                             "NumPy head, no TensorFlow); CALIB_RUNTIME")


class ModelList(BaseModel):
    models: list[ModelSummary]


class ModelCard(BaseModel):
    """The artifact's model card as written at training time (extra keys kept)."""

    model_config = ConfigDict(extra="allow")
    name: str
    version: Optional[str] = Field(None, description="the version this card belongs to: the one served by default")
    classes: list[str]
    temperature: float
    input: dict[str, Any]
    metrics: dict[str, Any]
    model_sha256: str
    ood_threshold: Optional[OODThreshold] = Field(None, description=OOD_THRESHOLD_NOTE)
    runtime: Literal["keras", "litert"] = Field(
        "keras", description="what serves this model: keras (TensorFlow) or litert (backbone.tflite + the "
                             "NumPy head, no TensorFlow); CALIB_RUNTIME")


class Uncertainty(BaseModel):
    n_samples: int = Field(description="MC dropout samples T")
    mean: list[float] = Field(description="per-class mean of the calibrated softmax over samples")
    variance: list[float] = Field(description="per-class variance of the calibrated softmax")
    predictive_entropy: float = Field(description="H[mean p], nats")
    expected_entropy: float = Field(description="mean of H[p] over samples (aleatoric), nats")
    mutual_information: float = Field(description="predictive - expected entropy (epistemic), nats")


class OODFlag(BaseModel):
    """Out-of-distribution score of one image and whether to abstain on it."""

    score: str = Field(description="'predictive_entropy': entropy (nats) of the calibrated deterministic "
                                   "probabilities, also when MC samples were drawn (the threshold was fitted on it)")
    value: float = Field(description="this image's score; higher means less like the training data")
    threshold: Optional[float] = Field(description="the model card's ood_threshold.threshold; null when the "
                                                   "card has none (older models)")
    flag: Optional[bool] = Field(description="true: value > threshold, the image looks out of distribution "
                                             "(abstain); 95% of clean validation images are not flagged. "
                                             "null: no threshold, the flag is unavailable")


class PredictionSetOut(BaseModel):
    """A split-conformal prediction set (docs/conformal.md): contains the true class with probability
    >= coverage over exchangeable images. An empty set says no class is plausible enough at this coverage."""

    indices: list[int] = Field(description="class indices in the set, ascending")
    labels: list[str]
    coverage: float = Field(description="the requested coverage 1 - alpha")
    method: str = Field(description="'lac', 'aps' or 'raps': the non-conformity score")
    mondrian: bool = Field(False, description="class-conditional thresholds (coverage holds within each class)")


class PredictionOut(BaseModel):
    class_index: int
    label: str
    confidence: float = Field(description="largest calibrated probability")
    probabilities: list[float] = Field(description="softmax(logits / T)")
    uncertainty: Optional[Uncertainty] = Field(None, description="null when mc_samples=0")
    logits: Optional[list[float]] = Field(None, description="raw logits (return_logits=true)")
    uncalibrated_probabilities: Optional[list[float]] = Field(
        None, description="softmax(logits) (return_logits=true)")
    ood: Optional[OODFlag] = Field(None, description="out-of-distribution score and flag")
    prediction_set: Optional[PredictionSetOut] = Field(None, description="with `coverage` only")
    prediction_id: Optional[str] = Field(None, description="this prediction's id (32 hex digits), to send its true "
                                                           "label to POST /v1/feedback; null when monitoring is "
                                                           "off (CALIB_MONITORING=false)")


class PredictResponse(BaseModel):
    model: str
    version: Optional[str] = Field(None, description="the model version that served this answer (its version "
                                                     "folder's number; the flat layout is \"1\")")
    temperature: float
    classes: list[str]
    mc_samples: int
    seed: Optional[int] = Field(None, description="seed of the MC samples; send it back to reproduce them")
    calibration: Optional[CalibrationUsed] = Field(None, description="the calibration used: a profile "
                                                                     "(calibration=<id>) or the card's temperature")
    predictions: list[PredictionOut]


class ReliabilityBinOut(BaseModel):
    lower: float
    upper: float
    count: int
    mean_confidence: Optional[float]
    accuracy: Optional[float]


class MetricsOut(BaseModel):
    n: int
    n_bins: int
    temperature: float
    accuracy: float
    nll: float
    brier: float
    ece: float
    mce: float
    adaptive_ece: float
    classwise_ece: float
    bins: list[ReliabilityBinOut]


class CoveragePointOut(BaseModel):
    coverage: float = Field(description="requested coverage (fraction of the batch accepted)")
    accepted: int = Field(description="images accepted: ceil(coverage * n), at least 1; the most confident first")
    accuracy: float = Field(description="accuracy among the accepted (ties with the last one at their mean)")
    risk: float = Field(description="1 - accuracy: the selective risk")
    threshold: float = Field(description="calibrated confidence of the last image accepted")


class AccuracyThresholdOut(BaseModel):
    target_accuracy: float
    achieved: bool = Field(description="false when no confidence threshold reaches the target")
    threshold: Optional[float] = Field(description="lowest confidence threshold whose accepted set "
                                                   "(confidence >= threshold) reaches the target; null if none")
    coverage: float = Field(description="fraction of the batch that threshold accepts; 0 if none")
    accepted: int
    accuracy: Optional[float] = Field(description="accuracy among the accepted; null if none")


class SelectiveOut(BaseModel):
    """Selective prediction on the calibrated confidence (max probability at the model's T)."""

    n: int
    accuracy: float = Field(description="accuracy at full coverage")
    aurc: float = Field(description="area under the risk-coverage curve: mean selective risk over the "
                                    "coverages k/n, k=1..n (Geifman et al. 2019); lower is better")
    e_aurc: float = Field(description="aurc - oracle_aurc: the part due to the confidence ranking")
    oracle_aurc: float = Field(description="AURC of the perfect ranking (every correct image first)")
    at_coverage: list[CoveragePointOut] = Field(description="coverage 50, 80, 90 and 95%")
    risk_coverage_curve: list[CoveragePointOut] = Field(
        description="the curve at coverage steps 1%, 2%, ..., 100% (at most 100 points; fewer when n < 100)")
    target: Optional[AccuracyThresholdOut] = Field(None, description="with target_accuracy only")


class ReportWarningOut(BaseModel):
    code: str = Field(description="stable code, e.g. 'missing_classes': the batch lacks some of the model's classes")
    message: str = Field(description="what it means for this report, for humans")


class SetSizeCoverageOut(BaseModel):
    size: int
    n: int
    coverage: float


class ClassCoverageOut(BaseModel):
    class_: int = Field(alias="class", description="class index")
    n: int
    coverage: float

    model_config = ConfigDict(populate_by_name=True)


class ConformalResultOut(BaseModel):
    """How one (coverage, method) pair's prediction sets did on the labelled batch."""

    coverage_target: float
    method: str
    mondrian: bool
    calibration_n: int = Field(description="images whose scores set the threshold")
    threshold: Any = Field(description="the score threshold q (null: +inf, every class); a list per class "
                                       "when mondrian")
    n: int = Field(description="images the sets were measured on")
    coverage: float = Field(description="share of images whose set holds the true class")
    mean_set_size: float
    singletons: float = Field(description="share of sets with exactly one class")
    empty: float = Field(description="share of empty sets")
    coverage_by_set_size: list[SetSizeCoverageOut]
    worst_class: ClassCoverageOut = Field(description="the class whose images are covered least often")


class ConformalOut(BaseModel):
    calibration: dict[str, Any] = Field(description="where the thresholds come from and how many images")
    results: list[ConformalResultOut]


CONFORMAL_UNAVAILABLE = {409: {"model": ErrorResponse, "description": "`conformal_unavailable`: `coverage` was "
                                                                   "asked of a model without a conformal "
                                                                   "calibration set (calibration_set.npz)"}}


class EvaluateResponse(BaseModel):
    model: str
    version: Optional[str] = Field(None, description="the model version that served this answer (its version "
                                                     "folder's number; the flat layout is \"1\")")
    n: int
    n_bins: int
    temperature: float = Field(description="the model's temperature T")
    before_temperature: MetricsOut = Field(description="softmax(logits)")
    after_temperature: MetricsOut = Field(description="softmax(logits / T)")
    fitted_temperature: Optional[float] = Field(None, description="T fitted on this batch (fit_temperature=true)")
    after_fitted_temperature: Optional[MetricsOut] = None
    selective: SelectiveOut = Field(description="selective prediction: AURC, accuracy at coverage, "
                                                "risk-coverage curve, threshold for target_accuracy")
    warnings: list[ReportWarningOut] = Field(
        default_factory=list, description="what limits this report, e.g. 'missing_classes' when the batch "
                                          "holds fewer than all the model's classes; empty when nothing does")
    calibration: Optional[CalibrationUsed] = Field(None, description="the calibration of `after_calibration` and "
                                                                     "`selective`: a profile or the card's")
    after_calibration: Optional[MetricsOut] = Field(None, description="with calibration=<id>: the metrics under "
                                                                      "that profile")
    conformal: Optional[ConformalOut] = Field(None, description="with `coverage`: the card's conformal "
                                                                "prediction sets measured on this batch")


class SplitConformalOut(BaseModel):
    split: dict[str, int] = Field(description="seed, calibration_n (the half that sets the thresholds) and "
                                              "test_n (the half measured)")
    results: list[ConformalResultOut]


class LogitsEvaluateResponse(BaseModel):
    kind: Literal["logits", "probabilities"] = Field(description="what was uploaded")
    n: int
    num_classes: int
    n_bins: int
    uploaded: MetricsOut = Field(description="the uploaded outputs as they are (probabilities as log p)")
    fitted_temperature: Optional[float] = Field(None, description="T fitted on this batch (fit_temperature=true)")
    after_fitted_temperature: Optional[MetricsOut] = Field(None, description="in-sample: at the fitted T")
    conformal: Optional[SplitConformalOut] = Field(None, description="with `coverage`: split conformal on this "
                                                                     "batch (docs/conformal.md)")


class ScoreSeparation(BaseModel):
    """How well one uncertainty score tells the suspect batch from the in-distribution one."""

    score: str = Field(description="'max_probability' (1 - max p), 'predictive_entropy' or "
                                   "'mutual_information' (MC, mc_samples >= 2)")
    auroc: float = Field(description="P(a suspect image scores higher than an in-distribution one); 0.5: "
                                     "indistinguishable, 1: perfectly separated")
    aupr: float = Field(description="average precision with the suspect images as positives (AUPR-Out)")
    fpr_at_95_tpr: float = Field(description="share of suspect images that pass the threshold letting 95% "
                                             "of the in-distribution batch pass (lower is better)")
    mean_in_distribution: float
    mean_suspect: float


class FlaggedShare(BaseModel):
    threshold: float = Field(description="the model card's predictive-entropy flag threshold")
    in_distribution: float = Field(description="share of the in-distribution batch flagged")
    suspect: float = Field(description="share of the suspect batch flagged")


class CompareResponse(BaseModel):
    model: str
    version: Optional[str] = Field(None, description="the model version that served this answer (its version "
                                                     "folder's number; the flat layout is \"1\")")
    temperature: float
    mc_samples: int = Field(description="MC dropout samples drawn for the mutual information (0: none)")
    seed: Optional[int] = Field(None, description="seed of the MC samples (null without them)")
    calibration: Optional[CalibrationUsed] = Field(None, description="the calibration the scores used: a "
                                                                     "profile (calibration=<id>) or the card's")
    n_in_distribution: int
    n_suspect: int
    scores: list[ScoreSeparation]
    flagged: Optional[FlaggedShare] = Field(None, description="the service's OOD flag on both batches; "
                                                              "null when the card has no ood_threshold")


def _exactly(n: int, items: dict) -> dict:
    return {"type": "array", "minItems": n, "maxItems": n, "items": items}


_PIXELS = {**_exactly(32, _exactly(32, _exactly(3, {"type": "integer", "minimum": 0, "maximum": 255}))),
           "description": "32x32x3 nested array of integers 0..255 (RGB, HWC)"}
_B64 = {"type": "object", "required": ["b64"], "additionalProperties": False,
        "properties": {"b64": {"type": "string", "minLength": 1, "format": "byte", "contentEncoding": "base64",
                               "description": "base64 PNG or JPEG bytes"}}}
# {"b64": ...} first: the smallest valid body is then one short object, not 3,072 pixel values
# (schemathesis' health check refuses a minimal example that large)
_INSTANCES = {"type": "array", "minItems": 1, "items": {"oneOf": [_B64, _PIXELS]},
              "description": "at most CALIB_MAX_INSTANCES (predict) or CALIB_MAX_EVAL_IMAGES (evaluate)"}
_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
# Two real 32x32 RGB PNGs (plain red and blue), so the documented examples are requests that work.
_EXAMPLE_IMAGES = [
    {"b64": "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAKklEQVR42u3NMQEAAAQAMKTRP4VYSvBtBZbTHZ8qngkE"
            "AoFAIBAIBIIrC9JiAVggSmjwAAAAAElFTkSuQmCC"},
    {"b64": "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAK0lEQVR42u3NQQEAQAQAMC6NTBKLdSX4bQWW1ROXXhwT"
            "CAQCgUAgEAgEWz4vKwGKe/bgAAAAAABJRU5ErkJggg=="},
]
PNG_CONTENT = {"image/png": {"schema": {"type": "string", "format": "binary"}}}

PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["instances"],
                                    "properties": {"instances": _INSTANCES}},
                         "example": {"instances": _EXAMPLE_IMAGES}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {"files": {
        **_FILES, "minItems": 1, "description": "PNG/JPEG image files, or one .npy/.npz array [N,32,32,3] uint8"}}}},
}}}

EVALUATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["instances", "labels"],
                                    "properties": {"instances": _INSTANCES,
                                                   "labels": {"type": "array", "items": {
                                                       "type": "integer", "minimum": 0},
                                                       "description": "one class index per instance"}}},
                         "example": {"instances": _EXAMPLE_IMAGES, "labels": [0, 9]}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {"file": {
        "type": "string", "format": "binary",
        "description": ".npz with x uint8 [N,32,32,3] and y int [N], or a .tar.gz/.zip of "
                       "<class>/<image> folders"}}}},
}}}

_BATCH = {**_INSTANCES, "description": "images as in predict: 32x32x3 arrays or {\"b64\": ...}; at most "
                                      "CALIB_MAX_EVAL_IMAGES per batch"}
_BATCH_FILES = {**_FILES, "minItems": 1, "description": "PNG/JPEG image files, or .npy/.npz arrays [N,32,32,3] uint8 "
                                         "(repeat the field for several files)"}
COMPARE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["in_distribution", "suspect"],
                                    "properties": {"in_distribution": _BATCH, "suspect": _BATCH}},
                         "example": {"in_distribution": _EXAMPLE_IMAGES[:1], "suspect": _EXAMPLE_IMAGES[1:]}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["in_distribution", "suspect"],
                                       "properties": {"in_distribution": _BATCH_FILES, "suspect": _BATCH_FILES}}},
}}}

_SCORES = {"type": "array", "items": {"type": "array", "items": {"type": "number"}},
           "description": "[N, K], K from 2 to 1,000, finite"}
LOGITS_EVALUATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["labels"],
                                    "oneOf": [{"required": ["logits"]}, {"required": ["probabilities"]}],
                                    "properties": {"logits": _SCORES,
                                                   "probabilities": {**_SCORES, "description":
                                                                     "[N, K], rows summing to 1 (instead of logits)"},
                                                   "labels": {"type": "array", "items": {"type": "integer",
                                                                                         "minimum": 0}}}},
                         "example": {"logits": [[2.0, 0.5, -1.0], [0.1, 1.2, 0.3], [0.0, 0.2, 2.5],
                                                [1.5, 1.4, -0.5]],
                                     "labels": [0, 1, 2, 1]}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {"file": {
        "type": "string", "format": "binary",
        "description": ".npz with `logits` (or `probs`) float [N, K] and `y` int [N]"}}}},
}}}
