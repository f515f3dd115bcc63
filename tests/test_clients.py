"""Client-side tests that need no server: import hygiene, payload building, error decoding."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_importing_clients_pulls_in_no_tensorflow_service_or_numpy():
    code = ("import sys, clients, clients.cli, clients.client, clients.payloads\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'service', 'numpy', 'models'})\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _mock(handler):
    from clients import CalibClient

    return CalibClient("http://svc", model="m", transport=httpx.MockTransport(handler))


def test_service_error_carries_code_and_message():
    from clients import ServiceError

    def handler(request):
        return httpx.Response(422, json={"error": {"code": "invalid_shape", "message": "instance 0: bad",
                                                   "status": 422}})

    with pytest.raises(ServiceError) as err, _mock(handler) as client:
        client.predict([[[[0, 0, 0]]]])
    assert (err.value.status, err.value.code, err.value.message) == (422, "invalid_shape", "instance 0: bad")
    assert "[invalid_shape]" in str(err.value)


def test_non_json_error_and_transport_error():
    from clients import CalibClient, ServiceError, TransportError

    with pytest.raises(ServiceError) as err, _mock(lambda r: httpx.Response(502, text="bad gateway")) as client:
        client.models()
    assert err.value.code == "http_502" and "bad gateway" in err.value.message

    def refuse(request):
        raise httpx.ConnectError("refused")

    with pytest.raises(TransportError), CalibClient("http://svc", transport=httpx.MockTransport(refuse)) as c:
        c.live()


def test_request_shapes(tmp_path):
    """Paths -> multipart files, nested lists -> JSON, a folder -> in-memory tar.gz, options -> query."""
    seen = []

    def handler(request):
        seen.append(request)
        if request.url.path.endswith("/predict"):
            return httpx.Response(200, json={"model": "m", "temperature": 1.5, "classes": ["a", "b"],
                                             "mc_samples": 3, "seed": 9, "predictions": [
                {"class_index": 1, "label": "b", "confidence": 0.7, "probabilities": [0.3, 0.7],
                 "uncertainty": {"n_samples": 3, "mean": [0.3, 0.7], "variance": [0.0, 0.0],
                                 "predictive_entropy": 0.6, "expected_entropy": 0.5, "mutual_information": 0.1}}]})
        metrics = {"n": 1, "n_bins": 15, "temperature": 1.0, "accuracy": 1.0, "nll": 0.1, "brier": 0.01,
                   "ece": 0.05, "mce": 0.05, "adaptive_ece": 0.05, "classwise_ece": 0.02, "bins": []}
        return httpx.Response(200, json={"model": "m", "n": 1, "n_bins": 15, "temperature": 1.5,
                                         "before_temperature": metrics, "after_temperature": metrics,
                                         "fitted_temperature": None, "after_fitted_temperature": None})

    img = tmp_path / "cat.png"
    img.write_bytes(b"\x89PNG fake")
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "cat" / "0.png").write_bytes(b"png")
    (tmp_path / "tree" / ".DS_Store").write_bytes(b"junk")
    with _mock(handler) as client:
        result = client.predict([str(img)], mc_samples=3, seed=9, resize=True)
        assert result.predictions[0].label == "b" and result.predictions[0].uncertainty.mutual_information == 0.1
        client.predict([[[[1, 2, 3]]]], mc_samples=0)
        report = client.evaluate(str(tmp_path / "tree"), bins=15, fit_temperature=True)
        assert report.after.ece == 0.05 and report.after_fitted is None
        client.evaluate([[[[0, 0, 0]]]], [1])

    files_req, json_req, tree_req, labels_req = seen
    assert files_req.url.params["mc_samples"] == "3" and files_req.url.params["resize"] == "true"
    assert files_req.headers["content-type"].startswith("multipart/form-data")
    assert b'filename="cat.png"' in files_req.content
    assert json.loads(json_req.content) == {"instances": [[[[1, 2, 3]]]]}
    assert "seed" not in json_req.url.params
    assert tree_req.url.params["fit_temperature"] == "true"
    body = tree_req.content
    start = body.index(b"\x1f\x8b")
    with tarfile.open(fileobj=io.BytesIO(body[start:]), mode="r:gz") as tar:
        assert tar.getnames() == ["cat/0.png"]  # hidden files left out
    assert json.loads(labels_req.content) == {"instances": [[[[0, 0, 0]]]], "labels": [1]}


def test_cli_usage_errors_exit_2():
    out = subprocess.run([sys.executable, "-m", "clients", "predict"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


def test_cli_connection_refused_is_a_clean_error():
    out = subprocess.run([sys.executable, "-m", "clients", "--url", "http://127.0.0.1:9", "models"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("calib-client: error: cannot reach")
