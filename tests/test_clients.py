"""Client-side tests that need no server: import hygiene, payload building, error decoding."""

from __future__ import annotations

import dataclasses
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


# --- API keys and request IDs ------------------------------------------------------------------
def _recording(seen, status=200, body=None, headers=None):
    def handler(request):
        seen.append(request)
        return httpx.Response(status, json={"models": []} if body is None else body, headers=headers or {})
    return handler


def test_api_key_sent_as_bearer_from_argument_or_env(monkeypatch):
    from clients import AsyncCalibClient, CalibClient

    seen = []
    monkeypatch.delenv("CALIB_API_KEY", raising=False)
    with CalibClient("http://svc", transport=httpx.MockTransport(_recording(seen))) as c:
        c.models()
    with CalibClient("http://svc", api_key="arg-key", transport=httpx.MockTransport(_recording(seen))) as c:
        c.models()
        c.live()
    monkeypatch.setenv("CALIB_API_KEY", "env-key")
    with CalibClient("http://svc", transport=httpx.MockTransport(_recording(seen))) as c:
        c.models()
    with CalibClient("http://svc", api_key="", transport=httpx.MockTransport(_recording(seen))) as c:
        c.models()  # "" sends none, even with the env set

    async def run():
        async with AsyncCalibClient("http://svc", transport=httpx.MockTransport(_recording(seen))) as c:
            await c.models()

    import asyncio
    asyncio.run(run())
    assert [r.headers.get("authorization") for r in seen] == [
        None, "Bearer arg-key", "Bearer arg-key", "Bearer env-key", None, "Bearer env-key"]


def test_401_is_an_authentication_error_with_a_hint_and_the_request_id(monkeypatch):
    from clients import AuthenticationError, CalibClient, ServiceError

    monkeypatch.delenv("CALIB_API_KEY", raising=False)
    body = {"error": {"code": "unauthorized", "message": "missing API key", "status": 401, "request_id": "rid-9"}}
    handler = _recording([], 401, body, {"WWW-Authenticate": "Bearer", "X-Request-ID": "rid-9"})
    with pytest.raises(AuthenticationError) as err, CalibClient("http://svc", transport=httpx.MockTransport(handler)) as c:
        c.models()
    assert isinstance(err.value, ServiceError) and (err.value.status, err.value.code) == (401, "unauthorized")
    assert err.value.request_id == "rid-9" and "request_id rid-9" in str(err.value)
    assert "needs an API key" in err.value.message and "CALIB_API_KEY" in err.value.message
    with pytest.raises(AuthenticationError) as err, CalibClient(
            "http://svc", api_key="sekrit-k", transport=httpx.MockTransport(handler)) as c:
        c.models()
    assert "check the API key" in err.value.message and "sekrit-k" not in str(err.value)


def test_request_ids_on_results_errors_and_the_client():
    from clients import ServiceError

    predict = {"model": "m", "temperature": 1.0, "classes": ["a"], "mc_samples": 0, "seed": None,
               "predictions": [{"class_index": 0, "label": "a", "confidence": 1.0, "probabilities": [1.0],
                                "uncertainty": None}]}

    def handler(request):
        if request.url.path == "/v1/models/m/predict":
            return httpx.Response(200, json=predict, headers={"X-Request-ID": "pred-1"})
        if request.url.path == "/v1/models":
            return httpx.Response(502, text="bad gateway", headers={"X-Request-ID": "gw-2"})
        return httpx.Response(404, json={"error": {"code": "unknown_model", "message": "no", "status": 404,
                                                   "request_id": "body-3"}}, headers={"X-Request-ID": "body-3"})

    with _mock(handler) as client:
        result = client.predict([[[[0, 0, 0]]]])
        assert result.request_id == "pred-1" and client.last_request_id == "pred-1"
        assert result == dataclasses.replace(result, request_id=None)  # not part of equality
        with pytest.raises(ServiceError) as err:
            client.models()
        assert err.value.request_id == "gw-2" and client.last_request_id == "gw-2"  # from the header
        with pytest.raises(ServiceError) as err:
            client.card("x")
        assert err.value.request_id == "body-3"


def test_cli_api_key_option_and_env(monkeypatch, capsys):
    import functools

    from clients import CalibClient, cli

    seen = []

    def handler(request):
        seen.append(request.headers.get("authorization"))
        if request.headers.get("authorization") == "Bearer good":
            return httpx.Response(200, json={"models": []})
        return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "invalid API key",
                                                   "status": 401, "request_id": "r1"}})

    monkeypatch.setattr(cli, "CalibClient", functools.partial(CalibClient, transport=httpx.MockTransport(handler)))
    monkeypatch.delenv("CALIB_API_KEY", raising=False)
    assert cli.main(["--api-key", "good", "models", "--json"]) == 0
    monkeypatch.setenv("CALIB_API_KEY", "good")
    assert cli.main(["models", "--json"]) == 0
    capsys.readouterr()
    assert cli.main(["--api-key", "bad", "models"]) == 1  # the option wins over the env
    err = capsys.readouterr().err
    assert "unauthorized" in err and "invalid API key" in err and "bad" not in err
    assert seen == ["Bearer good", "Bearer good", "Bearer bad"]


# --- selective prediction: target_accuracy, the selective block, the risk-coverage PNG ------------
_POINT = {"coverage": 0.5, "accepted": 2, "accuracy": 1.0, "risk": 0.0, "threshold": 0.8}
_SELECTIVE = {"n": 4, "accuracy": 0.75, "aurc": 0.1458, "e_aurc": 0.0833, "oracle_aurc": 0.0625,
              "at_coverage": [_POINT, {**_POINT, "coverage": 0.8, "accepted": 4, "accuracy": 0.75, "risk": 0.25,
                                       "threshold": 0.6}],
              "risk_coverage_curve": [_POINT],
              "target": {"target_accuracy": 0.99, "achieved": True, "threshold": 0.8, "coverage": 0.5,
                         "accepted": 2, "accuracy": 1.0}}


def _evaluate_answer(request, selective=_SELECTIVE):
    if request.url.params.get("format") == "risk_coverage_png":
        return httpx.Response(200, content=b"\x89PNG risk", headers={"content-type": "image/png"})
    metrics = {"n": 4, "n_bins": 15, "temperature": 1.0, "accuracy": 0.75, "nll": 0.1, "brier": 0.01,
               "ece": 0.05, "mce": 0.05, "adaptive_ece": 0.05, "classwise_ece": 0.02, "bins": []}
    body = {"model": "m", "n": 4, "n_bins": 15, "temperature": 1.5, "before_temperature": metrics,
            "after_temperature": metrics, "fitted_temperature": None, "after_fitted_temperature": None}
    if selective is not None:
        body["selective"] = selective
    return httpx.Response(200, json=body)


def test_evaluate_sends_target_accuracy_and_parses_the_selective_block():
    from clients import AccuracyThreshold, CoveragePoint, SelectiveReport

    seen = []

    def handler(request):
        seen.append(request)
        return _evaluate_answer(request)

    with _mock(handler) as client:
        report = client.evaluate([[[[0, 0, 0]]]], [1], target_accuracy=0.99)
        png = client.risk_coverage_diagram([[[[0, 0, 0]]]], [1], target_accuracy=0.9)
        client.evaluate([[[[0, 0, 0]]]], [1])
    sel = report.selective
    assert isinstance(sel, SelectiveReport) and sel.aurc == 0.1458 and sel.e_aurc == 0.0833
    assert sel.at_coverage[1] == CoveragePoint(0.8, 4, 0.75, 0.25, 0.6)
    assert sel.target == AccuracyThreshold(0.99, True, 0.8, 0.5, 2, 1.0)
    assert png == b"\x89PNG risk"
    json_req, png_req, plain_req = seen
    assert json_req.url.params["target_accuracy"] == "0.99" and "format" not in json_req.url.params
    assert png_req.url.params["format"] == "risk_coverage_png" and png_req.url.params["target_accuracy"] == "0.9"
    assert "target_accuracy" not in plain_req.url.params


def test_selective_block_absent_or_unreached_target():
    unreached = {**_SELECTIVE, "target": {"target_accuracy": 1.0, "achieved": False, "threshold": None,
                                          "coverage": 0.0, "accepted": 0, "accuracy": None}}
    with _mock(lambda r: _evaluate_answer(r, selective=None)) as client:
        assert client.evaluate([[[[0, 0, 0]]]], [1]).selective is None      # an older server
    with _mock(lambda r: _evaluate_answer(r, selective=unreached)) as client:
        target = client.evaluate([[[[0, 0, 0]]]], [1], target_accuracy=1.0).selective.target
    assert target.achieved is False and target.threshold is None and target.coverage == 0.0


def test_async_client_target_accuracy_and_risk_coverage_png():
    import asyncio

    from clients import AsyncCalibClient

    seen = []

    def handler(request):
        seen.append(request)
        return _evaluate_answer(request)

    async def run():
        async with AsyncCalibClient("http://svc", model="m", transport=httpx.MockTransport(handler)) as c:
            return (await c.evaluate([[[[0, 0, 0]]]], [1], target_accuracy=0.95),
                    await c.risk_coverage_diagram([[[[0, 0, 0]]]], [1]))

    report, png = asyncio.run(run())
    assert report.selective.target.threshold == 0.8 and png.startswith(b"\x89PNG")
    assert seen[0].url.params["target_accuracy"] == "0.95" and seen[1].url.params["format"] == "risk_coverage_png"


def test_cli_prints_aurc_coverage_table_and_threshold(monkeypatch, capsys, tmp_path):
    import functools

    from clients import CalibClient, cli

    seen = []

    def handler(request):
        seen.append(request)
        return _evaluate_answer(request)

    monkeypatch.setattr(cli, "CalibClient", functools.partial(CalibClient, transport=httpx.MockTransport(handler)))
    data = tmp_path / "val.npz"
    data.write_bytes(b"PK fake npz")
    png = tmp_path / "rc.png"
    assert cli.main(["--model", "m", "evaluate", str(data), "--target-accuracy", "0.99",
                     "--risk-coverage-png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "AURC 0.1458   E-AURC 0.0833" in out
    assert "      50%         2    1.0000   0.0000     0.8000" in out
    assert "      80%         4    0.7500   0.2500     0.6000" in out
    assert "accuracy >= 0.99: confidence >= 0.8000 keeps 50.00% (2 images, accuracy 1.0000)" in out
    assert f"risk-coverage curve saved to {png}" in out and png.read_bytes() == b"\x89PNG risk"
    assert [r.url.params.get("target_accuracy") for r in seen] == ["0.99", "0.99"]
    assert cli.main(["--model", "m", "evaluate", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selective"]["aurc"] == 0.1458


def test_evaluate_warnings_parsed_printed_and_absent_from_an_older_server(monkeypatch, capsys, tmp_path):
    import functools

    from clients import CalibClient, ReportWarning, cli

    warning = {"code": "missing_classes", "message": "the batch holds 1 of the model's 10 classes"}

    def handler(request):
        answer = _evaluate_answer(request)
        return httpx.Response(200, json={**answer.json(), "warnings": [warning]})

    with _mock(handler) as client:
        assert client.evaluate([[[[0, 0, 0]]]], [1]).warnings == [ReportWarning(**warning)]
    with _mock(_evaluate_answer) as client:
        assert client.evaluate([[[[0, 0, 0]]]], [1]).warnings == []
    monkeypatch.setattr(cli, "CalibClient", functools.partial(CalibClient, transport=httpx.MockTransport(handler)))
    data = tmp_path / "val.npz"
    data.write_bytes(b"PK fake npz")
    assert cli.main(["--model", "m", "evaluate", str(data)]) == 0
    assert "warning [missing_classes]: the batch holds 1 of the model's 10 classes" in capsys.readouterr().out


def test_cli_bad_target_accuracy_is_the_services_one_line_error(monkeypatch, capsys, tmp_path):
    import functools

    from clients import CalibClient, cli

    def handler(request):
        message = "target_accuracy: Input should be less than or equal to 1"
        return httpx.Response(422, json={"error": {"code": "invalid_parameter", "status": 422, "message": message}})

    monkeypatch.setattr(cli, "CalibClient", functools.partial(CalibClient, transport=httpx.MockTransport(handler)))
    data = tmp_path / "val.npz"
    data.write_bytes(b"PK fake npz")
    assert cli.main(["--model", "m", "evaluate", str(data), "--target-accuracy", "1.5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("calib-client: error: [invalid_parameter]") and "target_accuracy" in err
    with pytest.raises(SystemExit) as usage:   # argparse's usage error: not a number
        cli.main(["--model", "m", "evaluate", str(data), "--target-accuracy", "abc"])
    assert usage.value.code == 2 and "invalid float value: 'abc'" in capsys.readouterr().err


# --- OOD flag and compare --------------------------------------------------------------------------
COMPARE_REPLY = {"model": "m", "temperature": 1.5, "mc_samples": 4, "seed": 7, "n_in_distribution": 2,
                 "n_suspect": 1, "flagged": {"threshold": 0.6, "in_distribution": 0.0, "suspect": 1.0},
                 "scores": [{"score": s, "auroc": 0.9, "aupr": 0.8, "fpr_at_95_tpr": 0.25,
                             "mean_in_distribution": 0.1, "mean_suspect": 0.7}
                            for s in ("max_probability", "predictive_entropy", "mutual_information")]}


def _predict_reply(flag):
    return {"model": "m", "temperature": 1.0, "classes": ["a", "b"], "mc_samples": 0, "seed": None,
            "predictions": [{"class_index": 0, "label": "a", "confidence": 0.6, "probabilities": [0.6, 0.4],
                             "uncertainty": None, "ood": {"score": "predictive_entropy", "value": 0.67,
                                                          "threshold": None if flag is None else 0.5,
                                                          "flag": flag}}]}


def test_compare_request_shapes_and_report(tmp_path):
    import numpy as np

    seen = []

    def handler(request):
        seen.append(request)
        if request.url.params.get("format") == "png":
            return httpx.Response(200, content=b"\x89PNG...", headers={"content-type": "image/png"})
        return httpx.Response(200, json=COMPARE_REPLY, headers={"X-Request-ID": "cmp-1"})

    (tmp_path / "suspect" / ".hidden").mkdir(parents=True)
    (tmp_path / "suspect" / "1.png").write_bytes(b"png-1")
    (tmp_path / "suspect" / "0.jpg").write_bytes(b"jpg-0")
    (tmp_path / "suspect" / "notes.txt").write_text("not an image")
    (tmp_path / "suspect" / ".hidden" / "2.png").write_bytes(b"hidden")
    with _mock(handler) as client:
        report = client.compare(np.zeros((2, 32, 32, 3), np.uint8), str(tmp_path / "suspect"), mc_samples=4, seed=7)
        assert report.request_id == "cmp-1" and report.n_suspect == 1 and report.seed == 7
        assert report.score("mutual_information").auroc == 0.9 and report.flagged["suspect"] == 1.0
        client.compare([[[[1, 2, 3]]]], [[[[4, 5, 6]]]])
        assert client.ood_histogram([[[[1, 2, 3]]]], [[[[4, 5, 6]]]]).startswith(b"\x89PNG")
        with pytest.raises(ValueError, match="same form"):
            client.compare([[[[1, 2, 3]]]], np.zeros((1, 32, 32, 3), np.uint8))
        (tmp_path / "text-only").mkdir()
        (tmp_path / "text-only" / "a.txt").write_text("no image")
        with pytest.raises(ValueError, match="no PNG/JPEG"):
            client.compare(str(tmp_path / "text-only"), str(tmp_path / "suspect"))
    files_req, json_req, png_req = seen
    assert files_req.url.path == "/v1/models/m/compare"
    assert files_req.url.params["mc_samples"] == "4" and files_req.url.params["seed"] == "7"
    body = files_req.content
    assert body.count(b'name="in_distribution"') == 1 and body.count(b'name="suspect"') == 2
    assert body.index(b'filename="0.jpg"') < body.index(b'filename="1.png"') and b"hidden" not in body
    assert json.loads(json_req.content) == {"in_distribution": [[[[1, 2, 3]]]], "suspect": [[[[4, 5, 6]]]]}
    assert "mc_samples" not in json_req.url.params and png_req.url.params["format"] == "png"


def test_async_compare():
    import asyncio

    from clients import AsyncCalibClient

    async def run():
        transport = httpx.MockTransport(lambda r: httpx.Response(200, json=COMPARE_REPLY))
        async with AsyncCalibClient("http://svc", model="m", transport=transport) as c:
            return await c.compare([[[[0, 0, 0]]]], [[[[9, 9, 9]]]])

    report = asyncio.run(run())
    assert [s.score for s in report.scores] == ["max_probability", "predictive_entropy", "mutual_information"]


def test_prediction_carries_the_ood_flag():
    for flag in (True, False, None):
        with _mock(lambda r, f=flag: httpx.Response(200, json=_predict_reply(f))) as client:
            ood = client.predict([[[[0, 0, 0]]]]).predictions[0].ood
        assert (ood.score, ood.value, ood.flag) == ("predictive_entropy", 0.67, flag)
        assert ood.threshold == (None if flag is None else 0.5)


def test_cli_predict_shows_the_ood_flag_and_compare_prints_the_table(monkeypatch, capsys, tmp_path):
    import functools

    from clients import CalibClient, cli

    flags = iter([True, None])

    def handler(request):
        if request.url.path.endswith("/predict"):
            return httpx.Response(200, json=_predict_reply(next(flags)))
        if request.url.params.get("format") == "png":
            return httpx.Response(200, content=b"\x89PNG-hist")
        return httpx.Response(200, json=COMPARE_REPLY)

    monkeypatch.setattr(cli, "CalibClient", functools.partial(CalibClient, transport=httpx.MockTransport(handler)))
    img = tmp_path / "cat.png"
    img.write_bytes(b"png")
    assert cli.main(["--model", "m", "predict", str(img)]) == 0
    out = capsys.readouterr().out
    assert "OOD flag" in out and out.splitlines()[-1].endswith("0.6700  OOD")
    assert cli.main(["--model", "m", "predict", str(img)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("0.6700  n/a")

    png = tmp_path / "hist.png"
    assert cli.main(["--model", "m", "compare", str(img), str(img), "--mc-samples", "4", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "mutual_information" in out and "0.9000" in out and "100.0% of suspect flagged" in out
    assert png.read_bytes() == b"\x89PNG-hist"
    assert cli.main(["--model", "m", "compare", str(img), str(img), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == COMPARE_REPLY


def test_cli_compare_service_error_is_one_line(monkeypatch, capsys, tmp_path):
    import functools

    from clients import CalibClient, cli

    reply = {"error": {"code": "missing_batch", "message": "no file in the suspect field(s)", "status": 422}}
    monkeypatch.setattr(cli, "CalibClient", functools.partial(
        CalibClient, transport=httpx.MockTransport(lambda r: httpx.Response(422, json=reply))))
    img = tmp_path / "a.png"
    img.write_bytes(b"png")
    assert cli.main(["--model", "m", "compare", str(img), str(img)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("calib-client: error: [missing_batch] (HTTP 422)") and err.count("\n") == 1
