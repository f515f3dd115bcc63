"""In-process API tests: every endpoint, every input format, every bad-input case.

One app for the module (tiny artifact + a corrupt one). After each test the registry must still
hold the model, unchanged: bad requests never cost stored state.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
import threading
import time
import zipfile

import numpy as np
import pytest

from models.calibration import compute_metrics, softmax
from tests.service_helpers import (
    BROKEN,
    MAX_BODY,
    MAX_EVAL,
    MAX_INSTANCES,
    MAX_MC,
    MODEL,
    error_of,
    npy_bytes,
    npz_bytes,
    png_bytes,
)

PREDICT = f"/v1/models/{MODEL}/predict"
EVALUATE = f"/v1/models/{MODEL}/evaluate"


@pytest.fixture(scope="module")
def images(sample_data) -> np.ndarray:
    return sample_data.x_test[:8]


@pytest.fixture(scope="module")
def labelled(sample_data):
    return sample_data.x_test, sample_data.y_test


@pytest.fixture(autouse=True)
def registry_intact(app_client):
    registry = app_client.app.state.registry
    before = (registry.names(), {n: m.card["model_sha256"] for n, m in registry.models.items()})
    yield
    assert (registry.names(), {n: m.card["model_sha256"] for n, m in registry.models.items()}) == before
    assert app_client.get("/health/ready").status_code == 200


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


# --- health, models, docs ----------------------------------------------------------------------
def test_health_and_readiness_report_the_corrupt_artifact(app_client):
    assert app_client.get("/health/live").json() == {"status": "alive"}
    ready = app_client.get("/health/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["models"] == [MODEL]
    assert [f["path"].rsplit("/", 1)[-1] for f in body["failed"]] == [BROKEN]
    assert "checksum mismatch" in body["failed"][0]["error"]


def test_not_ready_when_no_artifact_loads(tmp_path, service_model_dir):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    import shutil
    shutil.copytree(service_model_dir / BROKEN, tmp_path / BROKEN)
    with TestClient(create_app(Settings(model_dir=tmp_path))) as client:
        assert client.get("/health/live").status_code == 200
        msg = error_of(client.get("/health/ready"), 503, "not_ready")
        assert "1 artifact(s) failed" in msg
        assert client.get("/health/ready").json()["error"]["details"]["failed"][0]["path"].endswith(BROKEN)
        error_of(client.get("/v1/models/tiny"), 404, "unknown_model")
    with TestClient(create_app(Settings(model_dir=tmp_path / "missing"))) as client:
        error_of(client.get("/health/ready"), 503, "not_ready")


def test_default_model_dir_is_the_shipped_one_whatever_the_cwd(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", "from service.settings import Settings; print(Settings().model_dir)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    assert Path(out.stdout.strip()) == repo / "models" / "shipped"


def test_models_and_card(app_client, split_classifier):
    _, card = split_classifier
    listed = app_client.get("/v1/models").json()["models"]
    assert [m["name"] for m in listed] == [MODEL]
    assert listed[0]["temperature"] == pytest.approx(card["temperature"])
    assert listed[0]["classes"] == card["classes"]
    assert listed[0]["input"]["shape"] == [32, 32, 3]
    assert set(listed[0]["metrics"]) >= {"test_before_temperature", "test_after_temperature"}
    full = app_client.get(f"/v1/models/{MODEL}").json()
    assert full["model_sha256"] == card["model_sha256"] and full["name"] == MODEL
    assert full["metrics"] == card["metrics"]


def test_openapi_documents_every_endpoint_and_both_body_types(app_client):
    spec = app_client.get("/openapi.json").json()
    assert {"/health/live", "/health/ready", "/metrics", "/v1/models", "/v1/models/{name}",
            "/v1/models/{name}/predict", "/v1/models/{name}/evaluate"} <= set(spec["paths"])
    for op in ("predict", "evaluate"):
        content = spec["paths"][f"/v1/models/{{name}}/{op}"]["post"]["requestBody"]["content"]
        assert {"application/json", "multipart/form-data"} <= set(content)
    params = {p["name"] for p in spec["paths"]["/v1/models/{name}/predict"]["post"]["parameters"]}
    assert {"mc_samples", "seed", "return_logits", "resize"} <= params
    assert "image/png" in spec["paths"]["/v1/models/{name}/evaluate"]["post"]["responses"]["200"]["content"]


# --- predict: formats and outputs -------------------------------------------------------------------
def _check_prediction(body: dict, n: int, k: int = 10, mc: int = 100):
    assert body["model"] == MODEL and len(body["predictions"]) == n and body["mc_samples"] == mc
    for p in body["predictions"]:
        probs = np.array(p["probabilities"])
        assert probs.shape == (k,) and probs.sum() == pytest.approx(1.0)
        assert p["class_index"] == int(probs.argmax()) and p["label"] == body["classes"][p["class_index"]]
        assert p["confidence"] == pytest.approx(probs.max())
        u = p["uncertainty"]
        if mc == 0:
            assert u is None
            continue
        assert u["n_samples"] == mc
        assert np.sum(u["mean"]) == pytest.approx(1.0) and min(u["variance"]) >= 0
        assert u["mutual_information"] >= 0
        assert u["predictive_entropy"] == pytest.approx(u["expected_entropy"] + u["mutual_information"], abs=1e-9)
        assert 0 <= u["expected_entropy"] <= np.log(k) + 1e-9


def test_predict_json_arrays_matches_in_process_model(app_client, images, split_classifier):
    clf, card = split_classifier
    r = app_client.post(PREDICT, json={"instances": images.tolist()}, params={"return_logits": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    _check_prediction(body, len(images))
    logits = clf.logits(images)
    got = np.array([p["logits"] for p in body["predictions"]])
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([p["probabilities"] for p in body["predictions"]],
                               softmax(logits, card["temperature"]), atol=1e-6)
    np.testing.assert_allclose([p["uncalibrated_probabilities"] for p in body["predictions"]],
                               softmax(logits, 1.0), atol=1e-6)
    assert isinstance(body["seed"], int)  # drawn by the server when not given, and reported


def _without_ids(predictions: list[dict]) -> list[dict]:
    """The predictions without `prediction_id`, which is new for every answer (monitoring)."""
    assert all(len(p["prediction_id"]) == 32 for p in predictions)
    return [{k: v for k, v in p.items() if k != "prediction_id"} for p in predictions]


def test_predict_b64_png_and_jpeg(app_client, images):
    r = app_client.post(PREDICT, json={"instances": [b64(png_bytes(images[0])), b64(png_bytes(images[1], fmt="JPEG")),
                                                     images[2].tolist()]})
    assert r.status_code == 200, r.text
    _check_prediction(r.json(), 3)
    arrays = app_client.post(PREDICT, json={"instances": [images[0].tolist()]}, params={"seed": 1}).json()
    pngs = app_client.post(PREDICT, json={"instances": [b64(png_bytes(images[0]))]}, params={"seed": 1}).json()
    # PNG is lossless: same pixels, same answer (each prediction has its own monitoring id)
    assert _without_ids(arrays["predictions"]) == _without_ids(pngs["predictions"])


def test_predict_multipart_images_npy_npz(app_client, images):
    files = [("files", (f"{i}.png", png_bytes(img), "image/png")) for i, img in enumerate(images[:3])]
    r = app_client.post(PREDICT, files=files, params={"seed": 3})
    assert r.status_code == 200, r.text
    _check_prediction(r.json(), 3)
    r_npy = app_client.post(PREDICT, files={"files": ("x.npy", npy_bytes(images[:3]))}, params={"seed": 3})
    r_npz = app_client.post(PREDICT, files={"file": ("x.npz", npz_bytes(x=images[:3]))}, params={"seed": 3})
    one = app_client.post(PREDICT, files={"file": ("one.npy", npy_bytes(images[0].astype(np.int64)))})
    assert r_npy.status_code == r_npz.status_code == one.status_code == 200
    assert (_without_ids(r_npy.json()["predictions"]) == _without_ids(r.json()["predictions"])
            == _without_ids(r_npz.json()["predictions"]))
    assert len(one.json()["predictions"]) == 1


def test_predict_resize_option(app_client, images):
    big = np.kron(images[0], np.ones((2, 2, 1), np.uint8))  # 64x64
    error_of(app_client.post(PREDICT, json={"instances": [b64(png_bytes(big))]}), 422, "wrong_image_size")
    r = app_client.post(PREDICT, json={"instances": [b64(png_bytes(big))]}, params={"resize": "true"})
    assert r.status_code == 200
    gray = png_bytes(images[0], mode="L")
    error_of(app_client.post(PREDICT, json={"instances": [b64(gray)]}), 422, "unsupported_image_mode")
    assert app_client.post(PREDICT, json={"instances": [b64(gray)]}, params={"resize": "true"}).status_code == 200


def test_mc_seed_reproducible_and_mc_off(app_client, images):
    body = {"instances": images[:4].tolist()}
    a = app_client.post(PREDICT, json=body, params={"seed": 7, "mc_samples": 50}).json()
    b = app_client.post(PREDICT, json=body, params={"seed": 7, "mc_samples": 50}).json()
    c = app_client.post(PREDICT, json=body, params={"seed": 8, "mc_samples": 50}).json()
    assert {**a, "predictions": _without_ids(a["predictions"])} == {**b, "predictions": _without_ids(b["predictions"])}
    assert [p["uncertainty"] for p in a["predictions"]] != [p["uncertainty"] for p in c["predictions"]]
    assert [p["probabilities"] for p in a["predictions"]] == [p["probabilities"] for p in c["predictions"]]
    off = app_client.post(PREDICT, json=body, params={"mc_samples": 0}).json()
    _check_prediction(off, 4, mc=0)
    assert off["seed"] is None
    big = app_client.post(PREDICT, json=body, params={"mc_samples": MAX_MC, "seed": 1})  # chunked MC
    _check_prediction(big.json(), 4, mc=MAX_MC)


# --- evaluate: formats and outputs ------------------------------------------------------------------
def _reference(split_classifier, x, y, n_bins=15):
    clf, card = split_classifier
    logits = clf.logits(x)
    return (compute_metrics(logits, y, temperature=1.0, n_bins=n_bins),
            compute_metrics(logits, y, temperature=card["temperature"], n_bins=n_bins))


def _check_report(body, before, after, n):
    assert body["model"] == MODEL and body["n"] == n
    for key, ref in (("before_temperature", before), ("after_temperature", after)):
        got = body[key]
        for metric in ("accuracy", "nll", "brier", "ece", "mce", "adaptive_ece", "classwise_ece"):
            assert got[metric] == pytest.approx(getattr(ref, metric), abs=1e-6), (key, metric)
        assert [b["count"] for b in got["bins"]] == [b.count for b in ref.bins]


def test_evaluate_npz_in_chunks_equals_compute_metrics(app_client, labelled, split_classifier):
    x, y = labelled  # 300 images, eval_chunk=128 in these settings: three chunks
    r = app_client.post(EVALUATE, files={"file": ("val.npz", npz_bytes(x=x, y=y))})
    assert r.status_code == 200, r.text
    before, after = _reference(split_classifier, x, y)
    _check_report(r.json(), before, after, len(x))
    assert r.json()["fitted_temperature"] is None and r.json()["after_fitted_temperature"] is None


def test_evaluate_json_bins_and_fitted_temperature(app_client, labelled, split_classifier):
    from models.calibration import fit_temperature

    x, y = labelled[0][:200], labelled[1][:200]
    r = app_client.post(EVALUATE, json={"instances": x.tolist(), "labels": y.tolist()},
                        params={"bins": 10, "fit_temperature": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    before, after = _reference(split_classifier, x, y, n_bins=10)
    _check_report(body, before, after, 200)
    assert body["n_bins"] == 10 and len(body["after_temperature"]["bins"]) == 10
    t = fit_temperature(split_classifier[0].logits(x), y)
    assert body["fitted_temperature"] == pytest.approx(t, rel=1e-4)
    assert body["after_fitted_temperature"]["nll"] <= body["after_temperature"]["nll"] + 1e-9


def test_evaluate_warns_when_the_batch_lacks_classes(app_client, labelled):
    """The first images of a class-ordered folder are one class: the report says so."""
    x, y = labelled
    one_class = y == y[0]
    r = app_client.post(EVALUATE, json={"instances": x[one_class][:20].tolist(), "labels": y[one_class][:20].tolist()})
    assert r.status_code == 200, r.text
    (warning,) = r.json()["warnings"]
    assert warning["code"] == "missing_classes" and "1 of the model's 10 classes" in warning["message"]
    every = np.concatenate([np.flatnonzero(y == k)[:2] for k in range(10)])
    r = app_client.post(EVALUATE, json={"instances": x[every].tolist(), "labels": y[every].tolist()})
    assert r.status_code == 200, r.text
    assert r.json()["warnings"] == []


def _archive(x, y, classes, kind="tar.gz", size=None) -> bytes:
    buf = io.BytesIO()
    members = []
    for i, (img, label) in enumerate(zip(x, y)):
        data = png_bytes(img) if size is None else png_bytes(np.zeros((size, size, 3), np.uint8))
        members.append((f"val/{classes[label]}/{i:04d}.png", data))
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members:
                zf.writestr(name, data)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_evaluate_image_folder_archives(app_client, labelled, split_classifier, kind):
    x, y = labelled[0][:100], labelled[1][:100]
    classes = split_classifier[1]["classes"]
    r = app_client.post(EVALUATE, files={"file": (f"val.{kind}", _archive(x, y, classes, kind))})
    assert r.status_code == 200, r.text
    order = np.argsort(y, kind="stable")  # the archive reader groups by class
    before, after = _reference(split_classifier, x[order], y[order])
    _check_report(r.json(), before, after, 100)


def test_evaluate_shared_sample_archive_with_split(app_client, sample_archive, sample_data, split_classifier):
    r = app_client.post(EVALUATE, files={"file": (sample_archive.name, sample_archive.read_bytes())},
                        params={"split": "test"})
    assert r.status_code == 200, r.text
    before, after = _reference(split_classifier, sample_data.x_test, sample_data.y_test)
    _check_report(r.json(), before, after, len(sample_data.y_test))


def test_evaluate_png_diagram(app_client, labelled):
    x, y = labelled[0][:300], labelled[1][:300]
    r = app_client.post(EVALUATE, files={"file": ("val.npz", npz_bytes(x=x, y=y))}, params={"format": "png"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image
    assert Image.open(io.BytesIO(r.content)).size[0] > 500


# --- bad input: one request per case, status + code + message -----------------------------------
def _img(v=0, shape=(32, 32, 3)):
    return np.full(shape, v, np.uint8).tolist()


def _nan_body():
    inst = np.zeros((32, 32, 3)).tolist()
    inst[0][0][0] = float("nan")
    return json.dumps({"instances": [inst]}).encode()


GOOD = {"instances": [_img()]}
BAD_PREDICT = [
    # id, request kwargs, status, code, message fragment
    ("malformed-json", dict(content=b"{not json", headers={"content-type": "application/json"}),
     400, "malformed_json", "not valid JSON"),
    ("empty-body", dict(content=b"", headers={"content-type": "application/json"}), 400, "malformed_json", "empty"),
    ("json-not-object", dict(json=[1, 2]), 400, "malformed_json", "expected a JSON object"),
    ("no-instances", dict(json={"inputs": []}), 422, "invalid_request", "'instances'"),
    ("instances-not-list", dict(json={"instances": 5}), 422, "invalid_request", "must be a list"),
    ("empty-batch", dict(json={"instances": []}), 422, "empty_batch", "empty"),
    ("too-many", dict(json={"instances": [0] * (MAX_INSTANCES + 1)}), 422, "too_many_instances", f"at most {MAX_INSTANCES}"),
    ("wrong-shape", dict(json={"instances": [_img(shape=(31, 32, 3))]}), 422, "invalid_shape", "[31, 32, 3]"),
    ("channels-first", dict(json={"instances": [_img(shape=(3, 32, 32))]}), 422, "invalid_shape", "instance 0"),
    ("ragged", dict(json={"instances": [[[1, 2, 3], [1, 2]]]}), 422, "invalid_shape", "ragged"),
    ("strings", dict(json={"instances": [np.full((32, 32, 3), "a").tolist()]}), 422, "invalid_dtype", "dtype"),
    ("booleans", dict(json={"instances": [np.full((32, 32, 3), True).tolist()]}), 422, "invalid_dtype", "bool"),
    ("nulls", dict(json={"instances": [np.full((32, 32, 3), None).tolist()]}), 422, "invalid_dtype", "object"),
    ("fractions", dict(json={"instances": [np.full((32, 32, 3), 0.5).tolist()]}), 422, "invalid_dtype", "whole numbers"),
    ("above-255", dict(json={"instances": [_img(), (np.full((32, 32, 3), 256)).tolist()]}), 422,
     "value_out_of_range", "instance 1"),
    ("negative", dict(json={"instances": [(np.full((32, 32, 3), -1)).tolist()]}), 422, "value_out_of_range", "-1"),
    ("huge-int", dict(json={"instances": [[[[10**30] * 3] * 32] * 32]}), 422, "value_out_of_range", "outside"),
    ("nan", dict(content=_nan_body(), headers={"content-type": "application/json"}), 422, "non_finite_value", "NaN"),
    ("scalar-instance", dict(json={"instances": ["cat.png"]}), 422, "invalid_instance", "got str"),
    ("object-without-b64", dict(json={"instances": [{"image": "x"}]}), 422, "invalid_instance", "b64"),
    ("bad-base64", dict(json={"instances": [{"b64": "***"}]}), 422, "invalid_base64", "base64"),
    ("undecodable-b64", dict(json={"instances": [{"b64": base64.b64encode(b"GIF89a nope").decode()}]}), 422,
     "undecodable_image", "instance 0"),
    ("undecodable-file", dict(files={"files": ("cat.png", b"\x89PNG broken")}), 422, "undecodable_image", "cat.png"),
    ("empty-file", dict(files={"files": ("cat.png", b"")}), 422, "undecodable_image", "empty"),
    ("pickled-npy", dict(files={"files": ("x.npy", npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True))}),
     422, "invalid_dtype", "object arrays"),
    ("corrupt-npy", dict(files={"files": ("x.npy", b"\x93NUMPY garbage")}), 422, "invalid_array_file", "x.npy"),
    ("corrupt-npz", dict(files={"files": ("x.npz", b"PK\x03\x04 garbage")}), 422, "invalid_array_file", "x.npz"),
    ("npy-nan", dict(files={"files": ("x.npy", npy_bytes(np.full((1, 32, 32, 3), np.nan)))}), 422,
     "non_finite_value", "x.npy"),
    ("npy-shape", dict(files={"files": ("x.npy", npy_bytes(np.zeros((2, 32, 32), np.uint8)))}), 422,
     "invalid_shape", "[2, 32, 32]"),
    ("npy-float01", dict(files={"files": ("x.npy", npy_bytes(np.full((1, 32, 32, 3), 0.25, np.float32)))}), 422,
     "invalid_dtype", "normalised"),
    ("npy-empty", dict(files={"files": ("x.npy", npy_bytes(np.zeros((0, 32, 32, 3), np.uint8)))}), 422,
     "empty_batch", "empty"),
    ("npy-too-many", dict(files={"files": ("x.npy", npy_bytes(np.zeros((MAX_INSTANCES + 1, 32, 32, 3), np.uint8)))}),
     422, "too_many_instances", f"at most {MAX_INSTANCES}"),
    ("too-many-files", dict(files=[("files", (f"{i}.png", b"x")) for i in range(MAX_INSTANCES + 1)]), 422,
     "too_many_instances", "Too many files"),
    ("archive-to-predict", dict(files={"files": ("val.tar.gz", b"\x1f\x8b...")}), 422, "unsupported_file", "/evaluate"),
    ("multipart-no-file", dict(data={"note": "hi"}, files={"nothing": ("", b"")}), 422, "empty_batch", "no file part"),
    ("multipart-fields-only", dict(content=b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--\r\n",
                                   headers={"content-type": "multipart/form-data; boundary=b"}),
     422, "empty_batch", "no file part"),
    ("malformed-multipart", dict(content=b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a\"\r\n",
                                 headers={"content-type": "multipart/form-data"}),
     400, "malformed_multipart", "multipart"),
    ("text-plain", dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported_media_type",
     "text/plain"),
    ("no-content-type", dict(content=b"hello"), 415, "unsupported_media_type", "none"),
    ("too-large", dict(content=b"{" + b" " * MAX_BODY + b"}", headers={"content-type": "application/json"}), 413,
     "payload_too_large", str(MAX_BODY)),
    ("mc-negative", dict(json=GOOD, params={"mc_samples": -1}), 422, "mc_samples_out_of_range", f"0..{MAX_MC}"),
    ("mc-too-many", dict(json=GOOD, params={"mc_samples": MAX_MC + 1}), 422, "mc_samples_out_of_range", str(MAX_MC + 1)),
    ("mc-not-int", dict(json=GOOD, params={"mc_samples": "lots"}), 422, "invalid_parameter", "mc_samples"),
    ("seed-negative", dict(json=GOOD, params={"seed": -3}), 422, "invalid_parameter", "seed"),
    ("resize-not-bool", dict(json=GOOD, params={"resize": "perhaps"}), 422, "invalid_parameter", "resize"),
]


@pytest.mark.parametrize("case", BAD_PREDICT, ids=[c[0] for c in BAD_PREDICT])
def test_predict_bad_input(app_client, case):
    _, kwargs, status, code, fragment = case
    msg = error_of(app_client.post(PREDICT, **kwargs), status, code)
    assert fragment in msg, msg


def test_too_large_body_without_content_length_is_413(app_client):
    def chunks():
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536

    r = app_client.post(PREDICT, content=chunks(), headers={"content-type": "application/json"})
    error_of(r, 413, "payload_too_large")


def _npz_file(**arrays):
    return {"files": {"file": ("val.npz", npz_bytes(**arrays))}}


X4 = np.zeros((4, 32, 32, 3), np.uint8)
Y4 = np.array([0, 1, 2, 3])
BAD_EVALUATE = [
    ("labels-missing-json", dict(json={"instances": X4.tolist()}), 422, "missing_labels", "labels"),
    ("labels-out-of-range", dict(json={"instances": X4.tolist(), "labels": [0, 1, 2, 10]}), 422,
     "label_out_of_range", "label 10 outside 0..9"),
    ("labels-negative", dict(json={"instances": X4.tolist(), "labels": [0, -1, 2, 3]}), 422,
     "label_out_of_range", "-1"),
    ("labels-fractional", dict(json={"instances": X4.tolist(), "labels": [0, 1.5, 2, 3]}), 422, "invalid_dtype",
     "whole numbers"),
    ("labels-strings", dict(json={"instances": X4.tolist(), "labels": ["cat"] * 4}), 422, "invalid_dtype", "integers"),
    ("labels-not-list", dict(json={"instances": X4.tolist(), "labels": 3}), 422, "invalid_request", "list"),
    ("n-mismatch-json", dict(json={"instances": X4.tolist(), "labels": [0, 1, 2]}), 422, "length_mismatch",
     "3 labels for 4 images"),
    ("npz-no-y", dict(**_npz_file(x=X4)), 422, "missing_labels", "'y'"),
    ("npz-no-x", dict(**_npz_file(images=X4, y=Y4)), 422, "invalid_array_file", "'x' and 'y'"),
    ("npz-n-mismatch", dict(**_npz_file(x=X4, y=Y4[:3])), 422, "length_mismatch", "3 labels for 4 images"),
    ("npz-y-2d", dict(**_npz_file(x=X4, y=Y4[:, None])), 422, "invalid_shape", "val.npz:y"),
    ("npz-y-range", dict(**_npz_file(x=X4, y=Y4 + 7)), 422, "label_out_of_range", "10"),
    ("npz-x-float", dict(**_npz_file(x=(X4 + 1) / 255.0, y=Y4)), 422, "invalid_dtype", "val.npz:x"),
    ("npz-x-nan", dict(**_npz_file(x=np.full((4, 32, 32, 3), np.nan), y=Y4)), 422, "non_finite_value", "NaN"),
    ("npz-x-range", dict(**_npz_file(x=np.full((4, 32, 32, 3), 300, np.int16), y=Y4)), 422, "value_out_of_range", "300"),
    ("npz-x-shape", dict(**_npz_file(x=np.zeros((4, 28, 28), np.uint8), y=Y4)), 422, "invalid_shape", "[4, 28, 28]"),
    ("npz-empty", dict(**_npz_file(x=X4[:0], y=Y4[:0])), 422, "empty_batch", "empty"),
    ("npz-corrupt", dict(files={"file": ("val.npz", b"PK\x03\x04 not really")}), 422, "invalid_array_file", "val.npz"),
    ("npz-too-many", dict(files={"file": ("val.npz", npz_bytes(compressed=True, x=np.zeros((MAX_EVAL + 1, 32, 32, 3), np.uint8),
                                                                 y=np.zeros(MAX_EVAL + 1, np.int64)))}),
     422, "too_many_instances", f"at most {MAX_EVAL}"),
    ("npz-bomb", dict(files={"file": ("val.npz", npz_bytes(compressed=True, x=np.zeros((12_000, 32, 32, 3), np.uint8),
                                                             y=np.zeros(1, np.int64)))}),
     413, "payload_too_large", "CALIB_MAX_UNCOMPRESSED_BYTES"),  # declared sizes, refused before inflating
    ("archive-corrupt", dict(files={"file": ("val.tar.gz", b"\x1f\x8b\x08 broken")}), 422, "invalid_archive", "val.tar.gz"),
    ("archive-unknown-class", dict(files={"file": ("val.tar.gz", _archive(X4[:1], [0], ["unicorn"]))}), 422,
     "invalid_archive", "unknown class folder 'unicorn'"),
    ("archive-no-images", dict(files={"file": ("val.zip", b"PK\x05\x06" + b"\x00" * 18)}), 422, "invalid_archive",
     "no .jpg"),
    ("archive-not-32", dict(files={"file": ("val.zip", None)}), 422, "wrong_image_size", "resize"),
    ("archive-bad-split", dict(files={"file": ("val.zip", None)}, params={"split": "../x"}), 422, "invalid_parameter",
     "split"),
    ("image-has-no-label", dict(files={"file": ("cat.png", png_bytes(X4[0]))}), 422, "missing_labels", "cat.png"),
    ("npy-has-no-label", dict(files={"file": ("x.npy", npy_bytes(X4))}), 422, "missing_labels", "x.npy"),
    ("two-files", dict(files=[("file", ("a.npz", b"1")), ("file", ("b.npz", b"2"))]), 422, "invalid_request",
     "exactly one file"),
    ("bins-zero", dict(json={"instances": X4.tolist(), "labels": Y4.tolist()}, params={"bins": 0}), 422,
     "bins_out_of_range", "bins=0"),
    ("bins-too-many", dict(json={"instances": X4.tolist(), "labels": Y4.tolist()}, params={"bins": 101}), 422,
     "bins_out_of_range", "1..100"),
    ("format-gif", dict(json={"instances": X4.tolist(), "labels": Y4.tolist()}, params={"format": "gif"}), 422,
     "invalid_parameter", "format"),
    ("fit-on-one-image", dict(json={"instances": X4[:1].tolist(), "labels": [0]}, params={"fit_temperature": "true"}),
     422, "temperature_fit_failed", "at least 2 samples"),
    ("empty-json-batch", dict(json={"instances": [], "labels": []}), 422, "empty_batch", "empty"),
]


@pytest.mark.parametrize("case", BAD_EVALUATE, ids=[c[0] for c in BAD_EVALUATE])
def test_evaluate_bad_input(app_client, case, split_classifier):
    name, kwargs, status, code, fragment = case
    if name in ("archive-not-32", "archive-bad-split"):
        data = _archive(X4[:2], [0, 1], split_classifier[1]["classes"], kind="zip", size=8 if name == "archive-not-32" else None)
        kwargs = {**kwargs, "files": {"file": ("val.zip", data)}}
    msg = error_of(app_client.post(EVALUATE, **kwargs), status, code)
    assert fragment in msg, msg


def test_unknown_model_route_and_method(app_client):
    for path in ("/v1/models/nope", ):
        error_of(app_client.get(path), 404, "unknown_model")
    msg = error_of(app_client.post("/v1/models/nope/predict", json=GOOD), 404, "unknown_model")
    assert "'nope'" in msg and MODEL in msg
    error_of(app_client.post("/v1/models/nope/evaluate", json=GOOD), 404, "unknown_model")
    error_of(app_client.post("/v1/models/broken/predict", json=GOOD), 404, "unknown_model")
    error_of(app_client.get("/v3/anything"), 404, "not_found")
    v2 = app_client.get("/v2/anything")          # /v2 answers in the Open Inference Protocol's shape
    assert v2.status_code == 404 and isinstance(v2.json()["error"], str)
    error_of(app_client.get(PREDICT), 405, "method_not_allowed")


def test_internal_errors_are_json_500(app_client, monkeypatch):
    from service import dataplane

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(dataplane, "predict", boom)
    monkeypatch.setattr(dataplane, "predict_many", boom)  # the micro-batcher's path: its pass fails
    msg = error_of(app_client.post(PREDICT, json=GOOD), 500, "internal_error")
    assert "BatchForwardError" in msg and "kaboom" not in msg


# --- concurrency and metrics ---------------------------------------------------------------------------
def test_slow_evaluation_does_not_block_health_checks(app_client, monkeypatch):
    from service import dataplane

    release, entered = threading.Event(), threading.Event()
    real = dataplane.evaluate

    def slow(*args, **kwargs):
        entered.set()
        release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(dataplane, "evaluate", slow)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault(
        "r", app_client.post(EVALUATE, json={"instances": X4.tolist(), "labels": Y4.tolist()})))
    worker.start()
    try:
        assert entered.wait(20), "evaluation never started"
        started = time.perf_counter()
        assert app_client.get("/health/live").status_code == 200
        assert app_client.get("/health/ready").status_code == 200
        assert time.perf_counter() - started < 2.0
        assert worker.is_alive()  # still evaluating
    finally:
        release.set()
        worker.join(30)
    assert result["r"].status_code == 200


def test_prometheus_metrics(app_client, images):
    app_client.post(PREDICT, json={"instances": images[:2].tolist()}, params={"mc_samples": 10})
    app_client.post(PREDICT, json={"instances": [_img(shape=(2, 2, 3))]})
    text = app_client.get("/metrics").text
    predict_ok = ('calib_http_requests_total{endpoint="/v1/models/{name}/predict",method="POST",'
                  f'model="{MODEL}",status="200"}}')
    assert predict_ok in text
    assert 'calib_http_request_duration_seconds_bucket{endpoint="/v1/models/{name}/predict"' in text
    assert f'calib_mc_samples_drawn_total{{model="{MODEL}"}}' in text
    assert f'calib_images_scored_total{{endpoint="predict",model="{MODEL}"}}' in text
    assert 'calib_http_errors_total{code="invalid_shape",endpoint="/v1/models/{name}/predict",status="422"}' in text
    assert "calib_models_loaded 1.0" in text and "calib_model_load_failures 1.0" in text

    def value(prefix):
        line = next(l for l in text.splitlines() if l.startswith(prefix))
        return float(line.rsplit(" ", 1)[1])

    assert value(f'calib_mc_samples_drawn_total{{model="{MODEL}"}}') >= 20
    app_client.post("/v1/models/zzz-random-name/predict", json=GOOD)  # no label per unknown name
    assert "zzz-random-name" not in app_client.get("/metrics").text


def test_the_default_model_is_listed_first(tmp_path):
    """Clients take the first listed model, so CALIB_DEFAULT_MODEL decides what they get."""
    from service.registry import ModelRegistry

    registry = ModelRegistry(tmp_path, default="m-b")
    registry.models.update({"m-a": object(), "m-b": object(), "m-c": object()})
    assert registry.names() == ["m-b", "m-a", "m-c"]
    registry.default = "absent"
    assert registry.names() == ["m-a", "m-b", "m-c"]
