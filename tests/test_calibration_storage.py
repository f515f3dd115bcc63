"""The calibration-profile repository (`service.storage`) on a SQLite file and on the real
PostgreSQL: round trips, the CALIB_MAX_CALIBRATIONS limit, the migrations against the ORM
tables, and a database that is down or unusable (StorageUnavailable, retried on the next call)."""

from __future__ import annotations

import math
from datetime import timezone

import pytest
from pydantic import ValidationError

from service.storage import LimitReached, NewProfile, NotFound, SqlCalibrationRepository, StorageUnavailable
from tests.storage_fixtures import database_url, postgres_server, postgres_url, sqlite_url  # noqa: F401

SHA = "ab" * 32


def profile(model: str | None = "tiny", **overrides) -> NewProfile:
    fields = dict(model_name=model, model_sha256=None if model is None else SHA, num_classes=10,
                  method="temperature", parameters={"temperature": 1.25}, n=600, data_sha256="cd" * 32,
                  report={"before": {"nll": 0.9}, "after": {"nll": 0.7}, "folds": 5}, label="camera B",
                  conformal=b"\x93NUMPY\x00\x01binary")
    fields.update(overrides)
    return NewProfile(**fields)


def test_profiles_round_trip(database_url):
    repo = SqlCalibrationRepository(database_url, max_profiles=10)
    stored = repo.create(profile())
    free = repo.create(profile(None, num_classes=3, method="vector", label=None, conformal=None,
                               parameters={"w": [1.0, 2.0, 3.0], "b": [0.0, 0.1, -0.1]}))
    other = repo.create(profile("other"))
    got = repo.get(stored.id)
    assert got == stored and got.conformal == b"\x93NUMPY\x00\x01binary"
    assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == timezone.utc.utcoffset(None)
    assert got.parameters == {"temperature": 1.25} and got.report["after"] == {"nll": 0.7}
    assert [r.id for r in repo.list("tiny")] == [stored.id]
    assert [r.id for r in repo.list(None)] == [free.id] and repo.get(free.id).conformal is None
    assert repo.list(None)[0].model_independent and not repo.list("other")[0].model_independent
    assert repo.count() == 3
    repo.delete(stored.id)
    with pytest.raises(NotFound):
        repo.get(stored.id)
    with pytest.raises(NotFound):
        repo.delete(stored.id)
    assert [r.id for r in repo.list("other")] == [other.id] and repo.count() == 2
    repo.close()
    again = SqlCalibrationRepository(database_url, max_profiles=10)  # a new engine: what was committed is there
    assert again.get(free.id).parameters == {"w": [1.0, 2.0, 3.0], "b": [0.0, 0.1, -0.1]}
    again.close()


@pytest.mark.parametrize("bad_id", ["nope", "", "1234", "../../etc", "5b0f3c2e-8d1a-4d44-9c3e-0a1b2c3d4e5f"])
def test_unknown_ids_are_not_found(sqlite_url, bad_id):
    repo = SqlCalibrationRepository(sqlite_url, max_profiles=10)
    with pytest.raises(NotFound) as info:
        repo.get(bad_id)
    assert repr(bad_id) in info.value.message
    with pytest.raises(NotFound):
        repo.delete(bad_id)


def test_the_limit_holds_and_frees_on_delete(database_url):
    repo = SqlCalibrationRepository(database_url, max_profiles=3)
    ids = [repo.create(profile()).id for _ in range(2)] + [repo.create(profile(None)).id]
    with pytest.raises(LimitReached) as info:
        repo.create(profile("another"))
    assert info.value.limit == 3 and "CALIB_MAX_CALIBRATIONS=3" in info.value.message
    assert repo.count() == 3
    repo.delete(ids[0])
    repo.create(profile("another"))
    assert repo.count() == 3


def test_a_report_with_nan_is_refused_and_nothing_is_stored(database_url):
    repo = SqlCalibrationRepository(database_url, max_profiles=3)
    with pytest.raises(ValueError):
        repo.create(profile(report={"after": {"nll": math.nan}}))
    assert repo.count() == 0


def test_migrations_create_exactly_the_orm_tables(database_url):
    """Alembic's autogenerate comparison of the migrated database with `service.storage.tables`
    finds nothing to change: the migration scripts and the ORM mapping agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from service.storage.engine import sqlite_path
    from service.storage.migrate import current_revision, head_revision
    from service.storage.tables import Base

    repo = SqlCalibrationRepository(database_url, max_profiles=3)
    if database_url.startswith("sqlite"):
        sqlite_path(database_url).parent.mkdir(parents=True)
    assert current_revision(repo.engine) is None
    repo.ensure_schema()
    repo.ensure_schema()  # once per process; a second upgrade would be a no-op anyway
    assert current_revision(repo.engine) == head_revision()
    with repo.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_sqlite_is_in_wal_mode(sqlite_url):
    from sqlalchemy import text

    repo = SqlCalibrationRepository(sqlite_url, max_profiles=3)
    repo.ensure_schema()
    with repo.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL


def test_an_unreachable_database_is_storage_unavailable():
    repo = SqlCalibrationRepository("postgresql+psycopg://calib:s3cret-pw@127.0.0.1:9/test", max_profiles=3,
                                    timeout_s=1)
    for call in (repo.count, repo.check, lambda: repo.list(None), lambda: repo.create(profile())):
        with pytest.raises(StorageUnavailable) as info:
            call()
        assert "s3cret" not in info.value.message and "calib:" not in info.value.message
    assert "s3cret" not in repr(repo)


def test_an_unusable_data_dir_is_unavailable_then_retried(tmp_path):
    """A file where the data folder should be: 503-worthy, and the next call tries again."""
    from service.storage.engine import default_url

    blocker = tmp_path / "data"
    blocker.write_text("not a folder")
    repo = SqlCalibrationRepository(default_url(blocker), max_profiles=3)
    with pytest.raises(StorageUnavailable):
        repo.count()
    blocker.unlink()
    assert repo.count() == 0
    assert (blocker / "calibrations.db").is_file()


def test_settings_check_the_database_url_without_echoing_it(tmp_path):
    from service.settings import Settings

    with pytest.raises(ValidationError) as info:
        Settings(database_url="mysql://root:hunter2@db/calib")
    assert "unsupported database 'mysql'" in str(info.value) and "hunter2" not in str(info.value)
    with pytest.raises(ValidationError) as info:
        Settings(database_url="::not a url hunter2::")
    assert "hunter2" not in str(info.value)
    assert Settings(data_dir=tmp_path / "d").storage_url == f"sqlite:///{tmp_path / 'd' / 'calibrations.db'}"
    url = "postgresql+psycopg://u:pw@db:5432/calib"
    assert Settings(database_url=url).storage_url == url
    assert "pw@" not in repr(Settings(database_url=url))


@pytest.mark.parametrize("method,path,gated", [
    ("POST", "/v1/models/m/calibrations", True), ("POST", "/v1/calibrations", True),
    ("POST", "/v1/calibrations/", True), ("POST", "/v1/models/m/evaluate", True),
    ("POST", "/v1/calibrations/5b0f/apply", False), ("GET", "/v1/calibrations", False),
    ("DELETE", "/v1/models/m/calibrations/5b0f", False), ("POST", "/v1/models/m/predict", False)])
def test_profile_fits_are_admitted_like_evaluate(method, path, gated):
    """The admission middleware puts profile fits through the evaluation gate (same slots, queue
    and 503 + Retry-After); applying, reading and deleting are light and pass."""
    from service.rest.admission_middleware import AdmissionMiddleware

    assert AdmissionMiddleware._gated({"method": method, "path": path}) is gated
