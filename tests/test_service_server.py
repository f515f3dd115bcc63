"""End to end over real HTTP: the Docker CMD's serve command under uvicorn on a loopback port,
driven by the Python clients (sync and async), the CLI and the curl script. The ECE in every
HTTP report must equal `compute_metrics` on logits computed in-process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.calibration import compute_metrics
from service.__main__ import SERVE_COMMAND
from tests.service_helpers import BROKEN, MODEL, npz_bytes, png_bytes

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(service_model_dir, tmp_path_factory):
    """The shipped serve command (SERVE_COMMAND, the Dockerfile's CMD) on a free loopback port."""
    from benchmarks.server_process import ServerError, ServerProcess

    assert SERVE_COMMAND[0] == "python"
    log = tmp_path_factory.mktemp("server") / "server.log"
    try:
        with ServerProcess(service_model_dir, log_path=log, ready_timeout=120) as running:
            yield running.url
    except ServerError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def reference(split_classifier, sample_data):
    clf, card = split_classifier
    logits = clf.logits(sample_data.x_test)
    return {"after": compute_metrics(logits, sample_data.y_test, temperature=card["temperature"]),
            "before": compute_metrics(logits, sample_data.y_test, temperature=1.0)}


@pytest.fixture(scope="module")
def val_npz(tmp_path_factory, sample_data) -> Path:
    path = tmp_path_factory.mktemp("data") / "val.npz"
    path.write_bytes(npz_bytes(x=sample_data.x_test, y=sample_data.y_test))
    return path


@pytest.fixture(scope="module")
def png_files(tmp_path_factory, sample_data) -> list[Path]:
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i in range(3):
        paths.append(folder / f"img{i}.png")
        paths[-1].write_bytes(png_bytes(sample_data.x_test[i]))
    return paths


def test_python_client(server, val_npz, png_files, reference, sample_data, split_classifier):
    from clients import CalibClient, ServiceError

    with CalibClient(server) as client:
        assert client.ready()["models"] == [MODEL]
        assert [m.name for m in client.models()] == [MODEL] and client.model == MODEL
        result = client.predict([str(p) for p in png_files], mc_samples=30, seed=2, return_logits=True)
        assert len(result.predictions) == 3 and result.mc_samples == 30 and result.seed == 2
        np.testing.assert_allclose([p.logits for p in result.predictions],
                                   split_classifier[0].logits(sample_data.x_test[:3]), rtol=1e-5, atol=1e-5)
        assert all(p.uncertainty.n_samples == 30 for p in result.predictions)

        report = client.evaluate(str(val_npz), bins=15, fit_temperature=True)
        assert report.n == len(sample_data.y_test)
        assert report.after.ece == pytest.approx(reference["after"].ece, abs=1e-6)
        assert report.before.ece == pytest.approx(reference["before"].ece, abs=1e-6)
        assert report.after.nll == pytest.approx(reference["after"].nll, abs=1e-6)
        assert report.fitted_temperature is not None

        arrays = client.evaluate(sample_data.x_test, sample_data.y_test)  # in-memory npz
        assert arrays.after.ece == pytest.approx(reference["after"].ece, abs=1e-6)
        assert client.reliability_diagram(str(val_npz)).startswith(b"\x89PNG")

        with pytest.raises(ServiceError) as err:
            client.predict([str(png_files[0])], model="nope")
        assert err.value.status == 404 and err.value.code == "unknown_model"
        with pytest.raises(ServiceError) as err:
            client.evaluate(sample_data.x_test[:4], [0, 1, 2, 99])
        assert err.value.code == "label_out_of_range"


def test_async_client_concurrent(server, png_files, sample_data):
    from clients import AsyncCalibClient

    async def run():
        async with AsyncCalibClient(server, model=MODEL) as client:
            results = await asyncio.gather(*[client.predict(sample_data.x_test[i].tolist(), seed=1)
                                             for i in range(8)])
            live = await client.live()
        return results, live

    results, live = asyncio.run(run())
    assert live == {"status": "alive"} and all(len(r.predictions) == 1 for r in results)


def test_cli(server, val_npz, png_files, reference, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "clients", "--url", server, *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    out = cli("models")
    assert out.returncode == 0 and MODEL in out.stdout
    out = cli("predict", *map(str, png_files), "--mc-samples", "20", "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert "img0.png" in out.stdout and "MI" in out.stdout
    png = tmp_path / "diagram.png"
    out = cli("evaluate", str(val_npz), "--json", "--png", str(png))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["after_temperature"]["ece"] == pytest.approx(reference["after"].ece, abs=1e-6)
    assert png.read_bytes().startswith(b"\x89PNG")
    out = cli("evaluate", str(val_npz), "--fit-temperature")
    assert out.returncode == 0 and "ece" in out.stdout and "fitted T=" in out.stdout
    out = cli("--model", "nope", "predict", str(png_files[0]))
    assert out.returncode == 1 and "[unknown_model]" in out.stderr


def test_cli_evaluates_a_folder_tree(server, tmp_path, sample_data, split_classifier):
    classes = split_classifier[1]["classes"]
    for i in range(40):
        folder = tmp_path / "tree" / classes[sample_data.y_test[i]]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.png").write_bytes(png_bytes(sample_data.x_test[i]))
    out = subprocess.run([sys.executable, "-m", "clients", "--url", server, "evaluate", str(tmp_path / "tree"),
                          "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    clf, card = split_classifier
    ref = compute_metrics(clf.logits(sample_data.x_test[:40]), sample_data.y_test[:40],
                          temperature=card["temperature"])
    assert json.loads(out.stdout)["after_temperature"]["ece"] == pytest.approx(ref.ece, abs=1e-6)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_script(server, sample_archive, reference, tmp_path):
    env = {**os.environ, "CALIB_URL": server, "SPLIT": "test"}
    out = subprocess.run(["bash", str(REPO / "clients" / "evaluate_with_curl.sh"), str(sample_archive),
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == MODEL
    assert report["after_temperature"]["ece"] == pytest.approx(reference["after"].ece, abs=1e-6)
    assert report["fitted_temperature"] is not None
    assert (tmp_path / "diagram.png").read_bytes().startswith(b"\x89PNG")
    bad = subprocess.run(["bash", str(REPO / "clients" / "evaluate_with_curl.sh"), str(REPO / "pyproject.toml"),
                          str(tmp_path / "bad")], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "missing_labels" in bad.stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_script_target_accuracy_and_risk_coverage_png(server, sample_archive, tmp_path):
    env = {**os.environ, "CALIB_URL": server, "SPLIT": "test", "FIT_TEMPERATURE": "false",
           "TARGET_ACCURACY": "0.3", "RISK_COVERAGE_PNG": "true"}
    out = subprocess.run(["bash", str(REPO / "clients" / "evaluate_with_curl.sh"), str(sample_archive),
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    selective = json.loads((tmp_path / "report.json").read_text())["selective"]
    assert selective["target"]["target_accuracy"] == 0.3
    assert f'selective: "aurc":{selective["aurc"]}' in out.stdout
    assert 'selective: "target":{"target_accuracy":0.3,' in out.stdout
    assert (tmp_path / "risk_coverage.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "risk_coverage.png").read_bytes() != (tmp_path / "diagram.png").read_bytes()
    env["TARGET_ACCURACY"] = "1.5"
    bad = subprocess.run(["bash", str(REPO / "clients" / "evaluate_with_curl.sh"), str(sample_archive),
                          str(tmp_path / "bad")], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "invalid_parameter" in bad.stderr and "target_accuracy" in bad.stderr


def test_server_readiness_reports_skipped_artifact(server):
    import httpx

    body = httpx.get(f"{server}/health/ready").json()
    assert body["models"] == [MODEL] and body["failed"][0]["path"].endswith(BROKEN)
    assert "calib_http_requests_total" in httpx.get(f"{server}/metrics").text
