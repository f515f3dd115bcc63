"""Prediction sets over HTTP: predict / evaluate / v2 `coverage` with the card's calibration set,
and a model without one (in process, the tiny artifact of tests/conftest.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from models.calibration import softmax
from models.calibration.conformal import ConformalCalibration, evaluate_sets
from models.conformal_set import CALIBRATION_SET_FILE, CARD_KEY
from tests.service_helpers import MODEL, error_of

PREDICT = f"/v1/models/{MODEL}/predict"
EVALUATE = f"/v1/models/{MODEL}/evaluate"
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def images(sample_data):
    return sample_data.x_test[:40], sample_data.y_test[:40]


@pytest.fixture(scope="module")
def reference(split_classifier, tiny_artifact):
    """The card's calibration set and the tiny model's calibrated probabilities, computed here."""
    clf, card = split_classifier
    with np.load(tiny_artifact / CALIBRATION_SET_FILE, allow_pickle=False) as npz:
        calibration = ConformalCalibration(softmax(npz["logits"].astype(np.float64), card["temperature"]),
                                           npz["labels"])
    return calibration, (lambda x: softmax(clf.logits(x), card["temperature"]))


def test_the_tiny_artifact_carries_its_validation_set(tiny_artifact, app_client):
    card = json.loads((tiny_artifact / "model_card.json").read_text())
    block = card[CARD_KEY]
    assert block["n"] == card["data"]["n_validation"] == 100
    assert block["model_sha256"] == card["model_sha256"]
    served = app_client.get(f"/v1/models/{MODEL}").json()
    assert served[CARD_KEY]["sha256"] == block["sha256"]


@pytest.mark.parametrize("method", ["lac", "aps", "raps"])
@pytest.mark.parametrize("mondrian", [False, True])
def test_predict_sets_equal_the_calibration_sets(app_client, images, reference, method, mondrian):
    x, _ = images
    calibration, probabilities = reference
    r = app_client.post(PREDICT, params={"coverage": 0.8, "conformal_method": method, "mondrian": mondrian,
                                         "mc_samples": 0}, json={"instances": x.tolist()})
    assert r.status_code == 200, r.text
    expected = calibration.prediction_sets(probabilities(x), 0.8, method, mondrian)
    classes = r.json()["classes"]
    for row, want in zip(r.json()["predictions"], expected):
        s = row["prediction_set"]
        assert s["indices"] == np.flatnonzero(want).tolist()
        assert s["labels"] == [classes[i] for i in s["indices"]]
        assert (s["coverage"], s["method"], s["mondrian"]) == (0.8, method, mondrian)


def test_predict_without_coverage_has_no_sets(app_client, images):
    r = app_client.post(PREDICT, params={"mc_samples": 0}, json={"instances": images[0][:2].tolist()})
    assert r.status_code == 200
    assert all(row["prediction_set"] is None for row in r.json()["predictions"])


@pytest.mark.parametrize("coverage", ["0", "1", "1.5", "-0.1", "nan", "inf"])
def test_coverage_outside_the_open_interval_is_422(app_client, images, coverage):
    r = app_client.post(PREDICT, params={"coverage": coverage}, json={"instances": images[0][:1].tolist()})
    error_of(r, 422, "invalid_coverage")
    r = app_client.post(EVALUATE, params={"coverage": coverage},
                        json={"instances": images[0][:2].tolist(), "labels": images[1][:2].tolist()})
    error_of(r, 422, "invalid_coverage")


@pytest.mark.parametrize("params, code", [({"conformal_method": "aps"}, "needs_coverage"),
                                          ({"mondrian": "true"}, "needs_coverage"),
                                          ({"coverage": 0.9, "conformal_method": "naive"}, "invalid_parameter")])
def test_set_options_need_coverage_and_a_known_method(app_client, images, params, code):
    r = app_client.post(PREDICT, params=params, json={"instances": images[0][:1].tolist()})
    error_of(r, 422, code)


def test_evaluate_reports_coverage_per_level_and_method(app_client, images, reference):
    x, y = images
    calibration, probabilities = reference
    r = app_client.post(EVALUATE, params=[("coverage", "0.9"), ("coverage", "0.7"), ("conformal_method", "lac"),
                                          ("conformal_method", "aps")],
                        json={"instances": x.tolist(), "labels": y.tolist()})
    assert r.status_code == 200, r.text
    block = r.json()["conformal"]
    assert block["calibration"]["n"] == calibration.n
    expected = evaluate_sets(calibration, probabilities(x), y, [0.7, 0.9], ["lac", "aps"])
    assert [(e["coverage_target"], e["method"]) for e in block["results"]] == [(0.7, "lac"), (0.7, "aps"),
                                                                               (0.9, "lac"), (0.9, "aps")]
    for got, want in zip(block["results"], expected):
        for key in ("coverage", "mean_set_size", "singletons", "empty", "coverage_by_set_size", "worst_class"):
            assert got[key] == want[key], key


def test_evaluate_without_coverage_has_no_block(app_client, images):
    x, y = images
    r = app_client.post(EVALUATE, json={"instances": x[:4].tolist(), "labels": y[:4].tolist()})
    assert r.status_code == 200 and r.json()["conformal"] is None


def _pixels(x, **parameters) -> dict:
    body = {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "UINT8",
                        "data": x.reshape(-1).tolist()}]}
    if parameters:
        body["parameters"] = parameters
    return body


def test_v2_prediction_set_output_equals_v1(app_client, images, reference):
    x = images[0][:6]
    calibration, probabilities = reference
    r = app_client.post(INFER, json=_pixels(x, coverage=0.8, conformal_method="raps"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"]["coverage"] == 0.8 and body["parameters"]["conformal_method"] == "raps"
    out = {o["name"]: o for o in body["outputs"]}
    assert set(out) == {"probabilities", "prediction_set"}
    mask = out["prediction_set"]
    assert mask["datatype"] == "BOOL" and mask["shape"] == [6, calibration.num_classes]
    assert all(isinstance(v, bool) for v in mask["data"])
    np.testing.assert_array_equal(np.array(mask["data"]).reshape(6, -1),
                                  calibration.prediction_sets(probabilities(x), 0.8, "raps"))


@pytest.mark.parametrize("body_params, outputs", [({"coverage": 1.5}, None), ({"coverage": "0.9"}, None),
                                                  ({"coverage": 0.9, "conformal_method": "x"}, None),
                                                  ({}, [{"name": "prediction_set"}])])
def test_v2_bad_coverage_is_400(app_client, images, body_params, outputs):
    body = _pixels(images[0][:1], **body_params)
    if outputs is not None:
        body["outputs"] = outputs
    r = app_client.post(INFER, json=body)
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["error"], str)


# --- a model without a calibration set ------------------------------------------------------------
@pytest.fixture(scope="module")
def bare_client(tmp_path_factory, tiny_artifact):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    root = tmp_path_factory.mktemp("bare")
    shutil.copytree(tiny_artifact, root / MODEL)
    card_path = root / MODEL / "model_card.json"
    card = json.loads(card_path.read_text())
    del card[CARD_KEY]
    card_path.write_text(json.dumps(card))
    (root / MODEL / CALIBRATION_SET_FILE).unlink()
    with TestClient(create_app(Settings(model_dir=root)), raise_server_exceptions=False) as client:
        yield client


def test_without_a_set_predict_serves_and_coverage_is_refused(bare_client, images):
    x, y = images
    ok = bare_client.post(PREDICT, params={"mc_samples": 0}, json={"instances": x[:2].tolist()})
    assert ok.status_code == 200
    error_of(bare_client.post(PREDICT, params={"coverage": 0.9}, json={"instances": x[:2].tolist()}),
             409, "conformal_unavailable")
    error_of(bare_client.post(EVALUATE, params={"coverage": 0.9},
                              json={"instances": x[:2].tolist(), "labels": y[:2].tolist()}),
             409, "conformal_unavailable")
    r = bare_client.post(INFER, json=_pixels(x[:1], coverage=0.9))
    assert r.status_code == 400 and "conformal" in r.json()["error"]


def test_an_altered_set_refuses_the_artifact(tmp_path, tiny_artifact):
    from service.registry import load_registry

    shutil.copytree(tiny_artifact, tmp_path / MODEL)
    path = tmp_path / MODEL / CALIBRATION_SET_FILE
    with np.load(path) as npz:
        logits, labels = npz["logits"], npz["labels"]
    np.savez_compressed(path, logits=logits + 1, labels=labels)
    registry = load_registry(tmp_path, warmup=False)
    assert not registry.models
    assert "checksum mismatch" in registry.failures[0].error


def test_evaluate_with_another_calibrator_and_calibration_set(split_classifier, tiny_artifact, images):
    """The data plane's hook for recalibration profiles: their calibrator's probabilities and
    their own conformal set, named in the block."""
    from models.calibration.recalibration import fit_profile
    from service import dataplane
    from service.registry import LoadedModel

    clf, card = split_classifier
    model = LoadedModel(MODEL, tiny_artifact, card, clf)
    x, y = images
    logits = clf.logits(x)
    profile = fit_profile(logits, y, "temperature", folds=2)
    request = dataplane.ConformalRequest(profile.conformal, (0.8,), ("lac", "aps"), calibrator=profile.calibrator,
                                         source="profile test")
    report = dataplane.evaluate(model, x, y, n_bins=15, fit=False, conformal=request)
    assert report.conformal["calibration"] == {"source": "profile test", "n": len(y)}
    want = evaluate_sets(profile.conformal, profile.calibrator.probabilities(logits), y, [0.8], ["lac", "aps"])
    assert [r["coverage"] for r in report.conformal["results"]] == [r["coverage"] for r in want]
