"""Mechanism tests for the rm_server micro-batcher, driven by a fake async batch handler.

Ordering and batch contents are asserted through events and what the handler saw, never through
wall-clock numbers; ``asyncio.wait_for(..., GUARD)`` only keeps a broken batcher from hanging the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from rm_server._batcher import BatcherStopped, BatchTimeout, MicroBatcher, QueueFull

GUARD = 30.0  # hang guard, far above any wait configured below (a paused or busy box still makes it)
LONG_WAIT_MS = 60_000.0  # a flush deadline no test may reach


class FakeEngine:
    """Async batch handler that records every batch and can be held at a gate."""

    def __init__(self, fn: Callable[[Any], Any] = lambda x: f"r:{x}", *, gated: bool = False) -> None:
        self.fn = fn
        self.batches: list[list[Any]] = []
        self.entered: asyncio.Queue[list[Any]] = asyncio.Queue()
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.entered.put_nowait(list(items))
        await self.gate.wait()
        return [self.fn(x) for x in items]

    async def next_batch(self) -> list[Any]:
        return await asyncio.wait_for(self.entered.get(), GUARD)

    def seen(self) -> list[Any]:
        return [x for batch in self.batches for x in batch]


@contextlib.asynccontextmanager
async def serving(batcher: MicroBatcher[Any, Any], *gates: asyncio.Event) -> AsyncIterator[None]:
    await batcher.start()
    try:
        yield
    finally:
        for gate in gates:
            gate.set()
        await batcher.stop(drain=False)


async def settle(*aws: Any) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*aws, return_exceptions=True), GUARD)


async def outcomes(*aws: Any) -> list[tuple[str, Any]]:
    """Like settle, but tells a raised exception ("raised", exc) from a returned value ("ok", value)."""

    async def one(aw: Any) -> tuple[str, Any]:
        try:
            return "ok", await aw
        except Exception as exc:
            return "raised", exc

    return await settle(*(one(aw) for aw in aws))


async def until(cond: Callable[[], bool]) -> None:
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def test_full_batch_flushes_at_once_and_waits_before_that() -> None:
    engine = FakeEngine()
    b = MicroBatcher(engine, max_batch_size=4, max_wait_ms=LONG_WAIT_MS)
    async with serving(b):
        first = [asyncio.create_task(b.submit(i)) for i in range(3)]
        await asyncio.sleep(0.05)  # plenty of loop turns for a premature flush to show up
        assert engine.batches == []  # 3 < max_batch and the deadline is a minute away
        assert b.depth == 0  # all three are collected, waiting for a fourth
        results = await settle(*first, b.submit(3))
    assert results == ["r:0", "r:1", "r:2", "r:3"]
    assert engine.batches == [[0, 1, 2, 3]]


async def test_partial_batches_flush_after_max_wait() -> None:
    engine = FakeEngine()
    sizes: list[int] = []
    b = MicroBatcher(engine, max_batch_size=64, max_wait_ms=20, on_batch=sizes.append)
    async with serving(b):
        assert await settle(b.submit("a"), b.submit("b"), b.submit("c")) == ["r:a", "r:b", "r:c"]
        assert await settle(b.submit("d"), b.submit("e")) == ["r:d", "r:e"]
    assert engine.batches == [["a", "b", "c"], ["d", "e"]]
    assert sizes == [3, 2]


async def test_each_caller_gets_its_own_result_object() -> None:
    items = [object() for _ in range(8)]
    engine = FakeEngine(lambda x: {"echo": x})
    b = MicroBatcher(engine, max_batch_size=8, max_wait_ms=LONG_WAIT_MS)
    async with serving(b):
        results = await settle(*(b.submit(x) for x in items))
    assert len(engine.batches) == 1
    assert all(r["echo"] is x for r, x in zip(results, items, strict=True))


async def test_one_bad_item_fails_only_itself() -> None:
    own_timeout = TimeoutError("engine-side timeout for this item")

    def judge(x: str) -> Any:
        return {"bad": ValueError("unparseable verdict"), "slow": own_timeout}.get(x, x.upper())

    engine = FakeEngine(judge)
    b = MicroBatcher(engine, max_batch_size=4, max_wait_ms=LONG_WAIT_MS)
    async with serving(b):
        results = await outcomes(b.submit("a"), b.submit("bad"), b.submit("slow"), b.submit("c"))
    assert engine.batches == [["a", "bad", "slow", "c"]]
    assert results[0] == ("ok", "A") and results[3] == ("ok", "C")
    assert results[1][0] == "raised" and isinstance(results[1][1], ValueError)
    # An item's own TimeoutError is raised as is, not mistaken for the batcher's deadline.
    assert results[2] == ("raised", own_timeout)


async def test_handler_raising_fails_its_batch_and_serving_continues() -> None:
    async def handler(items: list[str]) -> list[str]:
        if "boom" in items:
            raise RuntimeError("engine blew up")
        return [x * 2 for x in items]

    b: MicroBatcher[str, str] = MicroBatcher(handler, max_batch_size=2, max_wait_ms=LONG_WAIT_MS)
    async with serving(b):
        failed = await outcomes(b.submit("x"), b.submit("boom"))
        assert all(k == "raised" and isinstance(e, RuntimeError) and "blew up" in str(e) for k, e in failed)
        assert b.running
        assert await settle(b.submit("y"), b.submit("z")) == ["yy", "zz"]


async def test_wrong_length_result_fails_the_batch_clearly() -> None:
    async def handler(items: list[int]) -> list[int]:
        return items[:-1]

    b: MicroBatcher[int, int] = MicroBatcher(handler, max_batch_size=3, max_wait_ms=LONG_WAIT_MS)
    async with serving(b):
        results = await outcomes(*(b.submit(i) for i in range(3)))
    for kind, err in results:
        assert kind == "raised" and isinstance(err, RuntimeError)
        assert "2 results" in str(err) and "3 items" in str(err)


async def test_queue_full_raises_at_once_with_retry_after() -> None:
    engine = FakeEngine(gated=True)
    b = MicroBatcher(engine, max_batch_size=1, max_wait_ms=0, max_queue=2)
    async with serving(b, engine.gate):
        running = asyncio.create_task(b.submit(0))
        assert await engine.next_batch() == [0]
        queued = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
        await until(lambda: b.depth == 2)
        with pytest.raises(QueueFull) as info:
            await b.submit(3)
        assert info.value.retry_after_s >= 1
        assert int(info.value.retry_after_header) >= 1
        engine.gate.set()
        assert await settle(running, *queued) == ["r:0", "r:1", "r:2"]
    assert engine.seen() == [0, 1, 2]


async def test_timed_out_item_is_not_run_if_its_batch_had_not_started() -> None:
    engine = FakeEngine(gated=True)
    b = MicroBatcher(engine, max_batch_size=1, max_wait_ms=0)
    async with serving(b, engine.gate):
        running = asyncio.create_task(b.submit("busy"))
        assert await engine.next_batch() == ["busy"]
        with pytest.raises(BatchTimeout, match="not run"):
            await b.submit("late", timeout_s=0.05)
        assert b.depth == 0  # the abandoned entry no longer holds a queue slot
        engine.gate.set()
        assert await settle(running, b.submit("after")) == ["r:busy", "r:after"]
        assert b.depth == 0
    assert engine.batches == [["busy"], ["after"]]


async def test_item_timed_out_while_its_batch_was_collecting_is_left_out() -> None:
    engine = FakeEngine()
    b = MicroBatcher(engine, max_batch_size=2, max_wait_ms=LONG_WAIT_MS)
    async with serving(b):
        with pytest.raises(BatchTimeout):
            await b.submit("gone", timeout_s=0.05)  # collected, then its waiter gives up
        assert await settle(b.submit("y"), b.submit("z"), b.submit("w")) == ["r:y", "r:z", "r:w"]
    # "gone" and "y" filled the first batch, but only the live item reached the engine.
    assert engine.batches == [["y"], ["z", "w"]]


async def test_timeout_during_a_running_batch_discards_the_result() -> None:
    engine = FakeEngine(gated=True)
    b = MicroBatcher(engine, max_batch_size=1, max_wait_ms=0, request_timeout_s=0.05)
    async with serving(b, engine.gate):
        with pytest.raises(BatchTimeout, match="discarded"):
            await b.submit("slow")
        assert engine.batches == [["slow"]]
        engine.gate.set()
        assert await settle(b.submit("next", timeout_s=GUARD)) == ["r:next"]


async def test_stop_with_drain_completes_queued_items() -> None:
    engine = FakeEngine(gated=True)
    b = MicroBatcher(engine, max_batch_size=2, max_wait_ms=0)
    await b.start()
    tasks = [asyncio.create_task(b.submit(i)) for i in range(5)]
    await engine.next_batch()
    stopping = asyncio.create_task(b.stop(drain=True))
    await until(lambda: not b.running)
    with pytest.raises(BatcherStopped):
        await b.submit(99)
    engine.gate.set()
    await asyncio.wait_for(stopping, GUARD)
    assert await settle(*tasks) == [f"r:{i}" for i in range(5)]
    assert sorted(engine.seen()) == [0, 1, 2, 3, 4]
    with pytest.raises(BatcherStopped):
        await b.submit(100)


async def test_stop_without_drain_fails_queued_and_running_items() -> None:
    engine = FakeEngine(gated=True)  # never opened: the running batch must be cut off
    b = MicroBatcher(engine, max_batch_size=1, max_wait_ms=0)
    await b.start()
    tasks = [asyncio.create_task(b.submit(i)) for i in range(3)]
    assert await engine.next_batch() == [0]
    await until(lambda: b.depth == 2)
    await asyncio.wait_for(b.stop(drain=False), GUARD)
    results = await outcomes(*tasks)
    assert all(kind == "raised" and isinstance(err, BatcherStopped) for kind, err in results)
    assert engine.batches == [[0]]  # the queued items never reached the engine
    assert b.depth == 0 and not b.running


async def test_event_loop_stays_free_while_compute_runs_in_a_thread() -> None:
    in_compute = threading.Event()
    release = threading.Event()

    def compute(items: list[int]) -> list[str]:
        in_compute.set()
        # Only a coroutine on the event loop can set `release`; a blocked loop would time out here.
        return ["released" if release.wait(GUARD) else "loop was blocked" for _ in items]

    async def handler(items: list[int]) -> list[str]:
        return await asyncio.to_thread(compute, items)

    b: MicroBatcher[int, str] = MicroBatcher(handler, max_batch_size=1, max_wait_ms=0)
    async with serving(b):
        busy = asyncio.create_task(b.submit(1))
        assert await asyncio.to_thread(in_compute.wait, GUARD)
        ticks = 0
        for _ in range(5):  # a concurrent coroutine makes progress while the batch computes
            await asyncio.sleep(0.01)
            ticks += 1
        waiting = asyncio.create_task(b.submit(2))
        await until(lambda: b.depth == 1)  # new work is still accepted and queued meanwhile
        assert ticks == 5
        release.set()
        assert await settle(busy, waiting) == ["released", "released"]


async def test_concurrent_batches_when_allowed() -> None:
    engine = FakeEngine(gated=True)
    b = MicroBatcher(engine, max_batch_size=1, max_wait_ms=0, max_concurrent_batches=2)
    async with serving(b, engine.gate):
        tasks = [asyncio.create_task(b.submit(i)) for i in range(3)]
        # Two batches are inside the handler at the same time; the third waits for a slot.
        assert sorted([await engine.next_batch(), await engine.next_batch()]) == [[0], [1]]
        assert engine.entered.empty() and len(engine.batches) == 2
        engine.gate.set()
        assert await settle(*tasks) == ["r:0", "r:1", "r:2"]


async def test_lifecycle_and_argument_errors() -> None:
    engine = FakeEngine()
    b = MicroBatcher(engine, max_batch_size=2, max_wait_ms=1)
    with pytest.raises(BatcherStopped):
        await b.submit(1)  # not started
    async with serving(b):
        with pytest.raises(RuntimeError, match="already started"):
            await b.start()
        with pytest.raises(ValueError, match="timeout_s"):
            await b.submit(1, timeout_s=0)
        assert await settle(b.submit(1)) == ["r:1"]
    await b.stop()  # stopping twice is a no-op
    for bad in (
        {"max_batch_size": 0},
        {"max_wait_ms": -1},
        {"max_queue": 0},
        {"request_timeout_s": 0},
        {"max_concurrent_batches": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MicroBatcher(engine, **bad)
