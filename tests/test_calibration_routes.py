"""Recalibration profiles over HTTP, in process (the tiny artifact), on SQLite and on the real
PostgreSQL: create from every input form, list / get / delete, `calibration=<id>` on predict and
evaluate, model-independent profiles from logits and their apply route, the admin scope, and
every bad-input case of issue 24 that concerns profiles (status and code checked)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from models.calibration import softmax
from models.calibration.recalibration import Calibrator, minimum_images
from service.storage import NewProfile
from tests.service_helpers import MAX_BODY, MODEL, error_of, npz_bytes, png_bytes
from tests.storage_fixtures import postgres_schema, postgres_server  # noqa: F401

CALIBRATIONS = f"/v1/models/{MODEL}/calibrations"
PREDICT = f"/v1/models/{MODEL}/predict"
EVALUATE = f"/v1/models/{MODEL}/evaluate"
READ_KEY, ADMIN_KEY = "read-key-1", "admin-key-1"


def _app(model_dir, **settings):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    return TestClient(create_app(Settings(model_dir=model_dir, max_body_bytes=MAX_BODY, warmup=False,
                                          eval_chunk=128, **settings)), raise_server_exceptions=False)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def client(request, service_model_dir, tmp_path_factory):
    if request.param == "sqlite":
        with _app(service_model_dir, data_dir=tmp_path_factory.mktemp("data"), max_calibrations=50) as c:
            yield c
        return
    engine = request.getfixturevalue("postgres_server")
    with postgres_schema(engine) as url, _app(service_model_dir, database_url=url, max_calibrations=50) as c:
        yield c


@pytest.fixture(autouse=True)
def clean(client):
    """Each test starts with no profile (the limit and the counts are the test's own)."""
    from sqlalchemy import delete

    from service.storage.tables import ProfileRow

    repo = client.app.state.calibrations
    repo.ensure_schema()
    with repo.engine.begin() as connection:
        connection.execute(delete(ProfileRow))
    client.app.state.profile_cache.__init__()
    yield


@pytest.fixture(scope="module")
def labelled(sample_data):
    return sample_data.x_test, sample_data.y_test   # 300 images, 30 a class


@pytest.fixture(scope="module")
def logits_batch():
    """Over-confident synthetic logits of a 4-class classifier (30% of the labels flipped)."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 4)) * 4
    y = z.argmax(1)
    flip = rng.random(400) < 0.3
    y[flip] = rng.integers(0, 4, int(flip.sum()))
    return z, y


def _create(client, x, y, **params):
    r = client.post(CALIBRATIONS, params=params, files={"file": ("batch.npz", npz_bytes(x=x, y=y))})
    assert r.status_code == 201, r.text
    return r.json()


def _count(client) -> int:
    return client.app.state.calibrations.count()


# --- create, list, get, delete --------------------------------------------------------------------

def test_create_a_model_profile_from_an_npz(client, labelled):
    x, y = labelled
    r = client.post(CALIBRATIONS, params={"label": "fixture test split"},
                    files={"file": ("batch.npz", npz_bytes(x=x, y=y))})
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["location"] == f"{CALIBRATIONS}/{body['id']}"
    model = client.app.state.registry.get(MODEL)
    assert body["model"] == {"name": MODEL, "sha256": model.card["model_sha256"]}
    assert body["method"] == "temperature" and body["parameters"]["temperature"] > 0
    assert body["label"] == "fixture test split" and body["n"] == 300 and body["num_classes"] == 10
    assert len(body["data_sha256"]) == 64 and body["created_at"].endswith("Z")
    report = body["report"]
    assert report["folds"] == 5 and report["n"] == 300
    for part in ("before", "after"):
        assert set(report[part]) == {"nll", "ece_15", "brier", "accuracy"}
    assert body["conformal"]["n"] == 300 and sum(body["conformal"]["class_counts"]) == 300
    assert client.get(f"{CALIBRATIONS}/{body['id']}").json() == body
    assert client.get(f"/v1/calibrations/{body['id']}").json() == body
    listed = client.get(CALIBRATIONS).json()
    assert listed["count"] == 1 and listed["calibrations"] == [body] and listed["limit"] == 50
    assert client.get("/v1/calibrations").json()["count"] == 0   # model-independent ones only


def test_the_same_batch_as_json_and_as_an_archive_gives_the_same_profile(client, labelled):
    x, y = labelled[0][:60], labelled[1][:60]
    from_npz = _create(client, x, y)
    r = client.post(CALIBRATIONS, json={"instances": x.tolist(), "labels": y.tolist()})
    assert r.status_code == 201, r.text
    from_json = r.json()
    classes = client.app.state.registry.get(MODEL).classes
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i, (image, label) in enumerate(zip(x, y)):
            data = png_bytes(image)
            info = tarfile.TarInfo(f"{classes[label]}/{i:04d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    r = client.post(CALIBRATIONS, files={"file": ("batch.tar.gz", buf.getvalue())})
    assert r.status_code == 201, r.text
    from_archive = r.json()
    assert from_npz["data_sha256"] == from_json["data_sha256"]
    assert from_npz["parameters"] == from_json["parameters"]
    assert from_archive["n"] == 60   # the archive's order is by class folder: another digest, same images
    np.testing.assert_allclose(from_archive["parameters"]["temperature"], from_npz["parameters"]["temperature"],
                               rtol=1e-6)
    assert len({from_npz["id"], from_json["id"], from_archive["id"]}) == 3 and _count(client) == 3


@pytest.mark.parametrize("method", ["vector", "dirichlet", "auto"])
def test_every_method(client, labelled, method):
    x, y = labelled
    need = minimum_images(method, 10, 5)   # dirichlet: K^2 + K = 110 parameters, 5 images each per fit
    copies = -(-need // len(x))
    x, y = np.concatenate([x] * copies), np.concatenate([y] * copies)
    body = _create(client, x, y, method=method, folds=5)
    assert body["method"] in ("temperature", "vector", "dirichlet")
    if method != "auto":
        assert body["method"] == method
    else:
        assert body["report"]["auto"]["choice"] == body["method"]
    Calibrator.from_parameters(body["method"], body["parameters"])   # what is stored rebuilds


def test_delete_is_204_then_404(client, labelled):
    body = _create(client, *labelled)
    r = client.delete(f"{CALIBRATIONS}/{body['id']}")
    assert r.status_code == 204 and r.content == b""
    error_of(client.get(f"{CALIBRATIONS}/{body['id']}"), 404, "unknown_calibration")
    error_of(client.delete(f"{CALIBRATIONS}/{body['id']}"), 404, "unknown_calibration")
    error_of(client.delete(f"/v1/calibrations/{body['id']}"), 404, "unknown_calibration")
    assert _count(client) == 0


def test_profiles_are_immutable(client, labelled):
    body = _create(client, *labelled)
    for method in ("put", "patch"):
        r = getattr(client, method)(f"{CALIBRATIONS}/{body['id']}", json={"label": "changed"})
        assert r.status_code == 405
    assert client.get(f"{CALIBRATIONS}/{body['id']}").json() == body


# --- calibration=<id> on predict and evaluate ------------------------------------------------------

def test_predict_with_a_profile_uses_it_everywhere(client, labelled, split_classifier):
    clf, card = split_classifier
    x, y = labelled
    profile = _create(client, x, y)
    t_profile = profile["parameters"]["temperature"]
    images = x[:6].tolist()
    r = client.post(PREDICT, params={"calibration": profile["id"], "mc_samples": 20, "seed": 3,
                                     "return_logits": True}, json={"instances": images})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["calibration"] == {"id": profile["id"], "method": "temperature", "source": "profile"}
    logits = np.array([p["logits"] for p in body["predictions"]])
    probs = np.array([p["probabilities"] for p in body["predictions"]])
    np.testing.assert_allclose(probs, softmax(logits, t_profile), atol=1e-6)
    # MC: the per-sample probabilities calibrated by the profile = the card's path at the profile's T
    features = clf.features(np.asarray(x[:6]))
    expected = clf.mc_summary_from_features(features, 20, 3, t_profile)
    np.testing.assert_allclose([p["uncertainty"]["mean"] for p in body["predictions"]], expected.mean, atol=1e-5)
    np.testing.assert_allclose([p["uncertainty"]["mutual_information"] for p in body["predictions"]],
                               expected.mutual_information, atol=1e-5)
    entropy = -(probs * np.log(np.clip(probs, 1e-300, None))).sum(1)
    np.testing.assert_allclose([p["ood"]["value"] for p in body["predictions"]], entropy, atol=1e-5)
    plain = client.post(PREDICT, params={"mc_samples": 0}, json={"instances": images}).json()
    assert plain["calibration"] == {"id": None, "method": "temperature", "source": "card"}
    np.testing.assert_allclose([p["probabilities"] for p in plain["predictions"]],
                               softmax(logits, card["temperature"]), atol=1e-6)


def test_evaluate_with_a_profile(client, labelled):
    x, y = labelled
    profile = _create(client, x, y, method="vector")
    r = client.post(EVALUATE, params={"calibration": profile["id"]}, files={"file": ("b.npz", npz_bytes(x=x, y=y))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["calibration"]["id"] == profile["id"] and body["calibration"]["method"] == "vector"
    assert body["after_calibration"]["n"] == 300
    # fitted on this very batch: its in-sample NLL cannot be worse than the uncalibrated softmax's
    assert body["after_calibration"]["nll"] <= body["before_temperature"]["nll"] + 1e-9
    plain = client.post(EVALUATE, files={"file": ("b.npz", npz_bytes(x=x, y=y))}).json()
    assert plain["calibration"]["source"] == "card" and plain["after_calibration"] is None


def test_a_deleted_profile_is_not_used_from_the_cache(client, labelled):
    profile = _create(client, *labelled)
    images = {"instances": labelled[0][:2].tolist()}
    assert client.post(PREDICT, params={"calibration": profile["id"], "mc_samples": 0}, json=images).status_code == 200
    assert client.delete(f"/v1/calibrations/{profile['id']}").status_code == 204
    error_of(client.post(PREDICT, params={"calibration": profile["id"], "mc_samples": 0}, json=images),
             404, "unknown_calibration")


# --- model-independent profiles ---------------------------------------------------------------------

def test_model_independent_profile_from_logits_json_and_npz(client, logits_batch):
    z, y = logits_batch
    r = client.post("/v1/calibrations", params={"label": "torch resnet", "method": "auto"},
                    json={"logits": z.tolist(), "labels": y.tolist()})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["model"] is None and body["num_classes"] == 4 and body["n"] == 400
    assert r.headers["location"] == f"/v1/calibrations/{body['id']}"
    # over-confident logits: the cross-fitted NLL improves on the plain softmax's
    assert body["report"]["after"]["nll"] < body["report"]["before"]["nll"]
    r2 = client.post("/v1/calibrations", params={"method": "auto"},
                     files={"file": ("l.npz", npz_bytes(logits=z.astype(np.float32), y=y))})
    assert r2.status_code == 201, r2.text
    assert r2.json()["data_sha256"] != body["data_sha256"]   # float32 upload: other bytes, stated honestly
    probs = softmax(z, 1.0)
    r3 = client.post("/v1/calibrations", files={"file": ("p.npz", npz_bytes(probs=probs, y=y))})
    assert r3.status_code == 201, r3.text
    np.testing.assert_allclose(r3.json()["report"]["before"]["nll"], body["report"]["before"]["nll"], rtol=1e-6)
    listed = client.get("/v1/calibrations").json()
    assert listed["count"] == 3 and client.get(CALIBRATIONS).json()["count"] == 0
    assert client.get(f"/v1/calibrations/{body['id']}").json() == body


def test_apply_gives_calibrated_probabilities_and_sets(client, logits_batch):
    z, y = logits_batch
    body = client.post("/v1/calibrations", params={"method": "vector"},
                       json={"logits": z.tolist(), "labels": y.tolist()}).json()
    calibrator = Calibrator.from_parameters(body["method"], body["parameters"])
    r = client.post(f"/v1/calibrations/{body['id']}/apply", params={"coverage": 0.9, "conformal_method": "aps"},
                    json={"logits": z[:50].tolist()})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["calibration"] == {"id": body["id"], "method": "vector", "source": "profile"} and out["n"] == 50
    np.testing.assert_allclose(out["probabilities"], calibrator.probabilities(z[:50]), atol=1e-9)
    sets = out["prediction_sets"]
    assert len(sets) == 50 and all(s["coverage"] == 0.9 and s["method"] == "aps" for s in sets)
    wider = client.post(f"/v1/calibrations/{body['id']}/apply", params={"coverage": 0.99, "conformal_method": "aps"},
                        json={"logits": z[:50].tolist()}).json()["prediction_sets"]
    assert all(set(a["indices"]) <= set(b["indices"]) for a, b in zip(sets, wider))   # nested in coverage
    no_sets = client.post(f"/v1/calibrations/{body['id']}/apply", json={"logits": z[:5].tolist()}).json()
    assert no_sets["prediction_sets"] is None


# --- bad input: status and code ---------------------------------------------------------------------

def test_unknown_profile_is_404_everywhere(client, labelled):
    missing = "5b0f3c2e-8d1a-4d44-9c3e-0a1b2c3d4e5f"
    images = {"instances": labelled[0][:1].tolist()}
    for response in (client.get(f"{CALIBRATIONS}/{missing}"), client.get(f"/v1/calibrations/{missing}"),
                     client.get(f"/v1/calibrations/not-an-id"),
                     client.post(PREDICT, params={"calibration": missing}, json=images),
                     client.post(EVALUATE, params={"calibration": "nope"},
                                 json={**images, "labels": [0]}),
                     client.post(f"/v1/calibrations/{missing}/apply", json={"logits": [[0.0, 1.0]]})):
        error_of(response, 404, "unknown_calibration")


def test_a_profile_of_another_model_is_409(client, labelled, logits_batch):
    z, y = logits_batch
    free = client.post("/v1/calibrations", json={"logits": z.tolist(), "labels": y.tolist()}).json()
    images = {"instances": labelled[0][:1].tolist()}
    error_of(client.post(PREDICT, params={"calibration": free["id"]}, json=images), 409, "calibration_model_mismatch")
    error_of(client.get(f"{CALIBRATIONS}/{free['id']}"), 409, "calibration_model_mismatch")
    error_of(client.delete(f"{CALIBRATIONS}/{free['id']}"), 409, "calibration_model_mismatch")
    other = client.app.state.calibrations.create(NewProfile(
        model_name="another-model", model_sha256="1" * 64, num_classes=10, method="temperature",
        parameters={"temperature": 2.0}, n=100, data_sha256="2" * 64, report={}))
    msg = error_of(client.post(PREDICT, params={"calibration": other.id}, json=images), 409,
                   "calibration_model_mismatch")
    assert "another-model" in msg
    assert _count(client) == 2   # nothing deleted through the wrong model's path


def test_a_profile_of_an_older_version_of_the_model_is_409(client, labelled):
    stale = client.app.state.calibrations.create(NewProfile(
        model_name=MODEL, model_sha256="0" * 64, num_classes=10, method="temperature",
        parameters={"temperature": 2.0}, n=100, data_sha256="2" * 64, report={}))
    images = {"instances": labelled[0][:1].tolist()}
    msg = error_of(client.post(PREDICT, params={"calibration": stale.id}, json=images), 409,
                   "calibration_model_changed")
    assert "000000000000" in msg and "fit a new profile" in msg
    error_of(client.post(EVALUATE, params={"calibration": stale.id}, json={**images, "labels": [1]}), 409,
             "calibration_model_changed")
    assert client.get(CALIBRATIONS).json()["count"] == 0   # the served version's profiles only
    listed = client.get(CALIBRATIONS, params={"all_versions": True}).json()
    assert [p["id"] for p in listed["calibrations"]] == [stale.id]   # kept: its sha256 says which version


@pytest.mark.parametrize("method,folds", [("temperature", 5), ("vector", 5), ("temperature", 10)])
def test_too_few_images_names_the_minimum_and_stores_nothing(client, labelled, method, folds):
    need = minimum_images(method, 10, folds)
    x, y = labelled[0][:need - 1], labelled[1][:need - 1]
    r = client.post(CALIBRATIONS, params={"method": method, "folds": folds},
                    files={"file": ("b.npz", npz_bytes(x=x, y=y))})
    msg = error_of(r, 422, "too_few_images")
    assert str(need) in msg and r.json()["error"]["details"]["minimum"] == need
    z = np.random.default_rng(1).normal(size=(need - 1, 10))
    r = client.post("/v1/calibrations", params={"method": method, "folds": folds},
                    json={"logits": z.tolist(), "labels": (np.arange(need - 1) % 10).tolist()})
    assert error_of(r, 422, "too_few_images") and r.json()["error"]["details"]["minimum"] == need
    assert _count(client) == 0


@pytest.mark.parametrize("payload,code", [
    ({"logits": [[0.0, float("nan")], [1.0, 0.0]] * 20, "labels": [0, 1] * 20}, "non_finite_value"),
    ({"logits": [[0.0, 1.0], [1.0, 0.0]] * 20, "labels": [0, 1] * 19}, "length_mismatch"),
    ({"logits": [[0.0, 1.0], [1.0, 0.0]] * 20, "labels": [0, 2] * 20}, "label_out_of_range"),
    ({"logits": [[0.0, 1.0, 2.0]] * 40, "labels": [-1] + [0] * 39}, "label_out_of_range"),
    ({"probabilities": [[0.5, 0.6]] * 40, "labels": [0] * 40}, "invalid_probabilities"),
    ({"logits": [[1.0]] * 40, "labels": [0] * 40}, "invalid_shape"),
    ({"logits": [[0.0, 1.0]] * 40}, "missing_labels"),
    ({"logits": [[0.0, 1.0]] * 40, "probabilities": [[0.5, 0.5]] * 40, "labels": [0] * 40}, "invalid_request"),
    ({"labels": [0] * 40}, "invalid_request"),
])
def test_bad_logits_are_422_and_store_nothing(client, payload, code):
    body = json.dumps(payload)  # NaN as Python's json writes it (not strict JSON, but sent in practice)
    r = client.post("/v1/calibrations", content=body, headers={"content-type": "application/json"})
    error_of(r, 422, code)
    assert _count(client) == 0


def test_infinite_logits_in_an_npz_are_422(client):
    z = np.zeros((40, 3))
    z[5, 1] = np.inf
    r = client.post("/v1/calibrations", files={"file": ("l.npz", npz_bytes(logits=z, y=np.zeros(40, int)))})
    error_of(r, 422, "non_finite_value")


def test_bad_model_batch_is_422(client, labelled):
    x, y = labelled
    error_of(client.post(CALIBRATIONS, json={"instances": x[:30].tolist(), "labels": y[:29].tolist()}), 422,
             "length_mismatch")
    error_of(client.post(CALIBRATIONS, json={"instances": x[:30].tolist(), "labels": [10] * 30}), 422,
             "label_out_of_range")
    error_of(client.post(CALIBRATIONS, params={"method": "platt"}, files={"file": ("b.npz", npz_bytes(x=x, y=y))}),
             422, "invalid_parameter")
    error_of(client.post(CALIBRATIONS, params={"folds": 1}, files={"file": ("b.npz", npz_bytes(x=x, y=y))}),
             422, "invalid_parameter")
    error_of(client.post(CALIBRATIONS, params={"label": "x" * 201}, files={"file": ("b.npz", npz_bytes(x=x, y=y))}),
             422, "invalid_parameter")
    assert _count(client) == 0


@pytest.mark.parametrize("coverage", [0, 1, -0.5, 1.5])
def test_coverage_outside_0_1_is_422(client, logits_batch, labelled, coverage):
    z, y = logits_batch
    body = client.post("/v1/calibrations", json={"logits": z.tolist(), "labels": y.tolist()}).json()
    r = client.post(f"/v1/calibrations/{body['id']}/apply", params={"coverage": coverage},
                    json={"logits": z[:2].tolist()})
    error_of(r, 422, "invalid_coverage")
    profile = _create(client, *labelled)
    r = client.post(PREDICT, params={"calibration": profile["id"], "coverage": coverage},
                    json={"instances": labelled[0][:1].tolist()})
    error_of(r, 422, "invalid_coverage")


def test_apply_with_the_wrong_number_of_classes_is_422(client, logits_batch):
    z, y = logits_batch
    body = client.post("/v1/calibrations", json={"logits": z.tolist(), "labels": y.tolist()}).json()
    error_of(client.post(f"/v1/calibrations/{body['id']}/apply", json={"logits": [[0.0, 1.0, 2.0]]}), 422,
             "class_count_mismatch")
    r = client.post(f"/v1/calibrations/{body['id']}/apply", files={"file": ("l.npz", npz_bytes(
        logits=np.array([[0.0, np.inf, 1, 2]])))})
    error_of(r, 422, "non_finite_value")


def test_more_profiles_than_the_limit_is_409(service_model_dir, tmp_path, logits_batch):
    z, y = logits_batch
    with _app(service_model_dir, data_dir=tmp_path, max_calibrations=2) as client:
        for _ in range(2):
            assert client.post("/v1/calibrations", json={"logits": z.tolist(), "labels": y.tolist()}).status_code == 201
        r = client.post("/v1/calibrations", json={"logits": z.tolist(), "labels": y.tolist()})
        assert "CALIB_MAX_CALIBRATIONS=2" in error_of(r, 409, "calibration_limit_reached")
        assert r.json()["error"]["details"] == {"limit": 2}
        assert client.get("/v1/calibrations").json()["count"] == 2


def test_a_database_down_is_503_on_profile_routes_only(service_model_dir, labelled, logits_batch):
    z, y = logits_batch
    with _app(service_model_dir, database_url="postgresql+psycopg://calib:pw@127.0.0.1:9/test",
              database_timeout_s=1) as client:
        images = {"instances": labelled[0][:2].tolist()}
        pid = "5b0f3c2e-8d1a-4d44-9c3e-0a1b2c3d4e5f"
        for response in (client.get(CALIBRATIONS), client.get("/v1/calibrations"),
                         client.get(f"/v1/calibrations/{pid}"), client.delete(f"/v1/calibrations/{pid}"),
                         client.post("/v1/calibrations", json={"logits": z.tolist(), "labels": y.tolist()}),
                         client.post(f"/v1/calibrations/{pid}/apply", json={"logits": z[:1].tolist()}),
                         client.post(PREDICT, params={"calibration": pid}, json=images)):
            msg = error_of(response, 503, "storage_unavailable")
            assert response.headers["retry-after"] == "5" and "pw" not in msg
        assert client.post(PREDICT, params={"mc_samples": 0}, json=images).status_code == 200
        ready = client.get("/health/ready")
        assert ready.status_code == 200
        storage = ready.json()["storage"]
        assert storage["status"] == "unavailable" and storage["backend"] == "postgresql"


# --- scopes ------------------------------------------------------------------------------------------

def test_read_keys_read_and_use_admin_keys_create_and_delete(service_model_dir, tmp_path, labelled, logits_batch):
    z, y = logits_batch
    key_file = tmp_path / "admin-keys"
    key_file.write_text(f"# admin\n{ADMIN_KEY}\n")
    with _app(service_model_dir, data_dir=tmp_path / "d", api_keys=READ_KEY, admin_api_keys_file=key_file) as client:
        read, admin = {"X-API-Key": READ_KEY}, {"Authorization": f"Bearer {ADMIN_KEY}"}
        body = {"logits": z.tolist(), "labels": y.tolist()}
        error_of(client.post("/v1/calibrations", json=body), 401, "unauthorized")
        error_of(client.post("/v1/calibrations", json=body, headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        error_of(client.post("/v1/calibrations", json=body, headers=read), 403, "forbidden")
        x, labels = labelled
        error_of(client.post(CALIBRATIONS, files={"file": ("b.npz", npz_bytes(x=x, y=labels))}, headers=read),
                 403, "forbidden")
        assert client.get("/v1/calibrations", headers=admin).json()["count"] == 0
        created = client.post("/v1/calibrations", json=body, headers=admin)
        assert created.status_code == 201, created.text
        pid = created.json()["id"]
        model = client.post(CALIBRATIONS, files={"file": ("b.npz", npz_bytes(x=x, y=labels))}, headers=admin).json()
        assert client.get(f"/v1/calibrations/{pid}", headers=read).status_code == 200
        assert client.get(CALIBRATIONS, headers=read).json()["count"] == 1
        assert client.post(f"/v1/calibrations/{pid}/apply", json={"logits": z[:2].tolist()},
                           headers=read).status_code == 200
        assert client.post(PREDICT, params={"calibration": model["id"], "mc_samples": 0},
                           json={"instances": x[:1].tolist()}, headers=read).status_code == 200
        error_of(client.get(f"/v1/calibrations/{pid}"), 401, "unauthorized")
        error_of(client.delete(f"/v1/calibrations/{pid}", headers=read), 403, "forbidden")
        error_of(client.delete(f"{CALIBRATIONS}/{model['id']}", headers=read), 403, "forbidden")
        assert client.delete(f"/v1/calibrations/{pid}", headers=admin).status_code == 204
        assert client.delete(f"{CALIBRATIONS}/{model['id']}", headers=admin).status_code == 204
        # the admin scope is documented where it applies
        paths = client.get("/openapi.json").json()["paths"]
        assert "403" in paths["/v1/calibrations"]["post"]["responses"]
        assert "403" not in paths["/v1/calibrations"]["get"]["responses"]


def test_without_any_key_everything_is_open(client, logits_batch):
    z, y = logits_batch
    r = client.post("/v1/calibrations", json={"logits": z.tolist(), "labels": y.tolist()})
    assert r.status_code == 201
    assert client.delete(f"/v1/calibrations/{r.json()['id']}").status_code == 204


# --- prediction sets and /v2 with a profile ----------------------------------------------------------

def test_prediction_sets_come_from_the_profiles_own_conformal_calibration(client, labelled):
    from models.calibration.conformal import ConformalCalibration

    x, y = labelled
    profile = _create(client, x, y, method="vector")
    stored = client.app.state.calibrations.get(profile["id"])
    conformal = ConformalCalibration.from_bytes(stored.conformal)
    assert conformal.n == profile["conformal"]["n"] == 300
    r = client.post(PREDICT, params={"calibration": profile["id"], "coverage": 0.8, "conformal_method": "aps",
                                     "mc_samples": 0}, json={"instances": x[:8].tolist()})
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    probs = np.array([row["probabilities"] for row in rows])
    expected = conformal.prediction_sets(probs, 0.8, "aps")
    for row, mask in zip(rows, expected):
        assert row["prediction_set"]["indices"] == np.flatnonzero(mask).tolist()
        assert row["prediction_set"]["coverage"] == 0.8 and row["prediction_set"]["method"] == "aps"
    ev = client.post(EVALUATE, params={"calibration": profile["id"], "coverage": [0.8, 0.9]},
                     files={"file": ("b.npz", npz_bytes(x=x, y=y))})
    assert ev.status_code == 200, ev.text
    block = ev.json()["conformal"]
    assert block["calibration"] == {"source": "profile", "n": 300} and len(block["results"]) == 6


def test_v2_infer_takes_parameters_calibration(client, labelled):
    x, y = labelled
    profile = _create(client, x, y)
    url = f"/v2/models/{MODEL}/infer"
    tensor = {"name": "images", "datatype": "UINT8", "shape": [3, 32, 32, 3],
              "data": np.asarray(x[:3]).ravel().tolist()}
    r = client.post(url, json={"inputs": [tensor], "parameters": {"calibration": profile["id"]}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["parameters"]["calibration"] == profile["id"] and out["parameters"]["calibration_method"] == "temperature"
    via_v1 = client.post(PREDICT, params={"calibration": profile["id"], "mc_samples": 0},
                         json={"instances": x[:3].tolist()}).json()
    (probs,) = [o for o in out["outputs"] if o["name"] == "probabilities"]
    np.testing.assert_allclose(np.reshape(probs["data"], (3, 10)),
                               [p["probabilities"] for p in via_v1["predictions"]], atol=1e-6)
    missing = client.post(url, json={"inputs": [tensor], "parameters": {"calibration": "nope"}})
    assert missing.status_code == 404 and "no calibration profile" in missing.json()["error"]
    bad = client.post(url, json={"inputs": [tensor], "parameters": {"calibration": 7}})
    assert bad.status_code == 400


def test_compare_with_a_profile(client, labelled):
    x, y = labelled
    profile = _create(client, x, y)
    t_profile = profile["parameters"]["temperature"]
    body = {"in_distribution": x[:20].tolist(), "suspect": x[20:40][..., ::-1].tolist()}
    r = client.post(f"/v1/models/{MODEL}/compare", params={"calibration": profile["id"], "mc_samples": 4, "seed": 1},
                    json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["calibration"] == {"id": profile["id"], "method": "temperature", "source": "profile"}
    plain = client.post(f"/v1/models/{MODEL}/compare", params={"mc_samples": 4, "seed": 1}, json=body).json()
    assert plain["calibration"]["source"] == "card"
    # without MC a temperature rescales the entropy but keeps 1 - max p in the same order: the same
    # AUROC (with MC samples it need not: the mean of softmax(z_t / T) over draws can reorder images),
    det = client.post(f"/v1/models/{MODEL}/compare", params={"calibration": profile["id"], "mc_samples": 0},
                      json=body)
    assert det.status_code == 200, det.text
    det_plain = client.post(f"/v1/models/{MODEL}/compare", params={"mc_samples": 0}, json=body).json()
    det_score = {s["score"]: s["auroc"] for s in det.json()["scores"]}
    det_plain_score = {s["score"]: s["auroc"] for s in det_plain["scores"]}
    # up to four pairs of 20 x 20: the barely trained test model's top probabilities differ by about
    # float32's resolution, so rounding under another temperature can tie or swap a few pairs
    assert det_score["max_probability"] == pytest.approx(det_plain_score["max_probability"], abs=4 / 400)
    by_score = {s["score"]: s for s in out["scores"]}
    plain_by_score = {s["score"]: s for s in plain["scores"]}
    if abs(t_profile - client.app.state.registry.get(MODEL).temperature) > 1e-3:
        assert by_score["predictive_entropy"]["mean_suspect"] != plain_by_score["predictive_entropy"]["mean_suspect"]
    error_of(client.post(f"/v1/models/{MODEL}/compare", params={"calibration": "nope"}, json=body), 404,
             "unknown_calibration")
