"""Database fixtures for the calibration-profile tests: a fresh SQLite file, and a PostgreSQL
schema of its own per test run (so parallel runs and CI jobs sharing one server never collide),
dropped afterwards.

PostgreSQL: `CALIB_TEST_POSTGRES_URL` (default: the development machine's trust-auth server,
postgresql+psycopg://postgres@127.0.0.1:5432/test; `.ci/start-postgres` starts one in CI). When
it cannot be reached the PostgreSQL cases skip with the reason; CI sets CALIB_TESTS_NO_SKIP=1,
which turns that skip into a failure.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import quote

import pytest

POSTGRES_URL = os.environ.get("CALIB_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# The PostgreSQL cases carry the `postgres` marker: `make test` runs SQLite only, `make test-all` both
BACKENDS = ("sqlite", pytest.param("postgresql", marks=pytest.mark.postgres))


def _with_search_path(url: str, schema: str) -> str:
    """The libpq `options` parameter sets the schema every connection of the service uses."""
    return f"{url}{'&' if '?' in url else '?'}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(scope="session")
def postgres_server():
    """An engine on the test PostgreSQL (no schema of ours yet), or a skip saying why not."""
    from sqlalchemy import create_engine, text

    engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any reason to be unreachable is a skip with that reason
        engine.dispose()
        pytest.skip(f"PostgreSQL at CALIB_TEST_POSTGRES_URL is unreachable ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200]}); start one with .ci/start-postgres")
    yield engine
    engine.dispose()


@contextmanager
def postgres_schema(engine) -> Iterator[str]:
    """A PostgreSQL URL whose connections use a new, empty schema; dropped on exit."""
    from sqlalchemy import text

    schema = f"calib_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield _with_search_path(POSTGRES_URL, schema)
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.fixture
def postgres_url(postgres_server):
    with postgres_schema(postgres_server) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path):
    from service.storage.engine import default_url

    return default_url(tmp_path / "data")


@pytest.fixture(params=BACKENDS)
def database_url(request):
    """Each test that takes it runs twice: on a SQLite file and on a PostgreSQL schema."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
