"""Typed views of the service's JSON responses (plain dataclasses; `.raw` keeps the full dict)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


class ClientError(Exception):
    """Base of everything this client raises."""


class ServiceError(ClientError):
    """The service answered with an error body: `code` is its stable error code, `request_id`
    the ID the server logged the request under (quote it in a bug report)."""

    def __init__(self, status: int, code: str, message: str, details: Optional[dict] = None,
                 request_id: Optional[str] = None):
        where = f"HTTP {status}" + (f", request_id {request_id}" if request_id else "")
        super().__init__(f"[{code}] {message} ({where})")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.request_id = request_id


class AuthenticationError(ServiceError):
    """401: the service wants an API key (`api_key=...`, env CALIB_API_KEY, CLI --api-key)."""


class TransportError(ClientError):
    """No HTTP answer at all (connection refused, timeout, ...)."""


@dataclass(frozen=True)
class Uncertainty:
    n_samples: int
    mean: list[float]
    variance: list[float]
    predictive_entropy: float
    expected_entropy: float
    mutual_information: float


@dataclass(frozen=True)
class OODFlag:
    """`flag` True: the image looks out of distribution (abstain); None: the model has no threshold."""

    score: str
    value: float
    threshold: Optional[float]
    flag: Optional[bool]


@dataclass(frozen=True)
class PredictionSet:
    """A conformal prediction set: holds the true class with probability >= coverage (over exchangeable
    images). Empty: no class is plausible enough at this coverage (docs/conformal.md)."""

    indices: list[int]
    labels: list[str]
    coverage: float
    method: str
    mondrian: bool = False


@dataclass(frozen=True)
class Prediction:
    class_index: int
    label: str
    confidence: float
    probabilities: list[float]
    uncertainty: Optional[Uncertainty]
    logits: Optional[list[float]] = None
    uncalibrated_probabilities: Optional[list[float]] = None
    ood: Optional[OODFlag] = None
    prediction_set: Optional[PredictionSet] = None  # with coverage=... only
    prediction_id: Optional[str] = None  # send its true label with CalibClient.feedback (None: monitoring off)

    @classmethod
    def from_dict(cls, d: dict) -> "Prediction":
        u = d.get("uncertainty")
        ood = d.get("ood")
        ps = d.get("prediction_set")
        return cls(d["class_index"], d["label"], d["confidence"], d["probabilities"],
                   Uncertainty(**u) if u else None, d.get("logits"), d.get("uncalibrated_probabilities"),
                   OODFlag(**{k: ood.get(k) for k in OODFlag.__dataclass_fields__}) if ood else None,
                   PredictionSet(**{k: ps[k] for k in PredictionSet.__dataclass_fields__ if k in ps}) if ps else None,
                   d.get("prediction_id"))


@dataclass(frozen=True)
class CalibrationUsed:
    """Which calibration an answer used: a profile (`source` 'profile', its `id`) or the card's."""

    id: Optional[str]
    method: str
    source: str

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["CalibrationUsed"]:
        return None if not d else cls(d.get("id"), d["method"], d["source"])


@dataclass(frozen=True)
class PredictResult:
    model: str
    temperature: float
    classes: list[str]
    mc_samples: int
    seed: Optional[int]
    predictions: list[Prediction]
    raw: dict = field(repr=False, compare=False)
    request_id: Optional[str] = field(default=None, compare=False)  # the server's X-Request-ID
    calibration: Optional[CalibrationUsed] = None   # None from an older server
    version: Optional[str] = None   # the model version that answered; None from an older server

    @classmethod
    def from_dict(cls, d: dict) -> "PredictResult":
        return cls(d["model"], d["temperature"], d["classes"], d["mc_samples"], d.get("seed"),
                   [Prediction.from_dict(p) for p in d["predictions"]], d,
                   calibration=CalibrationUsed.from_dict(d.get("calibration")), version=d.get("version"))


@dataclass(frozen=True)
class CalibrationMetrics:
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
    bins: list[dict[str, Any]]

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["CalibrationMetrics"]:
        if d is None:
            return None
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class CoveragePoint:
    """The `accepted` most confident images (ceil(coverage * n)): their accuracy and risk, and
    the confidence of the last one accepted."""

    coverage: float
    accepted: int
    accuracy: float
    risk: float
    threshold: float


@dataclass(frozen=True)
class AccuracyThreshold:
    """The lowest confidence threshold reaching `target_accuracy`; `achieved=False` (threshold
    None, coverage 0) when none does."""

    target_accuracy: float
    achieved: bool
    threshold: Optional[float]
    coverage: float
    accepted: int
    accuracy: Optional[float]


@dataclass(frozen=True)
class SelectiveReport:
    """The evaluate report's `selective` block: selective prediction on the calibrated confidence."""

    n: int
    accuracy: float
    aurc: float
    e_aurc: float
    oracle_aurc: float
    at_coverage: list[CoveragePoint]
    risk_coverage_curve: list[CoveragePoint]
    target: Optional[AccuracyThreshold]

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["SelectiveReport"]:
        if d is None:
            return None
        target = d.get("target")
        return cls(d["n"], d["accuracy"], d["aurc"], d["e_aurc"], d["oracle_aurc"],
                   [CoveragePoint(**p) for p in d["at_coverage"]],
                   [CoveragePoint(**p) for p in d["risk_coverage_curve"]],
                   AccuracyThreshold(**target) if target else None)


@dataclass(frozen=True)
class ReportWarning:
    """Something about the batch that limits what the report means (e.g. code 'missing_classes')."""

    code: str
    message: str


@dataclass(frozen=True)
class ConformalResult:
    """How the prediction sets at one (coverage, method) did on a labelled batch."""

    coverage_target: float
    method: str
    mondrian: bool
    calibration_n: int
    threshold: Any  # float, None (+inf: every class), or one per class (mondrian)
    n: int
    coverage: float
    mean_set_size: float
    singletons: float
    empty: float
    coverage_by_set_size: list[dict[str, Any]]
    worst_class: dict[str, Any]

    @classmethod
    def list_from(cls, block: Optional[dict]) -> list["ConformalResult"]:
        if not block:
            return []
        return [cls(**{k: r[k] for k in cls.__dataclass_fields__}) for r in block["results"]]


@dataclass(frozen=True)
class EvaluationReport:
    model: str
    n: int
    n_bins: int
    temperature: float
    before: CalibrationMetrics
    after: CalibrationMetrics
    fitted_temperature: Optional[float]
    after_fitted: Optional[CalibrationMetrics]
    raw: dict = field(repr=False, compare=False)
    request_id: Optional[str] = field(default=None, compare=False)  # the server's X-Request-ID

    @classmethod
    def from_dict(cls, d: dict) -> "EvaluationReport":
        return cls(d["model"], d["n"], d["n_bins"], d["temperature"],
                   CalibrationMetrics.from_dict(d["before_temperature"]),
                   CalibrationMetrics.from_dict(d["after_temperature"]),
                   d.get("fitted_temperature"), CalibrationMetrics.from_dict(d.get("after_fitted_temperature")),
                   d)

    @property
    def selective(self) -> Optional[SelectiveReport]:
        """AURC, accuracy at coverage, risk-coverage curve, threshold (None from an older server)."""
        return SelectiveReport.from_dict(self.raw.get("selective"))

    @property
    def warnings(self) -> list[ReportWarning]:
        """What limits this report, e.g. a batch without some classes (empty from an older server)."""
        return [ReportWarning(w["code"], w["message"]) for w in self.raw.get("warnings", [])]

    @property
    def version(self) -> Optional[str]:
        """The model version that answered (None from an older server)."""
        return self.raw.get("version")

    @property
    def calibration(self) -> Optional[CalibrationUsed]:
        """The calibration of `after_calibration` and `selective`: a profile's or the card's."""
        return CalibrationUsed.from_dict(self.raw.get("calibration"))

    @property
    def after_calibration(self) -> Optional[CalibrationMetrics]:
        """With `calibration=<id>`: the metrics under that profile (else None)."""
        return CalibrationMetrics.from_dict(self.raw.get("after_calibration"))

    @property
    def conformal(self) -> list[ConformalResult]:
        """One result per (coverage, method) when evaluate was asked for coverage, else empty."""
        return ConformalResult.list_from(self.raw.get("conformal"))


@dataclass(frozen=True)
class OutputsReport:
    """POST /v1/calibration/evaluate: calibration of any classifier's logits or probabilities."""

    kind: str
    n: int
    num_classes: int
    n_bins: int
    uploaded: CalibrationMetrics
    fitted_temperature: Optional[float]
    after_fitted: Optional[CalibrationMetrics]
    conformal: list[ConformalResult]
    split: Optional[dict[str, int]]  # seed, calibration_n, test_n of the split-conformal halves
    raw: dict = field(repr=False, compare=False)
    request_id: Optional[str] = field(default=None, compare=False)  # the server's X-Request-ID

    @classmethod
    def from_dict(cls, d: dict) -> "OutputsReport":
        block = d.get("conformal")
        return cls(d["kind"], d["n"], d["num_classes"], d["n_bins"], CalibrationMetrics.from_dict(d["uploaded"]),
                   d.get("fitted_temperature"), CalibrationMetrics.from_dict(d.get("after_fitted_temperature")),
                   ConformalResult.list_from(block), block["split"] if block else None, d)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    classes: list[str]
    temperature: float
    metrics: dict[str, Any]
    raw: dict = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        return cls(d["name"], d["classes"], d["temperature"], d.get("metrics", {}), d)

    @property
    def version(self) -> Optional[str]:
        """The version served by default (None from an older server)."""
        return self.raw.get("version")


@dataclass(frozen=True)
class ScoreSeparation:
    score: str
    auroc: float
    aupr: float
    fpr_at_95_tpr: float
    mean_in_distribution: float
    mean_suspect: float


@dataclass(frozen=True)
class ComparisonReport:
    """POST /v1/models/{name}/compare: how well each score separates the suspect batch."""

    model: str
    temperature: float
    mc_samples: int
    seed: Optional[int]
    n_in_distribution: int
    n_suspect: int
    scores: list[ScoreSeparation]
    flagged: Optional[dict[str, float]]   # threshold, in_distribution, suspect; None without a threshold
    raw: dict = field(repr=False, compare=False)
    request_id: Optional[str] = field(default=None, compare=False)  # the server's X-Request-ID
    calibration: Optional[CalibrationUsed] = None   # None from an older server
    version: Optional[str] = None   # the model version that answered; None from an older server

    @classmethod
    def from_dict(cls, d: dict) -> "ComparisonReport":
        scores = [ScoreSeparation(**{k: s[k] for k in ScoreSeparation.__dataclass_fields__}) for s in d["scores"]]
        return cls(d["model"], d["temperature"], d["mc_samples"], d.get("seed"), d["n_in_distribution"],
                   d["n_suspect"], scores, d.get("flagged"), d,
                   calibration=CalibrationUsed.from_dict(d.get("calibration")), version=d.get("version"))

    def score(self, name: str) -> ScoreSeparation:
        for s in self.scores:
            if s.score == name:
                return s
        raise KeyError(f"no score {name!r} in this report (mutual_information needs mc_samples >= 2)")


@dataclass(frozen=True)
class CalibrationProfile:
    """A stored recalibration profile (immutable): `model` is None for a model-independent one;
    `report` holds the cross-fitted before/after figures, `conformal` its calibration set's size."""

    id: str
    model: Optional[str]
    model_sha256: Optional[str]
    method: str
    parameters: dict
    label: Optional[str]
    n: int
    created_at: str
    report: dict
    conformal_n: Optional[int]
    raw: dict = field(repr=False, default_factory=dict)
    request_id: Optional[str] = None

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationProfile":
        model = d.get("model") or {}
        return cls(id=d["id"], model=model.get("name"), model_sha256=model.get("sha256"), method=d["method"],
                   parameters=d["parameters"], label=d.get("label"), n=d["n"], created_at=d["created_at"],
                   report=d["report"], conformal_n=(d.get("conformal") or {}).get("n"), raw=d)

