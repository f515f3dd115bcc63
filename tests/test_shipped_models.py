"""The artifacts in models/shipped/ load (checksum verified, safe_mode) under their folder's name.

The service names a model after its card, so an artifact trained into runs/<x> and copied into
models/shipped/ must carry `--name` equal to the folder name, or the documented URLs break.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras")

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shipped"
FOLDERS = sorted(p for p in SHIPPED.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_the_default_and_the_resnet_model_are_shipped():
    assert {p.name for p in FOLDERS} >= {"cifar10-airbench", "cifar10-resnet"}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_shipped_artifact_loads_under_its_folder_name(folder):
    from models.artifact import load_artifact
    from models.inference import SplitClassifier

    artifact = load_artifact(folder)
    assert artifact.name == folder.name
    card = artifact.card
    assert card["temperature"] > 0 and card["classes"][0] == "airplane"
    # The card's figures are the test split's after T; the model must run on raw uint8 pixels.
    classifier = SplitClassifier(artifact.model)
    logits = classifier.logits(np.zeros((2, 32, 32, 3), np.uint8))
    assert logits.shape == (2, len(card["classes"])) and np.isfinite(logits).all()
    assert classifier.temperature == pytest.approx(card["temperature"])
