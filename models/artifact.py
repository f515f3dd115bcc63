"""Model artifacts on disk: `model.keras` plus a JSON model card, written atomically.

An artifact is a folder. It is written to a temporary sibling folder and renamed into place,
so a reader never sees half an artifact. The card records the SHA-256 of `model.keras`;
`load_artifact` refuses a tampered or truncated file before Keras ever parses it, and loads
with `safe_mode=True` (no lambdas, no pickles).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODEL_FILE = "model.keras"
CARD_FILE = "model_card.json"
CARD_SCHEMA = 1


class ArtifactError(ValueError):
    """The artifact folder is missing, incomplete, tampered with or unreadable."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_artifact(model, card: dict, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save `model` and `card` (plus checksum) to `directory`, atomically."""
    target = Path(directory)
    if target.exists() and not overwrite:
        raise ArtifactError(f"{target} already exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it 0700; the artifact must be readable by a service user
        model.save(staging / MODEL_FILE)
        full_card = {**card, "schema": CARD_SCHEMA, "model_file": MODEL_FILE,
                     "model_sha256": sha256_file(staging / MODEL_FILE)}
        (staging / CARD_FILE).write_text(json.dumps(full_card, indent=2, sort_keys=False) + "\n")
        if target.exists():
            retired = target.with_name(f".{target.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_card(directory: str | os.PathLike) -> dict:
    """Read and check the model card, and verify the model file's checksum against it."""
    folder = Path(directory)
    card_path = folder / CARD_FILE
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not an artifact folder")
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{card_path}: model card missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{card_path}: unreadable model card ({exc})") from None
    if not isinstance(card, dict) or "model_sha256" not in card or "temperature" not in card:
        raise ArtifactError(f"{card_path}: not a model card (no model_sha256/temperature)")
    model_path = folder / card.get("model_file", MODEL_FILE)
    if not model_path.is_file():
        raise ArtifactError(f"{model_path}: model file missing")
    actual = sha256_file(model_path)
    if actual != card["model_sha256"]:
        raise ArtifactError(
            f"{model_path}: checksum mismatch (card says {card['model_sha256'][:12]}..., file is "
            f"{actual[:12]}...): the file was modified or truncated")
    return card


def update_card(directory: str | os.PathLike, fields: dict) -> dict:
    """Add or replace top-level `fields` of an artifact's card, atomically (a temporary file in the
    same folder, then `os.replace`); `model.keras` is not touched. The card is verified first
    (`read_card`: the checksum must match), so a field is never added to a tampered artifact.
    `model_sha256`, `model_file` and `schema` describe the file and cannot be changed here."""
    folder = Path(directory)
    card = read_card(folder)
    frozen = {"model_sha256", "model_file", "schema"} & set(fields)
    if frozen:
        raise ArtifactError(f"{folder / CARD_FILE}: {sorted(frozen)} describe the model file; not updatable")
    card = {**card, **fields}
    fd, tmp = tempfile.mkstemp(prefix=f".{CARD_FILE}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(card, indent=2, sort_keys=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / CARD_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return card


@dataclass
class Artifact:
    name: str
    path: Path
    card: dict
    model: object  # keras.Model


def load_artifact(directory: str | os.PathLike) -> Artifact:
    """Verify and load an artifact; raise ArtifactError with the file's name on any problem."""
    import keras

    import models.layers  # noqa: F401  (registers the custom layers for deserialisation)

    folder = Path(directory)
    card = read_card(folder)
    model_path = folder / card.get("model_file", MODEL_FILE)
    try:
        model = keras.saving.load_model(model_path, safe_mode=True, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file
        raise ArtifactError(f"{model_path}: Keras could not load it ({type(exc).__name__}: {exc})") from None
    stored_t = float(keras.ops.convert_to_numpy(model.get_layer("temperature").temperature))
    if abs(stored_t - float(card["temperature"])) > 1e-5 * max(1.0, abs(stored_t)):
        raise ArtifactError(f"{model_path}: temperature {stored_t} differs from the card's {card['temperature']}")
    return Artifact(name=card.get("name", folder.name), path=folder, card=card, model=model)
