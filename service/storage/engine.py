"""A database URL -> a SQLAlchemy engine set up for this service's two backends.

SQLite (the default, one file under CALIB_DATA_DIR): WAL mode, so readers never block the
writer; `synchronous=FULL`, so a committed profile survives a crash; and the transactions are
begun by us (`BEGIN` / `BEGIN IMMEDIATE`) rather than by the driver's legacy guesswork, so a
write transaction takes SQLite's write lock *before* it reads (the profile count it checks
against CALIB_MAX_CALIBRATIONS cannot go stale between two processes). PostgreSQL
(`postgresql+psycopg://...`): a connect timeout, and connections checked before use so a
restarted server does not cost a failed request.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

SUPPORTED_BACKENDS = ("sqlite", "postgresql")
SQLITE_FILE = "calibrations.db"
# Execution option of a connection whose transaction writes: BEGIN IMMEDIATE on SQLite.
WRITE = {"calib_write": True}


def default_url(data_dir: Path) -> str:
    """The SQLite file under CALIB_DATA_DIR (made absolute: the URL must not depend on a later chdir)."""
    return f"sqlite:///{(Path(data_dir).expanduser().resolve() / SQLITE_FILE).as_posix()}"


def backend_of(url: str) -> str:
    """'sqlite' or 'postgresql'; ValueError (without the URL, which may hold a password) otherwise."""
    try:
        name = make_url(url).get_backend_name()
    except Exception:  # sqlalchemy.exc.ArgumentError and friends: say what is wrong, not the URL
        raise ValueError("CALIB_DATABASE_URL is not a database URL (e.g. "
                         "postgresql+psycopg://user:password@host:5432/db or sqlite:///path/file.db)") from None
    if name not in SUPPORTED_BACKENDS:
        raise ValueError(f"CALIB_DATABASE_URL: unsupported database {name!r}; use "
                         f"postgresql+psycopg://... or sqlite:///...")
    return name


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for an in-memory database)."""
    database = make_url(url).database
    return None if not database or database == ":memory:" else Path(database)


def create_storage_engine(url: str, *, timeout_s: float) -> Engine:
    """No connection is made here: the service starts even when the database is down."""
    serializer = functools.partial(json.dumps, allow_nan=False)  # NaN is not JSON (PostgreSQL refuses it)
    if backend_of(url) == "sqlite":
        engine = create_engine(url, json_serializer=serializer,
                               connect_args={"timeout": timeout_s, "check_same_thread": False})
        _sqlite_events(engine, timeout_s)
        return engine
    return create_engine(url, json_serializer=serializer, pool_pre_ping=True,
                         connect_args={"connect_timeout": max(1, round(timeout_s))})


def _sqlite_events(engine: Engine, timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None   # the driver never begins a transaction on its own
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")   # persistent in the file; readers do not block writers
        cursor.execute("PRAGMA synchronous = FULL")   # a commit is on disk before it returns
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):
        immediate = connection.get_execution_options().get("calib_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
