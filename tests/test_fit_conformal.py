"""training.fit_conformal and models.conformal_set on the tiny artifact."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from models.artifact import ArtifactError, read_card, update_card
from models.conformal_set import CALIBRATION_SET_FILE, CARD_KEY, load_calibration_set, stale_reason


def test_fit_conformal_recomputes_the_set_training_wrote(tmp_path, tiny_artifact, sample_archive):
    from training.fit_conformal import fit_artifact

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_artifact, folder)
    written = load_calibration_set(tiny_artifact, read_card(tiny_artifact))
    (folder / CALIBRATION_SET_FILE).unlink()
    block = fit_artifact(str(folder), str(sample_archive))
    assert block["card_check"]["compared"] and block["card_check"]["within_tolerance"]
    card = read_card(folder)
    assert card[CARD_KEY] == block and "$CIFAR10_DIR" in block["command"]
    logits, labels = load_calibration_set(folder, card)
    np.testing.assert_array_equal(labels, written[1])
    np.testing.assert_allclose(logits, written[0], atol=1e-5)
    assert stale_reason(card) is None


def test_missing_or_altered_file_is_an_artifact_error(tmp_path, tiny_artifact):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_artifact, folder)
    card = read_card(folder)
    with open(folder / CALIBRATION_SET_FILE, "ab") as f:
        f.write(b"x")
    with pytest.raises(ArtifactError, match="checksum"):
        load_calibration_set(folder, card)
    (folder / CALIBRATION_SET_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_calibration_set(folder, card)


def test_a_set_for_another_model_is_stale(tmp_path, tiny_artifact):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_artifact, folder)
    block = {**read_card(folder)[CARD_KEY], "model_sha256": "0" * 64}
    card = update_card(folder, {CARD_KEY: block})
    assert "another model" in stale_reason(card)
    card_path = folder / "model_card.json"
    plain = json.loads(card_path.read_text())
    del plain[CARD_KEY]
    assert stale_reason(plain) is None and load_calibration_set(folder, plain) is None
