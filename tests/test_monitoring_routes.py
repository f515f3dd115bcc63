"""Monitoring and feedback over HTTP, in process (the tiny artifact), on SQLite and PostgreSQL:
what predict records (/v1 and /v2), GET /v1/models/{name}/monitoring with and without feedback,
the timeline, POST /v1/feedback and its errors (404 / 409 / 422, all or nothing), profiles fitted
from feedback, a database that is down (predict still answers, drops counted, monitoring 503),
and CALIB_MONITORING=false."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from models.calibration import monitoring as mstats
from models.calibration.metrics import expected_calibration_error
from tests.service_helpers import MAX_BODY, MODEL, error_of
from tests.storage_fixtures import postgres_schema, postgres_server  # noqa: F401

PREDICT = f"/v1/models/{MODEL}/predict"
MONITORING = f"/v1/models/{MODEL}/monitoring"
TIMELINE = f"/v1/models/{MODEL}/monitoring/timeline"
CALIBRATIONS = f"/v1/models/{MODEL}/calibrations"


def _app(model_dir, **settings):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    options = dict(model_dir=model_dir, max_body_bytes=MAX_BODY, warmup=False, eval_chunk=128,
                   max_instances=64, monitoring_flush_s=0.05, monitoring_gauges_s=0)
    options.update(settings)
    return TestClient(create_app(Settings(**options)), raise_server_exceptions=False)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def client(request, service_model_dir, tmp_path_factory):
    if request.param == "sqlite":
        with _app(service_model_dir, data_dir=tmp_path_factory.mktemp("data")) as c:
            yield c
        return
    engine = request.getfixturevalue("postgres_server")
    with postgres_schema(engine) as url, _app(service_model_dir, database_url=url) as c:
        yield c


@pytest.fixture(autouse=True)
def clean(client):
    from sqlalchemy import delete

    from service.storage.tables import MonitoredPredictionRow, ProfileRow

    client.app.state.monitoring_writer.flush(5)
    repo = client.app.state.calibrations
    repo.ensure_schema()
    with repo.engine.begin() as connection:
        connection.execute(delete(MonitoredPredictionRow))
        connection.execute(delete(ProfileRow))
    client.app.state.profile_cache.__init__()
    yield


@pytest.fixture(scope="module")
def images(sample_data):
    return sample_data.x_test, sample_data.y_test   # 300 real CIFAR-10 images, 30 a class


def _predict(client, x, **params):
    """Predict in batches of 60 (CALIB_MAX_INSTANCES 64); the answers and their request ids."""
    answers = []
    for i in range(0, len(x), 60):
        r = client.post(PREDICT, params={"mc_samples": 0, **params}, json={"instances": x[i:i + 60].tolist()})
        assert r.status_code == 200, r.text
        answers.append((r.headers["X-Request-ID"], r.json()))
    return answers


def _predictions(answers):
    return [p for _, body in answers for p in body["predictions"]]


def _stored(client):
    from sqlalchemy import select

    from service.storage.tables import MonitoredPredictionRow as Row

    client.app.state.monitoring_writer.flush(5)
    with client.app.state.calibrations.engine.connect() as connection:
        return connection.execute(select(Row).order_by(Row.id)).all()


def test_predict_records_numbers_of_each_image(client, images):
    x, _ = images
    r = client.post(PREDICT, params={"mc_samples": 0, "coverage": 0.9}, headers={"X-Request-ID": "call-1"},
                    json={"instances": x[:5].tolist()})
    assert r.status_code == 200
    predictions = r.json()["predictions"]
    ids = [p["prediction_id"] for p in predictions]
    assert len(set(ids)) == 5 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    rows = _stored(client)
    assert [row.prediction_id for row in rows] == ids
    assert {c for c in rows[0]._fields} >= {"confidence", "entropy", "predicted_class", "probabilities", "logits"}
    assert not any("image" in c or "pixel" in c for c in rows[0]._fields)   # numbers only, never images
    for i, (row, p) in enumerate(zip(rows, predictions)):
        assert (row.model_name, row.model_version, row.calibration_id) == (MODEL, "1", None)
        assert (row.request_id, row.batch_index) == ("call-1", i)
        assert row.predicted_class == p["class_index"]
        assert row.confidence == pytest.approx(p["confidence"], rel=1e-6)
        assert row.entropy == pytest.approx(p["ood"]["value"])
        assert row.ood_flag == p["ood"]["flag"]
        assert np.allclose(np.frombuffer(row.probabilities, np.float32), p["probabilities"], atol=1e-7)
        assert row.set_size == len(p["prediction_set"]["indices"]) and row.set_coverage == 0.9
        assert row.created_at is not None and row.label is None


def test_v2_infer_returns_and_records_prediction_ids(client, images):
    x, _ = images
    body = {"inputs": [{"name": "images", "shape": [3, 32, 32, 3], "datatype": "UINT8",
                        "data": x[:3].ravel().tolist()}]}
    r = client.post(f"/v2/models/{MODEL}/infer", json=body, headers={"X-Request-ID": "v2-call"})
    assert r.status_code == 200, r.text
    ids = r.json()["parameters"]["prediction_ids"].split(",")
    assert len(ids) == 3
    rows = _stored(client)
    assert [row.prediction_id for row in rows] == ids and {row.request_id for row in rows} == {"v2-call"}


def test_monitoring_without_feedback(client, images):
    x, _ = images
    predictions = _predictions(_predict(client, x))
    r = client.get(MONITORING, params={"window": "300"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and body["version"] == "1" and body["calibration"]["source"] == "card"
    assert body["window"]["kind"] == "count" and body["window"]["value"] == 300
    assert body["window"]["predictions"] == 300 and body["window"]["start"] <= body["window"]["end"]
    conf = np.array([p["confidence"] for p in predictions])
    est = body["estimated_accuracy"]
    assert est["value"] == pytest.approx(conf.mean(), rel=1e-5)
    assert est["interval"][0] < est["value"] < est["interval"][1]
    reference = client.app.state.registry.get(MODEL).conformal
    ref_entropy = mstats.entropy(reference.probabilities)
    entropy = np.array([p["ood"]["value"] for p in predictions])
    statistic, p_value = sps.ks_2samp(entropy, ref_entropy)
    assert body["entropy_drift"]["test"] == "ks"
    assert body["entropy_drift"]["statistic"] == pytest.approx(statistic, abs=1e-6)
    assert body["entropy_drift"]["p_value"] == pytest.approx(p_value, rel=1e-3, abs=1e-9)
    flags = [p["ood"]["flag"] for p in predictions]
    assert body["ood"]["share"] == pytest.approx(np.mean(flags)) and body["ood"]["expected"] == pytest.approx(0.05)
    assert set(body["class_prior_drift"]) >= {"psi", "chi2", "p_value"}
    drift = body["drift"]
    assert isinstance(drift["status"], bool) and drift["thresholds"]["correction"] == "bonferroni"
    assert drift["thresholds"]["p_value_per_test"] == pytest.approx(0.01 / 3)
    assert body["labelled"]["n"] == 0 and body["labelled"]["accuracy"] is None
    assert body["alert"] == {"status": False, "ece_threshold": 0.05, "min_labelled": 100}
    assert body["reference"] == {"source": "card validation split", "n": reference.n}
    # a smaller window: the newest predictions
    small = client.get(MONITORING, params={"window": "100"}).json()
    assert small["window"]["predictions"] == 100
    assert small["estimated_accuracy"]["value"] == pytest.approx(conf[-100:].mean(), rel=1e-5)
    assert client.get(MONITORING, params={"window": "1h"}).json()["window"]["predictions"] == 300
    # the gauges carry the figures
    text = client.get("/metrics").text
    assert f'calib_monitoring_estimated_accuracy{{calibration="card",model="{MODEL}",version="1"}}' in text


def test_monitoring_with_feedback(client, images):
    x, y = images
    answers = _predict(client, x, coverage=0.9)
    predictions = _predictions(answers)
    half = [{"prediction_id": p["prediction_id"], "label": int(label)}
            for p, label in zip(predictions[:150], y[:150])]
    by_request = [{"request_id": rid, "index": i, "label": int(y[60 * k + i])}
                  for k, (rid, body) in enumerate(answers) if 60 * k >= 150
                  for i in range(len(body["predictions"]))]
    r = client.post("/v1/feedback", json={"feedback": half})
    assert r.status_code == 200, r.text
    assert r.json()["stored"] == 150
    assert r.json()["feedback"][0]["correct"] == (predictions[0]["class_index"] == y[0])
    assert client.post("/v1/feedback", json={"feedback": by_request}).status_code == 200
    labelled = len(half) + len(by_request)
    body = client.get(MONITORING, params={"window": "300"}).json()
    got = body["labelled"]
    p = np.array([q["probabilities"] for q in predictions])
    idx = np.r_[np.arange(150), np.arange(180, 300)]
    assert got["n"] == labelled == len(idx)
    correct = p[idx].argmax(1) == y[idx]
    assert got["accuracy"] == pytest.approx(correct.mean())
    assert got["ece_15"] == pytest.approx(expected_calibration_error(p[idx].max(1), correct, 15), abs=1e-5)
    assert got["nll"] == pytest.approx(-np.mean(np.log(p[idx, y[idx]])), rel=1e-4)
    assert got["estimated_minus_observed"] == pytest.approx(p[idx].max(1).mean() - correct.mean(), abs=1e-5)
    in_set = [int(y[i]) in predictions[i]["prediction_set"]["indices"] for i in idx]
    assert got["coverage"]["target"] == 0.9 and got["coverage"]["observed"] == pytest.approx(np.mean(in_set))
    assert body["alert"]["status"] == (got["ece_15"] > 0.05)
    # the timeline: exactly the dashboard's keys, oldest first
    points = client.get(TIMELINE, params={"bucket": 100, "buckets": 5}).json()["points"]
    assert len(points) == 3 and [pt["predictions"] for pt in points] == [100, 100, 100]
    keys = {"end", "predictions", "estimated_accuracy", "observed_accuracy", "ece_15", "labelled", "drift", "alert"}
    assert all(set(pt) == keys for pt in points)
    assert [pt["labelled"] for pt in points] == [100, 70, 100]   # 150..179 unlabelled
    assert points[0]["end"] <= points[1]["end"] <= points[2]["end"]
    assert points[0]["observed_accuracy"] == pytest.approx(correct[:100].mean())


def test_feedback_errors(client, images):
    x, _ = images
    answers = _predict(client, x[:4])
    rid, body = answers[0]
    ids = [p["prediction_id"] for p in body["predictions"]]
    unknown = client.post("/v1/feedback", json={"feedback": [{"prediction_id": "0" * 32, "label": 1}]})
    error_of(unknown, 404, "unknown_prediction")
    error_of(client.post("/v1/feedback", json={"feedback": [{"request_id": "nope", "index": 0, "label": 1}]}),
             404, "unknown_prediction")
    error_of(client.post("/v1/feedback", json={"feedback": [{"request_id": rid, "index": 9, "label": 1}]}),
             404, "unknown_prediction")
    out_of_range = client.post("/v1/feedback", json={"feedback": [{"prediction_id": ids[0], "label": 10}]})
    error_of(out_of_range, 422, "invalid_label")
    assert out_of_range.json()["error"]["details"] == {"position": 0, "num_classes": 10}
    error_of(client.post("/v1/feedback", json={"feedback": [{"prediction_id": ids[0], "label": -1}]}),
             422, "invalid_label")
    for bad in ({}, {"feedback": []}, {"feedback": [{"prediction_id": ids[0]}]},
                {"feedback": [{"prediction_id": "xyz", "label": 1}]},
                {"feedback": [{"prediction_id": ids[0], "label": True}]},
                {"feedback": [{"prediction_id": ids[0], "request_id": rid, "index": 0, "label": 1}]}):
        error_of(client.post("/v1/feedback", json=bad), 422, "invalid_request")
    error_of(client.post("/v1/feedback", content=b"label=1", headers={"Content-Type": "text/plain"}),
             415, "unsupported_media_type")
    # all or nothing: a good item beside an unknown one is not stored either
    mixed = client.post("/v1/feedback", json={"feedback": [{"prediction_id": ids[1], "label": 2},
                                                          {"prediction_id": "f" * 32, "label": 2}]})
    assert error_of(mixed, 404, "unknown_prediction").startswith("feedback[1]")
    assert mixed.json()["error"]["details"]["position"] == 1
    assert client.post("/v1/feedback", json={"feedback": [{"prediction_id": ids[1], "label": 2}]}).status_code == 200
    # twice: 409, the first label kept (by id, then by request id and index)
    again = client.post("/v1/feedback", json={"feedback": [{"prediction_id": ids[1], "label": 7}]})
    error_of(again, 409, "feedback_exists")
    error_of(client.post("/v1/feedback", json={"feedback": [{"request_id": rid, "index": 1, "label": 7}]}),
             409, "feedback_exists")
    twice_in_one = client.post("/v1/feedback", json={"feedback": [{"prediction_id": ids[2], "label": 3},
                                                                 {"request_id": rid, "index": 2, "label": 3}]})
    error_of(twice_in_one, 409, "feedback_exists")
    labels = {row.prediction_id: row.label for row in _stored(client)}
    assert labels == {ids[0]: None, ids[1]: 2, ids[2]: None, ids[3]: None}
    # JSON Schema counts 3.0 as an integer, so does the service; 3.5 is refused
    error_of(client.post("/v1/feedback", json={"feedback": [{"prediction_id": ids[3], "label": 3.5}]}),
             422, "invalid_request")
    assert client.post("/v1/feedback", json={"feedback": [{"prediction_id": ids[3], "label": 3.0}]}).status_code == 200
    assert {row.prediction_id: row.label for row in _stored(client)}[ids[3]] == 3


def test_feedback_finds_a_prediction_still_in_the_queue(client, images, monkeypatch):
    x, _ = images
    writer = client.app.state.monitoring_writer
    monkeypatch.setattr(writer, "flush_interval_s", 60.0)   # only a flush writes now
    import time

    time.sleep(0.1)  # the writer thread picks up the new interval on its next wait
    prediction_id = _predictions(_predict(client, x[:1]))[0]["prediction_id"]
    r = client.post("/v1/feedback", json={"feedback": [{"prediction_id": prediction_id, "label": 0}]})
    assert r.status_code == 200, r.text


def test_profile_from_feedback(client, images):
    from models.calibration.recalibration import minimum_images

    x, y = images
    predictions = _predictions(_predict(client, x))
    need = minimum_images("temperature", 10)
    few = [{"prediction_id": p["prediction_id"], "label": int(label)} for p, label in zip(predictions, y[:need - 1])]
    assert client.post("/v1/feedback", json={"feedback": few}).status_code == 200
    too_few = client.post(CALIBRATIONS, params={"from": "feedback"})
    error_of(too_few, 422, "too_few_images")
    assert too_few.json()["error"]["details"]["minimum"] == need
    rest = [{"prediction_id": p["prediction_id"], "label": int(label)}
            for p, label in zip(predictions[need - 1:], y[need - 1:])]
    assert client.post("/v1/feedback", json={"feedback": rest}).status_code == 200
    error_of(client.post(CALIBRATIONS, params={"from": "feedback", "since": "yesterday"}), 422, "invalid_parameter")
    error_of(client.post(CALIBRATIONS, params={"since": "1h"}), 422, "invalid_parameter")
    error_of(client.post(CALIBRATIONS, params={"from": "feedback"}, json={"instances": []}), 422, "invalid_request")
    r = client.post(CALIBRATIONS, params={"from": "feedback", "since": "1h", "label": "from feedback"})
    assert r.status_code == 201, r.text
    profile = r.json()
    assert profile["n"] == 300 and profile["method"] == "temperature" and profile["label"] == "from feedback"
    # the profile's temperature is fitted on the raw logits: the same as a fit on the stored logits
    from sqlalchemy import select

    from models.calibration.recalibration import fit_calibrator
    from service.storage.tables import MonitoredPredictionRow as Row

    with client.app.state.calibrations.engine.connect() as connection:
        rows = connection.execute(select(Row.logits, Row.label).order_by(Row.id)).all()
    z = np.stack([np.frombuffer(r.logits, np.float32) for r in rows]).astype(np.float64)
    expected = fit_calibrator(z, np.array([r.label for r in rows]), "temperature")
    assert profile["parameters"]["temperature"] == pytest.approx(expected.parameters["temperature"], rel=1e-6)
    # serve with it, and monitor what it served against its own reference
    used = _predict(client, x[:60], calibration=profile["id"])
    assert used[0][1]["calibration"]["id"] == profile["id"]
    body = client.get(MONITORING, params={"calibration": profile["id"]}).json()
    assert body["calibration"]["id"] == profile["id"] and body["window"]["predictions"] == 60
    assert body["reference"]["source"].startswith("profile") and body["reference"]["n"] == 300
    # nothing labelled in the future
    error_of(client.post(CALIBRATIONS, params={"from": "feedback", "since": "2999-01-01T00:00:00"}),
             422, "too_few_images")


def test_monitoring_query_errors(client):
    error_of(client.get(MONITORING, params={"window": "abc"}), 422, "invalid_parameter")
    error_of(client.get(MONITORING, params={"window": "0"}), 422, "invalid_parameter")
    error_of(client.get("/v1/models/nope/monitoring"), 404, "unknown_model")
    error_of(client.get(MONITORING, params={"calibration": "5b0f3c2e-8d1a-4d44-9c3e-0a1b2c3d4e5f"}),
             404, "unknown_calibration")
    error_of(client.get(TIMELINE, params={"bucket": 100000, "buckets": 100}), 422, "invalid_parameter")
    empty = client.get(MONITORING).json()
    assert empty["window"]["predictions"] == 0 and empty["estimated_accuracy"] is None
    assert empty["drift"]["status"] is False and client.get(TIMELINE).json() == {"points": []}


def test_a_database_that_is_down(service_model_dir, images):
    """Predict answers (with ids) and the drops are counted; monitoring and feedback answer 503."""
    x, _ = images
    url = "postgresql+psycopg://nobody@127.0.0.1:1/none"   # nothing listens on port 1
    with _app(service_model_dir, database_url=url, database_timeout_s=1) as client:
        r = client.post(PREDICT, params={"mc_samples": 0}, json={"instances": x[:3].tolist()})
        assert r.status_code == 200
        ids = [p["prediction_id"] for p in r.json()["predictions"]]
        assert all(ids)
        client.app.state.monitoring_writer.flush(10)
        metrics = client.get("/metrics").text
        assert 'calib_monitoring_rows_dropped_total{reason="storage_unavailable"} 3.0' in metrics
        error_of(client.get(MONITORING), 503, "storage_unavailable")
        error_of(client.post("/v1/feedback", json={"feedback": [{"prediction_id": ids[0], "label": 1}]}),
                 503, "storage_unavailable")


def test_monitoring_off(service_model_dir, images, tmp_path):
    x, _ = images
    with _app(service_model_dir, data_dir=tmp_path, monitoring=False) as client:
        r = client.post(PREDICT, params={"mc_samples": 0}, json={"instances": x[:2].tolist()})
        assert r.status_code == 200
        assert [p["prediction_id"] for p in r.json()["predictions"]] == [None, None]
        assert "prediction_ids" not in client.post(
            f"/v2/models/{MODEL}/infer", json={"inputs": [{"name": "images", "shape": [1, 32, 32, 3],
                                                           "datatype": "UINT8", "data": x[0].ravel().tolist()}]}
        ).json()["parameters"]
        error_of(client.get(MONITORING), 409, "monitoring_disabled")
        error_of(client.get(TIMELINE), 409, "monitoring_disabled")
        error_of(client.post("/v1/feedback", json={"feedback": [{"prediction_id": "0" * 32, "label": 1}]}),
                 409, "monitoring_disabled")


def test_scopes(service_model_dir, images, tmp_path):
    """Monitoring and feedback need a read key; a profile from feedback an admin key."""
    x, y = images
    with _app(service_model_dir, data_dir=tmp_path, api_keys="read-1", admin_api_keys="admin-1") as client:
        assert client.get(MONITORING).status_code == 401
        assert client.post("/v1/feedback", json={"feedback": []}).status_code == 401
        read = {"Authorization": "Bearer read-1"}
        assert client.get(MONITORING, headers=read).status_code == 200
        r = client.post(PREDICT, params={"mc_samples": 0}, headers=read, json={"instances": x[:1].tolist()})
        pid = r.json()["predictions"][0]["prediction_id"]
        assert client.post("/v1/feedback", headers=read,
                           json={"feedback": [{"prediction_id": pid, "label": int(y[0])}]}).status_code == 200
        error_of(client.post(CALIBRATIONS, params={"from": "feedback"}, headers=read), 403, "forbidden")
        error_of(client.post(CALIBRATIONS, params={"from": "feedback"}, headers={"Authorization": "Bearer admin-1"}),
                 422, "too_few_images")
