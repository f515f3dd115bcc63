"""The shipped CIFAR-10 JPEG fixture (tests/data/cifar10-fixture) is what its README says, and
the loader reads it the same way as a folder and as the archive the tests build from it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from training.data import CIFAR10_CLASSES, load_cifar10, read_labelled_images

README = Path(__file__).resolve().parent / "data" / "README.md"
PER_CLASS = 30


def manifest_sha256(root: Path) -> str:
    """sha256 of `sha256sum` output for every JPEG, sorted by path (the README's shell command)."""
    files = sorted(root.rglob("*.jpg"), key=lambda p: p.relative_to(root).as_posix().encode())
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(root).as_posix()}\n"
                    for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def test_fixture_matches_the_checksum_in_its_readme(sample_data_dir):
    stated = re.findall(r"manifest sha256: `([0-9a-f]{64})`", README.read_text())
    assert len(stated) == 1, "tests/data/README.md must state exactly one manifest sha256"
    assert manifest_sha256(sample_data_dir) == stated[0]


def test_fixture_layout_is_the_first_files_of_each_class(sample_data_dir):
    files = sorted(p.relative_to(sample_data_dir).as_posix() for p in sample_data_dir.rglob("*") if p.is_file())
    expected = sorted(f"{split}/{name}/{i:04d}.jpg" for split in ("train", "test")
                      for name in CIFAR10_CLASSES for i in range(PER_CLASS))
    assert files == expected
    assert all(p.read_bytes()[:3] == b"\xff\xd8\xff" for p in sample_data_dir.rglob("*.jpg"))  # JPEG


def test_folder_and_archive_load_the_same_real_images(sample_data_dir, sample_archive, sample_data):
    data = sample_data
    assert data.x_train.shape == data.x_test.shape == (10 * PER_CLASS, 32, 32, 3)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(data.y_train, minlength=10), [PER_CLASS] * 10)
    np.testing.assert_array_equal(np.bincount(data.y_test, minlength=10), [PER_CLASS] * 10)
    assert (np.diff(data.y_train) >= 0).all()  # grouped by class in CIFAR10_CLASSES order
    assert 30 < data.x_train.mean() < 225 and data.x_train.std() > 20  # real pictures, not blank
    assert "directory" in data.source

    packed = load_cifar10(str(sample_archive))
    assert "archive" in packed.source
    assert packed.checksum == "sha256:" + hashlib.sha256(sample_archive.read_bytes()).hexdigest()
    assert packed.checksum != data.checksum  # a folder's checksum is over its files, see CifarData
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(packed, name), getattr(data, name))
    # the service's reader on the same archive, one split
    x, y, _ = read_labelled_images(sample_archive, split="test", class_names=CIFAR10_CLASSES)
    np.testing.assert_array_equal(x, data.x_test)
    np.testing.assert_array_equal(y, data.y_test)


def test_the_packed_archive_is_reproducible(sample_data_dir, sample_archive, tmp_path):
    from tests.conftest import pack_fixture

    again = pack_fixture(sample_data_dir, tmp_path / "again.tar.gz")
    assert again.read_bytes() == sample_archive.read_bytes()
