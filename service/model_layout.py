"""What the model directory holds: model folders and their numbered version folders.

The layout is TF Serving's and Triton's: `<model_dir>/<name>/<version>/` with `<version>` a positive
integer (no sign, no leading zero). Today's flat layout, `<model_dir>/<name>/model_card.json`, is
version 1 of `<name>`, so a folder that was served flat can gain a `2/` beside its files and roll
forward. `CALIB_MODEL_DIR` may also be one model folder itself (flat or versioned; a mounted
volume, e.g. KServe's /mnt/models): that model's name is then its card's `name`.

Scanning reads directory listings and, for a model that is CALIB_MODEL_DIR itself, one card's
name; nothing is verified here (that is loading's job: `service.registry.build_version`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("service.model_layout")

CARD_FILE = "model_card.json"
MODEL_FILE = "model.keras"
VERSION_NAME = re.compile(r"[1-9][0-9]{0,17}")   # a positive integer folder name, TF Serving style
FLAT_VERSION = "1"

_reported: set[str] = set()   # ignored folders already logged (the poller rescans every few seconds)


def version_key(version: str) -> int:
    """Versions order as integers: 10 is newer than 9."""
    return int(version)


@dataclass(frozen=True)
class ModelFolder:
    """One model on disk: its name and each version's artifact folder."""

    name: str
    folder: Path
    versions: dict[str, Path] = field(default_factory=dict)

    def newest_first(self) -> list[str]:
        return sorted(self.versions, key=version_key, reverse=True)


def is_artifact(folder: Path) -> bool:
    """A folder holding a card or a model file is an artifact (a broken one is still one: loading
    reports what is wrong with it)."""
    return (folder / CARD_FILE).exists() or (folder / MODEL_FILE).exists()


def _log_once(path: Path, message: str, *args) -> None:
    key = str(path)
    if key not in _reported:
        _reported.add(key)
        logger.warning(message, *args)


def _subfolders(folder: Path) -> tuple[dict[str, Path], list[Path]]:
    """(numbered subfolders by version, other visible subfolders); hidden ones are skipped."""
    versions: dict[str, Path] = {}
    others: list[Path] = []
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return versions, others
    for child in children:
        if VERSION_NAME.fullmatch(child.name):
            versions[child.name] = child
        else:
            others.append(child)
    return versions, others


def version_folders(folder: Path) -> dict[str, Path]:
    """The numbered subfolders of a model folder; other visible subfolders are ignored, with a
    warning (once per folder), hidden ones (e.g. a copy in progress named `.3.tmp`) silently."""
    versions, others = _subfolders(folder)
    for child in others:
        _log_once(child, "ignoring %s: a model folder's subfolders are versions, named by a positive "
                         "integer (e.g. %s/2)", child, folder)
    return versions


def model_versions(folder: Path) -> dict[str, Path]:
    """A model folder's versions: its numbered subfolders, and the folder itself as version 1 when
    it holds an artifact (the flat layout) and has no `1/`."""
    versions = version_folders(folder)
    if is_artifact(folder):
        if FLAT_VERSION in versions:
            _log_once(folder / CARD_FILE, "%s holds both an artifact and a %s/ folder: serving %s/ as "
                                          "version %s, ignoring the files beside it", folder, FLAT_VERSION,
                      FLAT_VERSION, FLAT_VERSION)
        else:
            versions[FLAT_VERSION] = folder
    return dict(sorted(versions.items(), key=lambda kv: version_key(kv[0])))


def _card_name(versions: dict[str, Path]) -> str | None:
    """The `name` in the newest readable card (no checksum: only to name a model folder that is
    CALIB_MODEL_DIR itself, as the flat layout always did)."""
    for version in sorted(versions, key=version_key, reverse=True):
        try:
            name = json.loads((versions[version] / CARD_FILE).read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str) and name:
            return name
    return None


def scan(model_dir: Path) -> dict[str, ModelFolder]:
    """name -> ModelFolder for everything under `model_dir`, sorted by name. `model_dir` is one
    model when it holds an artifact or numbered folders; else each visible subfolder that holds
    either is a model named by the subfolder (other subfolders are not models: ignored)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return {}
    own = model_versions(model_dir) if (is_artifact(model_dir) or _subfolders(model_dir)[0]) else {}
    if own:
        name = _card_name(own) or model_dir.name
        return {name: ModelFolder(name, model_dir, own)}
    found: dict[str, ModelFolder] = {}
    for child in sorted(p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (is_artifact(child) or _subfolders(child)[0]):
            continue   # not a model folder (e.g. notes): ignored, as always
        versions = model_versions(child)
        if versions:
            found[child.name] = ModelFolder(child.name, child, versions)
    return found


def fingerprint(folder: Path) -> tuple:
    """(file name, size, mtime) of a version folder's files: a version that failed to load is tried
    again (by the poller) only once its files changed, e.g. when a copy in progress completed."""
    try:
        return tuple(sorted((p.name, st.st_size, st.st_mtime_ns)
                            for p in folder.iterdir() if p.is_file() for st in [p.stat()]))
    except OSError:
        return ()
