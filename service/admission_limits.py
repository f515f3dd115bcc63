"""Admission control: how much heavy work and how many buffered bytes the server takes on at once.

Without it nothing bounds the evaluations in flight: 40 concurrent 29 MB `.npz` evaluations peaked
at 3.57 GB RSS, so 400 would need ~30 GB. Two limits, both answering "come back later" (the
HTTP layer turns `Overloaded` into 503 + Retry-After) instead of letting memory grow:

* `EvaluationGate`: at most `limit` evaluations run; up to `queue` more wait (FIFO) for at most
  `timeout` seconds. An AnyIO CapacityLimiter does the FIFO hand-over and is cancellation-safe:
  a waiter or holder that is cancelled (client gone, timeout) never leaks its slot.
* `ByteBudget`: request bodies reserve what they will cost in memory while they are held
  (`charge_factor`), chunk by chunk as they arrive, and give it back when the request ends.

Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
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
    """A shared allowance of buffered bytes, charged as request bodies arrive.

    A chunk that does not fit waits (`Reservation.reserve_waiting`, at most `wait_s`) for others to
    release, which holds its upload in the client's socket; then Overloaded. The oldest open
    reservation may always grow, so some request always progresses: many concurrent uploads
    that each hold a part can never starve one another, and a legitimate (within
    CALIB_MAX_BODY_BYTES) request larger than the whole budget still runs."""

    RETRY_AFTER = 1  # buffers drain within a request's lifetime: retry soon

    def __init__(self, total: int, wait_s: float = 0.0):
        if total < 1 or wait_s < 0:
            raise ValueError(f"total must be >= 1 and wait_s >= 0, got {total}, {wait_s}")
        self.total = total
        self.wait_s = wait_s
        self.used = 0
        self.rejected = 0
        self._open: dict[Reservation, None] = {}  # insertion order: the oldest first
        self._changed: asyncio.Event | None = None

    def try_reserve(self, n: int, own: int = 0, oldest: bool = False) -> bool:
        """`own`: what the asking request already holds; `oldest`: it is the oldest open
        reservation (which may always grow)."""
        if n <= 0:
            return True
        if self.used - own and self.used + n > self.total and not oldest:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0, "ByteBudget released more than reserved"
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def reservation(self) -> Reservation:
        reservation = Reservation(self)
        self._open[reservation] = None
        return reservation

    def is_oldest(self, reservation: Reservation) -> bool:
        return next(iter(self._open), None) is reservation

    async def changed(self, timeout: float) -> None:
        """Until something is released (or `timeout` s)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass


class Reservation:
    """One request's share of a ByteBudget; `close` returns all of it (idempotent)."""

    def __init__(self, budget: ByteBudget):
        self.budget = budget
        self.held = 0

    def _overloaded(self, n: int) -> Overloaded:
        self.budget.rejected += 1
        return Overloaded("byte_budget", f"the server is buffering {self.budget.used} bytes of requests "
                          f"(budget {self.budget.total}, CALIB_MAX_BUFFERED_BYTES); this one needs {n} more; "
                          f"retry later", ByteBudget.RETRY_AFTER)

    def reserve(self, n: int) -> None:
        """At once, or Overloaded."""
        if not self.budget.try_reserve(n, own=self.held, oldest=self.budget.is_oldest(self)):
            raise self._overloaded(n)
        self.held += max(0, n)

    async def reserve_waiting(self, n: int) -> None:
        """Waits up to the budget's `wait_s` for room, then Overloaded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget.wait_s
        while not self.budget.try_reserve(n, own=self.held, oldest=self.budget.is_oldest(self)):
            left = deadline - loop.time()
            if left <= 0:
                raise self._overloaded(n)
            await self.budget.changed(left)
        self.held += max(0, n)

    def close(self) -> None:
        self.budget._open.pop(self, None)
        held, self.held = self.held, 0
        if held:
            self.budget.release(held)
        elif self.budget._changed is not None:  # the oldest may have changed: let waiters look again
            self.budget._changed.set()
            self.budget._changed = None


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
