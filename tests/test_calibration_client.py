"""Client and CLI for recalibration profiles, against an in-process app with its own SQLite
file (an httpx MockTransport forwards each request to the app's TestClient)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from tests.service_helpers import MAX_BODY, MODEL, forward_to
# the client of the prediction-set tests (on this module's `forward`), and their synthetic logits
from tests.test_client_conformal import client, logits_batch  # noqa: F401


@pytest.fixture(scope="module")
def forward(service_model_dir, tmp_path_factory):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(model_dir=service_model_dir, max_body_bytes=MAX_BODY, warmup=False,
                        data_dir=tmp_path_factory.mktemp("data"))
    with TestClient(create_app(settings), raise_server_exceptions=False) as app:
        yield forward_to(app)


def test_model_profile_round_trip_and_use(client, sample_data):
    from clients import CalibrationProfile, ServiceError

    x, y = sample_data.x_test, sample_data.y_test
    profile = client.create_calibration(x, y, method="vector", label="fixture")
    assert isinstance(profile, CalibrationProfile) and profile.model == MODEL and profile.method == "vector"
    assert profile.label == "fixture" and profile.n == 300 and profile.conformal_n == 300
    assert profile.request_id
    assert [p.id for p in client.calibrations(model=MODEL)] == [profile.id]
    assert client.calibration(profile.id, model=MODEL).raw == profile.raw
    result = client.predict(x[:4].tolist(), mc_samples=0, calibration=profile.id, coverage=0.9)
    assert result.raw["calibration"]["id"] == profile.id and all(p.prediction_set for p in result.predictions)
    report = client.evaluate(x, y, calibration=profile.id)
    assert report.raw["after_calibration"]["n"] == 300
    comparison = client.compare(x[:10], x[10:20], calibration=profile.id)
    assert comparison.raw["calibration"]["id"] == profile.id
    client.delete_calibration(profile.id, model=MODEL)
    with pytest.raises(ServiceError) as err:
        client.calibration(profile.id)
    assert (err.value.status, err.value.code) == (404, "unknown_calibration")


def test_logits_profile_and_apply(client, tmp_path):
    from clients import ServiceError

    z, y = logits_batch()
    profile = client.create_logits_calibration(z, y, method="temperature", label="torch")
    assert profile.model is None and profile.n == 120
    path = tmp_path / "logits.npz"
    np.savez(path, logits=z, y=y)
    from_file = client.create_logits_calibration(str(path))
    assert from_file.parameters == profile.parameters
    assert {p.id for p in client.calibrations()} == {profile.id, from_file.id}
    out = client.apply_calibration(profile.id, z[:10], coverage=0.9)
    assert out["n"] == 10 and len(out["prediction_sets"]) == 10
    t = profile.parameters["temperature"]
    expected = np.exp(z[:10] / t) / np.exp(z[:10] / t).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-9)
    with pytest.raises(ServiceError) as err:
        client.create_logits_calibration(z[:5], y[:5])
    assert (err.value.status, err.value.code) == (422, "too_few_images") and err.value.details["minimum"] == 25
    client.delete_calibration(profile.id)
    client.delete_calibration(from_file.id)


def test_cli_profiles(monkeypatch, capsys, tmp_path, forward):
    from clients import CalibClient, cli

    monkeypatch.setattr(cli, "CalibClient", functools.partial(CalibClient, transport=forward))
    z, y = logits_batch(seed=1)
    data = tmp_path / "logits.npz"
    np.savez(data, logits=z, y=y)
    assert cli.main(["--api-key", "", "calibrate", str(data), "--method", "auto", "--label", "cam-B", "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["model"] is None and profile["label"] == "cam-B"
    assert cli.main(["--api-key", "", "calibration", profile["id"]]) == 0
    out = capsys.readouterr().out
    assert f"profile {profile['id']}  model-independent" in out and "cross-fitted" in out
    assert cli.main(["--api-key", "", "calibrations", "--independent"]) == 0
    assert profile["id"] in capsys.readouterr().out
    unlabelled = tmp_path / "new.npz"
    np.savez(unlabelled, logits=z[:3])
    assert cli.main(["--api-key", "", "apply", profile["id"], str(unlabelled), "--coverage", "0.9"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["row", "class", "confidence", "set"] and len(rows) == 4 and "{" in rows[1]
    assert cli.main(["--api-key", "", "delete-calibration", profile["id"]]) == 0
    assert cli.main(["--api-key", "", "calibration", profile["id"]]) == 1
    assert "[unknown_calibration] (HTTP 404)" in capsys.readouterr().err
