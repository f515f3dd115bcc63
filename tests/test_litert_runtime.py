"""The TensorFlow-free serving runtime (CALIB_RUNTIME=litert): TF's stateless uniform in NumPy bit for bit,
the export of a trained artifact, LiteRT answers equal to Keras' (deterministic and MC, same seed), the
service on either runtime, no TensorFlow imported on the LiteRT path, and clear errors for a missing or
tampered export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.artifact import sha256_file
from models.calibration import softmax
from models.litert_classifier import BACKBONE_FILE, HEAD_FILE, LiteRTClassifier
from models.philox import stateless_uniform

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"
TOL = 1e-5


@pytest.mark.parametrize("seed", [(0, 7919), (5, 7920), (2**31 - 2, 7919), (123_456, 1), (2**40 + 3, -1)])
@pytest.mark.parametrize("shape", [(1,), (3,), (7, 5), (13, 17), (640, 192), (0, 4)])
def test_philox_uniform_is_tensorflows_bit_for_bit(seed, shape):
    import tensorflow as tf

    expected = tf.random.stateless_uniform(shape, seed=tf.constant(seed, tf.int64)).numpy()
    got = stateless_uniform(shape, seed)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module")
def classifiers(tiny_litert_artifact):
    from models.artifact import load_artifact
    from models.inference import SplitClassifier

    card, litert = LiteRTClassifier.from_artifact(tiny_litert_artifact)
    return card, litert, SplitClassifier(load_artifact(tiny_litert_artifact).model)


def test_litert_export_records_its_files_in_the_card(tiny_litert_artifact):
    card = json.loads((tiny_litert_artifact / "model_card.json").read_text())
    block = card["litert"]
    assert block["backbone_sha256"] == sha256_file(tiny_litert_artifact / BACKBONE_FILE)
    assert block["head_sha256"] == sha256_file(tiny_litert_artifact / HEAD_FILE)
    assert block["model_sha256"] == card["model_sha256"] == sha256_file(tiny_litert_artifact / "model.keras")
    assert 0 <= block["check"]["max_abs_probability_diff"] <= TOL
    assert 0 <= block["check"]["max_abs_mc_mean_variance_diff"] <= TOL


def test_litert_probabilities_equal_keras(classifiers, sample_data):
    card, litert, keras_clf = classifiers
    x, t = sample_data.x_test, card["temperature"]
    assert litert.num_classes == keras_clf.num_classes and litert.temperature == pytest.approx(keras_clf.temperature)
    np.testing.assert_allclose(softmax(litert.logits(x, batch_size=128), t), softmax(keras_clf.logits(x), t),
                               rtol=0, atol=TOL)
    # one image, then the micro-batcher's odd batch sizes: the interpreter is resized each time
    for n in (1, 7, 1):
        np.testing.assert_allclose(litert.features(x[:n]), keras_clf.features(x[:n]), rtol=0, atol=1e-4)
    assert litert.features(x[:0]).shape == (0, keras_clf.backbone.output.shape[-1])


def test_litert_mc_draws_the_same_masks_as_keras(classifiers, sample_data):
    card, litert, keras_clf = classifiers
    features = keras_clf.features(sample_data.x_test[:9])
    for seed in (0, 11, 2**31 - 5):
        np.testing.assert_allclose(litert.mc_logits_from_features(features, 7, seed),
                                   keras_clf.mc_logits_from_features(features, 7, seed), rtol=0, atol=1e-5)
    # end to end with each runtime's own features, chunked (chunk c draws with its own seed)
    x = sample_data.x_test[:40]
    a = litert.mc_summary_from_features(litert.features(x), 50, 3, card["temperature"], chunk_rows=1000)
    b = keras_clf.mc_summary_from_features(keras_clf.features(x), 50, 3, card["temperature"], chunk_rows=1000)
    for name in ("mean", "variance", "predictive_entropy", "mutual_information"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0, atol=TOL, err_msg=name)


def test_export_command_rewrites_only_the_litert_files(tiny_litert_artifact, tmp_path, sample_data):
    from training.export_litert import main

    folder = shutil.copytree(tiny_litert_artifact, tmp_path / "copy")
    (folder / BACKBONE_FILE).unlink()
    model_bytes = (folder / "model.keras").read_bytes()
    assert main([str(folder)]) == 0
    assert (folder / "model.keras").read_bytes() == model_bytes
    card, litert = LiteRTClassifier.from_artifact(folder)
    assert card["model_sha256"] == sha256_file(folder / "model.keras")
    assert litert.logits(sample_data.x_test[:3]).shape == (3, 10)


# --- the service on either runtime -----------------------------------------------------------------
@pytest.fixture(scope="module")
def clients(tiny_litert_artifact, tmp_path_factory):
    """Two in-process apps on the same artifact: CALIB_RUNTIME=keras and CALIB_RUNTIME=litert."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    root = tmp_path_factory.mktemp("runtimes")
    shutil.copytree(tiny_litert_artifact, root / MODEL)
    with TestClient(create_app(Settings(model_dir=root, runtime="keras", mc_chunk_rows=1000))) as k, \
            TestClient(create_app(Settings(model_dir=root, runtime="litert", mc_chunk_rows=1000))) as lite:
        yield k, lite


def test_model_card_says_which_runtime_serves_it(clients):
    keras_client, litert_client = clients
    assert keras_client.get(f"/v1/models/{MODEL}").json()["runtime"] == "keras"
    assert litert_client.get(f"/v1/models/{MODEL}").json()["runtime"] == "litert"
    assert litert_client.get("/v1/models").json()["models"][0]["runtime"] == "litert"
    assert litert_client.get(f"/v2/models/{MODEL}").json()["platform"] == "tensorflow_lite"


def test_service_answers_equal_on_both_runtimes(clients, sample_data):
    x, y = sample_data.x_test[:24], sample_data.y_test[:24]
    answers = []
    for client in clients:
        predict = client.post(f"/v1/models/{MODEL}/predict", json={"instances": x.tolist()},
                              params={"mc_samples": 30, "seed": 5})
        evaluate = client.post(f"/v1/models/{MODEL}/evaluate", json={"instances": x.tolist(), "labels": y.tolist()})
        infer = client.post(f"/v2/models/{MODEL}/infer", json={
            "inputs": [{"name": "images", "shape": list(x[:4].shape), "datatype": "UINT8",
                        "data": x[:4].reshape(-1).tolist()}], "parameters": {"mc_samples": 10, "seed": 2}})
        assert predict.status_code == evaluate.status_code == infer.status_code == 200
        answers.append((predict.json(), evaluate.json(), infer.json()))
    (kp, ke, ki), (lp, le, li) = answers
    for a, b in zip(kp["predictions"], lp["predictions"]):
        np.testing.assert_allclose(b["probabilities"], a["probabilities"], rtol=0, atol=TOL)
        np.testing.assert_allclose(b["uncertainty"]["mean"], a["uncertainty"]["mean"], rtol=0, atol=TOL)
        np.testing.assert_allclose(b["uncertainty"]["variance"], a["uncertainty"]["variance"], rtol=0, atol=TOL)
    for key in ("accuracy", "nll", "ece", "brier"):
        assert le["after_temperature"][key] == pytest.approx(ke["after_temperature"][key], abs=TOL)
    for a, b in zip(ki["outputs"], li["outputs"]):
        assert a["name"] == b["name"]
        np.testing.assert_allclose(b["data"], a["data"], rtol=0, atol=TOL, err_msg=a["name"])


def test_litert_service_path_imports_no_tensorflow(tiny_litert_artifact):
    code = (
        "import sys\n"
        "import service.__main__, service.app\n"
        "from service.registry import load_registry\n"
        f"registry = load_registry({str(tiny_litert_artifact)!r}, runtime='litert')\n"
        "assert registry.get('tiny').runtime == 'litert', registry.failures\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'tf_keras') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("damage", ["missing", "tampered", "stale"])
def test_litert_startup_error_names_the_file_and_the_export_command(tiny_litert_artifact, tmp_path, damage):
    from models.artifact import update_card
    from service.registry import load_registry

    folder = shutil.copytree(tiny_litert_artifact, tmp_path / MODEL)
    backbone = folder / BACKBONE_FILE
    if damage == "missing":
        backbone.unlink()
    elif damage == "tampered":
        backbone.write_bytes(backbone.read_bytes()[:-10])
    else:   # an export of another model.keras
        card = json.loads((folder / "model_card.json").read_text())
        update_card(folder, {"litert": {**card["litert"], "model_sha256": "0" * 64}})
    registry = load_registry(folder, runtime="litert", warmup=False)
    assert not registry.models
    [failure] = registry.failures
    assert str(backbone) in failure.error and f"python -m training.export_litert {folder}" in failure.error
    assert {"missing": "missing", "tampered": "checksum mismatch", "stale": "another model.keras"}[damage] in failure.error
    # the Keras runtime still serves the same folder
    assert load_registry(folder, runtime="keras", warmup=False).get(MODEL).runtime == "keras"


def test_auto_runtime_is_keras_where_tensorflow_is_installed():
    from service.registry import resolve_runtime

    assert resolve_runtime("auto") == "keras" and resolve_runtime("litert") == "litert"
