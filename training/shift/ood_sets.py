"""Out-of-distribution image sets for the shift benchmark: two synthetic ones and a real one read from disk.

Synthetic sets need no download, so the OOD part runs anywhere (CI, tests):
- uniform noise: every pixel uniform in 0..255, the easiest case a detector must get right;
- shuffled patches: each test image cut into square patches permuted within the image. It keeps the
  image's colours and local texture (its pixel multiset) and destroys the global shape, so a model
  that keys on texture alone cannot tell it from a real image.
A real natural-image set that is not CIFAR-10 (CIFAR-100, SVHN, ...) comes from `--ood-data`: an
image folder in the `<class>/<image>` layout (class names ignored) as a directory, .tar.gz or .zip,
or the official CIFAR-100 python data (`cifar-100-python.tar.gz`, its folder, or its `test` file),
whose pickles are read with CIFAR-10's restricted unpickler (numpy arrays only, never arbitrary objects).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import DataSourceError, read_labelled_images

CIFAR100_TEST = "test"
CIFAR100_DIR = "cifar-100-python"
_MAX_PICKLE_BYTES = 256 * 1024 * 1024   # the official test file is 31 MB


@dataclass(frozen=True, eq=False)
class OODSet:
    """Images [N, 32, 32, 3] uint8 that are not CIFAR-10, with where they came from."""

    name: str
    images: np.ndarray
    source: str
    checksum: str | None   # "sha256:<hex>" of the file(s) read; None for generated sets


# --------------------------------------------------------------------------------------------
# Synthetic sets
# --------------------------------------------------------------------------------------------
def uniform_noise(n: int, *, seed: int) -> np.ndarray:
    """`n` images of i.i.d. uniform 0..255 pixels."""
    rng = np.random.default_rng([seed, 0x0015E])
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def shuffled_patches(images: np.ndarray, *, patch: int = 8, seed: int) -> np.ndarray:
    """Each image cut into (32/patch)^2 square patches, permuted by its own seeded permutation."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"images must be uint8 [N, 32, 32, 3], got {images.dtype} {images.shape}")
    if patch < 1 or 32 % patch:
        raise ValueError(f"patch must divide 32, got {patch}")
    g = 32 // patch
    n = len(images)
    # [N, g, p, g, p, 3] -> [N, g*g, p, p, 3]: one row per patch
    tiles = images.reshape(n, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, patch, patch, 3)
    rng = np.random.default_rng([seed, 0x5A7C])
    order = np.argsort(rng.random((n, g * g)), axis=1)          # one permutation per image
    shuffled = np.take_along_axis(tiles, order[:, :, None, None, None], axis=1)
    return np.ascontiguousarray(
        shuffled.reshape(n, g, g, patch, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, 32, 32, 3))


# --------------------------------------------------------------------------------------------
# A real set from disk
# --------------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _folder_checksum(root: Path) -> str:
    """sha256 over sorted (relative POSIX path, NUL, sha256(content)) of the folder's image files,
    the rule `training.data.load_cifar10` uses for image folders."""
    from imagedata import IMAGE_EXTENSIONS

    records = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and path.name.lower().endswith(IMAGE_EXTENSIONS) \
                and not any(part.startswith(".") for part in rel.parts):
            records.append((rel.as_posix(), hashlib.sha256(path.read_bytes()).digest()))
    h = hashlib.sha256()
    for rel, digest in sorted(records):
        h.update(rel.encode("utf-8") + b"\0" + digest)
    return "sha256:" + h.hexdigest()


def _cifar100_images(data: bytes, display: str) -> np.ndarray:
    """The images of a CIFAR-100 python batch (`test` or `train`), via the restricted unpickler."""
    from training.data.cifar import load_python_batch   # one unpickling rule for both CIFARs

    batch = load_python_batch(data, display)
    x = batch.get("data")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataSourceError(f"CIFAR-100 file {display}: data must be uint8 [N, 3072], got {desc}")
    if batch.get("fine_labels") is None:
        raise DataSourceError(f"CIFAR-100 file {display}: no 'fine_labels' (not a CIFAR-100 batch)")
    return np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _cifar100_member(path: Path) -> tuple[str, bytes] | None:
    """(display, bytes) of `cifar-100-python/test` inside a tar/zip archive, or None if absent."""
    from imagedata.image_folder import _path_entries

    def keep(parts: tuple[str, ...]) -> bool:
        return parts[-1] == CIFAR100_TEST and len(parts) <= 2

    _, _, entries = _path_entries(path, keep, max_member_bytes=_MAX_PICKLE_BYTES, what="OOD data")
    return (entries[0].display, entries[0].read()) if entries else None


def load_ood_images(source: str | os.PathLike[str]) -> OODSet:
    """Read a real OOD set from `source` (see the module docstring for the formats)."""
    path = Path(os.fspath(source))
    if not path.exists():
        raise DataSourceError(f"OOD data does not exist: {path}")
    display = str(path)
    if path.is_dir():
        for candidate in (path / CIFAR100_TEST, path / CIFAR100_DIR / CIFAR100_TEST):
            if candidate.is_file():
                return OODSet("cifar100", _cifar100_images(candidate.read_bytes(), str(candidate)),
                              f"CIFAR-100 python test file {candidate}", _sha256_file(candidate))
        x, _, _ = read_labelled_images(path)
        return OODSet(path.name, x, f"image folder {display}", _folder_checksum(path))
    if path.name == CIFAR100_TEST:
        if path.stat().st_size > _MAX_PICKLE_BYTES:
            raise DataSourceError(f"{display} is larger than {_MAX_PICKLE_BYTES} bytes: not a CIFAR-100 test file")
        return OODSet("cifar100", _cifar100_images(path.read_bytes(), display),
                      f"CIFAR-100 python test file {display}", _sha256_file(path))
    member = _cifar100_member(path)
    if member is not None:
        return OODSet("cifar100", _cifar100_images(member[1], member[0]),
                      f"CIFAR-100 python archive {display} (member {member[0].split(':', 1)[-1]})",
                      _sha256_file(path))
    x, _, _ = read_labelled_images(path)
    stem = path.name.split(".")[0] or "ood"
    return OODSet(stem, x, f"image folder archive {display}", _sha256_file(path))


def seeded_subset(images: np.ndarray, n: int, *, seed: int) -> np.ndarray:
    """At most `n` images, drawn without replacement with a seed (all of them, in order, if fewer)."""
    if len(images) <= n:
        return images
    rng = np.random.default_rng([seed, 0x00D])
    return images[np.sort(rng.choice(len(images), size=n, replace=False))]
