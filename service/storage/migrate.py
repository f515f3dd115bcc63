"""Apply the Alembic migrations shipped in `migrations/` (package data: an installed service or
the container has them), through Alembic's API, with no alembic.ini.

Several processes (CALIB_WORKERS, replicas on one PostgreSQL) may start at once: the upgrade
runs in one transaction that first takes a lock every other upgrader waits on (SQLite's write
lock via BEGIN IMMEDIATE; a PostgreSQL transaction-level advisory lock), so exactly one creates
the tables and the others find them at head.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from service.storage.engine import WRITE

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock key: any constant 64-bit number that identifies "this service's migrations"
MIGRATION_LOCK = 0x63616C6962  # "calib"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to `revision`, serialised against other processes doing the same."""
    config = alembic_config()
    with engine.connect() as connection:
        connection.execution_options(**WRITE)
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
