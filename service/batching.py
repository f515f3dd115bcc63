"""Dynamic micro-batching: concurrent predict requests to one model share one backbone pass.

Each loaded model gets a `MicroBatcher`: a request of at most `batch_max_images` images puts
(images, its T and seed, future) on the model's queue; the worker coroutine takes the oldest
waiting request and, if nothing else is queued, dispatches it at once (a lone request never waits
for the window); otherwise it keeps the batch open until `batch_wait_ms` after that request
arrived (or until `batch_max_images` images are in). One call in the inference executor then runs
the backbone and the deterministic head once on the concatenation and draws MC dropout for all
its requests at once (`dataplane.predict_many`: each request's own seed and T, so its masks and
numbers are those it gets alone, bit for bit, for the same features), and each request's future
gets its own prediction: no second hop to an executor thread per request. What batching can
change is the backbone's rounding: float32 kernels may pick a different code path for a batch of
one than for a larger batch (on the shipped model, up to ~4e-6 absolute on features of magnitude
~8). Why the head and MC are one call per batch: per request they cost more than the backbone
pass itself (a profile under 64 clients: docs/workers.md).

Requests with more images than `batch_max_images`, and every request when `batch_wait_ms` is 0,
skip the queue and run `dataplane.predict` in the executor as before. A failing forward pass fails
each request of its batch (a 500, as without batching); a client that goes away only drops its
own entry. Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from service import dataplane
from service.registry import LoadedModel

logger = logging.getLogger("service.batching")

# Called after each shared backbone pass with (model name, images, requests): metrics.
BatchObserver = Callable[[str, int, int], None]
# Called with (model name, stage, seconds) for each stage of one predict request: metrics, so a
# profile under load shows where a request's time goes (see STAGES).
StageObserver = Callable[[str, str, float], None]


# How a batch is closed. window: it stays open `wait_seconds` after its first request while other
# requests are queued (a lone request goes at once). continuous: it takes what is queued when the
# backbone is free and never waits; requests that arrive during a pass queue up and form the next
# batch, so batches grow with the load.
POLICIES = ("window", "continuous")


class BatchForwardError(RuntimeError):
    """The shared pass of a batch (backbone, head, MC dropout) failed; the exception is the __cause__."""


@dataclass(eq=False)
class _Entry:
    images: np.ndarray
    future: asyncio.Future  # -> _Result
    enqueued: float  # loop time
    mc_samples: int = 0
    seed: int | None = None
    started: float = 0.0   # loop time its batch's pass was submitted
    finished: float = 0.0  # loop time its batch's pass returned
    mc_seconds: float = 0.0  # of the pass, the head, MC dropout and probabilities of the whole batch


@dataclass(frozen=True)
class _Result:
    features: np.ndarray
    logits: np.ndarray
    prediction: dataplane.Prediction


class MicroBatcher:
    """One model's queue and the worker coroutine that drains it (start/aclose on one loop)."""

    def __init__(self, model: LoadedModel, executor: Executor, *, max_images: int, wait_seconds: float,
                 batch_size: int = 500, observer: BatchObserver | None = None,
                 stage_observer: StageObserver | None = None, continuous: bool = False,
                 mc_chunk_rows: int = 65_536, max_passes: int = 1):
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.model = model
        self.max_images = max_images
        self.wait_seconds = max(0.0, float(wait_seconds))
        self.continuous = continuous
        self.batch_size = batch_size
        self.mc_chunk_rows = mc_chunk_rows
        self.max_passes = max(1, int(max_passes))   # batches computed at once (1: one after the other)
        self._executor = executor
        self._observer = observer
        self._stage_observer = stage_observer
        self._queue: asyncio.Queue[_Entry] | None = None
        self._worker: asyncio.Task | None = None
        self._open: list[_Entry] = []      # the batch being collected
        self._carry: _Entry | None = None  # taken from the queue, did not fit the previous batch
        self._passes: dict[asyncio.Task, list[_Entry]] = {}   # the batches being computed
        self._slots: asyncio.Semaphore | None = None
        self._pending = 0   # requests submitted and not yet answered (queued, collected or in a pass)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def busy(self) -> bool:
        """Some request is waiting for an answer of this batcher."""
        return self._pending > 0

    def start(self) -> None:
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.max_passes)
        self._worker = asyncio.get_running_loop().create_task(
            self._run(), name=f"micro-batcher[{self.model.name}]")

    async def aclose(self) -> None:
        """Stop the worker; requests still waiting are cancelled (the server drains requests
        before its lifespan ends, so normally there are none)."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        worker.cancel()
        await asyncio.wait([worker])
        passes = dict(self._passes)
        for task in passes:
            task.cancel()
        if passes:
            await asyncio.wait(passes)
        waiting = [*self._open, *([self._carry] if self._carry else [])]
        waiting += [entry for batch in passes.values() for entry in batch]
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for entry in waiting:
            entry.future.cancel()
        self._open, self._carry = [], None

    async def features(self, images: np.ndarray) -> np.ndarray:
        """The backbone features of `images` (1..max_images of them), computed in a shared pass."""
        return (await self._submit(images, 0, None)).features

    async def features_and_logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The backbone features and deterministic head logits of `images`, both computed in one
        shared pass: the head is one call for the whole batch, not one per request."""
        result = await self._submit(images, 0, None)
        return result.features, result.logits

    async def predict(self, images: np.ndarray, *, mc_samples: int, seed: int | None) -> dataplane.Prediction:
        """`dataplane.predict` of `images` with T = `mc_samples` and `seed`, computed in a shared
        pass (MC dropout for all of the batch's requests at once, each with its own seed)."""
        return (await self._submit(images, mc_samples, seed)).prediction

    async def _submit(self, images: np.ndarray, mc_samples: int, seed: int | None) -> _Result:
        if not self.running:
            raise RuntimeError(f"the micro-batcher of model {self.model.name!r} is not running")
        if not 0 < len(images) <= self.max_images:
            raise ValueError(f"{len(images)} images: the batcher takes 1..{self.max_images}")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        entry = _Entry(images, future, loop.time(), mc_samples, seed)
        self._queue.put_nowait(entry)
        self._pending += 1
        try:
            result = await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                future.exception()  # resolved just as the client went away: mark it retrieved
            raise
        finally:
            self._pending -= 1
        if self._stage_observer is not None:
            name, observe = self.model.name, self._stage_observer
            observe(name, "batch_queue", entry.started - entry.enqueued)
            observe(name, "backbone", entry.finished - entry.started - entry.mc_seconds)
            observe(name, "head_mc", entry.mc_seconds)
            observe(name, "wakeup", loop.time() - entry.finished)
        return result

    # --- the worker ----------------------------------------------------------------------------
    async def _run(self) -> None:
        """Collect a batch once a pass slot is free, start its pass, collect the next: with
        `max_passes` > 1 the next batch is computed while the previous one still runs."""
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                await self._collect()
            except Exception as exc:  # a bug here must neither hang the batch nor stop the worker
                logger.exception("micro-batcher of model %r failed", self.model.name)
                self._fail(self._open, exc)
                self._open = []
                self._slots.release()
                continue
            except BaseException:
                self._slots.release()
                raise
            batch, self._open = self._open, []
            task = loop.create_task(self._pass_then_release(batch))
            self._passes[task] = batch
            task.add_done_callback(self._passes.pop)

    async def _pass_then_release(self, batch: list[_Entry]) -> None:
        try:
            await self._forward(batch)
        except Exception as exc:
            logger.exception("micro-batcher of model %r failed", self.model.name)
            self._fail(batch, exc)
        finally:
            self._slots.release()

    async def _collect(self) -> None:
        """Fill `_open`: the oldest waiting request; alone if nothing else is queued; else, with
        the others queued, whatever arrives before its deadline (window) or nothing more
        (continuous)."""
        loop = asyncio.get_running_loop()
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        self._open = [first]
        n = len(first.images)
        deadline = first.enqueued + self.wait_seconds
        await asyncio.sleep(0)  # let requests that are ready to enqueue do so first
        if self._queue.empty():
            return  # nothing else queued: dispatch at once, never wait for the window
        while n < self.max_images:
            if self._queue.empty() and self.continuous:
                break
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        entry = await self._queue.get()
                except TimeoutError:
                    break
            else:
                entry = self._queue.get_nowait()
            if entry.future.done():
                continue  # its client went away while it was queued
            if n + len(entry.images) > self.max_images:
                self._carry = entry  # first in line for the next batch
                break
            self._open.append(entry)
            n += len(entry.images)

    async def _forward(self, batch: list[_Entry]) -> None:
        live = [e for e in batch if not e.future.done()]
        if not live:
            return
        x = live[0].images if len(live) == 1 else np.concatenate([e.images for e in live])
        requests, start = [], 0
        for entry in live:
            requests.append(dataplane.PredictRequest(start, start + len(entry.images), entry.mc_samples, entry.seed))
            start += len(entry.images)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            features, logits, predictions, mc_seconds = await loop.run_in_executor(
                self._executor, self._pass, x, requests)
        except Exception as exc:
            self._fail(live, exc)
            return
        finished = loop.time()
        for entry, request, prediction in zip(live, requests, predictions):
            entry.started, entry.finished, entry.mc_seconds = started, finished, mc_seconds
            if not entry.future.done():
                rows = slice(request.start, request.stop)
                entry.future.set_result(_Result(features[rows], logits[rows], prediction))
        if self._observer is not None:
            try:
                self._observer(self.model.name, len(x), len(live))
            except Exception:
                logger.exception("batch observer failed")

    def _pass(self, x: np.ndarray, requests: list[dataplane.PredictRequest]
              ) -> tuple[np.ndarray, np.ndarray, list[dataplane.Prediction], float]:
        clf = self.model.classifier
        features = clf.features(x, self.batch_size)
        head_started = time.perf_counter()
        logits = clf.head_logits(features)
        predictions = dataplane.predict_many(self.model, features, logits, requests, self.mc_chunk_rows)
        return features, logits, predictions, time.perf_counter() - head_started

    def _fail(self, entries: list[_Entry], exc: Exception) -> None:
        n = sum(len(e.images) for e in entries)
        for entry in entries:
            if not entry.future.done():
                err = BatchForwardError(f"batched pass of model {self.model.name!r} on {n} images "
                                        f"failed: {type(exc).__name__}: {exc}")
                err.__cause__ = exc
                entry.future.set_exception(err)


class BatchedPredictor:
    """The predict path of an app: a micro-batcher per loaded model version (none when `wait_ms` is
    0) and the inference executor shared with them.

    A batcher belongs to one `LoadedModel` object, so a batch never mixes versions: after a swap
    (service.model_repository) the new version gets a batcher of its own on its first request,
    and the old one's batcher answers what it holds, then closes (`retire`). A request that took
    the old version and arrives after that runs on it unbatched."""

    def __init__(self, models: Iterable[LoadedModel], executor: Executor, *, max_images: int, wait_ms: float,
                 batch_size: int = 500, observer: BatchObserver | None = None,
                 stage_observer: StageObserver | None = None, policy: str = "window",
                 mc_chunk_rows: int = 65_536, max_passes: int = 1):
        if policy not in POLICIES:
            raise ValueError(f"unknown batch policy {policy!r}; expected one of {', '.join(POLICIES)}")
        self.enabled = wait_ms > 0
        self.max_images = max_images
        self._executor = executor
        self._stage_observer = stage_observer
        self._options = dict(max_images=max_images, wait_seconds=wait_ms / 1000, batch_size=batch_size,
                             observer=observer, stage_observer=stage_observer, continuous=policy == "continuous",
                             mc_chunk_rows=mc_chunk_rows, max_passes=max_passes)
        self._batchers: dict[int, MicroBatcher] = {}   # id(LoadedModel) -> its batcher (which holds it)
        self._started = False
        if self.enabled:
            for m in models:
                self._batchers[id(m)] = MicroBatcher(m, executor, **self._options)

    def batcher(self, name: str) -> MicroBatcher | None:
        """The batcher of the version of `name` being served (not retired), if it has one."""
        return next((b for b in self._batchers.values() if b.model.name == name and not b.model.retired), None)

    def batcher_for(self, model: LoadedModel) -> MicroBatcher | None:
        """`model`'s batcher, created (and started) on its first request; None when batching is off
        or `model` was retired (swapped out: what it still has to do runs unbatched)."""
        if not self.enabled or model.retired:
            return None
        batcher = self._batchers.get(id(model))
        if batcher is None or batcher.model is not model:
            batcher = self._batchers[id(model)] = MicroBatcher(model, self._executor, **self._options)
            if self._started:
                batcher.start()
        return batcher

    async def retire(self, model: LoadedModel, poll_s: float = 0.02) -> bool:
        """Once `model`'s batcher has answered every request it holds, close it and forget it (the
        registry flagged `model` retired first, so no new request joins it). True if it had one."""
        batcher = self._batchers.get(id(model))
        if batcher is None or batcher.model is not model:
            return False
        while batcher.busy:
            await asyncio.sleep(poll_s)
        if self._batchers.get(id(model)) is batcher:
            del self._batchers[id(model)]
        await batcher.aclose()
        return True

    def start(self) -> None:
        self._started = True
        for batcher in list(self._batchers.values()):
            batcher.start()

    async def aclose(self) -> None:
        self._started = False
        await asyncio.gather(*(b.aclose() for b in list(self._batchers.values())))

    async def predict(self, model: LoadedModel, x: np.ndarray, *, mc_samples: int, seed: int | None,
                      mc_chunk_rows: int, stop=None, calibrator=None) -> dataplane.Prediction:
        """`dataplane.predict`, computed in a pass shared with concurrent requests when the request
        is small enough (and asks for the batcher's MC chunk size), else on its own. A request with
        a recalibration profile's `calibrator` shares the backbone pass only: its head and MC
        dropout run on their own. `stop` (a threading.Event, set when the client goes away):
        WorkCancelled at the next chunk of work that runs outside a shared pass."""
        batcher = self.batcher_for(model)
        features = logits = None
        if batcher is not None and 0 < len(x) <= batcher.max_images:
            if calibrator is None and mc_chunk_rows == batcher.mc_chunk_rows:
                return await batcher.predict(x, mc_samples=mc_samples, seed=seed)
            features, logits = await batcher.features_and_logits(x)
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await loop.run_in_executor(self._executor, functools.partial(
            dataplane.predict, model, x, mc_samples=mc_samples, seed=seed, mc_chunk_rows=mc_chunk_rows,
            features=features, logits=logits, stop=stop, calibrator=calibrator))
        if self._stage_observer is not None:
            self._stage_observer(model.name, "unbatched" if features is None else "head_mc",
                                 loop.time() - started)
        return result
