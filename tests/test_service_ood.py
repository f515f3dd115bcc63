"""Abstaining and comparing batches: the card's `ood_threshold` (fitted by
`python -m training.fit_ood_threshold`), the per-prediction OOD flag, and POST /compare.

The app here serves three copies of the tiny artifact: `tiny-ood` with a fitted threshold, `tiny`
without one (an older card) and `tiny-stale` whose threshold was fitted at another temperature.
Every number the service returns is checked against the NumPy functions of
`models.calibration.ood` on logits computed in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from models.calibration import softmax
from models.calibration.ood import detection, fit_ood_threshold, threshold_at_tpr, uncertainty_scores
from tests.service_helpers import error_of, npy_bytes, npz_bytes, png_bytes

REPO = Path(__file__).resolve().parents[1]
WITH, WITHOUT, STALE = "tiny-ood", "tiny", "tiny-stale"
MAX_EVAL = 50          # images per batch in this module's app: small, so "too many" is cheap to send
MAX_BODY = 2 * 1024 * 1024
MAX_MC = 50
BLOCK_KEYS = {"score", "threshold", "tpr", "n_images", "data", "temperature"}


def compare_url(name: str = WITH) -> str:
    return f"/v1/models/{name}/compare"


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_artifact(tmp_path_factory, tiny_artifact, sample_data_dir) -> Path:
    """A copy of the tiny artifact with the threshold written by the command's `main` (in-process:
    a subprocess would import TensorFlow again, minutes on a busy machine)."""
    from training.fit_ood_threshold import main

    path = tmp_path_factory.mktemp("ood") / WITH
    shutil.copytree(tiny_artifact, path)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([str(path), "--data", str(sample_data_dir)]) == 0
    written = json.loads((path / "model_card.json").read_text())["ood_threshold"]
    assert json.loads(stdout.getvalue())["ood_threshold"] == written
    return path


@pytest.fixture(scope="module")
def validation_images(tiny_artifact, sample_data):
    """The tiny model's validation split, recreated as training.train drew it."""
    from training.fit_ood_threshold import validation_split

    card = json.loads((tiny_artifact / "model_card.json").read_text())
    return validation_split(card, sample_data)


@pytest.fixture(scope="module")
def ood_model_dir(tmp_path_factory, tiny_artifact, fitted_artifact) -> Path:
    from models.artifact import read_card, update_card

    root = tmp_path_factory.mktemp("ood_models")
    shutil.copytree(fitted_artifact, root / WITH)
    shutil.copytree(tiny_artifact, root / WITHOUT)
    older = json.loads((root / WITHOUT / "model_card.json").read_text())   # a card from before the flag
    older.pop("ood_threshold", None)
    (root / WITHOUT / "model_card.json").write_text(json.dumps(older, indent=2))
    shutil.copytree(fitted_artifact, root / STALE)
    block = read_card(root / STALE)["ood_threshold"]
    update_card(root / STALE, {"name": STALE, "ood_threshold": {**block, "temperature": block["temperature"] + 0.5}})
    update_card(root / WITH, {"name": WITH})
    return root


@pytest.fixture(scope="module")
def client(ood_model_dir):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(model_dir=ood_model_dir, max_body_bytes=MAX_BODY, max_instances=64,
                        max_eval_images=MAX_EVAL, max_mc_samples=MAX_MC, eval_chunk=16, mc_chunk_rows=500)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def batches(sample_data):
    """In-distribution: CIFAR test images. Suspect: the same images' colour-inverted, shuffled
    pixels (no object left), which the model should find more uncertain."""
    rng = np.random.default_rng(0)
    x_in = sample_data.x_test[:30]
    x_out = 255 - sample_data.x_test[30:50]
    x_out = rng.permuted(x_out.reshape(len(x_out), -1), axis=1).reshape(x_out.shape).astype(np.uint8)
    return x_in, x_out


def reference_scores(split_classifier, x) -> dict:
    clf, card = split_classifier
    return uncertainty_scores(softmax(clf.logits(x), card["temperature"]))


# --- domain: the threshold block ---------------------------------------------------------------
def test_fit_ood_threshold_lets_the_requested_share_pass():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(400, 10)) * 3
    block = fit_ood_threshold(logits, 1.7)
    assert set(block) == BLOCK_KEYS
    assert block["score"] == "predictive_entropy" and block["tpr"] == 0.95 and block["n_images"] == 400
    assert block["data"] == "validation split" and block["temperature"] == 1.7
    entropy = uncertainty_scores(softmax(logits, 1.7))["predictive_entropy"]
    assert block["threshold"] == threshold_at_tpr(entropy, 0.95)
    assert np.mean(entropy <= block["threshold"]) == 0.95      # 380 of 400 pass, 20 are flagged
    assert fit_ood_threshold(logits, 1.7, 0.5)["threshold"] < block["threshold"]
    for bad in (np.zeros((0, 10)), np.zeros(10)):
        with pytest.raises(ValueError):
            fit_ood_threshold(bad, 1.0)
    with pytest.raises(ValueError):
        fit_ood_threshold(logits, 0.0)


def test_command_writes_the_block_and_leaves_the_model_alone(tiny_artifact, fitted_artifact, split_classifier,
                                                             validation_images):
    from models.artifact import read_card

    before = json.loads((tiny_artifact / "model_card.json").read_text())
    after = read_card(fitted_artifact)                   # the checksum still verifies
    assert (hashlib.sha256((fitted_artifact / "model.keras").read_bytes()).hexdigest()
            == hashlib.sha256((tiny_artifact / "model.keras").read_bytes()).hexdigest())
    assert {k: v for k, v in after.items() if k != "ood_threshold"} == {
        k: v for k, v in before.items() if k != "ood_threshold"}
    block = after["ood_threshold"]
    # training.train wrote the same block: the command recreates its validation split exactly
    assert block["threshold"] == pytest.approx(before["ood_threshold"]["threshold"], rel=1e-5)
    assert set(block) == BLOCK_KEYS
    assert block["n_images"] == before["data"]["n_validation"] == 100
    assert block["temperature"] == before["temperature"] and block["tpr"] == 0.95
    clf, card = split_classifier
    x_val, _ = validation_images
    assert block["threshold"] == pytest.approx(fit_ood_threshold(clf.logits(x_val), card["temperature"])["threshold"],
                                               rel=1e-5)
    assert not [p for p in fitted_artifact.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_command_refuses_other_data_and_tampered_artifacts(tmp_path, tiny_artifact, sample_data_dir, capsys):
    from training.fit_ood_threshold import main

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    card_before = (art / "model_card.json").read_text()
    other = tmp_path / "other"
    shutil.copytree(sample_data_dir, other)
    next(iter(sorted((other / "train").rglob("*.jpg")))).unlink()     # one training image fewer
    assert main([str(art), "--data", str(other)]) == 1
    assert "not the same data" in capsys.readouterr().err
    assert main([str(art), "--data", str(tmp_path / "missing")]) == 1
    with pytest.raises(SystemExit) as usage:
        main([str(art), "--data", str(sample_data_dir), "--tpr", "1.5"])
    assert usage.value.code == 2 and "--tpr" in capsys.readouterr().err
    assert (art / "model_card.json").read_text() == card_before      # nothing written
    model = art / "model.keras"
    model.write_bytes(model.read_bytes()[:-10])
    assert main([str(art), "--data", str(sample_data_dir)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err


def test_update_card_is_atomic_and_guards_the_checksum(tmp_path, tiny_artifact):
    from models.artifact import ArtifactError, read_card, update_card

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    card = update_card(art, {"note": "x"})
    assert read_card(art) == card and card["note"] == "x"
    with pytest.raises(ArtifactError, match="model_sha256"):
        update_card(art, {"model_sha256": "0" * 64})
    (art / "model.keras").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="checksum"):
        update_card(art, {"note": "y"})
    assert json.loads((art / "model_card.json").read_text())["note"] == "x"


# --- the flag over HTTP --------------------------------------------------------------------------
def test_model_cards_report_the_threshold_block(client, fitted_artifact):
    block = json.loads((fitted_artifact / "model_card.json").read_text())["ood_threshold"]
    assert client.get(f"/v1/models/{WITH}").json()["ood_threshold"] == block
    assert client.get(f"/v1/models/{WITHOUT}").json()["ood_threshold"] is None   # older card: still served
    assert client.get(f"/v1/models/{STALE}").json()["ood_threshold"] is None     # fitted at another T
    listed = {m["name"]: m["ood_threshold"] for m in client.get("/v1/models").json()["models"]}
    assert listed == {WITH: block, WITHOUT: None, STALE: None}


def test_predict_flags_above_the_threshold_and_passes_95_percent_of_validation(client, validation_images,
                                                                             split_classifier, fitted_artifact):
    threshold = json.loads((fitted_artifact / "model_card.json").read_text())["ood_threshold"]["threshold"]
    x_val, _ = validation_images
    rows = []
    for start in range(0, len(x_val), 50):
        r = client.post(f"/v1/models/{WITH}/predict?mc_samples=0",
                        files={"files": ("v.npy", npy_bytes(x_val[start:start + 50]))})
        assert r.status_code == 200, r.text
        rows += r.json()["predictions"]
    ref = reference_scores(split_classifier, x_val)["predictive_entropy"]
    values = np.array([p["ood"]["value"] for p in rows])
    np.testing.assert_allclose(values, ref, rtol=1e-5, atol=1e-7)
    assert all(p["ood"]["score"] == "predictive_entropy" and p["ood"]["threshold"] == threshold for p in rows)
    assert [p["ood"]["flag"] for p in rows] == (values > threshold).tolist()
    flagged = sum(p["ood"]["flag"] for p in rows)
    assert 4 <= flagged <= 6          # 5 of the 100 validation images (+-1 at the boundary: float32 passes)


def test_flag_uses_the_deterministic_entropy_with_mc_samples(client, batches):
    x = batches[0][:6]
    plain = client.post(f"/v1/models/{WITH}/predict?mc_samples=0", files={"files": ("x.npy", npy_bytes(x))}).json()
    mc = client.post(f"/v1/models/{WITH}/predict?mc_samples=20&seed=3", files={"files": ("x.npy", npy_bytes(x))}).json()
    assert mc["predictions"][0]["uncertainty"]["n_samples"] == 20
    for a, b in zip(plain["predictions"], mc["predictions"]):
        assert b["ood"]["value"] == pytest.approx(a["ood"]["value"], rel=1e-5)
        assert b["ood"]["flag"] == a["ood"]["flag"]
        assert b["ood"]["value"] != pytest.approx(b["uncertainty"]["predictive_entropy"], rel=1e-9)


@pytest.mark.parametrize("name", [WITHOUT, STALE])
def test_without_a_usable_threshold_the_flag_is_unavailable(client, batches, name, split_classifier):
    x = batches[0][:3]
    r = client.post(f"/v1/models/{name}/predict?mc_samples=0", json={"instances": x.tolist()})
    assert r.status_code == 200, r.text
    ref = reference_scores(split_classifier, x)["predictive_entropy"]
    for p, value in zip(r.json()["predictions"], ref):
        assert p["ood"]["flag"] is None and p["ood"]["threshold"] is None
        assert p["ood"]["value"] == pytest.approx(value, rel=1e-5, abs=1e-7)


def test_stale_threshold_is_logged_at_load(ood_model_dir, caplog):
    from service.registry import load_registry

    with caplog.at_level("WARNING", logger="service.registry"):
        registry = load_registry(ood_model_dir, warmup=False)
    assert registry.names() == sorted([WITH, WITHOUT, STALE])
    warned = [r.getMessage() for r in caplog.records if "ood_threshold" in r.getMessage()]
    assert len(warned) == 1 and STALE in warned[0] and "refit" in warned[0]


# --- compare --------------------------------------------------------------------------------------
def _check_against_reference(body, split_classifier, x_in, x_out, names=("max_probability", "predictive_entropy")):
    s_in, s_out = reference_scores(split_classifier, x_in), reference_scores(split_classifier, x_out)
    got = {s["score"]: s for s in body["scores"]}
    assert list(got)[:2] == ["max_probability", "predictive_entropy"]
    for name in names:
        ref = detection(name, s_in[name], s_out[name])
        assert got[name]["auroc"] == pytest.approx(ref.auroc, abs=1e-6)
        assert got[name]["aupr"] == pytest.approx(ref.aupr, abs=1e-6)
        assert got[name]["fpr_at_95_tpr"] == pytest.approx(ref.fpr_at_95_tpr, abs=1e-6)
        assert got[name]["mean_in_distribution"] == pytest.approx(ref.mean_in, rel=1e-5)
        assert got[name]["mean_suspect"] == pytest.approx(ref.mean_out, rel=1e-5)
    return s_in, s_out


def test_compare_json_matches_the_numpy_metrics(client, batches, split_classifier, fitted_artifact):
    x_in, x_out = batches
    r = client.post(compare_url(), json={"in_distribution": x_in.tolist(), "suspect": x_out.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["n_in_distribution"], body["n_suspect"]) == (WITH, 30, 20)
    assert body["mc_samples"] == 0 and body["seed"] is None
    assert [s["score"] for s in body["scores"]] == ["max_probability", "predictive_entropy"]
    s_in, s_out = _check_against_reference(body, split_classifier, x_in, x_out)
    threshold = json.loads((fitted_artifact / "model_card.json").read_text())["ood_threshold"]["threshold"]
    assert body["flagged"]["threshold"] == threshold
    assert body["flagged"]["in_distribution"] == pytest.approx(np.mean(s_in["predictive_entropy"] > threshold))
    assert body["flagged"]["suspect"] == pytest.approx(np.mean(s_out["predictive_entropy"] > threshold))
    # no threshold on the card: the metrics still, the flag share not
    assert client.post(compare_url(WITHOUT), json={"in_distribution": x_in.tolist(),
                                                   "suspect": x_out.tolist()}).json()["flagged"] is None


def test_compare_multipart_files_give_the_same_numbers(client, batches, split_classifier):
    x_in, x_out = batches
    files = [("in_distribution", ("in.npz", npz_bytes(x=x_in[:20]))),
             ("in_distribution", ("a.png", png_bytes(x_in[20]))),
             ("in_distribution", ("b.jpg", png_bytes(x_in[21], fmt="PNG"))),
             ("suspect", ("out.npy", npy_bytes(x_out)))]
    r = client.post(compare_url(), files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["n_in_distribution"], body["n_suspect"]) == (22, 20)
    _check_against_reference(body, split_classifier, x_in[:22], x_out)


def test_compare_with_mc_samples_adds_mutual_information_reproducibly(client, batches):
    x_in, x_out = batches
    files = {"in_distribution": ("in.npy", npy_bytes(x_in)), "suspect": ("out.npy", npy_bytes(x_out))}
    first = client.post(compare_url() + "?mc_samples=8&seed=11", files=files).json()
    again = client.post(compare_url() + "?mc_samples=8&seed=11", files=files).json()
    assert [s["score"] for s in first["scores"]] == ["max_probability", "predictive_entropy", "mutual_information"]
    assert first == again and first["seed"] == 11 and first["mc_samples"] == 8
    mi = first["scores"][2]
    assert 0.0 <= mi["auroc"] <= 1.0 and mi["mean_in_distribution"] >= 0 and mi["mean_suspect"] >= 0
    drawn = client.post(compare_url() + "?mc_samples=8", files=files).json()
    assert isinstance(drawn["seed"], int)      # a random seed, reported so the call can be repeated


def test_compare_png_histograms(client, batches):
    x_in, x_out = batches
    r = client.post(compare_url() + "?format=png&mc_samples=4&seed=1",
                    files={"in_distribution": ("in.npy", npy_bytes(x_in)), "suspect": ("out.npy", npy_bytes(x_out))})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG") and len(r.content) > 10_000


def test_compare_is_admitted_through_the_evaluation_gate(client):
    from service.rest.admission_middleware import AdmissionMiddleware

    scope = {"method": "POST", "path": f"/v1/models/{WITH}/compare"}
    assert AdmissionMiddleware._gated(scope) and scope["path_params"] == {"name": WITH}
    assert not AdmissionMiddleware._gated({"method": "POST", "path": f"/v1/models/{WITH}/predict"})


# --- compare: every bad input is a 4xx in the house shape ------------------------------------------
def _two(x_in=None, x_out=None):
    x = np.zeros((2, 32, 32, 3), np.uint8)
    return {"in_distribution": ("in.npy", npy_bytes(x if x_in is None else x_in)),
            "suspect": ("out.npy", npy_bytes(x if x_out is None else x_out))}


@pytest.mark.parametrize("body, code", [
    ({"suspect": [np.zeros((32, 32, 3), int).tolist()]}, "missing_batch"),
    ({"in_distribution": [np.zeros((32, 32, 3), int).tolist()], "suspect": None}, "missing_batch"),
    ({"in_distribution": [], "suspect": [np.zeros((32, 32, 3), int).tolist()]}, "empty_batch"),
    ({"in_distribution": "x", "suspect": []}, "invalid_request"),
    ({"in_distribution": [np.zeros((32, 32, 3), int).tolist()], "suspect": [np.zeros((32, 31, 3), int).tolist()]},
     "invalid_shape"),
    ({"in_distribution": [np.zeros((32, 32, 3), int).tolist()], "suspect": [np.full((32, 32, 3), 0.5).tolist()]},
     "invalid_dtype"),
    ({"in_distribution": [np.zeros((32, 32, 3), int).tolist()] * (MAX_EVAL + 1),
      "suspect": [np.zeros((32, 32, 3), int).tolist()]}, "too_many_instances"),
])
def test_compare_bad_json_batches(client, body, code):
    message = error_of(client.post(compare_url(), json=body), 422, code)
    if code not in ("missing_batch", "invalid_request"):
        assert message.startswith(("in_distribution:", "suspect:")), message   # names the batch


@pytest.mark.parametrize("files, code", [
    ({"suspect": ("out.npy", npy_bytes(np.zeros((2, 32, 32, 3), np.uint8)))}, "missing_batch"),
    ({**_two(), "files": ("x.npy", npy_bytes(np.zeros((1, 32, 32, 3), np.uint8)))}, "unexpected_field"),
    (_two(x_out=np.zeros((0, 32, 32, 3), np.uint8)), "empty_batch"),
    (_two(x_in=np.zeros((2, 28, 28, 3), np.uint8)), "invalid_shape"),
    (_two(x_out=np.zeros((2, 32, 32, 3), np.complex64)), "invalid_dtype"),
    (_two(x_out=np.zeros((2, 32, 32, 3), bool)), "invalid_dtype"),
    (_two(x_in=np.zeros((MAX_EVAL + 1, 32, 32, 3), np.uint8)), "too_many_instances"),
    ({"in_distribution": ("a.png", b"not an image"), "suspect": ("b.png", b"nope")}, "undecodable_image"),
])
def test_compare_bad_file_batches(client, files, code):
    error_of(client.post(compare_url(), files=files), 422, code)


def test_compare_bad_bodies_and_parameters(client):
    error_of(client.post(compare_url(), files={"in_distribution": ("big.npy", b"\x00" * (MAX_BODY + 10)),
                                               "suspect": ("s.npy", b"x")}), 413, "payload_too_large")
    error_of(client.post(compare_url(), content=b"{", headers={"content-type": "application/json"}),
             400, "malformed_json")
    error_of(client.post(compare_url(), content=b"abc", headers={"content-type": "text/plain"}),
             415, "unsupported_media_type")
    for query in ("mc_samples=-1", "mc_samples=1", f"mc_samples={MAX_MC + 1}"):
        assert "mc_samples" in error_of(client.post(f"{compare_url()}?{query}", files=_two()), 422,
                                        "mc_samples_out_of_range")
    for query in ("mc_samples=abc", "seed=x", "format=gif", "resize=maybe"):
        error_of(client.post(f"{compare_url()}?{query}", files=_two()), 422, "invalid_parameter")
    for seed in (-1, 2**31):
        error_of(client.post(f"{compare_url()}?seed={seed}", files=_two()), 422, "invalid_parameter")
    message = error_of(client.post(compare_url("nope"), files=_two()), 404, "unknown_model")
    assert WITH in message


# --- the curl script over real HTTP -----------------------------------------------------------------
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
@pytest.mark.server
def test_curl_script_compares_two_batches(ood_model_dir, batches, tmp_path, split_classifier):
    from benchmarks.server_process import ServerError, ServerProcess

    x_in, x_out = batches
    data, suspect = tmp_path / "in.npz", tmp_path / "suspect.npy"
    data.write_bytes(npz_bytes(x=x_in, y=np.zeros(len(x_in), np.int64)))
    suspect.write_bytes(npy_bytes(x_out))
    try:
        with ServerProcess(ood_model_dir, log_path=tmp_path / "server.log", ready_timeout=300) as running:
            env = {**os.environ, "CALIB_URL": running.url, "CALIB_MODEL": WITH, "SUSPECT": str(suspect),
                   "MC_SAMPLES": "4"}
            out = subprocess.run(["bash", str(REPO / "clients" / "evaluate_with_curl.sh"), str(data),
                                  str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    except ServerError as exc:
        pytest.fail(str(exc))
    assert out.returncode == 0, out.stderr
    body = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert body["mc_samples"] == 4 and body["seed"] == 0 and len(body["scores"]) == 3
    _check_against_reference(body, split_classifier, x_in, x_out)
    assert (tmp_path / "out" / "ood-histogram.png").read_bytes().startswith(b"\x89PNG")
    assert "AUROC predictive_entropy: " in out.stdout and '"flagged":{' in out.stdout
