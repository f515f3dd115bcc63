"""Shared fixtures: the shared JPEG sample and a tiny model artifact trained on it at test time."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "cifar10-jpeg-sample.tar.gz"


@pytest.fixture(scope="session")
def sample_archive() -> Path:
    if not SAMPLE.is_file():
        pytest.skip(f"shared sample {SAMPLE} not present")
    return SAMPLE


@pytest.fixture(scope="session")
def sample_data(sample_archive):
    from training.data import load_cifar10

    return load_cifar10(str(sample_archive))


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, sample_archive) -> Path:
    """A real artifact: one short epoch on the shared sample, temperature fitted, card written."""
    from training.config import TrainConfig
    from training.train import run

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    config = TrainConfig(data=str(sample_archive), output=str(out), epochs=1, batch_size=100,
                         width=4, dropout=0.3, n_validation=200, seed=1, verbose=0)
    run(config)
    return out
