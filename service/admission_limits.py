"""Admission control: how much heavy work and how many buffered bytes the server takes on at once.

Without it nothing bounds the evaluations in flight: 40 concurrent 29 MB `.npz` evaluations peaked
at 3.57 GB RSS, so 400 would need ~30 GB. Two limits, both answering "come back later" (the
HTTP layer turns `Overloaded` into 503 + Retry-After) instead of letting memory grow:

* `EvaluationGate`: at most `limit` evaluations run; up to `queue` more wait (FIFO) for at most
  `timeout` seconds. An AnyIO CapacityLimiter does the FIFO hand-over and is cancellation-safe:
  a waiter or holder that is cancelled (client gone, timeout) never leaks its slot.
* `ByteBudget`: request bodies reserve what they will cost in memory while they are held
  (`charge_factor`) and give it back when the request ends.

Nothing here knows about HTTP.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import asynccontextmanager, contextmanager
from typing import AsyncIterator, Iterator

import anyio

# Measured with tracemalloc (service.inputs on random uint8 images): a JSON body of nested pixel
# lists peaks at 7.2x its size while it is parsed (the lists), on top of the body itself; an
# uncompressed .npz upload at 1.1x (its arrays) on top of the bytes read from the upload. PNG
# uploads decode to about their own size. What a *compressed* .npz declares it inflates to is charged
# on top, from its zip directory before it is inflated (service.rest.requests.charge_uncompressed).
JSON_CHARGE = 8
OTHER_CHARGE = 2


def charge_factor(content_type: str) -> int:
    """Bytes of memory per body byte while the request is being served."""
    ctype = content_type.split(";")[0].strip().lower()
    return JSON_CHARGE if ctype == "application/json" or ctype.endswith("+json") else OTHER_CHARGE


class Overloaded(Exception):
    """The server is busy; the request itself is fine. `reason`: queue_full, queue_timeout,
    byte_budget or predict_work; `retry_after`: whole seconds a client should wait before retrying."""

    def __init__(self, reason: str, message: str, retry_after: int):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class EvaluationGate:
    """At most `limit` holders; at most `queue` waiters, each for at most `timeout` seconds."""

    def __init__(self, limit: int, queue: int, timeout: float):
        if limit < 1 or queue < 0 or timeout <= 0:
            raise ValueError(f"limit >= 1, queue >= 0, timeout > 0; got {limit}, {queue}, {timeout}")
        self.limit, self.queue, self.timeout = limit, queue, timeout
        self._limiter: anyio.CapacityLimiter | None = None  # created on the serving loop
        self._hold_seconds = 5.0  # running mean of how long a slot is held, for Retry-After
        self.rejected: Counter[str] = Counter()

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.limit)
        return self._limiter

    @property
    def in_flight(self) -> int:
        return 0 if self._limiter is None else int(self._limiter.borrowed_tokens)

    @property
    def waiting(self) -> int:
        return 0 if self._limiter is None else self._limiter.statistics().tasks_waiting

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, served `limit` at a time."""
        turns = (self.waiting + self.in_flight) / self.limit
        return max(1, min(60, math.ceil(turns * self._hold_seconds)))

    async def acquire(self) -> object:
        """A token for `release`; raises Overloaded when the queue is full or the wait times out."""
        limiter, token = self.limiter, object()
        try:
            limiter.acquire_on_behalf_of_nowait(token)
            return token
        except anyio.WouldBlock:
            pass
        if self.waiting >= self.queue:
            self.rejected["queue_full"] += 1
            raise Overloaded("queue_full", f"{self.in_flight} evaluation(s) running and {self.waiting} waiting "
                             f"(CALIB_MAX_CONCURRENT_EVALUATIONS={self.limit}, CALIB_EVALUATION_QUEUE="
                             f"{self.queue}); retry later", self.retry_after())
        try:
            with anyio.fail_after(self.timeout):
                await limiter.acquire_on_behalf_of(token)
        except TimeoutError:
            if token in limiter.statistics().borrowers:  # granted just as the deadline hit
                return token
            self.rejected["queue_timeout"] += 1
            raise Overloaded("queue_timeout", f"waited {self.timeout:g} s for an evaluation slot "
                             f"(CALIB_EVALUATION_QUEUE_TIMEOUT_S); retry later", self.retry_after()) from None
        return token

    def release(self, token: object, held_seconds: float | None = None) -> None:
        self.limiter.release_on_behalf_of(token)
        if held_seconds is not None:
            self._hold_seconds = 0.8 * self._hold_seconds + 0.2 * held_seconds

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        token = await self.acquire()
        start = time.monotonic()
        try:
            yield
        finally:
            self.release(token, time.monotonic() - start)


class ByteBudget:
    """A shared allowance of buffered bytes. Reservations never wait: over budget is Overloaded.
    One request larger than the whole budget still runs when nothing else is reserved, so a
    legitimate (within CALIB_MAX_BODY_BYTES) request can never be refused forever."""

    RETRY_AFTER = 1  # buffers drain within a request's lifetime: retry soon

    def __init__(self, total: int):
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total}")
        self.total = total
        self.used = 0
        self.rejected = 0

    def try_reserve(self, n: int, own: int = 0) -> bool:
        """`own`: what the asking request already holds (charged chunk by chunk, a request alone
        may still grow past the total)."""
        if n <= 0:
            return True
        if self.used - own and self.used + n > self.total:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0, "ByteBudget released more than reserved"

    def reservation(self) -> Reservation:
        return Reservation(self)


class Reservation:
    """One request's share of a ByteBudget; `close` returns all of it (idempotent)."""

    def __init__(self, budget: ByteBudget):
        self.budget = budget
        self.held = 0

    def reserve(self, n: int) -> None:
        if not self.budget.try_reserve(n, own=self.held):
            self.budget.rejected += 1
            raise Overloaded("byte_budget", f"the server is buffering {self.budget.used} bytes of requests "
                             f"(budget {self.budget.total}, CALIB_MAX_BUFFERED_BYTES); this one needs {n} more; "
                             f"retry later", ByteBudget.RETRY_AFTER)
        self.held += max(0, n)

    def close(self) -> None:
        held, self.held = self.held, 0
        if held:
            self.budget.release(held)


class PredictWorkBound(ByteBudget):
    """The predict work admitted at once, in images x max(1, MC samples): a queue of abandoned
    512-image T=1000 requests can no longer make a 1-image predict wait half a minute. Like the
    byte budget, one request larger than the bound runs when nothing else is admitted."""

    RETRY_AFTER = 2  # a few seconds of model work drain it

    @contextmanager
    def hold(self, units: int) -> Iterator[None]:
        if not self.try_reserve(units):
            self.rejected += 1
            raise Overloaded("predict_work", f"{self.used} image x MC-sample units of predict work are admitted "
                             f"(bound {self.total}, CALIB_MAX_QUEUED_PREDICT_WORK); this request adds {units}; "
                             f"retry later", self.RETRY_AFTER)
        try:
            yield
        finally:
            self.release(units)
