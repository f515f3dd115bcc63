"""Shared fixtures: the CIFAR-10 JPEG fixture shipped in tests/data, a tiny model artifact
trained on it at test time, and the in-process service built on that artifact. No test needs
anything outside the repository.

`sample_data` reads the shipped folder (the loader's directory path); `sample_archive` is the
same folder packed into a .tar.gz at test time (the loader's and the service's archive path), so
both code paths are exercised on the same 600 real images.

`tiny_artifact` is the Keras artifact only; `tiny_litert_artifact` is a copy with the LiteRT
export added, for the tests of that runtime (the export costs seconds most tests do not need).
`service_model_dir` holds a copy of `tiny_artifact` plus a corrupt artifact (its model file
truncated, so the checksum fails) and an unrelated folder, so every app built on it exercises
skip-and-report at startup. Constants and payload helpers: tests/service_helpers.py.

Markers (registered in pyproject.toml): `slow` and the finer kinds below it are left out of
`make test`; `make test-all` runs everything.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import pytest

from tests.service_helpers import BROKEN, MAX_BODY, MAX_EVAL, MAX_INSTANCES, MAX_MC, MODEL

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "cifar10-fixture"  # see tests/data/README.md


def pack_fixture(folder: Path, archive: Path) -> Path:
    """`folder` as a reproducible .tar.gz (sorted members under one top folder, no timestamps)."""
    import gzip

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            info = tarfile.TarInfo(f"{folder.name}/{path.relative_to(folder).as_posix()}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    archive.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    return archive


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    """The shipped fixture folder: {train,test}/<class>/NNNN.jpg, 30 per class and split."""
    assert FIXTURE.is_dir(), f"{FIXTURE} is missing: it is part of the repository"
    return FIXTURE


@pytest.fixture(scope="session")
def sample_archive(tmp_path_factory, sample_data_dir) -> Path:
    """The fixture folder as `cifar10-fixture.tar.gz` in a temporary directory."""
    return pack_fixture(sample_data_dir, tmp_path_factory.mktemp("data") / "cifar10-fixture.tar.gz")


@pytest.fixture(scope="session")
def sample_data(sample_data_dir):
    from training.data import load_cifar10

    return load_cifar10(str(sample_data_dir))


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, sample_archive) -> Path:
    """A real artifact: one short epoch on the fixture (200 train, 100 validation images),
    temperature fitted on the validation part, card written; no LiteRT export."""
    from training.config import TrainConfig
    from training.train import run

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    config = TrainConfig(data=str(sample_archive), output=str(out), epochs=1, batch_size=50,
                         width=4, dropout=0.3, n_validation=100, seed=1, verbose=0)
    run(config, litert_export=False)
    return out


@pytest.fixture(scope="session")
def tiny_litert_artifact(tmp_path_factory, tiny_artifact) -> Path:
    """`tiny_artifact` (same model.keras) with the LiteRT export that training.train adds:
    backbone.tflite, head.npz and their checksums in the card."""
    from training.train import export_for_litert

    out = shutil.copytree(tiny_artifact, tmp_path_factory.mktemp("artifacts") / "tiny")
    export_for_litert(out)
    return out


# --- the in-process service on the tiny artifact -----------------------------------------------
@pytest.fixture(scope="session")
def service_model_dir(tmp_path_factory, tiny_artifact) -> Path:
    root = tmp_path_factory.mktemp("model_dir")
    shutil.copytree(tiny_artifact, root / MODEL)
    broken = root / BROKEN
    shutil.copytree(tiny_artifact, broken)
    model_file = broken / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    (root / "notes").mkdir()
    (root / "notes" / "README.txt").write_text("not an artifact\n")
    return root


@pytest.fixture(scope="session")
def service_settings(service_model_dir, tmp_path_factory):
    from service.settings import Settings

    # data_dir: the SQLite file of the profiles and of monitoring's served predictions (every predict
    # records its rows) in a temporary folder, not ./data of the working directory
    return Settings(model_dir=service_model_dir, max_body_bytes=MAX_BODY, max_instances=MAX_INSTANCES,
                    max_eval_images=MAX_EVAL, max_mc_samples=MAX_MC, eval_chunk=128, mc_chunk_rows=1000,
                    data_dir=tmp_path_factory.mktemp("service_data"))


@pytest.fixture(scope="session")
def app_client(service_settings):
    """One in-process app for the session (lifespan run: models loaded once)."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(service_settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="session")
def split_classifier(tiny_artifact):
    """An independent in-process copy of the tiny model, for reference numbers."""
    from models.artifact import load_artifact
    from models.inference import SplitClassifier

    artifact = load_artifact(tiny_artifact)
    return SplitClassifier(artifact.model), artifact.card


def pytest_sessionfinish(session, exitstatus):
    """With CALIB_TESTS_NO_SKIP=1 (set by .ci/run) a skipped test fails the run: CI has every
    optional tool (torch, hadolint, curl) installed, so a skip there means something is missing."""
    if os.environ.get("CALIB_TESTS_NO_SKIP") != "1" or exitstatus != pytest.ExitCode.OK:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reporter.write("\n")
        reporter.write_sep("=", f"CALIB_TESTS_NO_SKIP=1: {len(skipped)} skipped test(s) fail this run",
                           red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
