"""Labelled image folders (``<class>/*.jpg|*.jpeg|*.png``) read with numpy + Pillow only.

No TensorFlow here: the HTTP service imports this module to read uploaded
validation sets and single images, and training's CIFAR-10 loader reads image folders with it.

Supported sources
-----------------
* a directory;
* a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive (any compression ``tarfile`` knows);
* a ``.zip`` archive.

Archives are read in memory, never extracted to disk.  Paths are given to
:func:`read_labelled_images`; uploaded archives (bytes or a seekable binary
file object) go to :func:`read_labelled_images_from_bytes`, which picks the
archive type from the file name and falls back to sniffing the content.

Layout
------
``<class>/<image>`` (or ``<split>/<class>/<image>`` when ``split`` is given),
optionally inside one extra top-level folder (``cifar10-jpeg-sample/train/...``).
Files whose extension is not ``.jpg``/``.jpeg``/``.png`` are ignored, as are
hidden entries (any path component starting with ``.``, e.g. ``.DS_Store``,
``._x.png``) and ``__MACOSX/``.  Archive members with absolute paths or ``..``
components are ignored.  Images are sorted by file name within each class;
classes come in ``class_names`` order.

Every problem raises :class:`~imagedata.errors.DataSourceError` with a
message that names the file (``archive.tar.gz:train/cat/0001.png`` for archive
members).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataSourceError

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_SIZE",
    "decode_image",
    "read_labelled_images",
    "read_labelled_images_from_bytes",
]

IMAGE_SIZE = 32
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Decoders Pillow may use: only the formats we accept (no exotic decoders on uploads).
_PIL_FORMATS = ("JPEG", "PNG")
# With resize=True, refuse sources bigger than this before decoding (decompression bombs).
MAX_SOURCE_PIXELS = 40_000_000
# An archive member larger than this is refused (an image file; zip/tar bombs).
MAX_IMAGE_FILE_BYTES = 32 * 1024 * 1024
# Images per decoding task in the thread pool.
_CHUNK = 512

PathLike = Union[str, "os.PathLike[str]"]
Keep = Callable[[tuple[str, ...]], bool]


# --------------------------------------------------------------------------- #
# Single images
# --------------------------------------------------------------------------- #
def decode_image(data: bytes, *, name: str, resize: bool = False) -> np.ndarray:
    """Decode one JPEG/PNG file to a ``uint8`` array of shape ``[32, 32, 3]``.

    ``name`` is only used in error messages.  Without ``resize`` the image must
    already be 32x32 in mode ``RGB`` (grayscale, RGBA, palette, CMYK ... are
    rejected).  With ``resize=True`` any size/mode is converted to RGB and
    resized to 32x32 with bilinear filtering.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise DataSourceError(f"cannot decode image {name}: the file is empty", "undecodable_image")
    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except UnidentifiedImageError as exc:
        raise DataSourceError(f"cannot decode image {name}: not a JPEG or PNG file", "undecodable_image") from exc
    except Exception as exc:  # OSError, SyntaxError, ... from a damaged header
        raise DataSourceError(f"cannot decode image {name}: {exc}", "undecodable_image") from exc
    with img:
        width, height = img.size
        if not resize:
            if (width, height) != (IMAGE_SIZE, IMAGE_SIZE) or img.mode != "RGB":
                raise DataSourceError(
                    f"image {name} is {width}x{height} mode {img.mode}; expected "
                    f"{IMAGE_SIZE}x{IMAGE_SIZE} RGB",
                    "wrong_image_size" if (width, height) != (IMAGE_SIZE, IMAGE_SIZE) else "unsupported_image_mode",
                )
            try:
                img.load()
                arr = np.asarray(img, dtype=np.uint8)
            except Exception as exc:
                raise DataSourceError(f"cannot decode image {name}: {exc}", "undecodable_image") from exc
        else:
            if width * height > MAX_SOURCE_PIXELS:
                raise DataSourceError(
                    f"image {name} is {width}x{height}, larger than {MAX_SOURCE_PIXELS} pixels",
                    "image_too_large",
                )
            try:
                if img.format == "JPEG":
                    img.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))  # decode at a reduced scale
                work = img
                if work.mode in ("P", "PA"):
                    work = work.convert("RGBA")  # honour palette transparency before dropping it
                if work.mode != "RGB":
                    work = work.convert("RGB")
                if work.size != (IMAGE_SIZE, IMAGE_SIZE):
                    work = work.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
                arr = np.asarray(work, dtype=np.uint8)
            except Exception as exc:
                raise DataSourceError(f"cannot decode image {name}: {exc}", "undecodable_image") from exc
    if arr.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):  # defensive: Pillow oddities
        raise DataSourceError(f"image {name} decoded to shape {arr.shape}, expected (32, 32, 3)",
                              "undecodable_image")
    return arr


# --------------------------------------------------------------------------- #
# Entries: files of a directory or members of an archive
# --------------------------------------------------------------------------- #
class _Entry:
    """One file of a source: relative path parts, a display name and its bytes."""

    __slots__ = ("parts", "display", "_data", "_path")

    def __init__(self, parts: tuple[str, ...], display: str, *, data: bytes | None = None,
                 path: str | None = None) -> None:
        self.parts = parts
        self.display = display
        self._data = data
        self._path = path

    @property
    def relpath(self) -> str:
        return "/".join(self.parts)

    def read(self) -> bytes:
        if self._data is not None:
            return self._data
        assert self._path is not None
        try:
            with open(self._path, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise DataSourceError(f"cannot read {self.display}: {exc}") from exc


def _clean_parts(name: str) -> tuple[str, ...] | None:
    """Relative path components of an archive member, or None to ignore it."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) >= 2 and name[1] == ":"):
        return None  # absolute (POSIX or drive letter)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts or ".." in parts:
        return None
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    return parts


def _is_image(parts: tuple[str, ...]) -> bool:
    return parts[-1].lower().endswith(IMAGE_EXTENSIONS)


def _archive_kind(filename: str) -> str | None:
    lower = filename.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")):
        return "tar"
    return None


def _sniff_kind(head: bytes) -> str | None:
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"
    return None


class _Counter:
    def __init__(self, limit: int | None, display: str) -> None:
        self.limit = limit
        self.display = display
        self.n = 0

    def add(self) -> None:
        self.n += 1
        if self.limit is not None and self.n > self.limit:
            raise DataSourceError(f"{self.display} contains more than {self.limit} images", "too_many_images")


def _directory_entries(root: Path, keep: Keep, counter: _Counter) -> list[_Entry]:
    entries: list[_Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        rel_dir = os.path.relpath(dirpath, root)
        base = () if rel_dir == "." else tuple(Path(rel_dir).parts)
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            parts = base + (fname,)
            if not keep(parts):
                continue
            full = os.path.join(dirpath, fname)
            if not os.path.isfile(full):
                continue
            if _is_image(parts):
                counter.add()
            entries.append(_Entry(parts, full, path=full))
    return entries


def _archive_members(fileobj: BinaryIO, kind: str):
    """(name, size, read) for each regular file of a tar or zip, streamed in archive order."""
    if kind == "tar":
        with tarfile.open(fileobj=fileobj, mode="r:*") as archive:
            for info in archive:
                if info.isreg():
                    yield info.name, info.size, archive.extractfile(info).read
    else:
        with zipfile.ZipFile(fileobj) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield info.filename, info.file_size, (lambda i=info: archive.read(i))


def _archive_entries(fileobj: BinaryIO, kind: str, display: str, keep: Keep, counter: _Counter,
                     max_member_bytes: int, max_total_bytes: int | None = None,
                     max_members: int | None = None) -> list[_Entry]:
    """Read the kept members of a tar/zip archive into memory.

    Every member's declared size counts towards `max_total_bytes` (those skipped too: a tar.gz
    is inflated to be walked), checked before the member is read; `max_members` bounds the
    entries walked (empty members cost a header each)."""
    entries: list[_Entry] = []
    member = "?"
    total = members = 0
    try:
        for name, size, read in _archive_members(fileobj, kind):
            members += 1
            total += size
            if max_members is not None and members > max_members:
                raise DataSourceError(f"{display} has more than {max_members} members", "too_many_images")
            if max_total_bytes is not None and total > max_total_bytes:
                raise DataSourceError(f"{display}: its members declare more than {max_total_bytes} bytes "
                                      f"uncompressed", "archive_too_large")
            parts = _clean_parts(name)
            if parts is None or not keep(parts):
                continue
            member = name
            if size > max_member_bytes:
                raise DataSourceError(f"{display}:{member} is {size} bytes, more than {max_member_bytes}",
                                      "member_too_large")
            if _is_image(parts):
                counter.add()
            data = read()
            if len(data) != size:
                raise DataSourceError(f"{display}:{member} is truncated")
            entries.append(_Entry(parts, f"{display}:{member}", data=data))
    except DataSourceError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError,
            NotImplementedError, RuntimeError) as exc:
        where = f" (at member {member})" if member != "?" else ""
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(":")
        if isinstance(exc, tarfile.ReadError) and reason.startswith("file could not be opened"):
            reason = "not a tar, tar.gz, tar.bz2 or tar.xz file"
        raise DataSourceError(f"corrupt or unreadable {kind} archive {display}{where}: {reason}") from exc
    return entries


def _path_entries(source: PathLike, keep: Keep, *, max_images: int | None = None,
                  max_member_bytes: int = MAX_IMAGE_FILE_BYTES,
                  what: str = "image source") -> tuple[str, bool, list[_Entry]]:
    """Entries of a directory or archive path -> (display, is_directory, entries)."""
    path = Path(os.fspath(source))
    display = str(path)
    if not path.exists():
        raise DataSourceError(f"{what} does not exist: {display}")
    counter = _Counter(max_images, display)
    if path.is_dir():
        return display, True, _directory_entries(path, keep, counter)
    kind = _archive_kind(path.name)
    if kind is None:
        raise DataSourceError(
            f"unknown format for {what} {display}: expected a directory, .tar.gz/.tgz/.tar or .zip")
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataSourceError(f"cannot open {display}: {exc}") from exc
    with fh:
        return display, False, _archive_entries(fh, kind, display, keep, counter, max_member_bytes)


# --------------------------------------------------------------------------- #
# Layout: entries -> classes -> arrays
# --------------------------------------------------------------------------- #
def _image_keep(split: str | None) -> Keep:
    if split is None:
        return _is_image

    def keep(parts: tuple[str, ...]) -> bool:
        return _is_image(parts) and len(parts) in (3, 4) and parts[-3] == split

    return keep


def _group_by_class(entries: Iterable[_Entry], *, split: str | None,
                    display: str) -> dict[str, list[_Entry]]:
    """Group image entries by class folder, checking a consistent layout."""
    keep = _image_keep(split)
    images = [e for e in entries if keep(e.parts)]
    where = f" under '{split}/'" if split is not None else ""
    if not images:
        raise DataSourceError(f"no {'/'.join(IMAGE_EXTENSIONS)} images found in {display}{where}", "invalid_layout")
    depth = 2 if split is None else 3  # parts after the optional top-level folder
    groups: dict[str, list[_Entry]] = {}
    prefix_entry: _Entry | None = None
    for e in images:
        if len(e.parts) not in (depth, depth + 1):
            layout = "<class>/<image>" if split is None else f"{split}/<class>/<image>"
            raise DataSourceError(
                f"{e.display}: unexpected location; expected {layout}, optionally inside one "
                f"top-level folder" + ("" if split is not None else " (pass split= for train/test trees)"), "invalid_layout")
        if prefix_entry is None:
            prefix_entry = e
        elif e.parts[:-depth] != prefix_entry.parts[:-depth]:
            raise DataSourceError(
                f"{display}: images at inconsistent levels: {prefix_entry.display} and {e.display}"
                + (" (pass split= for train/test trees)" if split is None else ""), "invalid_layout")
        groups.setdefault(e.parts[-2], []).append(e)
    for members in groups.values():
        members.sort(key=lambda e: e.parts[-1])
    return groups


def _decode_range(entries: Sequence[_Entry], start: int, stop: int, x: np.ndarray, resize: bool,
                  digests: list[bytes] | None) -> None:
    for i in range(start, stop):
        data = entries[i].read()
        x[i] = decode_image(data, name=entries[i].display, resize=resize)
        if digests is not None:
            digests[i] = hashlib.sha256(data).digest()


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _decode_all(entries: Sequence[_Entry], *, resize: bool, want_digests: bool = False,
                workers: int | None = None) -> tuple[np.ndarray, list[bytes] | None]:
    """Decode entries in order into ``uint8 [N,32,32,3]`` (thread pool for large sets)."""
    n = len(entries)
    x = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    digests: list[bytes] | None = [b""] * n if want_digests else None
    workers = _default_workers() if workers is None else max(1, workers)
    if workers == 1 or n <= _CHUNK:
        _decode_range(entries, 0, n, x, resize, digests)
        return x, digests
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    try:
        futures = [pool.submit(_decode_range, entries, s, min(s + _CHUNK, n), x, resize, digests)
                   for s in range(0, n, _CHUNK)]
        for fut in futures:  # in order: the first bad file (in sorted order) is reported
            fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return x, digests


def _check_class_names(class_names: Sequence[str] | None) -> list[str] | None:
    if class_names is None:
        return None
    if isinstance(class_names, str):
        raise TypeError("class_names must be a sequence of names, not a string")
    names = list(class_names)
    if not names or not all(isinstance(c, str) and c for c in names):
        raise ValueError("class_names must be a non-empty sequence of non-empty strings")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names has duplicates: {names}")
    return names


def _check_split(split: str | None) -> None:
    if split is not None and (not isinstance(split, str) or not split or "/" in split
                              or "\\" in split or split in (".", "..")):
        raise ValueError(f"split must be a plain folder name such as 'train', got {split!r}")


def _labelled_arrays(entries: Sequence[_Entry], *, display: str, split: str | None,
                     class_names: list[str] | None, require_all_classes: bool = False,
                     resize: bool = False, want_digests: bool = False, workers: int | None = None,
                     ) -> tuple[np.ndarray, np.ndarray, list[str], list[_Entry], list[bytes] | None]:
    """Shared core: (x, y, class_names, ordered image entries, sha256 digests or None)."""
    groups = _group_by_class(entries, split=split, display=display)
    if class_names is None:
        names = sorted(groups)
    else:
        names = class_names
        known = set(names)
        for folder in sorted(groups):
            if folder not in known:
                raise DataSourceError(
                    f"unknown class folder '{folder}' ({groups[folder][0].display}); "
                    f"expected one of {names}", "invalid_layout")
        if require_all_classes:
            for c in names:
                if c not in groups:
                    folder = c if split is None else f"{split}/{c}"
                    raise DataSourceError(f"missing class folder '{folder}' in {display}", "invalid_layout")
    ordered: list[_Entry] = []
    labels: list[int] = []
    for label, c in enumerate(names):
        members = groups.get(c, [])
        ordered.extend(members)
        labels.extend([label] * len(members))
    x, digests = _decode_all(ordered, resize=resize, want_digests=want_digests, workers=workers)
    y = np.asarray(labels, dtype=np.int64)
    return x, y, list(names), ordered, digests


# --------------------------------------------------------------------------- #
# Public readers
# --------------------------------------------------------------------------- #
def read_labelled_images(
    source: PathLike,
    *,
    class_names: Sequence[str] | None = None,
    split: str | None = None,
    resize: bool = False,
    max_images: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a labelled image tree from a directory or a .tar.gz/.tgz/.tar/.zip path.

    Layout ``<class>/<image>`` (or ``<split>/<class>/<image>`` when ``split`` is
    given), optionally inside one top-level folder.

    Returns ``(x, y, class_names)``: ``x`` uint8 ``[N, 32, 32, 3]``, ``y`` int64
    ``[N]`` indexing ``class_names``.  With ``class_names`` given, folder names
    must be a subset (an unknown folder is an error) and labels follow that
    order; the returned list is ``class_names`` itself.  Otherwise classes are
    the sorted folder names.  ``max_images`` caps the number of images.
    """
    names = _check_class_names(class_names)
    _check_split(split)
    display, _, entries = _path_entries(source, _image_keep(split), max_images=max_images)
    x, y, out_names, _, _ = _labelled_arrays(entries, display=display, split=split,
                                             class_names=names, resize=resize)
    return x, y, out_names


def read_labelled_images_from_bytes(
    data: bytes | bytearray | memoryview | BinaryIO,
    filename: str,
    *,
    class_names: Sequence[str] | None = None,
    split: str | None = None,
    resize: bool = False,
    max_images: int | None = None,
    max_total_bytes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Like :func:`read_labelled_images` for an uploaded archive held in memory.

    ``data`` is the archive content (bytes-like) or a seekable binary file
    object; ``filename`` (the upload's name) selects zip vs tar by extension,
    otherwise the content is sniffed, and it names the archive in errors.
    ``max_total_bytes`` caps what all members declare uncompressed (zip and tar bombs), and
    with ``max_images`` the members walked are at most ``4 * max_images + 1024``.
    """
    names = _check_class_names(class_names)
    _check_split(split)
    display = filename or "<upload>"
    if isinstance(data, (bytes, bytearray, memoryview)):
        fileobj: BinaryIO = io.BytesIO(bytes(data))
    elif hasattr(data, "read") and hasattr(data, "seek"):
        fileobj = data
    else:
        raise TypeError("data must be bytes or a seekable binary file object")
    kind = _archive_kind(display)
    if kind is None:
        try:
            pos = fileobj.tell()
            head = fileobj.read(512)
            fileobj.seek(pos)
        except (OSError, ValueError) as exc:
            raise DataSourceError(f"cannot read archive {display}: {exc}") from exc
        kind = _sniff_kind(head)
        if kind is None:
            raise DataSourceError(
                f"unknown archive format for {display}: expected .tar.gz/.tgz/.tar or .zip")
    counter = _Counter(max_images, display)
    entries = _archive_entries(fileobj, kind, display, _image_keep(split), counter,
                               MAX_IMAGE_FILE_BYTES, max_total_bytes,
                               None if max_images is None else 4 * max_images + 1024)
    x, y, out_names, _, _ = _labelled_arrays(entries, display=display, split=split,
                                             class_names=names, resize=resize)
    return x, y, out_names
