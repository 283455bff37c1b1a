"""Micro-batcher: turns single judge requests into batches for a single-device engine.

Batching pays on CPU (FACTS.md: batch 16 gives about 7x the tokens/s of batch 1), but each HTTP
request arrives alone. The batcher keeps one bounded queue in front of the engine; one consumer task
collects a batch (flush at ``max_batch_size`` items or ``max_wait_ms`` after the first item was
queued, on the monotonic clock) and hands it to an async handler. Each request holds one future.

Contract highlights:
- The handler returns one entry per item, a result or an exception instance; an exception entry fails
  that item alone. If the handler raises, every item of that batch gets the exception; if it returns
  the wrong number of entries, every item gets a RuntimeError naming both lengths.
- A full queue raises :class:`QueueFull` at once (the server answers 429 with Retry-After).
- A request past its deadline raises :class:`BatchTimeout` (504); if its batch had not started the
  item is skipped, otherwise its result is discarded.
- The handler must be async and offload compute (``asyncio.to_thread``) so the event loop stays free.
- Explicit :meth:`MicroBatcher.start` / :meth:`MicroBatcher.stop`; nothing is done from ``__del__``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_log = logging.getLogger(__name__)

_RECENT_BATCHES = 20  # batch durations kept for the Retry-After estimate
_STOP: Any = object()  # queue sentinel: drain what came before it, then end the consumer


class QueueFull(Exception):
    """The batch queue is at its limit; retry after ``retry_after_s`` seconds (a whole number, >= 1)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        # Whole seconds because the HTTP Retry-After header takes an integer.
        self.retry_after_s: float = float(max(1, math.ceil(retry_after_s)))

    @property
    def retry_after_header(self) -> str:
        """Value for the ``Retry-After`` header."""
        return str(int(self.retry_after_s))


class BatchTimeout(Exception):
    """The request's deadline passed before its result was ready (the server answers 504)."""


class BatcherStopped(Exception):
    """The batcher is not running, or was stopped without draining (the server answers 503)."""


@dataclass(eq=False)
class _Entry(Generic[T]):
    payload: T
    future: asyncio.Future[Any]
    enqueued_at: float  # time.monotonic()
    state: str = "queued"  # queued -> taken (consumer popped it) | dropped (waiter gave up first)
    started: bool = False  # its batch reached the handler


class MicroBatcher(Generic[T, R]):
    """Collects submitted items into batches and runs them through an async batch handler.

    ``handler(items)`` must return a list with one entry per item, in order: the item's result or an
    exception instance for that item alone. Batches run one at a time unless
    ``max_concurrent_batches`` > 1. ``on_batch(size)`` is called as each batch starts (metrics hook).
    """

    def __init__(
        self,
        handler: Callable[[list[T]], Awaitable[list[R | BaseException]]],
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
        request_timeout_s: float | None = 120.0,
        name: str = "judge",
        on_batch: Callable[[int], None] | None = None,
        max_concurrent_batches: int = 1,
    ) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if request_timeout_s is not None and request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0 or None, got {request_timeout_s}")
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1, got {max_concurrent_batches}")
        self._handler = handler
        self._max_batch = max_batch_size
        self._max_wait_s = max_wait_ms / 1000.0
        self._max_queue = max_queue
        self._timeout_s = request_timeout_s
        self._name = name
        self._on_batch = on_batch
        self._max_concurrent = max_concurrent_batches

        self._queue: asyncio.Queue[Any] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._inflight: dict[asyncio.Task[None], list[_Entry[T]]] = {}
        self._dispatched_at: dict[asyncio.Task[None], float] = {}
        self._forming: list[_Entry[T]] = []  # batch being collected (stop() must be able to fail it)
        self._queued = 0  # live entries in the queue; the bound counts these, not abandoned ones
        self._accepting = False
        self._durations: deque[float] = deque(maxlen=_RECENT_BATCHES)

    # ---------------------------------------------------------------- public API

    @property
    def depth(self) -> int:
        """Items waiting in the queue (not yet collected into a batch)."""
        return self._queued

    @property
    def running(self) -> bool:
        """True between start() and stop(): submissions are accepted."""
        return self._accepting

    @property
    def max_queue(self) -> int:
        return self._max_queue

    async def start(self) -> None:
        """Start the consumer task on the running loop. Raises RuntimeError if already started."""
        if self._consumer is not None:
            raise RuntimeError(f"{self._name} batcher is already started")
        self._queue = asyncio.Queue()  # unbounded: the bound is enforced on live entries in submit()
        self._slots = asyncio.Semaphore(self._max_concurrent)
        self._queued = 0
        self._forming = []
        self._accepting = True
        self._consumer = asyncio.create_task(self._consume(), name=f"{self._name}-batcher")

    async def stop(self, *, drain: bool = True) -> None:
        """Stop accepting work. ``drain=True`` runs every queued item to completion first;
        ``drain=False`` fails queued and in-flight items with BatcherStopped (a compute thread the
        handler already started runs on in the background). Calling it when stopped is a no-op."""
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        self._accepting = False
        assert self._queue is not None
        if drain:
            self._queue.put_nowait(_STOP)
            await asyncio.gather(consumer, return_exceptions=True)
            self._fail_leftovers(BatcherStopped(f"{self._name} batcher stopped"))  # only if it crashed
        else:
            inflight = list(self._inflight)
            # A batch task cancelled before its first step never settles its items: keep them here.
            stranded = [e for batch in self._inflight.values() for e in batch]
            consumer.cancel()
            for task in inflight:
                task.cancel()
            await asyncio.gather(consumer, *inflight, return_exceptions=True)
            stopped = BatcherStopped(f"{self._name} batcher stopped before this request finished")
            _settle_all(stranded, stopped)
            self._fail_leftovers(stopped)

    async def __aenter__(self) -> MicroBatcher[T, R]:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop(drain=True)

    async def submit(self, item: T, *, timeout_s: float | None = None) -> R:
        """Queue ``item`` and wait for its result.

        ``timeout_s`` overrides the batcher's ``request_timeout_s`` for this call. Raises QueueFull at
        once when the queue is full, BatcherStopped when not running, BatchTimeout when the deadline
        passes, and re-raises the item's own exception.
        """
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if not self._accepting or self._queue is None:
            raise BatcherStopped(f"{self._name} batcher is not running")
        if self._queued >= self._max_queue:
            raise QueueFull(
                f"{self._name} queue is full ({self._queued}/{self._max_queue} waiting)",
                self._estimate_retry_after(),
            )
        entry: _Entry[T] = _Entry(item, asyncio.get_running_loop().create_future(), time.monotonic())
        self._queue.put_nowait(entry)
        self._queued += 1
        timeout = self._timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout) as deadline:
                return await entry.future
        except TimeoutError:
            if not deadline.expired():
                raise  # the item's own TimeoutError from the handler, not our deadline
            where = (
                "while its batch was running; the result will be discarded"
                if entry.started
                else "while waiting in the queue; it was not run"
            )
            raise BatchTimeout(f"{self._name} request timed out after {timeout:g} s {where}") from None
        finally:
            # Timeout or caller cancellation: awaiting the future cancelled it, so the consumer skips
            # it; count it out of the queue now so abandoned entries do not hold queue slots.
            if entry.state == "queued":
                entry.state = "dropped"
                self._queued -= 1

    @property
    def oldest_running_s(self) -> float:
        """How long the oldest batch inside the handler has been running (0 when none is): a stalled engine
        shows here before any caller's deadline passes."""
        if not self._dispatched_at:
            return 0.0
        return time.monotonic() - min(self._dispatched_at.values())

    # ---------------------------------------------------------------- consumer side

    async def _consume(self) -> None:
        assert self._queue is not None and self._slots is not None
        queue, slots = self._queue, self._slots
        try:
            stopping = False
            while not stopping:
                # Take a slot before collecting: while the engine is busy, items pile up in the queue
                # and the next batch is fuller.
                await slots.acquire()
                batch, stopping = await self._collect(queue)
                if batch:
                    self._dispatch(batch)
                else:
                    slots.release()
            while self._inflight:  # drain: let running batches finish before reporting stopped
                await asyncio.gather(*list(self._inflight), return_exceptions=True)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here would leave every waiter hanging until its deadline
            _log.exception("%s batcher consumer crashed", self._name)
            self._accepting = False
            self._fail_leftovers(BatcherStopped(f"{self._name} batcher failed internally"))

    async def _collect(self, queue: asyncio.Queue[Any]) -> tuple[list[_Entry[T]], bool]:
        """Collect one batch. Returns (batch, stop_seen)."""
        batch: list[_Entry[T]] = []
        self._forming = batch
        first: _Entry[T] | None = None
        while first is None:
            entry = await queue.get()  # blocking wait for work: no polling
            if entry is _STOP:
                return batch, True
            first = self._take(entry)
        batch.append(first)
        # Deadline from when the first item was queued: if it already waited behind a running batch,
        # take what is queued now and go rather than wait again.
        deadline = first.enqueued_at + self._max_wait_s
        while len(batch) < self._max_batch:
            try:
                entry = queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        entry = await queue.get()
                except TimeoutError:
                    break
            if entry is _STOP:
                return batch, True
            taken = self._take(entry)
            if taken is not None:
                batch.append(taken)
        return batch, False

    def _take(self, entry: _Entry[T]) -> _Entry[T] | None:
        if entry.state == "dropped":
            return None  # its waiter already gave up and counted it out
        entry.state = "taken"
        self._queued -= 1
        return entry

    def _dispatch(self, batch: list[_Entry[T]]) -> None:
        task = asyncio.create_task(self._run(batch), name=f"{self._name}-batch")
        self._inflight[task] = batch
        self._dispatched_at[task] = time.monotonic()
        self._forming = []
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        self._dispatched_at.pop(task, None)
        assert self._slots is not None
        self._slots.release()  # in a callback so a batch cancelled before it ran still frees its slot
        if not task.cancelled() and task.exception() is not None:
            _log.error("%s batch task failed", self._name, exc_info=task.exception())

    async def _run(self, batch: list[_Entry[T]]) -> None:
        # Waiters that timed out or were cancelled since collection: do not spend compute on them.
        live = [e for e in batch if not e.future.done()]
        if not live:
            return
        for e in live:
            e.started = True
        self._notify(len(live))
        began = time.monotonic()
        try:
            results = await self._handler([e.payload for e in live])
        except asyncio.CancelledError:
            _settle_all(live, BatcherStopped(f"{self._name} batcher stopped while this request ran"))
            raise
        except Exception as exc:
            _log.warning("%s batch of %d failed: %r", self._name, len(live), exc)
            _settle_all(live, exc)
            return
        finally:
            self._durations.append(time.monotonic() - began)
        if not isinstance(results, list | tuple) or len(results) != len(live):
            got = f"{len(results)} results" if isinstance(results, list | tuple) else type(results).__name__
            _settle_all(
                live,
                RuntimeError(
                    f"{self._name} batch handler returned {got} for a batch of {len(live)} items"
                ),
            )
            return
        for e, res in zip(live, results, strict=True):
            if e.future.done():
                continue  # its deadline passed mid-batch: result discarded
            if isinstance(res, BaseException):
                e.future.set_exception(res)
            else:
                e.future.set_result(res)

    # ---------------------------------------------------------------- helpers

    def _notify(self, size: int) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(size)
        except Exception:  # a metrics bug must not fail requests
            _log.exception("%s on_batch hook failed", self._name)

    def _estimate_retry_after(self) -> float:
        """Seconds until a queue slot is likely free: recent batch time x batches ahead (>= 1 s)."""
        per_batch = sum(self._durations) / len(self._durations) if self._durations else self._max_wait_s
        batches_ahead = math.ceil(self._queued / self._max_batch) + len(self._inflight)
        return max(1.0, per_batch * batches_ahead / self._max_concurrent)

    def _fail_leftovers(self, exc: BaseException) -> None:
        """Fail the batch being collected and everything still queued (not running batches)."""
        leftovers = list(self._forming)
        self._forming = []
        if self._queue is not None:
            while True:
                try:
                    entry = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if entry is _STOP:
                    continue
                if entry.state == "queued":
                    entry.state = "dropped"
                    self._queued -= 1
                    leftovers.append(entry)
        _settle_all(leftovers, exc)


def _settle_all(entries: list[_Entry[Any]], exc: BaseException) -> None:
    for e in entries:
        if not e.future.done():
            e.future.set_exception(exc)
