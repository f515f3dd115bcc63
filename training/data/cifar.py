"""CIFAR-10 loading from keras, the official python archive, or image folders.

TensorFlow/Keras is imported only inside :func:`load_cifar10` when
``source="keras"``; every other source needs numpy + Pillow only.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imagedata.errors import DataSourceError
from imagedata.image_folder import _Entry, _labelled_arrays, _path_entries, _is_image

__all__ = ["CIFAR10_CLASSES", "CifarData", "load_cifar10", "load_python_batch", "recorded_data_source"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META = "batches.meta"
_BATCH_FILES = _TRAIN_BATCHES + (_TEST_BATCH, _META)
_BATCH_DIR = "cifar-10-batches-py"
_SPLITS = ("train", "test")
# An official batch is ~31 MB; allow generous headroom, refuse anything absurd.
_MAX_BATCH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class CifarData:
    """CIFAR-10 arrays plus provenance.

    ``x_*``: uint8 ``[N, 32, 32, 3]`` (NHWC, RGB); ``y_*``: int64 ``[N]`` indexing
    ``class_names``.  ``source`` describes where the data came from (incl. the
    path); ``checksum`` is ``"sha256:<hex>"``: of the file for archives; for a
    directory, over the sorted relative POSIX paths of the files used, each
    followed by a NUL byte and the sha256 digest of its content; for keras,
    over the arrays' shapes and bytes.  ``eq=False``: instances compare by
    identity (arrays make field-wise equality ambiguous).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str
    checksum: str

    def __post_init__(self) -> None:
        for xname, yname in (("x_train", "y_train"), ("x_test", "y_test")):
            x, y = getattr(self, xname), getattr(self, yname)
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
                raise ValueError(f"{xname} must be uint8 [N,32,32,3], got {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{yname} must be int64 [{x.shape[0]}], got {y.dtype} {y.shape}")

    def __repr__(self) -> str:
        return (f"CifarData(x_train={self.x_train.shape}, x_test={self.x_test.shape}, "
                f"classes={len(self.class_names)}, source={self.source!r}, "
                f"checksum={self.checksum!r})")


def recorded_data_source(card: dict) -> str:
    """The `--data` a model card records, with environment variables expanded: shipped cards say
    `$CIFAR10_DIR` rather than a path on the machine that trained them."""
    recorded = card["training"]["config"]["data"]
    source = os.path.expandvars(recorded)
    if "$" in source:
        raise DataSourceError(f"the model card records --data {recorded}: set that variable "
                              f"(the CIFAR-10 copy the model was trained on) or pass --data")
    return source


def load_cifar10(source: str | os.PathLike[str] = "keras") -> CifarData:
    """Load CIFAR-10 from ``source``.

    * ``"keras"``: ``keras.datasets.cifar10.load_data()`` (imports keras lazily;
      may download to ``~/.keras/datasets``).
    * the official ``cifar-10-python.tar.gz`` (any tar/zip holding
      ``data_batch_1..5``, ``test_batch``, ``batches.meta`` at the top level or
      in one folder), read in memory;
    * the extracted ``cifar-10-batches-py/`` directory (or its parent);
    * an image-folder tree ``train|test/<class>/*.jpg|*.jpeg|*.png`` (optionally
      inside one top-level folder) as a directory, .tar.gz/.tgz/.tar or .zip.
      Class folders must be exactly the 10 :data:`CIFAR10_CLASSES`; images must
      be 32x32 RGB.

    Raises :class:`DataSourceError` (naming the file) for a missing path, an
    unknown format, a corrupt archive, a missing/malformed batch file, a
    missing or unknown class folder, or a bad image.
    """
    if isinstance(source, str) and source == "keras":
        return _load_keras()
    path = Path(os.fspath(source))
    if not path.exists():
        raise DataSourceError(f"CIFAR-10 source does not exist: {path}")
    if path.is_dir():
        batch_dir = _find_batch_dir(path)
        if batch_dir is not None:
            return _load_batch_dir(batch_dir)
    display, is_dir, entries = _path_entries(path, _cifar_keep, max_member_bytes=_MAX_BATCH_BYTES,
                                             what="CIFAR-10 source")
    if is_dir:
        return _from_image_entries(entries, display, checksum=None, is_dir=True)
    checksum = _sha256_file(path)
    batch_entries = [e for e in entries if _is_batch(e.parts)]
    if batch_entries:
        batches = _batches_by_name(batch_entries, display)
        return _from_batches(batches, display, f"CIFAR-10 python archive {display}", checksum)
    return _from_image_entries(entries, display, checksum=checksum, is_dir=False)


# --------------------------------------------------------------------------- #
# keras
# --------------------------------------------------------------------------- #
def _load_keras() -> CifarData:
    try:
        import keras  # lazy: pulls in TensorFlow
    except ImportError as exc:
        raise DataSourceError(
            "source 'keras' needs the keras/tensorflow packages (install the 'tf' extra)") from exc
    try:
        (x_tr, y_tr), (x_te, y_te) = keras.datasets.cifar10.load_data()
    except Exception as exc:  # download / cache problems
        raise DataSourceError(f"keras.datasets.cifar10.load_data() failed: {exc}") from exc
    arrays = []
    for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        x = np.ascontiguousarray(x, dtype=np.uint8)
        y = np.asarray(y).reshape(-1).astype(np.int64)
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or y.shape != (x.shape[0],):
            raise DataSourceError(
                f"keras.datasets.cifar10 {name} split has unexpected shapes {x.shape} / {y.shape}")
        arrays += [x, y]
    h = hashlib.sha256()
    for a in arrays:
        h.update(repr((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return CifarData(*arrays, class_names=CIFAR10_CLASSES,
                     source="keras.datasets.cifar10.load_data()", checksum="sha256:" + h.hexdigest())


# --------------------------------------------------------------------------- #
# official python batches
# --------------------------------------------------------------------------- #
def _is_batch(parts: tuple[str, ...]) -> bool:
    return len(parts) <= 2 and parts[-1] in _BATCH_FILES


def _cifar_keep(parts: tuple[str, ...]) -> bool:
    if _is_batch(parts):
        return True
    return _is_image(parts) and len(parts) in (3, 4) and parts[-3] in _SPLITS


def _find_batch_dir(path: Path) -> Path | None:
    if any((path / name).is_file() for name in _BATCH_FILES):
        return path
    if (path / _BATCH_DIR).is_dir():
        return path / _BATCH_DIR
    return None


def _load_batch_dir(batch_dir: Path) -> CifarData:
    display = str(batch_dir)
    batches: dict[str, _Entry] = {}
    for name in _BATCH_FILES:
        p = batch_dir / name
        if not p.is_file():
            raise DataSourceError(f"missing CIFAR-10 batch file {p}")
        batches[name] = _Entry((name,), str(p), path=str(p))
    contents = {name: e.read() for name, e in batches.items()}
    checksum = _combined_checksum((name, hashlib.sha256(data).digest())
                                  for name, data in contents.items())
    loaded = {name: _Entry((name,), batches[name].display, data=data)
              for name, data in contents.items()}
    return _from_batches(loaded, display, f"CIFAR-10 python batches {display}", checksum)


def _batches_by_name(entries: Iterable[_Entry], display: str) -> dict[str, _Entry]:
    out: dict[str, _Entry] = {}
    for e in entries:
        name = e.parts[-1]
        if name in out:
            raise DataSourceError(
                f"{display}: duplicate CIFAR-10 batch file {name} ({out[name].display}, {e.display})")
        out[name] = e
    for name in _BATCH_FILES:
        if name not in out:
            raise DataSourceError(f"missing CIFAR-10 batch file {name} in {display}")
    return out


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    import codecs

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 at protocol < 3
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = numeric._frombuffer
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """``pickle.load(f, encoding="bytes")`` restricted to numpy array globals."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _BatchUnpickler._allowed is None:
            _BatchUnpickler._allowed = _numpy_globals()
        try:
            return _BatchUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def _unpickle(entry: _Entry) -> dict[Any, Any]:
    try:
        obj = _BatchUnpickler(io.BytesIO(entry.read()), encoding="bytes").load()
    except DataSourceError:
        raise
    except Exception as exc:
        raise DataSourceError(f"cannot unpickle CIFAR-10 batch file {entry.display}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataSourceError(
            f"CIFAR-10 batch file {entry.display} holds a {type(obj).__name__}, expected a dict")
    return obj


def load_python_batch(data: bytes, display: str) -> dict[str, Any]:
    """A CIFAR python batch (CIFAR-10's or CIFAR-100's) through the restricted unpickler (numpy
    arrays and plain containers only), with str keys; `display` names it in errors."""
    batch = _unpickle(_Entry((display,), display, data=data))
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _get(d: dict[Any, Any], key: str) -> Any:
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _parse_batch(entry: _Entry) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(entry)
    data, labels = _get(d, "data"), _get(d, "labels")
    if data is None or labels is None:
        raise DataSourceError(f"CIFAR-10 batch file {entry.display} lacks 'data' or 'labels'")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataSourceError(
            f"CIFAR-10 batch file {entry.display}: data must be uint8 [N, 3072], got {desc}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataSourceError(f"CIFAR-10 batch file {entry.display}: bad labels ({exc})") from exc
    if y.shape != (data.shape[0],):
        raise DataSourceError(f"CIFAR-10 batch file {entry.display}: {data.shape[0]} images "
                              f"but labels of shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= len(CIFAR10_CLASSES)):
        raise DataSourceError(f"CIFAR-10 batch file {entry.display}: labels outside 0..9")
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y


def _check_meta(entry: _Entry) -> None:
    d = _unpickle(entry)
    names = _get(d, "label_names")
    try:
        decoded = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    except (TypeError, UnicodeDecodeError) as exc:
        raise DataSourceError(f"CIFAR-10 meta file {entry.display}: bad label_names ({exc})") from exc
    if decoded != CIFAR10_CLASSES:
        raise DataSourceError(f"CIFAR-10 meta file {entry.display}: label_names {list(decoded)} "
                              f"differ from {list(CIFAR10_CLASSES)}")


def _from_batches(batches: dict[str, _Entry], display: str, source: str,
                  checksum: str) -> CifarData:
    _check_meta(batches[_META])
    train = [_parse_batch(batches[name]) for name in _TRAIN_BATCHES]
    x_test, y_test = _parse_batch(batches[_TEST_BATCH])
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return CifarData(x_train, y_train, x_test, y_test, class_names=CIFAR10_CLASSES,
                     source=source, checksum=checksum)


# --------------------------------------------------------------------------- #
# image folders
# --------------------------------------------------------------------------- #
def _from_image_entries(entries: Sequence[_Entry], display: str, *, checksum: str | None,
                        is_dir: bool) -> CifarData:
    arrays = []
    digests: list[tuple[str, bytes]] = []
    for split in _SPLITS:
        x, y, _, ordered, split_digests = _labelled_arrays(
            entries, display=display, split=split, class_names=list(CIFAR10_CLASSES),
            require_all_classes=True, want_digests=is_dir)
        arrays += [x, y]
        if split_digests is not None:
            digests += [(e.relpath, d) for e, d in zip(ordered, split_digests)]
    if checksum is None:
        checksum = _combined_checksum(digests)
    kind = "directory" if is_dir else "archive"
    return CifarData(*arrays, class_names=CIFAR10_CLASSES,
                     source=f"CIFAR-10 image folder {kind} {display}", checksum=checksum)


# --------------------------------------------------------------------------- #
# checksums
# --------------------------------------------------------------------------- #
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise DataSourceError(f"cannot read {path}: {exc}") from exc
    return "sha256:" + h.hexdigest()


def _combined_checksum(items: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over sorted (relative path, NUL, sha256(content)) records."""
    h = hashlib.sha256()
    for relpath, digest in sorted(items):
        h.update(relpath.encode("utf-8") + b"\0" + digest)
    return "sha256:" + h.hexdigest()
