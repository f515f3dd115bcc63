"""Model versions and hot reload (issue 25, section 3): the `<name>/<version>/` layout, the version
policy, the /v2/repository API (admin scope), polling, swapping a version in while requests run
(in-flight ones finish on the old version, a batch never mixes versions), a version that fails to
load leaving the old one serving, and profiles kept per version (per model-file sha256).

A "new version" is a copy of the session's tiny artifact (same weights). Where a different sha256
is needed (profiles), `model.keras` gets a zip comment -- the same weights in different bytes --
and the card's `model_sha256` is recomputed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.service_helpers import MODEL, npz_bytes
from tests.storage_fixtures import database_url, postgres_server, postgres_url, sqlite_url  # noqa: F401

READ, ADMIN = "read-key-0123456789", "admin-key-0123456789"
AS_ADMIN, AS_READER = {"X-API-Key": ADMIN}, {"X-API-Key": READ}
INDEX = "/v2/repository/index"
LOAD, UNLOAD = f"/v2/repository/models/{MODEL}/load", f"/v2/repository/models/{MODEL}/unload"
PREDICT = f"/v1/models/{MODEL}/predict"


# --- helpers ------------------------------------------------------------------------------------
def card_of(folder: Path) -> dict:
    return json.loads((folder / "model_card.json").read_text())


def add_version(src: Path, model_dir: Path, version: int | str, *, resign: str | None = None) -> Path:
    """Copy an artifact to `<model_dir>/tiny/<version>/`, atomically (a hidden folder, then a rename,
    as an operator should). `resign`: rewrite model.keras with this zip comment (same weights, new
    bytes) and recompute the card's sha256."""
    tmp = model_dir / MODEL / f".{version}.tmp"
    shutil.copytree(src, tmp)
    if resign is not None:
        from models.artifact import sha256_file

        with zipfile.ZipFile(tmp / "model.keras", "a") as z:
            z.comment = resign.encode()
        card = card_of(tmp)
        card["model_sha256"] = sha256_file(tmp / "model.keras")
        if isinstance(card.get("conformal_set"), dict) and "model_sha256" in card["conformal_set"]:
            card["conformal_set"]["model_sha256"] = card["model_sha256"]
        (tmp / "model_card.json").write_text(json.dumps(card))
    target = model_dir / MODEL / str(version)
    tmp.rename(target)
    return target


def tamper(folder: Path) -> None:
    path = folder / "model.keras"
    path.write_bytes(path.read_bytes()[:-100])


@pytest.fixture
def model_dir(tmp_path, tiny_artifact) -> Path:
    """`tiny/1/` only."""
    root = tmp_path / "models"
    (root / MODEL).mkdir(parents=True)
    add_version(tiny_artifact, root, 1)
    return root


def make_client(model_dir: Path, **settings):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings.setdefault("data_dir", model_dir.parent / "data")
    return TestClient(create_app(Settings(model_dir=model_dir, warmup=False, mc_chunk_rows=1000, **settings)),
                      raise_server_exceptions=False)


def keyed(model_dir: Path, **settings):
    return make_client(model_dir, api_keys=READ, admin_api_keys=ADMIN, **settings)


def one_image(sample_data) -> dict:
    return {"instances": sample_data.x_test[:1].tolist()}


def served_version(client, headers=AS_ADMIN) -> str:
    return client.get(f"/v1/models/{MODEL}", headers=headers).json()["version"]


def index_of(client) -> dict[str, dict]:
    r = client.post(INDEX, headers=AS_ADMIN)
    assert r.status_code == 200, r.text
    return {e["version"]: e for e in r.json() if e["name"] == MODEL}


# --- layout -------------------------------------------------------------------------------------
def _fake_artifact(folder: Path, name: str = "x") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_card.json").write_text(json.dumps({"name": name}))
    return folder


def test_flat_layout_is_version_1_and_numbered_folders_are_versions(tmp_path, caplog):
    from service.model_layout import scan

    _fake_artifact(tmp_path / "flat", "flat")
    for v in ("1", "2", "10"):
        _fake_artifact(tmp_path / "numbered" / v)
    _fake_artifact(tmp_path / "numbered" / "latest")     # not a version: ignored, with a warning
    _fake_artifact(tmp_path / "numbered" / "03")         # not canonical: ignored too
    _fake_artifact(tmp_path / "numbered" / ".4.tmp")     # a copy in progress: ignored silently
    _fake_artifact(tmp_path / "grown", "grown")          # flat, then a 2/ beside its files
    _fake_artifact(tmp_path / "grown" / "2")
    (tmp_path / "notes").mkdir()                          # not a model folder at all
    with caplog.at_level(logging.WARNING, logger="service.model_layout"):
        found = scan(tmp_path)
    assert sorted(found) == ["flat", "grown", "numbered"]
    assert found["flat"].versions == {"1": tmp_path / "flat"}
    assert list(found["numbered"].versions) == ["1", "2", "10"]          # integer order
    assert found["numbered"].newest_first() == ["10", "2", "1"]
    assert found["grown"].versions == {"1": tmp_path / "grown", "2": tmp_path / "grown" / "2"}
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "numbered/latest" in warned and "numbered/03" in warned and ".4.tmp" not in warned
    assert "notes" not in warned


def test_a_model_dir_that_is_one_model_is_named_by_its_card(tmp_path):
    from service.model_layout import scan

    root = _fake_artifact(tmp_path / "mnt-models", "cifar10-augmix")   # e.g. KServe's /mnt/models
    assert list(scan(root)) == ["cifar10-augmix"] and scan(root)["cifar10-augmix"].versions == {"1": root}
    versioned = tmp_path / "versioned"
    _fake_artifact(versioned / "1", "m")
    _fake_artifact(versioned / "2", "m")
    assert list(scan(versioned)) == ["m"] and list(scan(versioned)["m"].versions) == ["1", "2"]


def test_version_policy_parses_and_orders_targets():
    from service.model_repository import VersionPolicy

    assert VersionPolicy.parse("latest").targets(["1", "9", "10"]) == ["10", "9", "1"]
    assert VersionPolicy.parse("all").targets(["2", "1"]) == ["2", "1"]
    assert VersionPolicy.parse("specific:1, 3").targets(["1", "2", "3"]) == ["3", "1"]
    for bad in ("newest", "specific:", "specific:0", "specific:01", "specific:a", "latest:2"):
        with pytest.raises(ValueError):
            VersionPolicy.parse(bad)


def test_latest_policy_serves_the_newest_loadable_version_at_start(model_dir, tiny_artifact, sample_data):
    add_version(tiny_artifact, model_dir, 2)
    tamper(add_version(tiny_artifact, model_dir, 3))
    with make_client(model_dir) as client:
        assert served_version(client) == "2"
        r = client.post(PREDICT, params={"mc_samples": 0}, json=one_image(sample_data))
        assert r.status_code == 200 and r.json()["version"] == "2"
        index = index_of(client)
        assert index["2"]["state"] == "READY"
        assert index["3"]["state"] == "UNAVAILABLE" and "checksum mismatch" in index["3"]["reason"]
        assert index["1"]["state"] == "UNAVAILABLE" and "serves version 2" in index["1"]["reason"]
        ready = client.get("/health/ready").json()
        assert [(f["name"], f["version"]) for f in ready["failed"]] == [(MODEL, "3")]


def test_all_policy_serves_every_version_under_v2_versions(model_dir, tiny_artifact, sample_data):
    add_version(tiny_artifact, model_dir, 2)
    with make_client(model_dir, model_version_policy="all") as client:
        models = client.get("/v1/models").json()["models"]
        assert models[0]["version"] == "2" and models[0]["loaded_versions"] == ["1", "2"]
        assert client.get(f"/v2/models/{MODEL}").json()["versions"] == ["1", "2"]
        body = {"inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8",
                            "data": sample_data.x_test[:1].ravel().tolist()}]}
        for v in ("1", "2"):
            r = client.post(f"/v2/models/{MODEL}/versions/{v}/infer", json=body)
            assert r.status_code == 200 and r.json()["model_version"] == v
        assert client.post(f"/v2/models/{MODEL}/infer", json=body).json()["model_version"] == "2"
        assert client.get(f"/v2/models/{MODEL}/versions/3").status_code == 404
        # the 12-digit sha256 prefix still names a loaded version
        sha = card_of(model_dir / MODEL / "1")["model_sha256"][:12]
        assert client.get(f"/v2/models/{MODEL}/versions/{sha}/ready").json()["ready"] is True


# --- the repository API -------------------------------------------------------------------------
def test_index_load_unload_need_an_admin_key(model_dir, tiny_artifact, sample_data):
    with keyed(model_dir) as client:
        for path in (INDEX, LOAD, UNLOAD):
            assert client.post(path).status_code == 401
            r = client.post(path, headers=AS_READER)
            assert r.status_code == 403 and "admin" in r.json()["error"]
        assert client.post(PREDICT, headers=AS_READER, params={"mc_samples": 0},
                           json=one_image(sample_data)).json()["version"] == "1"

        assert list(index_of(client)) == ["1"]
        add_version(tiny_artifact, model_dir, 2)
        assert index_of(client)["2"]["state"] == "UNAVAILABLE"    # on disk, not loaded until asked
        r = client.post(LOAD, headers=AS_ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["serving"] == "2"
        assert {e["version"]: e["state"] for e in r.json()["versions"]} == {"1": "UNAVAILABLE", "2": "READY"}
        answer = client.post(PREDICT, headers=AS_READER, params={"mc_samples": 0}, json=one_image(sample_data))
        assert answer.json()["version"] == "2"
        assert client.post(INDEX, headers=AS_ADMIN, json={"ready": True}).json() == [
            {"name": MODEL, "version": "2", "state": "READY", "reason": ""}]

        # roll back to version 1 (pinned), then forward again
        r = client.post(LOAD, headers=AS_ADMIN, json={"parameters": {"version": 1}})
        assert r.status_code == 200 and r.json()["serving"] == "1" and served_version(client) == "1"
        assert client.post(LOAD, headers=AS_ADMIN, json={}).json()["serving"] == "2"

        r = client.post(UNLOAD, headers=AS_ADMIN)
        assert r.status_code == 200 and r.json()["serving"] is None
        assert index_of(client)["2"] == {"name": MODEL, "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"}
        r = client.post(PREDICT, headers=AS_READER, params={"mc_samples": 0}, json=one_image(sample_data))
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
        assert client.get("/health/ready").status_code == 503
        assert client.post(LOAD, headers=AS_ADMIN).json()["serving"] == "2"
        assert client.get("/health/ready").status_code == 200


def test_repository_errors_are_4xx_in_the_protocol_shape(model_dir):
    with make_client(model_dir) as client:
        r = client.post("/v2/repository/models/no-such-model/load")
        assert r.status_code == 404 and "no-such-model" in r.json()["error"]
        assert client.post("/v2/repository/models/no-such-model/unload").status_code == 404
        r = client.post(LOAD, json={"parameters": {"version": "7"}})
        assert r.status_code == 404 and "7" in r.json()["error"]
        for body in ('{"parameters": {"version": "01"}}', '{"parameters": {"version": true}}',
                     '{"parameters": {"version": -1}}', "[1]", "{not json", '{"parameters": 3}',
                     '{"parameters": {"config": "{}"}}'):
            r = client.post(LOAD, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and isinstance(r.json()["error"], str), (body, r.text)
        assert client.post(INDEX, json={"ready": "yes"}).status_code == 400
        # tritonclient's bodies: an empty index request, `{}` to load, unload_dependents to unload
        assert client.post(INDEX, content=b"").status_code == 200
        assert client.post(UNLOAD, json={"parameters": {"unload_dependents": False}}).status_code == 200
        assert client.post(LOAD, json={}).json()["serving"] == "1"
        assert served_version(client) == "1"


@pytest.mark.parametrize("damage", ["tampered", "missing_card"])
def test_a_version_that_fails_to_load_leaves_the_old_one_serving(model_dir, tiny_artifact, sample_data, damage):
    with make_client(model_dir) as client:
        bad = add_version(tiny_artifact, model_dir, 2)
        if damage == "tampered":
            tamper(bad)
        else:
            (bad / "model_card.json").unlink()
        r = client.post(LOAD)
        assert r.status_code == 409, r.text
        message = r.json()["error"]
        assert "version 1 keeps serving" in message
        assert ("checksum mismatch" if damage == "tampered" else "model card missing") in message
        answer = client.post(PREDICT, params={"mc_samples": 0}, json=one_image(sample_data))
        assert answer.status_code == 200 and answer.json()["version"] == "1"
        index = index_of(client)
        assert index["1"]["state"] == "READY" and index["2"]["state"] == "UNAVAILABLE"
        ready = client.get("/health/ready")
        assert ready.status_code == 200
        [failed] = ready.json()["failed"]
        assert failed["version"] == "2" and failed["path"].endswith(f"{MODEL}/2")


def test_a_stale_litert_export_leaves_the_old_version_serving(tmp_path, tiny_litert_artifact, sample_data):
    root = tmp_path / "models"
    (root / MODEL).mkdir(parents=True)
    add_version(tiny_litert_artifact, root, 1)
    with make_client(root, runtime="litert") as client:
        stale = add_version(tiny_litert_artifact, root, 2)
        card = card_of(stale)
        card["litert"]["model_sha256"] = "0" * 64     # an export of another model.keras
        (stale / "model_card.json").write_text(json.dumps(card))
        r = client.post(LOAD)
        assert r.status_code == 409 and "another model.keras" in r.json()["error"]
        answer = client.post(PREDICT, params={"mc_samples": 0}, json=one_image(sample_data))
        assert answer.json()["version"] == "1"
        assert index_of(client)["2"]["state"] == "UNAVAILABLE"


def test_polling_picks_up_a_new_version_and_skips_a_broken_one(model_dir, tiny_artifact, sample_data):
    with make_client(model_dir, model_poll_s=0.2) as client:
        assert served_version(client) == "1"
        tamper(add_version(tiny_artifact, model_dir, 3))
        add_version(tiny_artifact, model_dir, 2)
        deadline = time.monotonic() + 60
        while served_version(client) != "2":
            assert time.monotonic() < deadline, index_of(client)
            time.sleep(0.1)
        index = index_of(client)
        assert index["3"]["state"] == "UNAVAILABLE" and "checksum mismatch" in index["3"]["reason"]
        answer = client.post(PREDICT, params={"mc_samples": 0}, json=one_image(sample_data))
        assert answer.json()["version"] == "2"
        # a failed version is tried again only when its files change: fixing it brings it in
        shutil.rmtree(model_dir / MODEL / "3")
        add_version(tiny_artifact, model_dir, 3)
        deadline = time.monotonic() + 60
        while served_version(client) != "3":
            assert time.monotonic() < deadline, index_of(client)
            time.sleep(0.1)


# --- swapping while requests run ----------------------------------------------------------------
class _Recording:
    """A classifier stand-in: delegates to the real one, records the images of each backbone
    call, and (when gated) holds a call until released."""

    def __init__(self, real, gated: bool = False):
        self._real, self.calls, self.gated = real, [], gated
        self.entered, self.release = threading.Event(), threading.Event()

    def features(self, x, batch_size=500):
        self.calls.append(np.array(x))
        if self.gated:
            self.entered.set()
            self.release.wait(30)
        return self._real.features(x, batch_size)

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_a_batch_never_mixes_versions_and_in_flight_requests_finish_on_the_old(tiny_artifact, sample_data):
    """The old version's pass is held; a request queued behind it, and one that took the old
    version before the swap, finish on it; the new version gets its own batcher."""
    from service.batching import BatchedPredictor
    from service.registry import ModelRegistry, load_registry

    real = next(iter(load_registry(tiny_artifact, warmup=False).models.values()))
    old = real.__class__(MODEL, real.path, real.card, _Recording(real.classifier, gated=True), version="1")
    new = real.__class__(MODEL, real.path, real.card, _Recording(real.classifier), version="2")
    registry = ModelRegistry(tiny_artifact)
    registry.add(old)
    images = sample_data.x_test[:4]

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            predictor = BatchedPredictor([old], pool, max_images=8, wait_ms=5)
            predictor.start()
            retired = []
            loop = asyncio.get_running_loop()
            registry.listeners.append(lambda m: retired.append(loop.create_task(predictor.retire(m))))
            try:
                first = asyncio.create_task(predictor.predict(registry.get(MODEL), images[0:1], mc_samples=3,
                                                              seed=1, mc_chunk_rows=65_536))
                assert await asyncio.to_thread(old.classifier.entered.wait, 30)
                taken = registry.get(MODEL)                       # a request that took v1 before the swap
                queued = asyncio.create_task(predictor.predict(taken, images[1:2], mc_samples=3, seed=1,
                                                               mc_chunk_rows=65_536))
                await asyncio.sleep(0.05)
                registry.swap(new, retire=["1"])                  # v2 in: v1 retired
                assert old.retired and registry.get(MODEL) is new
                on_new = await predictor.predict(registry.get(MODEL), images[2:3], mc_samples=3, seed=1,
                                                 mc_chunk_rows=65_536)   # answered while v1's pass is held
                assert not first.done() and not queued.done()
                old.classifier.release.set()
                on_old = await asyncio.gather(first, queued)
                await asyncio.gather(*retired)
                late = await predictor.predict(taken, images[3:4], mc_samples=3, seed=1,
                                               mc_chunk_rows=65_536)    # retired: unbatched, still v1
                return on_old, on_new, late, predictor.batcher(MODEL)
            finally:
                old.classifier.release.set()
                await predictor.aclose()

    on_old, on_new, late, batcher = asyncio.run(scenario())
    seen_old = np.concatenate(old.classifier.calls)
    seen_new = np.concatenate(new.classifier.calls)
    assert {img.tobytes() for img in seen_old} == {images[i].tobytes() for i in (0, 1, 3)}
    assert [img.tobytes() for img in seen_new] == [images[2].tobytes()]
    assert batcher is not None and batcher.model is new
    reference = real.classifier.logits(images) if hasattr(real.classifier, "logits") else None
    for prediction in (*on_old, on_new, late):
        assert prediction.probabilities.shape == (1, 10)
    if reference is not None:
        np.testing.assert_allclose(on_old[0].logits, reference[0:1], atol=1e-4)


def test_a_request_in_flight_during_a_load_finishes_on_the_old_version(model_dir, tiny_artifact, sample_data):
    with make_client(model_dir) as client:
        old = client.app.state.registry.get(MODEL)
        gate = _Recording(old.classifier, gated=True)
        old.classifier = gate
        add_version(tiny_artifact, model_dir, 2)
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(client.post, PREDICT, params={"mc_samples": 5, "seed": 3}, json=one_image(sample_data))
            assert gate.entered.wait(30)
            r = client.post(LOAD)
            assert r.status_code == 200 and r.json()["serving"] == "2"
            during = client.post(PREDICT, params={"mc_samples": 5, "seed": 3}, json=one_image(sample_data))
            assert during.status_code == 200 and during.json()["version"] == "2"
            assert not held.done()
            gate.release.set()
            answer = held.result(30)
        assert answer.status_code == 200 and answer.json()["version"] == "1"
        assert len(gate.calls) == 1       # the old version computed only the request that took it
        np.testing.assert_allclose(answer.json()["predictions"][0]["probabilities"],
                                   during.json()["predictions"][0]["probabilities"], atol=1e-5)  # same weights


def test_reload_under_16_concurrent_clients_loses_no_request(model_dir, tiny_artifact, sample_data):
    """In process: 16 client threads predict while the model is re-loaded to 3 new versions."""
    from benchmarks.hot_reload import hammer

    with make_client(model_dir, batch_wait_ms=2) as client:
        def send() -> tuple[int, str | None]:
            r = client.post(PREDICT, params={"mc_samples": 2, "seed": 0}, json=one_image(sample_data))
            return r.status_code, (r.json().get("version") if r.status_code == 200 else r.text[:200])

        def reload(k: int) -> None:
            add_version(tiny_artifact, model_dir, k + 2)
            r = client.post(LOAD)
            assert r.status_code == 200 and r.json()["serving"] == str(k + 2), r.text

        report = hammer(send, reload, clients=16, reloads=3, settle_s=0.3)
    assert report.failed == 0, report.errors[:3]
    # every client got answers (how many depends on the machine's load), from the first and the last version
    assert report.sent >= 16 and {"1", "4"} <= set(report.versions), report


# --- profiles per version -----------------------------------------------------------------------
def test_profiles_are_kept_per_version(model_dir, tiny_artifact, sample_data, database_url):
    x, y = sample_data.x_test[:100], sample_data.y_test[:100]
    calibrations = f"/v1/models/{MODEL}/calibrations"
    with make_client(model_dir, database_url=database_url) as client:
        r = client.post(calibrations, files={"file": ("b.npz", npz_bytes(x=x, y=y))})
        assert r.status_code == 201, r.text
        v1_profile = r.json()["id"]
        add_version(tiny_artifact, model_dir, 2, resign="version 2")     # same weights, new sha256
        assert client.post(LOAD).json()["serving"] == "2"
        assert client.get(calibrations).json()["count"] == 0             # v2 starts with no profile
        listed = client.get(calibrations, params={"all_versions": True}).json()
        assert [p["id"] for p in listed["calibrations"]] == [v1_profile]
        r = client.post(PREDICT, params={"calibration": v1_profile, "mc_samples": 0}, json=one_image(sample_data))
        assert r.status_code == 409 and r.json()["error"]["code"] == "calibration_model_changed"
        # roll back: v1's profile is listed and usable again
        assert client.post(LOAD, json={"parameters": {"version": "1"}}).json()["serving"] == "1"
        assert [p["id"] for p in client.get(calibrations).json()["calibrations"]] == [v1_profile]
        r = client.post(PREDICT, params={"calibration": v1_profile, "mc_samples": 0}, json=one_image(sample_data))
        assert r.status_code == 200 and r.json()["version"] == "1" and r.json()["calibration"]["id"] == v1_profile


# --- the client ---------------------------------------------------------------------------------
def test_client_index_load_unload(model_dir, tiny_artifact):
    from clients import CalibClient, ServiceError

    with keyed(model_dir) as app_client:
        add_version(tiny_artifact, model_dir, 2)
        with CalibClient(str(app_client.base_url), transport=app_client._transport, api_key=ADMIN) as c:
            assert [(e["version"], e["state"]) for e in c.repository_index()] == [("1", "READY"), ("2", "UNAVAILABLE")]
            assert c.load_model(MODEL)["serving"] == "2"
            assert c.models()[0].version == "2"
            assert c.load_model(MODEL, version=1)["serving"] == "1"
            assert c.unload_model(MODEL)["serving"] is None
            tamper(model_dir / MODEL / "2")
            with pytest.raises(ServiceError) as exc:
                c.load_model(MODEL)
            assert exc.value.status == 409 and "checksum mismatch" in exc.value.message
        with CalibClient(str(app_client.base_url), transport=app_client._transport, api_key=READ) as c:
            with pytest.raises(ServiceError) as exc:
                c.repository_index()
            assert exc.value.status == 403


# --- a real server ------------------------------------------------------------------------------
@pytest.mark.server
def test_reload_under_16_concurrent_clients_of_a_real_server_loses_no_request(tiny_artifact):
    from benchmarks.hot_reload import run_against_server

    report = run_against_server(tiny_artifact, clients=16, reloads=3, settle_s=0.5, mc_samples=5)
    assert report.failed == 0, report.errors[:3]
    assert report.sent >= 16 * 4 and {"1", "4"} <= set(report.versions), report.line()
