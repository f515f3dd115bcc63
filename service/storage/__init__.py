"""Persisted recalibration profiles: SQLAlchemy 2 tables, Alembic migrations, and the
`CalibrationRepository` the HTTP layer talks to (it never sees SQLAlchemy).

`records` holds the plain dataclasses and typed errors, `tables` the ORM mapping, `engine`
how a URL becomes an engine (SQLite in WAL mode, or PostgreSQL), `migrate` runs the Alembic
scripts shipped in `migrations/`, and `repository` the create/list/get/delete/count calls.
"""

from service.storage.records import (
    LimitReached,
    NewProfile,
    NotFound,
    ProfileRecord,
    StorageError,
    StorageUnavailable,
    StoredProfile,
)
from service.storage.repository import CalibrationRepository, SqlCalibrationRepository

__all__ = ["CalibrationRepository", "SqlCalibrationRepository", "NewProfile", "ProfileRecord", "StoredProfile",
           "StorageError", "NotFound", "LimitReached", "StorageUnavailable"]
