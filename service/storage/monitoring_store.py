"""`SqlMonitoringStore`: the served predictions (numbers only) and their fed-back labels, in the
same database as the calibration profiles (`monitored_predictions`, migration 0002).

Calls are synchronous and short: the writer thread inserts batches, the HTTP layer reads windows
and applies feedback in a worker thread. Every database failure is `StorageUnavailable`
(through the profile repository's sessions); feedback problems are the typed errors below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Optional, Sequence

import numpy as np
from sqlalchemy import and_, delete, func, insert, select, update

from service.storage.records import StorageError
from service.storage.repository import SqlCalibrationRepository
from service.storage.tables import MonitoredPredictionRow as Row


# --- feedback errors (the HTTP layer maps them to 404 / 409 / 422) -------------------------------
class FeedbackError(StorageError):
    """A feedback item that cannot be stored; `position` is its index in the request's list."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(f"feedback[{position}]: {message}")
        self.position = position


class UnknownPrediction(FeedbackError):
    """No stored prediction has this id (or this request id and index): unknown, or past retention."""


class FeedbackExists(FeedbackError):
    """The prediction already has a label; the first one is kept."""


class LabelOutOfRange(FeedbackError):
    def __init__(self, position: int, message: str, num_classes: int) -> None:
        super().__init__(position, message)
        self.num_classes = num_classes


# --- records ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedRow:
    """What the writer inserts for one image."""

    prediction_id: str
    model_name: str
    model_version: str
    model_sha256: Optional[str]
    calibration_id: Optional[str]
    request_id: str
    batch_index: int
    created_at: datetime
    confidence: float
    entropy: float
    predicted_class: int
    ood_flag: Optional[bool]
    set_size: Optional[int]
    set_coverage: Optional[float]
    prediction_set: Optional[bytes]
    probabilities: bytes
    logits: bytes


@dataclass(frozen=True)
class FeedbackItem:
    """One item of POST /v1/feedback: a prediction id, or a request id and the image's index."""

    position: int
    label: int
    prediction_id: Optional[str] = None
    request_id: Optional[str] = None
    index: Optional[int] = None


@dataclass(frozen=True)
class StoredFeedback:
    prediction_id: str
    model_name: str
    model_version: str
    label: int
    predicted_class: int


@dataclass
class WindowRows:
    """A window of served predictions as arrays, oldest first. `label` is -1 where none came back;
    `ood_flag` is 1/0, or -1 where the card had no threshold; `set_size` -1 where no set was asked."""

    created_at: list[datetime]
    confidence: np.ndarray
    entropy: np.ndarray
    predicted_class: np.ndarray
    ood_flag: np.ndarray
    set_size: np.ndarray
    set_coverage: np.ndarray
    label_in_set: np.ndarray          # bool, meaningful where labelled and a set was served
    label: np.ndarray
    probabilities: np.ndarray         # [n, K] float32; rows of unlabelled predictions are zeros
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.confidence)

    def take(self, start: int, stop: int) -> "WindowRows":
        return WindowRows(self.created_at[start:stop], *(getattr(self, name)[start:stop] for name in _ARRAYS))


_ARRAYS = ("confidence", "entropy", "predicted_class", "ood_flag", "set_size", "set_coverage", "label_in_set",
           "label", "probabilities")


@dataclass(frozen=True)
class LabelledRows:
    """Labelled predictions of one model file: raw logits, the probabilities served, labels."""

    logits: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _floats(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


class SqlMonitoringStore:
    """Served predictions in the database of `repository` (its engine, schema and sessions)."""

    def __init__(self, repository: SqlCalibrationRepository) -> None:
        self.repository = repository

    @property
    def backend(self) -> str:
        return self.repository.backend

    # --- the writer's side ------------------------------------------------------------------
    def insert(self, rows: Sequence[ServedRow]) -> None:
        """All rows in one transaction (one multi-row INSERT)."""
        if not rows:
            return
        values = [row.__dict__ for row in rows]
        with self.repository.session("recording predictions", write=True, profile_lock=False) as session:
            session.execute(insert(Row), values)

    def apply_retention(self, *, max_rows: Optional[int], max_age_s: Optional[float],
                        now: Optional[datetime] = None) -> int:
        """Delete what is past CALIB_MONITORING_RETENTION: rows older than `max_age_s`, and beyond
        the newest `max_rows` of each model and version. Returns how many rows went."""
        deleted = 0
        now = now or datetime.now(timezone.utc)
        with self.repository.session("applying the monitoring retention", write=True,
                                     profile_lock=False) as session:
            if max_age_s is not None:
                cutoff = now - timedelta(seconds=max_age_s)
                deleted += session.execute(delete(Row).where(Row.created_at < cutoff)).rowcount or 0
            if max_rows is not None:
                keys = session.execute(select(Row.model_name, Row.model_version).distinct()).all()
                for name, version in keys:
                    where = and_(Row.model_name == name, Row.model_version == version)
                    last_kept = session.scalar(select(Row.id).where(where).order_by(Row.id.desc())
                                               .offset(max_rows - 1).limit(1))
                    if last_kept is not None:
                        deleted += session.execute(delete(Row).where(where, Row.id < last_kept)).rowcount or 0
        return deleted

    # --- windows ------------------------------------------------------------------------------
    def window(self, model_name: str, model_version: str, calibration_id: Optional[str], *,
               last: Optional[int] = None, since: Optional[datetime] = None, limit: int = 100_000) -> WindowRows:
        """The newest `last` predictions served with this calibration (None: the card's), or those
        since `since` (at most `limit`, the newest), oldest first."""
        calibration = Row.calibration_id.is_(None) if calibration_id is None else Row.calibration_id == calibration_id
        query = select(Row.created_at, Row.confidence, Row.entropy, Row.predicted_class, Row.ood_flag,
                       Row.set_size, Row.set_coverage, Row.prediction_set, Row.label, Row.probabilities) \
            .where(Row.model_name == model_name, Row.model_version == model_version, calibration)
        if since is not None:
            query = query.where(Row.created_at >= since)
        query = query.order_by(Row.id.desc()).limit(min(limit, last) if last is not None else limit)
        with self.repository.session("reading the monitoring window") as session:
            rows = session.execute(query).all()
        return _window(rows[::-1])

    def labelled(self, model_name: str, model_sha256: Optional[str], *, since: Optional[datetime],
                 limit: int) -> LabelledRows:
        """The newest `limit` labelled predictions of this model file since `since` (any calibration:
        the raw logits are the same model's)."""
        sha = Row.model_sha256.is_(None) if model_sha256 is None else Row.model_sha256 == model_sha256
        query = select(Row.logits, Row.probabilities, Row.label).where(
            Row.model_name == model_name, sha, Row.label.is_not(None))
        if since is not None:
            query = query.where(Row.created_at >= since)
        with self.repository.session("reading labelled predictions") as session:
            rows = session.execute(query.order_by(Row.id.desc()).limit(limit)).all()[::-1]
        if not rows:
            return LabelledRows(np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0, np.int64))
        return LabelledRows(np.stack([_floats(r.logits) for r in rows]).astype(np.float64),
                            np.stack([_floats(r.probabilities) for r in rows]).astype(np.float64),
                            np.asarray([r.label for r in rows], np.int64))

    def count(self, model_name: Optional[str] = None) -> int:
        query = select(func.count()).select_from(Row)
        if model_name is not None:
            query = query.where(Row.model_name == model_name)
        with self.repository.session("counting predictions") as session:
            return int(session.scalar(query))

    # --- feedback -----------------------------------------------------------------------------
    def apply_feedback(self, items: Sequence[FeedbackItem], now: Optional[datetime] = None) -> list[StoredFeedback]:
        """All items or none, in one transaction: every item is resolved and checked first
        (UnknownPrediction, LabelOutOfRange, FeedbackExists, also for an item repeating an earlier
        one of the same list), then the labels are written; a label written meanwhile by another
        request makes the whole list fail with FeedbackExists, the first label kept."""
        now = now or datetime.now(timezone.utc)
        stored: list[StoredFeedback] = []
        with self.repository.session("storing feedback", write=True, profile_lock=False) as session:
            seen: dict[int, int] = {}
            resolved = []
            for item in items:
                if item.prediction_id is not None:
                    where = Row.prediction_id == item.prediction_id
                    what = f"no stored prediction has id {item.prediction_id!r}"
                else:
                    where = and_(Row.request_id == item.request_id, Row.batch_index == item.index)
                    what = f"no stored prediction has request id {item.request_id!r} and index {item.index}"
                # a client may reuse an X-Request-ID: the newest prediction with it counts
                row = session.execute(select(Row.id, Row.prediction_id, Row.model_name, Row.model_version,
                                             Row.label, Row.probabilities, Row.predicted_class)
                                      .where(where).order_by(Row.id.desc()).limit(1)).first()
                if row is None:
                    raise UnknownPrediction(item.position, what + " (unknown, or past CALIB_MONITORING_RETENTION)")
                k = len(row.probabilities) // 4
                if not 0 <= item.label < k:
                    raise LabelOutOfRange(item.position, f"label {item.label} is not a class of model "
                                                         f"{row.model_name!r} (0..{k - 1})", k)
                if row.label is not None:
                    raise FeedbackExists(item.position, f"prediction {row.prediction_id} already has label "
                                                        f"{row.label}; the first feedback is kept")
                if row.id in seen:
                    raise FeedbackExists(item.position, f"prediction {row.prediction_id} is labelled twice in "
                                                        f"this list (also feedback[{seen[row.id]}])")
                seen[row.id] = item.position
                resolved.append((item, row))
            for item, row in resolved:
                done = session.execute(update(Row).where(Row.id == row.id, Row.label.is_(None))
                                       .values(label=item.label, labelled_at=now)).rowcount
                if done != 1:  # labelled by a concurrent request since the check: nothing of this list stays
                    raise FeedbackExists(item.position, f"prediction {row.prediction_id} was labelled by "
                                                        f"another request meanwhile; the first feedback is kept")
                stored.append(StoredFeedback(row.prediction_id, row.model_name, row.model_version, item.label,
                                             int(row.predicted_class)))
        return stored


def _window(rows) -> WindowRows:
    n = len(rows)
    k = len(rows[0].probabilities) // 4 if n else 0
    probabilities = np.zeros((n, k), np.float32)
    label = np.full(n, -1, np.int64)
    label_in_set = np.zeros(n, bool)
    for i, r in enumerate(rows):
        if r.label is None:
            continue
        label[i] = r.label
        probabilities[i] = _floats(r.probabilities)
        if r.prediction_set is not None:
            mask = np.unpackbits(np.frombuffer(r.prediction_set, np.uint8), count=k).astype(bool)
            label_in_set[i] = bool(mask[r.label])
    return WindowRows(
        created_at=[_utc(r.created_at) for r in rows],
        confidence=np.asarray([r.confidence for r in rows], np.float64),
        entropy=np.asarray([r.entropy for r in rows], np.float64),
        predicted_class=np.asarray([r.predicted_class for r in rows], np.int64),
        ood_flag=np.asarray([-1 if r.ood_flag is None else int(r.ood_flag) for r in rows], np.int64),
        set_size=np.asarray([-1 if r.set_size is None else r.set_size for r in rows], np.int64),
        set_coverage=np.asarray([np.nan if r.set_coverage is None else r.set_coverage for r in rows], np.float64),
        label_in_set=label_in_set, label=label, probabilities=probabilities)
