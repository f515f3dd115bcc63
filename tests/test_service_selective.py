"""The evaluate report's selective-prediction block, `target_accuracy` and the risk-coverage PNG,
in process (the same app fixtures as tests/test_service_api.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from models.calibration import softmax
from models.calibration.selective import selective_report
from tests.service_helpers import MODEL, error_of, npz_bytes

EVALUATE = f"/v1/models/{MODEL}/evaluate"


@pytest.fixture(scope="module")
def labelled(sample_data):
    return sample_data.x_test, sample_data.y_test


@pytest.fixture(scope="module")
def npz_file(labelled):
    x, y = labelled
    return {"file": ("val.npz", npz_bytes(x=x, y=y))}


def _reference(split_classifier, x, y, target=None) -> dict:
    clf, card = split_classifier
    return selective_report(softmax(clf.logits(x), card["temperature"]), y, target_accuracy=target).to_dict()


def test_report_has_the_selective_block_of_the_calibrated_probabilities(app_client, labelled, npz_file,
                                                                       split_classifier):
    x, y = labelled   # 300 images
    r = app_client.post(EVALUATE, files=npz_file, params={"target_accuracy": 0.3})
    assert r.status_code == 200, r.text
    got, want = r.json()["selective"], _reference(split_classifier, x, y, 0.3)
    assert got["n"] == 300 and got["accuracy"] == pytest.approx(r.json()["after_temperature"]["accuracy"])
    for key in ("aurc", "e_aurc", "oracle_aurc"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert 0 <= got["oracle_aurc"] <= got["aurc"] <= 1
    assert [p["coverage"] for p in got["at_coverage"]] == [0.5, 0.8, 0.9, 0.95]
    assert [p["accepted"] for p in got["at_coverage"]] == [150, 240, 270, 285]
    for g, w in zip(got["at_coverage"], want["at_coverage"]):
        assert g["accuracy"] == pytest.approx(w["accuracy"], abs=1e-6)
    curve = got["risk_coverage_curve"]
    assert len(curve) == 100 and curve[-1]["accepted"] == 300
    assert [p["coverage"] for p in curve] == pytest.approx([i / 100 for i in range(1, 101)])
    t = got["target"]
    assert t["target_accuracy"] == 0.3 and t["achieved"] == want["target"]["achieved"]
    if t["achieved"]:   # the tiny model is weak; 0.3 is what its confident images may reach
        assert t["threshold"] == pytest.approx(want["target"]["threshold"], abs=1e-6)
        assert t["accuracy"] >= 0.3 and 0 < t["coverage"] <= 1
    # the threshold applies to predict's `confidence`: same calibrated probabilities
    conf = softmax(split_classifier[0].logits(x), split_classifier[1]["temperature"]).max(axis=1)
    if t["achieved"]:
        assert np.count_nonzero(conf >= t["threshold"] - 1e-9) == t["accepted"]


def test_without_target_accuracy_target_is_null_and_unreachable_target_is_flagged(app_client, labelled):
    x, y = labelled[0][:40], labelled[1][:40]
    body = {"instances": x.tolist(), "labels": y.tolist()}
    r = app_client.post(EVALUATE, json=body)
    assert r.status_code == 200, r.text
    sel = r.json()["selective"]
    assert sel["target"] is None and len(sel["risk_coverage_curve"]) == 40   # n < 100: one per image count
    # labels that are all wrong: no threshold can reach any accuracy
    probs = app_client.post(f"/v1/models/{MODEL}/predict", json={"instances": x.tolist()},
                            params={"mc_samples": 0}).json()["predictions"]
    bad_labels = [(p["class_index"] + 1) % 10 for p in probs]
    r = app_client.post(EVALUATE, json={"instances": x.tolist(), "labels": bad_labels},
                        params={"target_accuracy": "0.5"})
    assert r.status_code == 200, r.text
    sel = r.json()["selective"]
    assert sel["target"] == {"target_accuracy": 0.5, "achieved": False, "threshold": None, "coverage": 0.0,
                             "accepted": 0, "accuracy": None}
    assert sel["aurc"] == pytest.approx(1.0) and sel["e_aurc"] == pytest.approx(0.0)


@pytest.mark.parametrize("value", ["0", "1.5", "abc", "NaN", "nan", "-0.2", "inf", ""])
def test_bad_target_accuracy_is_a_422_in_the_house_shape(app_client, value):
    body = {"instances": np.zeros((2, 32, 32, 3), np.uint8).tolist(), "labels": [0, 1]}
    msg = error_of(app_client.post(EVALUATE, json=body, params={"target_accuracy": value}), 422,
                   "invalid_parameter")
    assert "target_accuracy" in msg, msg


def test_target_accuracy_one_is_accepted(app_client, labelled):
    x, y = labelled[0][:10], labelled[1][:10]
    r = app_client.post(EVALUATE, json={"instances": x.tolist(), "labels": y.tolist()},
                        params={"target_accuracy": "1"})
    assert r.status_code == 200, r.text
    t = r.json()["selective"]["target"]
    assert t["target_accuracy"] == 1.0 and (t["accuracy"] == 1.0 if t["achieved"] else t["threshold"] is None)


def test_risk_coverage_png_and_the_reliability_png_unchanged(app_client, npz_file):
    from PIL import Image

    r = app_client.post(EVALUATE, files=npz_file, params={"format": "risk_coverage_png", "target_accuracy": 0.3})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert "risk-coverage-tiny.png" in r.headers["content-disposition"]
    assert Image.open(io.BytesIO(r.content)).size[0] > 400
    plain = app_client.post(EVALUATE, files=npz_file, params={"format": "png"})
    with_target = app_client.post(EVALUATE, files=npz_file, params={"format": "png", "target_accuracy": 0.3})
    assert plain.status_code == with_target.status_code == 200
    assert plain.content == with_target.content and plain.content != r.content
    assert "reliability-tiny.png" in plain.headers["content-disposition"]


def test_openapi_documents_target_accuracy_and_the_selective_block(app_client):
    spec = app_client.get("/openapi.json").json()
    op = spec["paths"]["/v1/models/{name}/evaluate"]["post"]
    param = next(p for p in op["parameters"] if p["name"] == "target_accuracy")
    bounds = next(s for s in param["schema"]["anyOf"] if s.get("type") == "number")
    assert bounds == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    fmt = next(p for p in op["parameters"] if p["name"] == "format")["schema"]
    assert "risk_coverage_png" in json.dumps(fmt)
    schemas = spec["components"]["schemas"]
    assert "selective" in schemas["EvaluateResponse"]["required"]
    fields = set(schemas["SelectiveOut"]["properties"])
    assert {"aurc", "e_aurc", "at_coverage", "risk_coverage_curve", "target"} <= fields


def test_compact_curve_keeps_a_10000_image_report_small():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10_000, 10)) * 3
    labels = np.where(rng.random(10_000) < 0.9, logits.argmax(axis=1), rng.integers(0, 10, 10_000))
    d = selective_report(softmax(logits, 1.0), labels, target_accuracy=0.99).to_dict()
    assert len(d["risk_coverage_curve"]) == 100
    assert len(json.dumps(d)) < 20_000
