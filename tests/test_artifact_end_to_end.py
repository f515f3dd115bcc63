"""End to end: one short epoch on the shipped fixture -> temperature -> artifact -> reload -> card check."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from models.artifact import ArtifactError, load_artifact, read_card, save_artifact

pytestmark = pytest.mark.training


def test_card_records_what_a_user_needs(tiny_artifact):
    card = read_card(tiny_artifact)
    assert card["classes"][0] == "airplane" and len(card["classes"]) == 10
    assert card["input"]["shape"] == [32, 32, 3] and card["input"]["dtype"] == "uint8"
    assert card["temperature"] > 0
    for key in ("test_before_temperature", "test_after_temperature", "validation_after_temperature"):
        assert set(card["metrics"][key]) >= {"accuracy", "nll", "brier", "ece", "adaptive_ece", "bins"}
    assert card["data"]["checksum"].startswith("sha256:")
    # tiny_artifact (conftest.py): 300 fixture train images, n_validation=100; 300 test images
    assert card["data"]["n_train"] == 200 and card["data"]["n_validation"] == 100
    assert card["data"]["n_test"] == 300
    assert card["training"]["config"]["label_smoothing"] == pytest.approx(0.1)
    assert set(card["versions"]) >= {"tensorflow", "keras", "numpy", "python"}
    assert len(card["model_sha256"]) == 64 and card["created"]


def test_card_matches_a_recomputation(tiny_artifact, sample_archive):
    from training.evaluate import card_mismatches, evaluate_artifact

    result = evaluate_artifact(str(tiny_artifact), str(sample_archive))
    assert card_mismatches(result) == []
    card_t = read_card(tiny_artifact)["temperature"]
    assert result["temperature"] == pytest.approx(card_t, rel=1e-6)
    # temperature scaling never changes accuracy
    assert result["before"].accuracy == result["after"].accuracy


def test_temperature_was_fitted_on_validation_not_test(tiny_artifact, sample_data):
    from models.calibration import fit_temperature
    from models.inference import SplitClassifier
    from training.data import train_validation_split

    artifact = load_artifact(tiny_artifact)
    classifier = SplitClassifier(artifact.model)
    _, _, x_val, y_val = train_validation_split(sample_data.x_train, sample_data.y_train,
                                                n_validation=100, seed=1)  # as in conftest.py
    t_val = fit_temperature(classifier.logits(x_val), y_val)
    assert t_val == pytest.approx(artifact.card["temperature"], rel=1e-3)


def test_evaluate_cli_check_and_png(tiny_artifact, sample_archive, tmp_path, capsys):
    from training.evaluate import main

    png = tmp_path / "diagram.png"
    assert main([str(tiny_artifact), "--data", str(sample_archive), "--check", "--png", str(png),
                 "--views", "--bootstrap", "50"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "ece" in out and "+ mirror + shifts" in out
    ece_line = next(line for line in out.splitlines() if "bootstrap" in line and " ece " in line)
    estimate, low, high = (float(v) for v in ece_line.replace("[", " ").replace("]", " ")
                           .replace(",", " ").split()[-3:])
    card_ece = read_card(tiny_artifact)["metrics"]["test_after_temperature"]["ece"]
    assert estimate == pytest.approx(card_ece, abs=1e-4) and low < high
    with pytest.raises(SystemExit):
        main([str(tiny_artifact), "--bootstrap", "1"])


def test_accuracy_by_views_reproduces_the_cards_accuracy(tiny_artifact, sample_archive):
    from training.evaluate import accuracy_by_views

    views = accuracy_by_views(str(tiny_artifact), str(sample_archive))
    assert list(views) == ["one view", "+ mirror", "+ mirror + shifts"]
    card = read_card(tiny_artifact)
    # the tiny artifact exports mirror TTA only, so "+ mirror" is its own graph
    assert views["+ mirror"] == pytest.approx(card["metrics"]["test_after_temperature"]["accuracy"])
    assert all(0.0 <= v <= 1.0 for v in views.values())


def test_tampered_model_file_is_refused(tiny_artifact, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(tiny_artifact, copy)
    model_file = copy / "model.keras"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_artifact(copy)


def test_truncated_model_file_is_refused(tiny_artifact, tmp_path):
    copy = tmp_path / "truncated"
    shutil.copytree(tiny_artifact, copy)
    model_file = copy / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="model.keras"):
        load_artifact(copy)


def test_corrupt_file_with_matching_checksum_gives_clear_error(tiny_artifact, tmp_path):
    """Even if someone rewrites the card's checksum, Keras' failure is reported, not raised raw."""
    from models.artifact import sha256_file

    copy = tmp_path / "rewritten"
    shutil.copytree(tiny_artifact, copy)
    (copy / "model.keras").write_bytes(b"not a zip file")
    card = json.loads((copy / "model_card.json").read_text())
    card["model_sha256"] = sha256_file(copy / "model.keras")
    (copy / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="could not load"):
        load_artifact(copy)


@pytest.mark.parametrize("damage", ["no_card", "bad_json", "no_model", "not_a_card"])
def test_incomplete_artifacts_are_refused(tiny_artifact, tmp_path, damage):
    copy = tmp_path / damage
    shutil.copytree(tiny_artifact, copy)
    if damage == "no_card":
        (copy / "model_card.json").unlink()
    elif damage == "bad_json":
        (copy / "model_card.json").write_text("{not json")
    elif damage == "no_model":
        (copy / "model.keras").unlink()
    else:
        (copy / "model_card.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError):
        load_artifact(copy)


def test_save_is_atomic_and_refuses_to_clobber(tiny_artifact, tmp_path):
    artifact = load_artifact(tiny_artifact)
    target = tmp_path / "out"
    save_artifact(artifact.model, {"temperature": artifact.card["temperature"]}, target)
    with pytest.raises(ArtifactError, match="already exists"):
        save_artifact(artifact.model, {"temperature": 1.0}, target)

    class Exploding:
        def save(self, path):
            open(path, "wb").write(b"partial")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_artifact(Exploding(), {"temperature": 1.0}, target, overwrite=True)
    # the failed overwrite left the old artifact intact and no staging folders behind
    assert load_artifact(target).card["model_sha256"] == read_card(target)["model_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    reloaded = load_artifact(target)
    x = np.zeros((2, 32, 32, 3), np.uint8)
    from models.inference import SplitClassifier
    np.testing.assert_allclose(SplitClassifier(reloaded.model).logits(x),
                               SplitClassifier(artifact.model).logits(x), rtol=1e-5, atol=1e-5)
