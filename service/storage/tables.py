"""The SQLAlchemy 2 mapping of the `calibration_profiles` and `monitored_predictions` tables. Kept apart from the API's
pydantic schemas: a column can change without changing what clients see, and the reverse.
The migrations in `migrations/versions` create exactly this table (a test compares them)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAME_LENGTH = 200     # model names and labels
SHA256_LENGTH = 64    # hex digests
METHOD_LENGTH = 32
REQUEST_ID_LENGTH = 128  # service.rest.request_id.SANE_ID
PREDICTION_ID_LENGTH = 32  # uuid4 hex
VERSION_LENGTH = 64
# SQLite's auto-increment needs INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit key
ROW_ID = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class ProfileRow(Base):
    """One recalibration profile; rows are written once and never updated (profiles are immutable)."""

    __tablename__ = "calibration_profiles"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    # NULL for a model-independent profile (fitted on a client's logits, POST /v1/calibrations)
    model_name: Mapped[Optional[str]] = mapped_column(String(NAME_LENGTH))
    model_sha256: Mapped[Optional[str]] = mapped_column(String(SHA256_LENGTH))
    num_classes: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(METHOD_LENGTH))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    label: Mapped[Optional[str]] = mapped_column(String(NAME_LENGTH))
    n: Mapped[int] = mapped_column(Integer)
    data_sha256: Mapped[str] = mapped_column(String(SHA256_LENGTH))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    # ConformalCalibration.to_bytes(): a documented binary format, never a pickle
    conformal: Mapped[Optional[bytes]] = mapped_column(LargeBinary, deferred=True)

    __table_args__ = (Index("ix_calibration_profiles_model", "model_name", "created_at"),)


class MonitoredPredictionRow(Base):
    """One image of a predict answer, as numbers (never the image): what monitoring compares with
    the validation split, and what feedback labels. Written in batches by
    `service.monitoring_writer`; only `label` / `labelled_at` are ever updated (once)."""

    __tablename__ = "monitored_predictions"

    id: Mapped[int] = mapped_column(ROW_ID, primary_key=True, autoincrement=True)  # insertion order
    prediction_id: Mapped[str] = mapped_column(String(PREDICTION_ID_LENGTH))
    model_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    model_version: Mapped[str] = mapped_column(String(VERSION_LENGTH))
    model_sha256: Mapped[Optional[str]] = mapped_column(String(SHA256_LENGTH))
    calibration_id: Mapped[Optional[str]] = mapped_column(String(NAME_LENGTH))  # NULL: the card's temperature
    request_id: Mapped[str] = mapped_column(String(REQUEST_ID_LENGTH))
    batch_index: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    confidence: Mapped[float] = mapped_column(Float)
    entropy: Mapped[float] = mapped_column(Float)
    predicted_class: Mapped[int] = mapped_column(SmallInteger)
    ood_flag: Mapped[Optional[bool]] = mapped_column(Boolean)          # NULL: the card has no threshold
    set_size: Mapped[Optional[int]] = mapped_column(SmallInteger)      # NULL: no prediction set was asked for
    set_coverage: Mapped[Optional[float]] = mapped_column(Float)
    prediction_set: Mapped[Optional[bytes]] = mapped_column(LargeBinary)  # numpy.packbits of the set's mask
    probabilities: Mapped[bytes] = mapped_column(LargeBinary)   # float32 [K], the calibrated ones served
    logits: Mapped[bytes] = mapped_column(LargeBinary)          # float32 [K], raw: what a profile is fitted on
    label: Mapped[Optional[int]] = mapped_column(SmallInteger)  # the true class, from POST /v1/feedback
    labelled_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("prediction_id", name="uq_monitored_predictions_prediction_id"),
        Index("ix_monitored_predictions_window", "model_name", "model_version", "calibration_id", "id"),
        Index("ix_monitored_predictions_request", "request_id", "batch_index"),
        Index("ix_monitored_predictions_created", "created_at"),
    )
