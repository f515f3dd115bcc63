"""One contract, three places: the calibration core's result fields (models/calibration), the
service's pydantic response schemas (service/schemas.py) and the client's result types
(clients/types.py) must name the same fields. Checked on real core results, without a server
or TensorFlow, so a field added or renamed in one place and forgotten in another fails here in
a second instead of in an end-to-end test."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clients import types as client
from models.calibration.uncertainty import MCSummary, summarize_mc_samples
from service import schemas
from service.dataplane import MISSING_CLASSES, evaluate_logits

CLIENT_ONLY = {"raw", "request_id"}   # the client's own bookkeeping, not response fields
# Response fields the client exposes under another name (attribute or property).
CLIENT_NAME = {
    "before_temperature": "before",
    "after_temperature": "after",
    "after_fitted_temperature": "after_fitted",
}


def schema_fields(model) -> set[str]:
    return set(model.model_fields)


def client_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - CLIENT_ONLY


def client_attributes(cls) -> set[str]:
    """Dataclass fields and properties: what a user of the client can read."""
    props = {name for name, value in vars(cls).items() if isinstance(value, property)}
    return client_fields(cls) | props


@pytest.fixture(scope="module")
def evaluation():
    """A real evaluation of 300 random logits over 10 classes (labels of 9 classes only, so the
    report carries a warning), temperature fitted, a target accuracy asked."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 9, 300)
    logits = rng.normal(0.0, 1.0, (300, 10)) + 3.0 * np.eye(10)[y]
    return evaluate_logits(logits, y, temperature=1.3, n_bins=15, fit=True, target_accuracy=0.9,
                           class_names=[f"c{k}" for k in range(10)])


@pytest.mark.parametrize("schema, client_type", [
    (schemas.MetricsOut, client.CalibrationMetrics),
    (schemas.CoveragePointOut, client.CoveragePoint),
    (schemas.AccuracyThresholdOut, client.AccuracyThreshold),
    (schemas.SelectiveOut, client.SelectiveReport),
    (schemas.Uncertainty, client.Uncertainty),
    (schemas.OODFlag, client.OODFlag),
    (schemas.PredictionOut, client.Prediction),
    (schemas.PredictResponse, client.PredictResult),
    (schemas.ScoreSeparation, client.ScoreSeparation),
    (schemas.CompareResponse, client.ComparisonReport),
    (schemas.ReportWarningOut, client.ReportWarning),
    (schemas.CalibrationUsed, client.CalibrationUsed),
])
def test_client_types_have_the_schema_fields(schema, client_type):
    assert client_fields(client_type) == schema_fields(schema)


def test_client_evaluation_report_exposes_every_response_field():
    exposed = {CLIENT_NAME.get(name, name) for name in schema_fields(schemas.EvaluateResponse)}
    assert exposed <= client_attributes(client.EvaluationReport)
    assert client_fields(client.EvaluationReport) <= exposed


def test_core_metrics_serialise_to_the_schema_fields(evaluation):
    d = evaluation.after.to_dict()
    assert set(d) == schema_fields(schemas.MetricsOut)
    assert set(d["bins"][0]) == schema_fields(schemas.ReliabilityBinOut)


def test_core_selective_report_serialises_to_the_schema_fields(evaluation):
    d = evaluation.selective.report.to_dict()
    assert set(d) == schema_fields(schemas.SelectiveOut)
    assert set(d["at_coverage"][0]) == set(d["risk_coverage_curve"][0]) == schema_fields(schemas.CoveragePointOut)
    assert set(d["target"]) == schema_fields(schemas.AccuracyThresholdOut)


def test_core_mc_summary_has_the_uncertainty_fields():
    summary = summarize_mc_samples(np.random.default_rng(1).normal(size=(5, 2, 10)))
    assert isinstance(summary, MCSummary)
    assert {f.name for f in dataclasses.fields(summary)} == schema_fields(schemas.Uncertainty)


def test_core_warning_serialises_to_the_schema_fields(evaluation):
    (warning,) = evaluation.warnings
    assert set(warning.to_dict()) == schema_fields(schemas.ReportWarningOut)
    assert warning.code == MISSING_CLASSES


def test_an_evaluation_survives_schema_and_client_unchanged(evaluation):
    """Core results -> the response schema (nothing dropped or coerced) -> the client's types."""
    body = {"model": "m", "version": "1", "n": evaluation.n, "n_bins": evaluation.n_bins, "temperature": evaluation.temperature,
            "before_temperature": evaluation.before.to_dict(), "after_temperature": evaluation.after.to_dict(),
            "fitted_temperature": evaluation.fitted_temperature,
            "after_fitted_temperature": evaluation.after_fitted.to_dict(),
            "selective": evaluation.selective.report.to_dict(),
            "warnings": [w.to_dict() for w in evaluation.warnings],
            "calibration": {"id": None, "method": "temperature", "source": "card"},
            "after_calibration": evaluation.after.to_dict(), "conformal": None}
    assert set(body) == schema_fields(schemas.EvaluateResponse)
    wire = schemas.EvaluateResponse.model_validate(body).model_dump(mode="json")
    assert wire == body
    report = client.EvaluationReport.from_dict(wire)
    assert dataclasses.asdict(report.after) == {**body["after_temperature"]}
    assert report.after_fitted.temperature == pytest.approx(evaluation.fitted_temperature)
    sel = report.selective
    core = evaluation.selective.report
    assert (sel.aurc, sel.e_aurc, sel.oracle_aurc) == (core.aurc, core.e_aurc, core.oracle_aurc)
    assert sel.target == client.AccuracyThreshold(**core.target.to_dict())
    assert [dataclasses.asdict(p) for p in sel.risk_coverage_curve] == [p.to_dict() for p in core.curve]
    assert [(w.code, w.message) for w in report.warnings] == [(w.code, w.message) for w in evaluation.warnings]
    assert report.calibration == client.CalibrationUsed(None, "temperature", "card")
    assert report.after_calibration == report.after and report.conformal == []
    assert report.version == "1"


def test_a_batch_of_every_class_has_no_warning():
    y = np.arange(40) % 10
    logits = np.random.default_rng(2).normal(size=(40, 10))
    assert evaluate_logits(logits, y, temperature=1.0, n_bins=10, fit=False).warnings == ()


def test_the_missing_classes_warning_names_them():
    y = np.zeros(50, dtype=int)   # 50 airplanes: what the first images of a class-ordered folder are
    logits = np.random.default_rng(3).normal(size=(50, 10))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (warning,) = evaluate_logits(logits, y, temperature=1.0, n_bins=10, fit=False, class_names=names).warnings
    assert warning.code == MISSING_CLASSES
    assert "1 of the model's 10 classes" in warning.message
    assert "automobile" in warning.message and "truck" in warning.message and "airplane" not in warning.message
