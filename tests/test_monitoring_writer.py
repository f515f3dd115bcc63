"""The background writer of the served predictions (`service.monitoring_writer`) with a recording
store in place of the database: batching into one insert per flush, flush() for feedback, the
bounded queue dropping (and counting) instead of blocking, and a database that is down."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np

from service.monitoring_writer import QUEUE_FULL, STORAGE_UNAVAILABLE, MonitoringWriter, served_batch
from service.storage import StorageUnavailable


class RecordingStore:
    def __init__(self, fail: bool = False, delay_s: float = 0.0) -> None:
        self.inserts: list[list] = []
        self.fail = fail
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()

    def insert(self, rows):
        self.gate.wait(10)
        time.sleep(self.delay_s)
        if self.fail:
            raise StorageUnavailable("down")
        self.inserts.append(list(rows))

    def apply_retention(self, **kwargs):
        return 0


MODEL = SimpleNamespace(name="m", card={"model_sha256": "ab" * 32})


def _batch(n: int, k: int = 3, rid: str = "req"):
    rng = np.random.default_rng(n)
    z = rng.normal(size=(n, k))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    h = -(p * np.log(p)).sum(1)
    return served_batch(MODEL, calibration_id=None, request_id=rid, probabilities=p, logits=z, entropy=h,
                        ood_flags=h > 1.0, set_mask=p > 0.2, set_coverage=0.9)


def _writer(store, **kwargs):
    counts: dict = {}
    options = dict(max_queued_rows=100, flush_rows=50, flush_interval_s=0.2,
                   on_dropped=lambda reason, n: counts.__setitem__(reason, counts.get(reason, 0) + n))
    options.update(kwargs)
    return MonitoringWriter(store, **options), counts


def test_rows_hold_numbers_of_the_answer():
    batch = _batch(4)
    rows = batch.rows()
    assert [r.batch_index for r in rows] == [0, 1, 2, 3]
    assert len({r.prediction_id for r in rows}) == 4 and all(len(r.prediction_id) == 32 for r in rows)
    p = np.asarray(batch.probabilities, np.float32)
    for i, r in enumerate(rows):
        assert np.array_equal(np.frombuffer(r.probabilities, np.float32), p[i])
        assert r.predicted_class == int(p[i].argmax()) and r.confidence == float(p[i].max())
        assert r.model_version == "1" and r.request_id == "req" and r.set_coverage == 0.9
        mask = np.unpackbits(np.frombuffer(r.prediction_set, np.uint8), count=3).astype(bool)
        assert np.array_equal(mask, batch.set_mask[i]) and r.set_size == int(mask.sum())


def test_batches_queued_together_go_in_one_insert():
    store = RecordingStore()
    writer, _ = _writer(store, flush_interval_s=0.3)
    writer.start()
    try:
        for _ in range(5):
            assert writer.submit(_batch(3))
        assert writer.flush(5)
        assert sum(len(i) for i in store.inserts) == 15
        assert len(store.inserts) == 1   # five answers, one transaction
        assert writer.written == 15 and writer.queued_rows == 0
    finally:
        writer.close()


def test_the_thread_flushes_on_its_own_after_the_interval_and_at_flush_rows():
    store = RecordingStore()
    writer, _ = _writer(store, flush_interval_s=0.2, flush_rows=10)
    writer.start()
    try:
        writer.submit(_batch(2))
        deadline = time.monotonic() + 5
        while not store.inserts and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sum(len(i) for i in store.inserts) == 2
        writer.flush_interval_s = 30  # from now on only the row count wakes it
        time.sleep(0.3)
        writer.submit(_batch(12))
        deadline = time.monotonic() + 5
        while sum(len(i) for i in store.inserts) < 14 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sum(len(i) for i in store.inserts) == 14
    finally:
        writer.close()


def test_a_full_queue_drops_and_counts_without_blocking():
    store = RecordingStore()
    store.gate.clear()                     # the database hangs: nothing leaves the queue
    writer, counts = _writer(store, max_queued_rows=10, flush_rows=1000, flush_interval_s=30)
    writer.start()
    try:
        started = time.perf_counter()
        accepted = [writer.submit(_batch(4)) for _ in range(5)]
        assert time.perf_counter() - started < 0.5   # never waits
        assert accepted == [True, True, False, False, False]
        assert counts == {QUEUE_FULL: 12} and writer.dropped[QUEUE_FULL] == 12
    finally:
        store.gate.set()
        writer.close()
    assert sum(len(i) for i in store.inserts) == 8   # close wrote what was queued


def test_a_database_that_is_down_drops_the_batch_and_counts_it():
    store = RecordingStore(fail=True)
    writer, counts = _writer(store)
    writer.start()
    try:
        writer.submit(_batch(3))
        writer.submit(_batch(2))
        assert writer.flush(5)             # flush returns: the rows are dropped, not pending
        assert counts == {STORAGE_UNAVAILABLE: 5}
        store.fail = False
        writer.submit(_batch(1))
        assert writer.flush(5) and sum(len(i) for i in store.inserts) == 1   # it recovers
    finally:
        writer.close()


def test_flush_without_a_thread_writes_in_the_caller():
    store = RecordingStore()
    writer, _ = _writer(store)
    writer.submit(_batch(2))
    assert writer.flush(1) and sum(len(i) for i in store.inserts) == 2


def test_refresh_gets_the_keys_written_since_the_last_one():
    store = RecordingStore()
    seen = []
    writer, _ = _writer(store, refresh=seen.append, refresh_every_s=0.05, flush_interval_s=0.05)
    writer.start()
    try:
        writer.submit(_batch(2))
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen and seen[0] == {("m", "1", None)}
    finally:
        writer.close()
