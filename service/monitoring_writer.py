"""Recording what predict served, off the request path.

Predict hands a `ServedBatch` (references to arrays it already computed, plus one uuid4 per
image) to `MonitoringWriter.submit`, which only appends it to a bounded in-memory queue: it never
waits and never fails. A background thread turns the queued batches into rows and inserts them in
one transaction every CALIB_MONITORING_FLUSH_S, or as soon as CALIB_MONITORING_FLUSH_ROWS wait.
A full queue drops the new rows, and a failed insert (database down) drops the rows it held; both
are counted (`on_dropped(reason, n)`, the Prometheus counter), and predict answers all the same.

`flush()` waits until every batch submitted before the call is written (or dropped): feedback
calls it first, so a label sent right after its predict finds the prediction.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

import numpy as np

from service.durations import Retention
from service.storage import StorageUnavailable
from service.storage.monitoring_store import ServedRow, SqlMonitoringStore

logger = logging.getLogger("service.monitoring")

QUEUE_FULL = "queue_full"
STORAGE_UNAVAILABLE = "storage_unavailable"
RETENTION_EVERY_S = 60.0


def new_prediction_ids(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


@dataclass(frozen=True)
class ServedBatch:
    """One predict answer as monitoring keeps it. The arrays are the answer's own (not copied:
    nothing mutates them after the answer is built)."""

    model_name: str
    model_version: str
    model_sha256: Optional[str]
    calibration_id: Optional[str]
    request_id: str
    created_at: datetime
    prediction_ids: list[str]
    probabilities: np.ndarray            # [n, K] calibrated, as served
    logits: np.ndarray                   # [n, K] raw
    entropy: np.ndarray                  # [n] of the calibrated deterministic probabilities (the OOD score)
    ood_flags: Optional[np.ndarray]      # [n] bool, None without a usable threshold
    set_mask: Optional[np.ndarray] = None  # [n, K] bool, with coverage only
    set_coverage: Optional[float] = None

    def __len__(self) -> int:
        return len(self.prediction_ids)

    def rows(self) -> list[ServedRow]:
        p = np.asarray(self.probabilities, np.float32)
        z = np.asarray(self.logits, np.float32)
        predicted = p.argmax(axis=1)
        confidence = p[np.arange(len(p)), predicted]
        sizes = None if self.set_mask is None else self.set_mask.sum(axis=1)
        out = []
        for i, pid in enumerate(self.prediction_ids):
            out.append(ServedRow(
                prediction_id=pid, model_name=self.model_name, model_version=self.model_version,
                model_sha256=self.model_sha256, calibration_id=self.calibration_id, request_id=self.request_id,
                batch_index=i, created_at=self.created_at, confidence=float(confidence[i]),
                entropy=float(self.entropy[i]), predicted_class=int(predicted[i]),
                ood_flag=None if self.ood_flags is None else bool(self.ood_flags[i]),
                set_size=None if sizes is None else int(sizes[i]),
                set_coverage=None if self.set_mask is None else float(self.set_coverage),
                prediction_set=None if self.set_mask is None else np.packbits(self.set_mask[i]).tobytes(),
                probabilities=p[i].tobytes(), logits=z[i].tobytes()))
        return out


def served_batch(model, *, calibration_id: Optional[str], request_id: Optional[str], probabilities: np.ndarray,
                 logits: np.ndarray, entropy: np.ndarray, ood_flags: Optional[np.ndarray],
                 set_mask: Optional[np.ndarray] = None, set_coverage: Optional[float] = None) -> ServedBatch:
    """The batch of one answer, with fresh prediction ids. The model's version is
    `LoadedModel.version` where the registry has one, else "1"."""
    return ServedBatch(model_name=model.name, model_version=str(getattr(model, "version", "1")),
                       model_sha256=model.card.get("model_sha256"), calibration_id=calibration_id,
                       request_id=request_id or uuid.uuid4().hex, created_at=datetime.now(timezone.utc),
                       prediction_ids=new_prediction_ids(len(probabilities)), probabilities=probabilities,
                       logits=logits, entropy=entropy, ood_flags=ood_flags, set_mask=set_mask,
                       set_coverage=set_coverage)


class MonitoringWriter:
    """The bounded queue and its writer thread (see the module docstring)."""

    def __init__(self, store: SqlMonitoringStore, *, max_queued_rows: int, flush_rows: int, flush_interval_s: float,
                 retention: Optional[Retention] = None, on_written: Callable[[str, int], None] = lambda m, n: None,
                 on_dropped: Callable[[str, int], None] = lambda reason, n: None,
                 refresh: Optional[Callable[[set], None]] = None, refresh_every_s: float = 0.0) -> None:
        self.store = store
        self.max_queued_rows = max_queued_rows
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.retention = retention
        self.on_written = on_written
        self.on_dropped = on_dropped
        self.refresh = refresh
        self.refresh_every_s = refresh_every_s
        self._queue: deque[tuple[int, ServedBatch]] = deque()
        self._queued_rows = 0
        self._submitted = 0      # sequence number of the last batch accepted
        self._done = 0           # every batch up to this one is written or dropped
        self._flush_wanted = False
        self._closing = False
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._touched: set = set()   # (model, version, calibration) written since the last refresh
        self.dropped = {QUEUE_FULL: 0, STORAGE_UNAVAILABLE: 0}
        self.written = 0

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    # --- the request side -----------------------------------------------------------------------
    def submit(self, batch: ServedBatch) -> bool:
        """Queue the batch; False (and counted as dropped) when the queue has no room for it."""
        n = len(batch)
        with self._cond:
            if self._closing or self._queued_rows + n > self.max_queued_rows:
                self.dropped[QUEUE_FULL] += n
                dropped = True
            else:
                self._submitted += 1
                self._queue.append((self._submitted, batch))
                self._queued_rows += n
                dropped = False
                if self._queued_rows >= self.flush_rows:
                    self._cond.notify_all()
        if dropped:
            self.on_dropped(QUEUE_FULL, n)
        return not dropped

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until what was submitted before this call is written or dropped (True), or timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            target = self._submitted
            if self._thread is None or not self._thread.is_alive():
                self._cond.release()
                try:
                    self._write_once()   # no thread (tests, or after close): write here
                finally:
                    self._cond.acquire()
            self._flush_wanted = True
            self._cond.notify_all()
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # --- the writer thread ----------------------------------------------------------------------
    def start(self) -> "MonitoringWriter":
        self._thread = threading.Thread(target=self._run, name="monitoring-writer", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        last_retention = last_refresh = time.monotonic()
        while True:
            with self._cond:
                deadline = time.monotonic() + self.flush_interval_s
                while not (self._closing or self._flush_wanted or self._queued_rows >= self.flush_rows):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                closing = self._closing
                self._flush_wanted = False
            self._write_once()
            now = time.monotonic()
            if self.retention is not None and now - last_retention >= RETENTION_EVERY_S:
                last_retention = now
                self._apply_retention()
            if self.refresh is not None and self.refresh_every_s > 0 and now - last_refresh >= self.refresh_every_s:
                last_refresh = now
                touched, self._touched = self._touched, set()
                if touched:
                    try:
                        self.refresh(touched)
                    except Exception:  # noqa: BLE001 - gauges are best effort; the writer must live on
                        logger.exception("refreshing the monitoring gauges failed")
            if closing:
                with self._cond:
                    if not self._queue:
                        return

    def _write_once(self) -> None:
        with self._cond:
            taken = list(self._queue)
            self._queue.clear()
            self._queued_rows = 0
        if not taken:
            return
        last = taken[-1][0]
        batches = [b for _, b in taken]
        n = sum(len(b) for b in batches)
        try:
            self.store.insert([row for b in batches for row in b.rows()])
        except StorageUnavailable:
            with self._cond:
                self.dropped[STORAGE_UNAVAILABLE] += n
            self.on_dropped(STORAGE_UNAVAILABLE, n)
        except Exception:  # noqa: BLE001 - a bug must not kill the writer: count, log, go on
            logger.exception("recording %d predictions failed", n)
            with self._cond:
                self.dropped[STORAGE_UNAVAILABLE] += n
            self.on_dropped(STORAGE_UNAVAILABLE, n)
        else:
            self.written += n
            per_model: dict[str, int] = {}
            for b in batches:
                per_model[b.model_name] = per_model.get(b.model_name, 0) + len(b)
                self._touched.add((b.model_name, b.model_version, b.calibration_id))
            for name, count in per_model.items():
                self.on_written(name, count)
        finally:
            with self._cond:
                self._done = max(self._done, last)
                self._cond.notify_all()

    def _apply_retention(self) -> None:
        try:
            gone = self.store.apply_retention(max_rows=self.retention.max_rows, max_age_s=self.retention.max_age_s)
            if gone:
                logger.info("monitoring retention: %d predictions deleted", gone)
        except StorageUnavailable:
            pass  # tried again next minute
        except Exception:  # noqa: BLE001
            logger.exception("applying the monitoring retention failed")
