"""The artifacts in models/shipped/ load (checksum verified, safe_mode) under their folder's name,
and plain Keras inference on them is deterministic and equals the service's prediction.

The service names a model after its card, so an artifact trained into runs/<x> and copied into
models/shipped/ must carry `--name` equal to the folder name, or the documented URLs break.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

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


# --- plain Keras on the shipped files: deterministic, and the service's numbers -------------------

N_IMAGES = 64


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Synthetic images: smooth colour blobs plus noise, so the logits are not degenerate."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    base = rng.uniform(0, 255, (N_IMAGES, 1, 1, 3)) * (0.5 + 0.5 * np.sin(
        rng.uniform(1, 6, (N_IMAGES, 1, 1, 3)) * (xx + yy)[None, :, :, None]))
    noise = rng.normal(0, 20, (N_IMAGES, 32, 32, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", params=FOLDERS, ids=lambda p: p.name)
def shipped(request):
    """(plain Keras model, the service's LoadedModel) for one shipped folder."""
    import keras

    import models.layers  # noqa: F401  registers the custom layers for safe_mode loading
    from models.artifact import load_artifact
    from models.inference import SplitClassifier
    from service.registry import LoadedModel

    folder = request.param
    plain = keras.saving.load_model(folder / "model.keras", safe_mode=True)
    artifact = load_artifact(folder)
    return plain, LoadedModel(artifact.name, folder, artifact.card, SplitClassifier(artifact.model))


def test_plain_keras_predict_is_deterministic_and_equals_the_service(shipped, images):
    from models.calibration import softmax
    from service import dataplane

    plain, service_model = shipped
    first = plain.predict(images, verbose=0)
    np.testing.assert_array_equal(first, plain.predict(images, verbose=0))
    for out in (plain(images), plain(images, training=False)):
        np.testing.assert_allclose(np.asarray(out), first, rtol=1e-5, atol=1e-5)
    served = dataplane.predict(service_model, images, mc_samples=0, seed=None)
    np.testing.assert_allclose(softmax(first.astype(np.float64)), served.probabilities, atol=1e-5)
    # the output is the temperature-scaled logits, T being the card's
    np.testing.assert_allclose(first, served.logits / service_model.temperature, rtol=1e-4, atol=1e-4)
    assert (first.argmax(1) == served.probabilities.argmax(1)).all()


def test_mc_sampling_is_explicit_and_both_paths_agree(shipped, images):
    """Vectorised stateless masks vs the plain Keras head(training=True) loop: same statistics;
    their mean is the deterministic prediction (BatchNorm in inference mode in both)."""
    _, service_model = shipped
    clf = service_model.classifier
    x = images[:16]
    vec = clf.mc_logits(x, 2000, seed=1)
    np.testing.assert_array_equal(vec, clf.mc_logits(x, 2000, seed=1))
    assert not np.array_equal(vec[:50], clf.mc_logits(x, 50, seed=2))
    assert np.all(vec.var(axis=0) > 0)                         # masks differ: real sampling
    explicit = clf.mc_logits_keras(x, 300, seed=3)
    np.testing.assert_array_equal(explicit, clf.mc_logits_keras(x, 300, seed=3))
    deterministic = clf.logits(x)
    for samples in (vec, explicit):
        se = samples.std(axis=0) / np.sqrt(len(samples)) + 1e-6
        assert (np.abs(samples.mean(axis=0) - deterministic) / se).max() < 5.0
    se = np.sqrt(vec.var(axis=0) / len(vec) + explicit.var(axis=0) / len(explicit))
    assert (np.abs(vec.mean(axis=0) - explicit.mean(axis=0)) / se).max() < 5.0
    ratio = vec.var(axis=0).sum(axis=1) / explicit.var(axis=0).sum(axis=1)
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio
    pooled = vec.var(axis=0).sum() / explicit.var(axis=0).sum()
    assert 0.85 < pooled < 1.18, pooled
