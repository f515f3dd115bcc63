"""imagedata: machine-readable error codes, and `.npy`/`.npz` read header-first within limits."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from imagedata import CODES, DataSourceError, decode_image, read_labelled_images_from_bytes
from imagedata.arrays import ArrayLimits, load_npy, load_npz, npz_declared_bytes, npz_members

LIMITS = ArrayLimits(max_rows=100, max_bytes=10**6, max_total_bytes=2 * 10**6)


def _png(size=(32, 32), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("data, code", [(b"", "undecodable_image"), (b"not an image", "undecodable_image"),
                                        (_png((33, 32)), "wrong_image_size"), (_png(mode="L"), "unsupported_image_mode")])
def test_decode_errors_carry_their_code(data, code):
    with pytest.raises(DataSourceError) as exc:
        decode_image(data, name="x.png")
    assert exc.value.code == code and code in CODES


def test_unknown_code_is_a_bug():
    with pytest.raises(ValueError):
        DataSourceError("message", "no_such_code")


def test_archive_total_declared_bytes_is_capped_before_reading():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(5):
            zf.writestr(f"cat/{i}.png", bytes(400_000))
    with pytest.raises(DataSourceError) as exc:
        read_labelled_images_from_bytes(buf.getvalue(), "a.zip", max_total_bytes=1_000_000)
    assert exc.value.code == "archive_too_large"


def test_npz_reads_only_the_members_asked_for():
    x = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
    data = _npz(x=x, y=np.array([1, 2]), junk=np.zeros((10_000, 100), np.float64))  # junk: 8 MB, over every limit
    assert sorted(npz_members(data, "a.npz")) == ["junk", "x", "y"]
    assert npz_declared_bytes(data, "a.npz", ("x", "y")) < 10_000
    out = load_npz(data, "a.npz", ("x", "y"), LIMITS)
    assert sorted(out) == ["x", "y"] and np.array_equal(out["x"], x) and out["y"].tolist() == [1, 2]
    with pytest.raises(DataSourceError) as exc:
        load_npz(data, "a.npz", ("junk",), LIMITS)
    assert exc.value.code == "array_too_large"


@pytest.mark.parametrize("arrays, code", [
    ({"x": np.zeros((101, 32, 32, 3), np.uint8)}, "too_many_images"),  # rows, from the header
    ({"x": np.zeros((100, 3000), np.float64)}, "array_too_large"),       # 2.4 MB declared
])
def test_npz_limits_are_checked_from_declared_sizes(arrays, code):
    with pytest.raises(DataSourceError) as exc:
        load_npz(_npz(**arrays), "a.npz", ("x",), LIMITS)
    assert exc.value.code == code


def test_npy_one_image_is_one_row_and_object_arrays_are_refused():
    buf = io.BytesIO()
    np.save(buf, np.zeros((32, 32, 3), np.uint8))
    assert load_npy(buf.getvalue(), "a.npy", ArrayLimits(1, 10**6, 10**6)).shape == (32, 32, 3)
    buf = io.BytesIO()
    np.save(buf, np.array([object()]), allow_pickle=True)
    with pytest.raises(DataSourceError) as exc:
        load_npy(buf.getvalue(), "a.npy", LIMITS)
    assert exc.value.code == "invalid_dtype" and "0x" not in str(exc.value)


def test_truncated_npy_data_is_refused():
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(DataSourceError) as exc:
        load_npy(buf.getvalue()[:-100], "a.npy", LIMITS)
    assert exc.value.code == "invalid_array_file"
