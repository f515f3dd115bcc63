"""`.npy` and `.npz` uploads read header-first: nothing is inflated before its declared shape,
dtype and size have passed the caller's limits.

An `.npz` is a zip of `.npy` members. Its central directory declares every member's
uncompressed size, and each member's `.npy` header its shape and dtype; both are read (a few
hundred bytes) before any array data. Only the members the caller names are opened at all, so a
2 MB file declaring gigabytes of zeros in members nobody uses costs nothing, and one declaring
them in `x` is refused in milliseconds. `zipfile` never returns more than a member's declared
size, so the declared figures bound what is inflated.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from typing import BinaryIO, Sequence

import numpy as np

from .errors import DataSourceError

__all__ = ["ArrayLimits", "ArrayHeader", "read_npy_header", "load_npy", "load_npz", "npz_members",
           "npz_declared_bytes"]


@dataclass(frozen=True)
class ArrayLimits:
    """What one upload may declare. `max_rows`: the first dimension of an array (images or
    labels); `max_bytes`: one array's data; `max_total_bytes`: all arrays read from one file."""

    max_rows: int
    max_bytes: int
    max_total_bytes: int


@dataclass(frozen=True)
class ArrayHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.float64)) * self.dtype.itemsize


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _reason(exc: BaseException) -> str:
    """numpy's message without object reprs (no memory addresses reach a client)."""
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    text = _ADDRESS.sub("", text)
    return text if len(text) <= 200 else text[:200] + "..."


def read_npy_header(fh: BinaryIO, name: str) -> ArrayHeader:
    """The shape and dtype of a `.npy` stream, which is left at the start of the data."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version in ((2, 0), (3, 0)):  # 3.0 differs only in the header's text encoding
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unknown .npy format version {version}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise DataSourceError(f"{name}: not a .npy array ({_reason(exc)})", "invalid_array_file") from None
    if dtype.hasobject:
        raise DataSourceError(f"{name}: object arrays are not accepted (no pickles)", "invalid_dtype")
    return ArrayHeader(tuple(shape), dtype, fortran)


def _check(header: ArrayHeader, name: str, limits: ArrayLimits) -> None:
    rows = 1 if len(header.shape) == 3 else (header.shape[0] if header.shape else 1)  # 3-D: one image
    if rows > limits.max_rows:
        raise DataSourceError(f"{name}: array {list(header.shape)} declares {rows} rows; at most "
                              f"{limits.max_rows} per request", "too_many_images")
    if header.nbytes > limits.max_bytes:
        raise DataSourceError(f"{name}: array {list(header.shape)} {header.dtype} would take {header.nbytes} "
                              f"bytes; at most {limits.max_bytes}", "array_too_large")


def _read_data(fh: BinaryIO, header: ArrayHeader, name: str) -> np.ndarray:
    """The data after a header already read: exactly `nbytes` into one buffer, never more."""
    n = header.nbytes
    data = bytearray(n)
    view = memoryview(data)
    got = 0
    try:
        while got < n:
            piece = fh.read(min(n - got, 1 << 20))
            if not piece:
                raise EOFError(f"the array data is truncated ({got} of {n} bytes)")
            view[got:got + len(piece)] = piece
            got += len(piece)
        arr = np.frombuffer(data, dtype=header.dtype)
        return arr.reshape(header.shape, order="F" if header.fortran_order else "C")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError) as exc:
        raise DataSourceError(f"{name}: not a readable .npy array ({_reason(exc)})", "invalid_array_file") from None


def load_npy(data: bytes, name: str, limits: ArrayLimits) -> np.ndarray:
    fh = io.BytesIO(data)
    header = read_npy_header(fh, name)
    _check(header, name, limits)
    if header.nbytes > limits.max_total_bytes:
        raise DataSourceError(f"{name}: {header.nbytes} bytes of arrays; at most {limits.max_total_bytes} "
                              f"per upload", "array_too_large")
    return _read_data(fh, header, name)


def _open_zip(data: bytes, name: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataSourceError(f"{name}: not a readable .npz archive ({_reason(exc)})", "invalid_array_file") from None


def npz_members(data: bytes, name: str) -> list[str]:
    """The array names of an `.npz` (its `<key>.npy` members), from the central directory only."""
    with _open_zip(data, name) as zf:
        names = [i.filename for i in zf.infolist()]
    if not names or not all(n.endswith(".npy") for n in names):
        raise DataSourceError(f"{name}: not an .npz archive of .npy arrays", "invalid_array_file")
    return [n[:-4] for n in names]


def npz_declared_bytes(data: bytes, name: str, keys: Sequence[str]) -> int:
    """What the named members declare they inflate to (the zip's central directory)."""
    with _open_zip(data, name) as zf:
        return sum(i.file_size for i in zf.infolist() if i.filename[:-4] in keys)


def load_npz(data: bytes, name: str, keys: Sequence[str], limits: ArrayLimits) -> dict[str, np.ndarray]:
    """The named arrays of an `.npz` (those present; the caller says which are required).

    First every wanted member's declared size against the limits, then every header, and only
    then the data, member by member."""
    out: dict[str, np.ndarray] = {}
    with _open_zip(data, name) as zf:
        infos = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
        wanted = [infos[k] for k in keys if k in infos]
        total = sum(i.file_size for i in wanted)
        if total > limits.max_total_bytes:
            raise DataSourceError(f"{name}: its arrays {[i.filename[:-4] for i in wanted]} declare {total} bytes "
                                  f"uncompressed; at most {limits.max_total_bytes} per upload", "array_too_large")
        try:
            headers = {}
            for info in wanted:
                key = info.filename[:-4]
                if info.file_size > limits.max_bytes + 65_536:  # header + data, before opening it
                    raise DataSourceError(f"{name}:{key} declares {info.file_size} bytes uncompressed; at most "
                                          f"{limits.max_bytes}", "array_too_large")
                with zf.open(info) as member:
                    headers[key] = read_npy_header(member, f"{name}:{key}")
                _check(headers[key], f"{name}:{key}", limits)
            for info in wanted:
                key = info.filename[:-4]
                with zf.open(info) as member:
                    read_npy_header(member, f"{name}:{key}")
                    out[key] = _read_data(member, headers[key], f"{name}:{key}")
        except DataSourceError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
            raise DataSourceError(f"{name}: not a readable .npz archive ({_reason(exc)})",
                                  "invalid_array_file") from None
    return out
