"""Client and CLI for prediction sets and /v1/calibration/evaluate, against the in-process app
(an httpx MockTransport forwards each request to the TestClient of tests/conftest.py)."""

from __future__ import annotations

import functools
import io
import json

import numpy as np
import pytest

from tests.service_helpers import MODEL, forward_to


@pytest.fixture(scope="module")
def forward(app_client):
    return forward_to(app_client)


@pytest.fixture()
def client(forward):
    from clients import CalibClient

    with CalibClient("http://svc", model=MODEL, transport=forward, api_key="") as c:
        yield c


def logits_batch(n=120, k=5, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, k))
    return z, z.argmax(axis=1) * (rng.random(n) < 0.7)


def test_predict_and_evaluate_with_coverage(client, sample_data):
    x, y = sample_data.x_test[:12], sample_data.y_test[:12]
    result = client.predict(x.tolist(), mc_samples=0, coverage=0.8, conformal_method="aps", mondrian=True)
    for p in result.predictions:
        s = p.prediction_set
        assert (s.coverage, s.method, s.mondrian) == (0.8, "aps", True)
        assert s.labels == [result.classes[i] for i in s.indices]
    report = client.evaluate(x, y, coverage=[0.7, 0.9], conformal_method="lac")
    assert [(r.coverage_target, r.method) for r in report.conformal] == [(0.7, "lac"), (0.9, "lac")]
    assert client.evaluate(x, y).conformal == []


def test_calibrate_evaluate_arrays_lists_and_npz(client, tmp_path):
    from clients import ServiceError

    z, y = logits_batch()
    from_arrays = client.calibrate_evaluate(z, y, fit_temperature=True, coverage=0.9, seed=1)
    assert from_arrays.kind == "logits" and from_arrays.num_classes == 5
    assert from_arrays.fitted_temperature is not None and from_arrays.split["seed"] == 1
    assert [r.method for r in from_arrays.conformal] == ["lac", "aps", "raps"]
    from_lists = client.calibrate_evaluate(z.tolist(), y.tolist(), fit_temperature=True, coverage=0.9, seed=1)
    assert from_lists.uploaded == from_arrays.uploaded and from_lists.conformal == from_arrays.conformal

    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    path = tmp_path / "probs.npz"
    np.savez(path, probs=p, y=y)
    from_file = client.calibrate_evaluate(str(path))
    assert from_file.kind == "probabilities"
    assert from_file.uploaded.nll == pytest.approx(from_arrays.uploaded.nll)
    assert client.calibration_diagram(str(path), fit_temperature=True)[:4] == b"\x89PNG"

    with pytest.raises(ServiceError) as err:
        client.calibrate_evaluate(z, np.where(y == 0, 7, y))
    assert (err.value.status, err.value.code) == (422, "label_out_of_range")


def test_cli_calibrate_evaluate(monkeypatch, capsys, tmp_path, forward):
    from clients import CalibClient, cli

    monkeypatch.setattr(cli, "CalibClient", functools.partial(CalibClient, transport=forward))
    z, y = logits_batch()
    path = tmp_path / "logits.npz"
    buf = io.BytesIO()
    np.savez(buf, logits=z, y=y)
    path.write_bytes(buf.getvalue())
    png = tmp_path / "rel.png"
    assert cli.main(["--api-key", "", "calibrate-evaluate", str(path), "--coverage", "0.9", "--coverage", "0.8",
                     "--conformal-method", "lac", "--fit-temperature", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "logits  N=120  K=5" in out and "fitted T=" in out
    assert "split conformal: seed 0, 60 rows set the thresholds, 60 are measured" in out
    assert "    80%     lac" in out and "    90%     lac" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["--api-key", "", "calibrate-evaluate", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["conformal"] is None
    assert cli.main(["--api-key", "", "calibrate-evaluate", str(path), "--coverage", "1.5"]) == 1
    assert "[invalid_coverage]" in capsys.readouterr().err


def test_cli_predict_prints_the_sets(monkeypatch, capsys, tmp_path, forward, sample_data):
    from clients import CalibClient, cli

    monkeypatch.setattr(cli, "CalibClient", functools.partial(CalibClient, transport=forward))
    path = tmp_path / "x.npy"
    np.save(path, sample_data.x_test[:3])
    assert cli.main(["--api-key", "", "--model", MODEL, "predict", str(path), "--mc-samples", "0",
                     "--coverage", "0.9"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("prediction sets: coverage 0.9, lac")
    assert all("{" in line for line in out[2:5])
