"""What the repository takes and gives back: plain frozen dataclasses (no SQLAlchemy, no
pydantic), and the typed errors the HTTP layer maps to 404 / 409 / 503."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional


class StorageError(Exception):
    """Base of the repository's errors; `message` is safe to show a client (no URL, no password)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(StorageError):
    """No profile has this id (or it was deleted)."""

    def __init__(self, profile_id: str) -> None:
        super().__init__(f"no calibration profile with id {profile_id!r}")
        self.profile_id = profile_id


class LimitReached(StorageError):
    """Storing one more profile would exceed CALIB_MAX_CALIBRATIONS."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the service already holds CALIB_MAX_CALIBRATIONS={limit} calibration profiles; "
                         f"delete one before creating another")
        self.limit = limit


class StorageUnavailable(StorageError):
    """The database cannot be reached or used right now (down, locked too long, unwritable)."""


@dataclass(frozen=True)
class NewProfile:
    """A fitted profile before it is stored. `model_name`/`model_sha256` are None for a
    model-independent profile (fitted on a client's logits)."""

    model_name: Optional[str]
    model_sha256: Optional[str]
    num_classes: int
    method: str
    parameters: dict[str, Any]
    n: int
    data_sha256: str
    report: dict[str, Any]
    label: Optional[str] = None
    conformal: Optional[bytes] = field(default=None, repr=False)  # ConformalCalibration.to_bytes()


@dataclass(frozen=True)
class ProfileRecord:
    """A stored profile without its conformal blob (what listings return)."""

    id: str
    model_name: Optional[str]
    model_sha256: Optional[str]
    num_classes: int
    method: str
    parameters: dict[str, Any]
    label: Optional[str]
    n: int
    data_sha256: str
    created_at: datetime
    report: dict[str, Any]

    @property
    def model_independent(self) -> bool:
        return self.model_name is None


@dataclass(frozen=True)
class StoredProfile(ProfileRecord):
    """A stored profile with its conformal calibration bytes (None if it has none)."""

    conformal: Optional[bytes] = field(default=None, repr=False)
