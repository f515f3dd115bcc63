"""Corrupted copies of a data set, built once and cached on disk.

Why a cache: the full CIFAR-10-C build (15 types x 5 severities x 10,000 images) takes minutes on
two cores, and every benchmark run needs the same arrays. A cached set is keyed by everything that
determines it: corruption, severity, seed, number of images, the checksum of the clean source and
the version of the corruption code. Files are plain ``.npy`` (loaded with ``allow_pickle=False``)
next to a small JSON manifest naming the key, written atomically (temporary file + rename) so a
crash or a concurrent builder never leaves a half-written set behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .corruptions import IMAGE_SHAPE, corrupt

__all__ = ["CACHE_FORMAT", "cache_key", "corrupted_set", "default_cache_dir"]

#: Bump when a corruption's output changes, so older cached sets are not reused.
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$CALIB_SHIFT_CACHE`` if set, else ``~/.cache/calibrated-cifar/cifar10-c``."""
    env = os.environ.get("CALIB_SHIFT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "calibrated-cifar" / "cifar10-c"


def cache_key(name: str, severity: int, seed: int, n_images: int, source_checksum: str) -> dict:
    """The manifest of one cached set: what it was built from."""
    return {"format": CACHE_FORMAT, "corruption": name, "severity": int(severity), "seed": int(seed),
            "n_images": int(n_images), "source_checksum": str(source_checksum)}


def _stem(key: dict) -> str:
    """A readable, file-system-safe name; the digest covers the full key (checksum included)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{key['corruption']}-s{key['severity']}-seed{key['seed']}-n{key['n_images']}-{digest}"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, n_images: int) -> np.ndarray | None:
    """The cached array, or None if it is missing or not what the key promises (then rebuilt)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.dtype != np.uint8 or arr.shape != (n_images, *IMAGE_SHAPE):
        return None
    return arr


def corrupted_set(images: np.ndarray, name: str, severity: int, *, seed: int,
                  cache_dir: Path | None, source_checksum: str) -> np.ndarray:
    """``corrupt(images, name, severity, seed=seed)``, read from ``cache_dir`` when built before.

    ``source_checksum`` identifies the clean images (e.g. ``CifarData.checksum``); the caller
    vouches that it matches ``images``. ``cache_dir=None`` builds without caching.
    """
    if cache_dir is None:
        return corrupt(images, name, severity, seed=seed)
    key = cache_key(name, severity, seed, len(images), source_checksum)
    cache_dir = Path(cache_dir)
    stem = _stem(key)
    npy, manifest = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"
    if npy.is_file():
        cached = _load(npy, len(images))
        if cached is not None:
            return cached
    data = corrupt(images, name, severity, seed=seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(npy, lambda f: np.save(f, data, allow_pickle=False))
    _atomic_write(manifest, lambda f: f.write(json.dumps(key, indent=1, sort_keys=True).encode()))
    return data
