"""`CalibrationRepository`: the five calls the service makes on stored profiles, and
`SqlCalibrationRepository`, their SQLAlchemy implementation (SQLite or PostgreSQL).

Every call is synchronous and short; the HTTP layer runs them in a worker thread. The schema
is brought to head lazily, on the first call (and retried on the next one after a failure),
so the service starts and serves predictions while the database is down; `check()` is what
/health/ready asks. Every database failure comes out as `StorageUnavailable`, whose message
never contains the URL.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator, Optional, Protocol

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, undefer

from service.storage.engine import WRITE, backend_of, create_storage_engine, sqlite_path
from service.storage.migrate import upgrade
from service.storage.records import (
    LimitReached,
    NewProfile,
    NotFound,
    ProfileRecord,
    StorageUnavailable,
    StoredProfile,
)
from service.storage.tables import ProfileRow

logger = logging.getLogger("service.storage")
# pg_advisory_xact_lock key of profile writes: the count check and the insert are one step
# across every process sharing the database
WRITE_LOCK = 0x63616C6962 + 1


class CalibrationRepository(Protocol):
    """Stored recalibration profiles. Profiles are immutable: there is no update."""

    def create(self, new: NewProfile) -> StoredProfile: ...

    def list(self, model_name: Optional[str]) -> list[ProfileRecord]:
        """The profiles of model `model_name`, or the model-independent ones for None; oldest first."""
        ...

    def get(self, profile_id: str) -> StoredProfile: ...

    def delete(self, profile_id: str) -> None: ...

    def count(self) -> int: ...


def _unavailable(action: str, exc: BaseException) -> StorageUnavailable:
    logger.warning("calibration storage unavailable while %s: %s", action, exc)
    return StorageUnavailable(f"the calibration database is unavailable ({type(exc).__name__} while {action}); "
                              f"predictions without a calibration profile are not affected")


def _record(row: ProfileRow, cls=ProfileRecord, **extra) -> ProfileRecord:
    created = row.created_at
    # SQLite keeps no zone (everything is written in UTC); PostgreSQL answers in the session's zone
    created = created.replace(tzinfo=timezone.utc) if created.tzinfo is None else created.astimezone(timezone.utc)
    return cls(id=str(row.id), model_name=row.model_name, model_sha256=row.model_sha256,
               num_classes=row.num_classes, method=row.method, parameters=row.parameters, label=row.label,
               n=row.n, data_sha256=row.data_sha256, created_at=created, report=row.report, **extra)


def _parse_id(profile_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(profile_id))
    except ValueError:
        raise NotFound(profile_id) from None


class SqlCalibrationRepository:
    """Profiles in the database at `url` (see `service.storage.engine`), at most `max_profiles`."""

    def __init__(self, url: str, *, max_profiles: int, timeout_s: float = 5.0) -> None:
        self.backend = backend_of(url)
        self.max_profiles = max_profiles
        self._url = url
        self._engine = create_storage_engine(url, timeout_s=timeout_s)
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    def __repr__(self) -> str:  # never the URL: it may hold a password
        return f"SqlCalibrationRepository({self.backend}, max_profiles={self.max_profiles})"

    @property
    def engine(self):
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    # --- schema ------------------------------------------------------------------------------
    def ensure_schema(self) -> None:
        """Apply the migrations once per process; a failure is retried by the next call."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            try:
                path = sqlite_path(self._url) if self.backend == "sqlite" else None
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                upgrade(self._engine)
            except (SQLAlchemyError, OSError) as exc:
                raise _unavailable("applying the migrations", exc) from exc
            self._schema_ready = True
            logger.info("calibration storage ready (%s)", self.backend)

    def check(self) -> None:
        """Raise StorageUnavailable unless the database answers (for /health/ready)."""
        with self._session("checking the database") as session:
            session.execute(text("SELECT 1"))

    # --- sessions ----------------------------------------------------------------------------
    @contextmanager
    def _session(self, action: str, *, write: bool = False, profile_lock: bool = True) -> Iterator[Session]:
        self.ensure_schema()
        try:
            with Session(self._engine, expire_on_commit=False) as session, session.begin():
                if write:  # the connection's first statement: BEGIN IMMEDIATE on SQLite
                    session.connection(execution_options=WRITE)
                    if self.backend == "postgresql" and profile_lock:
                        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK})
                yield session
        except IntegrityError:  # a bug (e.g. a NULL in a required column), not an outage
            raise
        except (SQLAlchemyError, OSError) as exc:
            raise _unavailable(action, exc) from exc

    def session(self, action: str, *, write: bool = False, profile_lock: bool = True):
        """A transaction for another store on the same database (`service.storage.monitoring_store`):
        every failure comes out as StorageUnavailable. `profile_lock=False`: a write that does not
        take the profiles' PostgreSQL advisory lock (it does not touch the profile count)."""
        return self._session(action, write=write, profile_lock=profile_lock)

    # --- the repository ----------------------------------------------------------------------
    def create(self, new: NewProfile) -> StoredProfile:
        for name in ("parameters", "report"):  # a bug upstream, not an outage: refuse before the database
            try:
                json.dumps(getattr(new, name), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"profile {name} are not strict JSON (NaN, infinity or a non-JSON type): {exc}") \
                    from None
        row = ProfileRow(id=uuid.uuid4(), model_name=new.model_name, model_sha256=new.model_sha256,
                         num_classes=new.num_classes, method=new.method, parameters=new.parameters,
                         label=new.label, n=new.n, data_sha256=new.data_sha256,
                         created_at=datetime.now(timezone.utc), report=new.report, conformal=new.conformal)
        with self._session("storing a profile", write=True) as session:
            if session.scalar(select(func.count()).select_from(ProfileRow)) >= self.max_profiles:
                raise LimitReached(self.max_profiles)
            session.add(row)
        return _record(row, StoredProfile, conformal=new.conformal)

    def list(self, model_name: Optional[str]) -> list[ProfileRecord]:
        where = ProfileRow.model_name.is_(None) if model_name is None else ProfileRow.model_name == model_name
        with self._session("listing profiles") as session:
            rows = session.scalars(select(ProfileRow).where(where)
                                   .order_by(ProfileRow.created_at, ProfileRow.id)).all()
            return [_record(row) for row in rows]

    def get(self, profile_id: str) -> StoredProfile:
        key = _parse_id(profile_id)
        with self._session("reading a profile") as session:
            row = session.scalar(select(ProfileRow).where(ProfileRow.id == key).options(undefer(ProfileRow.conformal)))
            if row is None:
                raise NotFound(profile_id)
            return _record(row, StoredProfile, conformal=row.conformal)

    def delete(self, profile_id: str) -> None:
        key = _parse_id(profile_id)
        with self._session("deleting a profile", write=True) as session:
            row = session.get(ProfileRow, key)
            if row is None:
                raise NotFound(profile_id)
            session.delete(row)

    def count(self) -> int:
        with self._session("counting profiles") as session:
            return session.scalar(select(func.count()).select_from(ProfileRow))

