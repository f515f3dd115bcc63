"""The SQLAlchemy 2 mapping of the `calibration_profiles` table. Kept apart from the API's
pydantic schemas: a column can change without changing what clients see, and the reverse.
The migrations in `migrations/versions` create exactly this table (a test compares them)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Optional

from sqlalchemy import JSON, DateTime, Index, Integer, LargeBinary, String, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAME_LENGTH = 200     # model names and labels
SHA256_LENGTH = 64    # hex digests
METHOD_LENGTH = 32


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
