"""Tests for training.data: CIFAR-10 loaders, image folders, the validation split.

Every fixture is written by the tests themselves (tiny official-format pickles,
PNG trees and their archives); the real JPEG fixture of tests/data is checked in
test_fixture_data.py.
No network: the keras download is not exercised.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagedata import decode_image, read_labelled_images_from_bytes
from training.data import (
    CIFAR10_CLASSES,
    CifarData,
    DataSourceError,
    load_cifar10,
    read_labelled_images,
    train_validation_split,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

ROWS_PER_TRAIN_BATCH = 3
ROWS_TEST = 4
TRAIN_PER_CLASS = 2
TEST_PER_CLASS = 1


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def png_bytes(arr: np.ndarray) -> bytes:
    """PNG of a uint8 array: [H,W] -> L, [H,W,3] -> RGB, [H,W,4] -> RGBA."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(arr))


def make_tar_gz(src_dir: Path, out: Path, arcname: str | None = None) -> Path:
    """tar.gz of the *contents* of src_dir (inside `arcname/` when given)."""
    with tarfile.open(out, "w:gz") as tf:
        for p in sorted(src_dir.rglob("*")):
            rel = p.relative_to(src_dir).as_posix()
            tf.add(p, arcname=f"{arcname}/{rel}" if arcname else rel, recursive=False)
    return out


def make_zip(src_dir: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(src_dir.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src_dir).as_posix())
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_error(excinfo: pytest.ExceptionInfo[DataSourceError], *names: str) -> None:
    msg = str(excinfo.value)
    for name in names:
        assert name in msg, f"{name!r} not in error message {msg!r}"


def nhwc_to_rows(x: np.ndarray) -> np.ndarray:
    """Official CIFAR row layout: [N, 3072] = R plane, G plane, B plane (row-major)."""
    return x.transpose(0, 3, 1, 2).reshape(len(x), 3 * 32 * 32)


def pickle_batch(data: np.ndarray, labels: list[int], label: bytes) -> bytes:
    """A batch dict the official way: bytes keys, list labels, uint8 [N,3072], protocol 2."""
    d = {
        b"batch_label": label,
        b"labels": labels,
        b"data": data,
        b"filenames": [b"img_%d.png" % i for i in range(len(labels))],
    }
    blob = pickle.dumps(d, protocol=2)
    # The official files were written with numpy 1.x, whose arrays pickle as
    # numpy.core.multiarray._reconstruct; mimic that (GLOBAL is newline-terminated text).
    assert b"numpy._core.multiarray\n" in blob
    return blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def meta_bytes() -> bytes:
    return pickle.dumps({b"num_cases_per_batch": ROWS_PER_TRAIN_BATCH,
                         b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                         b"num_vis": 3072}, protocol=2)


# --------------------------------------------------------------------------- #
# fixtures: official python format
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def pickle_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict:
    rng = np.random.default_rng(1)
    n_train = 5 * ROWS_PER_TRAIN_BATCH
    x_train = rng.integers(0, 256, size=(n_train, 32, 32, 3), dtype=np.uint8)
    y_train = rng.integers(0, 10, size=n_train).astype(np.int64)
    x_test = rng.integers(0, 256, size=(ROWS_TEST, 32, 32, 3), dtype=np.uint8)
    y_test = rng.integers(0, 10, size=ROWS_TEST).astype(np.int64)
    # A recognisable first test image: constant planes R=10, G=20, B=30 except pixel (0, 1).
    x_test[0, :, :, 0], x_test[0, :, :, 1], x_test[0, :, :, 2] = 10, 20, 30
    x_test[0, 0, 1] = (200, 201, 202)

    root = tmp_path_factory.mktemp("pickle")
    batch_dir = root / "cifar-10-batches-py"
    batch_dir.mkdir()
    rows = nhwc_to_rows(x_train)
    for i in range(5):
        sl = slice(i * ROWS_PER_TRAIN_BATCH, (i + 1) * ROWS_PER_TRAIN_BATCH)
        (batch_dir / f"data_batch_{i + 1}").write_bytes(
            pickle_batch(rows[sl], y_train[sl].tolist(), b"training batch %d of 5" % (i + 1)))
    (batch_dir / "test_batch").write_bytes(
        pickle_batch(nhwc_to_rows(x_test), y_test.tolist(), b"testing batch 1 of 1"))
    (batch_dir / "batches.meta").write_bytes(meta_bytes())
    (batch_dir / "readme.html").write_text("<html></html>")
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(batch_dir, arcname="cifar-10-batches-py")
    return {"dir": batch_dir, "archive": archive, "x_train": x_train, "y_train": y_train,
            "x_test": x_test, "y_test": y_test}


# --------------------------------------------------------------------------- #
# fixtures: image folder (PNG)
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def png_tree(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ROOT/{train,test}/<class>/NNNN.png with known pixels, plus .tar.gz and .zip copies."""
    rng = np.random.default_rng(2)
    root = tmp_path_factory.mktemp("png") / "tree"
    expected: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        xs, ys = [], []
        for label, cls in enumerate(CIFAR10_CLASSES):
            # names written in reverse order: the loader must sort by name
            for i in reversed(range(per_class)):
                write_png(root / split / cls / f"{i:04d}.png",
                          rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
            for i in range(per_class):
                xs.append(np.asarray(Image.open(root / split / cls / f"{i:04d}.png")))
                ys.append(label)
        expected[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    # noise that must be ignored
    (root / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "README.txt").write_text("not an image")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")

    base = root.parent
    tar_path = make_tar_gz(root, base / "tree.tar.gz", arcname="cifar10-png")  # extra top folder
    zip_path = make_zip(root, base / "tree.zip")
    # zip extras: macOS metadata and a path-traversal member, both ignored
    with zipfile.ZipFile(zip_path, "a") as zf:
        zf.writestr("__MACOSX/train/cat/._0000.png", b"\0\5\26\7junk")
        zf.writestr("../escape/train/cat/9999.png", b"not even a png")
        zf.writestr("/abs/train/cat/9999.png", b"not even a png")
    return {"dir": root, "tar": tar_path, "zip": zip_path, "expected": expected}


def check_cifar(data: CifarData, expected: dict) -> None:
    assert isinstance(data, CifarData)
    assert data.class_names == CIFAR10_CLASSES
    for split in ("train", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        ex, ey = expected[split]
        assert x.dtype == np.uint8 and x.shape == ex.shape and x.shape[1:] == (32, 32, 3)
        assert y.dtype == np.int64 and y.shape == (len(ex),)
        np.testing.assert_array_equal(y, ey)
        np.testing.assert_array_equal(x, ex)  # lossless PNG / pickle: exact round trip
    assert data.checksum.startswith("sha256:") and len(data.checksum) == len("sha256:") + 64


# --------------------------------------------------------------------------- #
# official python format
# --------------------------------------------------------------------------- #
def test_official_archive(pickle_fixture: dict) -> None:
    data = load_cifar10(str(pickle_fixture["archive"]))
    expected = {"train": (pickle_fixture["x_train"], pickle_fixture["y_train"]),
                "test": (pickle_fixture["x_test"], pickle_fixture["y_test"])}
    check_cifar(data, expected)
    # CHW row layout -> NHWC
    assert (data.x_test[0, 5, 5] == (10, 20, 30)).all()
    assert (data.x_test[0, 0, 1] == (200, 201, 202)).all()
    digest = hashlib.sha256(pickle_fixture["archive"].read_bytes()).hexdigest()
    assert data.checksum == f"sha256:{digest}"
    assert str(pickle_fixture["archive"]) in data.source


def test_official_extracted_folder(pickle_fixture: dict) -> None:
    a = load_cifar10(pickle_fixture["dir"])
    b = load_cifar10(pickle_fixture["dir"].parent)  # parent containing cifar-10-batches-py/
    expected = {"train": (pickle_fixture["x_train"], pickle_fixture["y_train"]),
                "test": (pickle_fixture["x_test"], pickle_fixture["y_test"])}
    check_cifar(a, expected)
    check_cifar(b, expected)
    assert a.checksum == b.checksum
    assert str(pickle_fixture["dir"]) in a.source


def test_official_missing_batch_file(pickle_fixture: dict, tmp_path: Path) -> None:
    d = copy_tree(pickle_fixture["dir"], tmp_path / "cifar-10-batches-py")
    (d / "data_batch_3").unlink()
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(d)
    assert_error(ei, "data_batch_3")
    # same in an archive: no test_batch
    (d / "test_batch").unlink()
    shutil.copy(pickle_fixture["dir"] / "data_batch_3", d / "data_batch_3")
    archive = make_tar_gz(d, tmp_path / "cifar-10-python.tar.gz", arcname="cifar-10-batches-py")
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(archive)
    assert_error(ei, "test_batch", str(archive))


def test_official_batch_with_wrong_shapes(pickle_fixture: dict, tmp_path: Path) -> None:
    d = copy_tree(pickle_fixture["dir"], tmp_path / "cifar-10-batches-py")
    (d / "data_batch_2").write_bytes(
        pickle_batch(np.zeros((3, 1000), np.uint8), [0, 1, 2], b"bad"))
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(d)
    assert_error(ei, "data_batch_2")
    # label count mismatch
    (d / "data_batch_2").write_bytes(
        pickle_batch(np.zeros((3, 3072), np.uint8), [0, 1], b"bad"))
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(d)
    assert_error(ei, "data_batch_2")
    # not a pickle at all
    (d / "data_batch_2").write_bytes(b"garbage")
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(d)
    assert_error(ei, "data_batch_2")


def test_official_batch_refuses_arbitrary_globals(pickle_fixture: dict, tmp_path: Path) -> None:
    d = copy_tree(pickle_fixture["dir"], tmp_path / "cifar-10-batches-py")
    (d / "test_batch").write_bytes(pickle.dumps({b"data": Path("x"), b"labels": []}))
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(d)
    assert_error(ei, "test_batch")


# --------------------------------------------------------------------------- #
# image folders via load_cifar10
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", ["dir", "tar", "zip"])
def test_png_tree_all_containers(png_tree: dict, kind: str) -> None:
    data = load_cifar10(str(png_tree[kind]))
    check_cifar(data, png_tree["expected"])
    assert str(png_tree[kind]) in data.source
    if kind != "dir":
        digest = hashlib.sha256(png_tree[kind].read_bytes()).hexdigest()
        assert data.checksum == f"sha256:{digest}"


def test_directory_checksum_tracks_content(png_tree: dict, tmp_path: Path) -> None:
    d = copy_tree(png_tree["dir"], tmp_path / "tree")
    first = load_cifar10(d).checksum
    assert load_cifar10(d).checksum == first
    write_png(d / "test" / "cat" / "0000.png", np.zeros((32, 32, 3), np.uint8))
    assert load_cifar10(d).checksum != first


def test_missing_class_folder(png_tree: dict, tmp_path: Path) -> None:
    d = copy_tree(png_tree["dir"], tmp_path / "tree")
    shutil.rmtree(d / "train" / "dog")
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(d)
    assert_error(ei, "dog", str(d))
    archive = make_tar_gz(d, tmp_path / "nodog.tar.gz")
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(archive)
    assert_error(ei, "dog", "nodog.tar.gz")


def test_unknown_class_folder(png_tree: dict, tmp_path: Path) -> None:
    d = copy_tree(png_tree["dir"], tmp_path / "tree")
    write_png(d / "test" / "unicorn" / "0000.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(d)
    assert_error(ei, "unicorn")


@pytest.mark.parametrize("case", ["16x16", "grayscale", "rgba", "undecodable", "empty"])
def test_bad_image(png_tree: dict, tmp_path: Path, case: str) -> None:
    d = copy_tree(png_tree["dir"], tmp_path / "tree")
    bad = d / "train" / "bird" / "0005.png"
    if case == "16x16":
        write_png(bad, np.zeros((16, 16, 3), np.uint8))
    elif case == "grayscale":
        write_png(bad, np.zeros((32, 32), np.uint8))
    elif case == "rgba":
        write_png(bad, np.zeros((32, 32, 4), np.uint8))
    elif case == "undecodable":
        bad.write_bytes(b"\x89PNG but not really" + os.urandom(64))
    else:
        bad.write_bytes(b"")
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(d)
    assert_error(ei, str(bad))
    # inside an archive the message names archive and member
    archive = make_zip(d, tmp_path / "bad.zip")
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(archive)
    assert_error(ei, "bad.zip", "train/bird/0005.png")


def test_truncated_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, format="JPEG")
    with pytest.raises(DataSourceError) as ei:
        decode_image(buf.getvalue()[:200], name="cut.jpg")
    assert_error(ei, "cut.jpg")


# --------------------------------------------------------------------------- #
# bad paths and archives
# --------------------------------------------------------------------------- #
def test_wrong_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "cifar-10-python.tar.gz"
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(str(missing))
    assert_error(ei, str(missing))
    with pytest.raises(DataSourceError) as ei:
        read_labelled_images(missing)
    assert_error(ei, str(missing))


def test_unknown_format(tmp_path: Path) -> None:
    f = tmp_path / "cifar.csv"
    f.write_text("a,b\n")
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(f)
    assert_error(ei, str(f))


@pytest.mark.parametrize("name", ["junk.tar.gz", "junk.tgz", "junk.tar", "junk.zip"])
def test_corrupt_archive_random_bytes(tmp_path: Path, name: str) -> None:
    f = tmp_path / name
    f.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(f)
    assert_error(ei, str(f))
    with pytest.raises(DataSourceError) as ei:
        read_labelled_images_from_bytes(f.read_bytes(), name)
    assert_error(ei, name)


@pytest.mark.parametrize("which", ["pickle", "png"])
def test_truncated_archive(pickle_fixture: dict, png_tree: dict, tmp_path: Path,
                           which: str) -> None:
    src = pickle_fixture["archive"] if which == "pickle" else png_tree["tar"]
    blob = src.read_bytes()
    f = tmp_path / f"truncated-{which}.tar.gz"
    f.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(f)
    assert_error(ei, str(f))


def test_truncated_zip(png_tree: dict, tmp_path: Path) -> None:
    blob = png_tree["zip"].read_bytes()
    f = tmp_path / "truncated.zip"
    f.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataSourceError) as ei:
        load_cifar10(f)
    assert_error(ei, str(f))


# --------------------------------------------------------------------------- #
# read_labelled_images (service API)
# --------------------------------------------------------------------------- #
@pytest.fixture()
def flat_tree(tmp_path: Path) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """<class>/*.png without a split level: 'ship' and 'cat' only."""
    rng = np.random.default_rng(4)
    root = tmp_path / "upload"
    imgs: dict[str, list[np.ndarray]] = {}
    for cls, n in (("ship", 2), ("cat", 3)):
        imgs[cls] = []
        for i in range(n):
            arr = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            write_png(root / cls / f"img{i}.png", arr)
            imgs[cls].append(arr)
    return root, imgs


def test_read_labelled_images_sorted_folder_names(flat_tree) -> None:
    root, imgs = flat_tree
    x, y, names = read_labelled_images(root)
    assert names == ["cat", "ship"]
    assert x.dtype == np.uint8 and x.shape == (5, 32, 32, 3)
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(x, np.stack(imgs["cat"] + imgs["ship"]))


def test_read_labelled_images_with_class_names(flat_tree) -> None:
    root, imgs = flat_tree
    x, y, names = read_labelled_images(root, class_names=CIFAR10_CLASSES)
    assert names == list(CIFAR10_CLASSES)
    np.testing.assert_array_equal(y, [3, 3, 3, 8, 8])
    np.testing.assert_array_equal(x, np.stack(imgs["cat"] + imgs["ship"]))
    with pytest.raises(DataSourceError) as ei:
        read_labelled_images(root, class_names=["cat", "dog"])
    assert_error(ei, "ship")


def test_read_labelled_images_from_bytes_and_fileobj(flat_tree, tmp_path: Path) -> None:
    root, imgs = flat_tree
    expected = np.stack(imgs["cat"] + imgs["ship"])
    zip_blob = make_zip(root, tmp_path / "u.zip").read_bytes()
    tar_blob = make_tar_gz(root, tmp_path / "u.tar.gz", arcname="upload").read_bytes()
    for blob, name in ((zip_blob, "val.zip"), (tar_blob, "val.tar.gz"),
                       (zip_blob, "no-extension"), (tar_blob, "upload.bin")):
        x, y, names = read_labelled_images_from_bytes(blob, name, class_names=CIFAR10_CLASSES)
        np.testing.assert_array_equal(x, expected)
        np.testing.assert_array_equal(y, [3, 3, 3, 8, 8])
        x2, _, _ = read_labelled_images_from_bytes(io.BytesIO(blob), name)
        np.testing.assert_array_equal(x2, expected)
    with pytest.raises(DataSourceError) as ei:
        read_labelled_images_from_bytes(b"plain text, no archive", "upload.bin")
    assert_error(ei, "upload.bin")


def test_archive_ignores_unsafe_and_hidden_members() -> None:
    good = np.full((32, 32, 3), 9, np.uint8)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, payload in (("cat/a.png", png_bytes(good)), ("../cat/b.png", b"junk"),
                              ("/cat/c.png", b"junk"), ("__MACOSX/cat/._a.png", b"junk"),
                              ("cat/.hidden.png", b"junk"), ("cat/._a.png", b"junk")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("cat/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    x, y, names = read_labelled_images_from_bytes(buf.getvalue(), "upload.tgz")
    assert names == ["cat"] and x.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(x[0], good)


def test_read_labelled_images_max_images(flat_tree, tmp_path: Path) -> None:
    root, _ = flat_tree
    assert read_labelled_images(root, max_images=5)[0].shape[0] == 5
    with pytest.raises(DataSourceError) as ei:
        read_labelled_images(root, max_images=4)
    assert_error(ei, str(root))
    blob = make_zip(root, tmp_path / "u.zip").read_bytes()
    with pytest.raises(DataSourceError) as ei:
        read_labelled_images_from_bytes(blob, "val.zip", max_images=4)
    assert_error(ei, "val.zip")


def test_read_labelled_images_split_and_layout(png_tree: dict) -> None:
    x, y, names = read_labelled_images(png_tree["tar"], split="test", class_names=CIFAR10_CLASSES)
    ex, ey = png_tree["expected"]["test"]
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)
    # a train/test tree without split= is ambiguous
    with pytest.raises(DataSourceError) as ei:
        read_labelled_images(png_tree["dir"])
    assert_error(ei, str(png_tree["dir"]))


def test_read_labelled_images_resize(tmp_path: Path) -> None:
    write_png(tmp_path / "u" / "cat" / "a.png", np.full((64, 48), 77, np.uint8))  # grayscale
    write_png(tmp_path / "u" / "cat" / "b.png", np.full((16, 16, 4), 200, np.uint8))  # RGBA
    with pytest.raises(DataSourceError) as ei:
        read_labelled_images(tmp_path / "u")
    assert_error(ei, "a.png")
    x, y, names = read_labelled_images(tmp_path / "u", resize=True)
    assert x.shape == (2, 32, 32, 3) and names == ["cat"]
    assert (x[0] == 77).all() and (x[1] == 200).all()


def test_decode_image() -> None:
    arr = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = decode_image(png_bytes(arr), name="x.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)
    with pytest.raises(DataSourceError) as ei:
        decode_image(png_bytes(np.zeros((16, 16, 3), np.uint8)), name="small.png")
    assert_error(ei, "small.png", "16x16")
    with pytest.raises(DataSourceError) as ei:
        decode_image(b"GIF89a....", name="anim.gif")
    assert_error(ei, "anim.gif")
    assert decode_image(png_bytes(np.zeros((100, 60, 3), np.uint8)), name="big.png",
                        resize=True).shape == (32, 32, 3)


# --------------------------------------------------------------------------- #
# split
# --------------------------------------------------------------------------- #
def test_split_cifar_sizes_and_determinism() -> None:
    x = np.arange(50_000, dtype=np.int64)  # stand-in for images: value == index
    y = x % 10
    x_tr, y_tr, x_val, y_val = train_validation_split(x, y)
    assert len(x_tr) == len(y_tr) == 45_000 and len(x_val) == len(y_val) == 5_000
    assert not set(x_tr.tolist()) & set(x_val.tolist())
    assert set(x_tr.tolist()) | set(x_val.tolist()) == set(range(50_000))
    np.testing.assert_array_equal(y_tr, x_tr % 10)  # rows stay paired
    again = train_validation_split(x, y)
    for a, b in zip((x_tr, y_tr, x_val, y_val), again):
        np.testing.assert_array_equal(a, b)
    other = train_validation_split(x, y, seed=1)
    assert not np.array_equal(x_val, other[2])


def test_split_small_sample_and_errors() -> None:
    x = np.zeros((1000, 32, 32, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(1000) % 256
    y = np.arange(1000, dtype=np.int64)
    x_tr, y_tr, x_val, y_val = train_validation_split(x, y, n_validation=100, seed=7)
    assert x_tr.shape == (900, 32, 32, 3) and x_val.shape == (100, 32, 32, 3)
    assert not set(y_tr.tolist()) & set(y_val.tolist())
    np.testing.assert_array_equal(x_val[:, 0, 0, 0], y_val % 256)
    assert train_validation_split(x, y, n_validation=0)[2].shape[0] == 0
    for bad in (1000, 1001, -1):
        with pytest.raises(ValueError):
            train_validation_split(x, y, n_validation=bad)
    with pytest.raises(ValueError):
        train_validation_split(x, y[:10], n_validation=5)


# --------------------------------------------------------------------------- #
# import hygiene
# --------------------------------------------------------------------------- #
def test_import_does_not_pull_tensorflow() -> None:
    code = (
        "import sys, training.data\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_recorded_data_source_expands_variables(monkeypatch):
    from training.data import DataSourceError, recorded_data_source

    card = {"training": {"config": {"data": "$CIFAR10_DIR"}}}
    monkeypatch.setenv("CIFAR10_DIR", "/data/cifar")
    assert recorded_data_source(card) == "/data/cifar"
    monkeypatch.delenv("CIFAR10_DIR")
    with pytest.raises(DataSourceError, match="CIFAR10_DIR"):
        recorded_data_source(card)
    assert recorded_data_source({"training": {"config": {"data": "keras"}}}) == "keras"


def test_shipped_cards_name_no_path_of_the_training_machine():
    from pathlib import Path

    for card in Path(__file__).resolve().parents[1].glob("models/shipped/*/model_card.json"):
        text = card.read_text()
        assert "/work/" not in text and "/home/" not in text, card
