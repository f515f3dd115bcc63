"""An artifact's conformal calibration set: the validation split's logits, stored beside the model.

Prediction sets need the conformity scores of images the model never trained on. Storing the
validation split's logits (float32 [n, K]) and labels, rather than one threshold, lets the
service serve any coverage, method and class-conditional option exactly. The file is
`calibration_set.npz` in the artifact folder; the card's `conformal_set` block records its
SHA-256 and the `model_sha256` it was computed with. Written by `python -m training.fit_conformal`.

A block whose file is missing or altered makes the artifact invalid (`ArtifactError`, like a
tampered model); a block computed for another `model.keras` is stale: the model serves without
prediction sets (`stale_reason`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from models.artifact import ArtifactError, sha256_file, update_card

CALIBRATION_SET_FILE = "calibration_set.npz"
CARD_KEY = "conformal_set"


def save_calibration_set(directory: str | os.PathLike, logits: np.ndarray, labels: np.ndarray,
                         details: dict | None = None) -> dict:
    """Write the logits and labels atomically and record them in the card; returns the block."""
    folder = Path(directory)
    from models.artifact import read_card

    card = read_card(folder)  # verifies model.keras first
    z = np.asarray(logits, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or y.shape != (z.shape[0],) or not np.all(np.isfinite(z)):
        raise ValueError(f"need finite logits [n, K] and labels [n], got {z.shape} and {y.shape}")
    fd, tmp = tempfile.mkstemp(prefix=f".{CALIBRATION_SET_FILE}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, logits=z, labels=y)
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / CALIBRATION_SET_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    block = {
        "file": CALIBRATION_SET_FILE,
        "sha256": sha256_file(folder / CALIBRATION_SET_FILE),
        "n": int(z.shape[0]),
        "num_classes": int(z.shape[1]),
        "content": "uncalibrated logits (float32) and labels; probabilities are softmax(logits / temperature)",
        "model_sha256": card["model_sha256"],
        **(details or {}),
    }
    update_card(folder, {CARD_KEY: block})
    return block


def stale_reason(card: dict) -> str | None:
    """Why the card's set cannot serve this model (None when it can, or when there is none)."""
    block = card.get(CARD_KEY)
    if block is None:
        return None
    if not isinstance(block, dict):
        return f"the card's {CARD_KEY} is not an object"
    if block.get("model_sha256") != card.get("model_sha256"):
        return "it was computed for another model.keras (rerun training.fit_conformal)"
    return None


def load_calibration_set(directory: str | os.PathLike, card: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(logits float32 [n, K], labels int64 [n]) verified against the card; None without a block.

    ArtifactError when the file is missing, altered (checksum) or malformed.
    """
    block = card.get(CARD_KEY)
    if block is None:
        return None
    folder = Path(directory)
    name = block.get("file", CALIBRATION_SET_FILE) if isinstance(block, dict) else CALIBRATION_SET_FILE
    path = folder / Path(str(name)).name
    if not path.is_file():
        raise ArtifactError(f"{path}: conformal calibration set missing (the card's {CARD_KEY} names it)")
    actual = sha256_file(path)
    if not isinstance(block, dict) or actual != block.get("sha256"):
        raise ArtifactError(f"{path}: checksum mismatch with the card's {CARD_KEY}: the file was modified")
    try:
        with np.load(path, allow_pickle=False) as npz:
            z, y = npz["logits"], npz["labels"]
    except Exception as exc:  # a checksummed file should load; say which one did not
        raise ArtifactError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if z.ndim != 2 or y.shape != (z.shape[0],) or y.dtype.kind not in "iu" or z.shape[0] != block.get("n"):
        raise ArtifactError(f"{path}: logits {z.shape} / labels {y.shape} do not match the card")
    return z, y.astype(np.int64)
