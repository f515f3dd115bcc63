"""`python -m training.calibrate`: shift-aware temperature and OOD threshold, written into the artifact."""

import json
import shutil

import numpy as np
import pytest

from models.artifact import load_artifact, read_card
from training.calibrate import main, perturbed_validation
from training.shift.corruptions import VALIDATION_CORRUPTIONS

pytestmark = pytest.mark.training


@pytest.fixture()
def artifact_copy(tiny_artifact, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_artifact, target)
    return target


def test_perturbed_validation_uses_only_the_validation_corruptions(sample_data):
    x, y = sample_data.x_train[:20], sample_data.y_train[:20]
    sets = perturbed_validation(x, y, n=8, seed=0)
    assert [(name, s) for name, s, _, _ in sets] == [(n, s) for n in VALIDATION_CORRUPTIONS for s in range(1, 6)]
    for _, _, images, labels in sets:
        assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
        assert np.array_equal(labels, y[:8]) and not np.array_equal(images, x[:8])


def test_shift_aware_temperature_rewrites_the_artifact(artifact_copy, sample_archive, capsys):
    before = read_card(artifact_copy)
    assert main([str(artifact_copy), "--data", str(sample_archive), "--images-per-set", "10"]) == 0
    out = capsys.readouterr().out
    assert "temperature" in out and "OOD threshold" in out
    card = read_card(artifact_copy)                         # checksum verified against model.keras
    loaded = load_artifact(artifact_copy)                   # temperature layer == card
    assert loaded.card["temperature"] == card["temperature"]
    cal = card["calibration"]
    assert cal["temperature_method"] == "shift-aware"
    assert cal["temperature_before"] == pytest.approx(before["temperature"])
    assert len(cal["sets"]) == 1 + 4 * 5 and cal["sets"][1]["n_images"] == 10
    assert card["metrics"]["test_after_temperature"]["temperature"] == pytest.approx(card["temperature"])
    ood = card["ood_threshold"]
    assert ood["score"] == "predictive_entropy" and ood["tpr"] == 0.95
    assert ood["temperature"] == pytest.approx(card["temperature"])
    assert 0.0 <= ood["threshold"] <= np.log(10) + 1e-9
    assert card["model_sha256"] != before["model_sha256"]   # the temperature layer changed


def test_clean_refit_to_output_leaves_the_source(artifact_copy, sample_archive, tmp_path):
    before = read_card(artifact_copy)
    out = tmp_path / "copy"
    assert main([str(artifact_copy), "--data", str(sample_archive), "--temperature", "clean",
                 "--output", str(out)]) == 0
    assert read_card(artifact_copy) == before               # source untouched
    card = read_card(out)
    # the same validation split and objective as training: the same temperature
    assert card["temperature"] == pytest.approx(before["temperature"], rel=1e-4)
    assert card["calibration"]["temperature_method"] == "clean" and len(card["calibration"]["sets"]) == 1
    assert "ood_threshold" in card


def test_other_data_than_the_training_data_is_refused(artifact_copy, sample_data_dir, capsys):
    card = json.loads((artifact_copy / "model_card.json").read_text())
    card["data"]["checksum"] = "sha256:" + "0" * 64
    (artifact_copy / "model_card.json").write_text(json.dumps(card))
    assert main([str(artifact_copy), "--data", str(sample_data_dir)]) == 1
    assert "not the data" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--temperature", "hot"], ["--images-per-set", "0"], ["--tpr", "1.0"]])
def test_bad_arguments_exit_2(artifact_copy, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(artifact_copy), *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
