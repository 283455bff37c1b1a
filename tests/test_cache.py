"""Verdict cache: keys, mirror, LRU, and Redis (the shared one on 6379 plus a private killable one)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
import uuid

import pytest
from redis.asyncio import Redis

from her_engines import ChatMessage
from her_genrm import Comparison, OrderResult, Usage, Verdict, mirror_verdict
from rm_server._cache import (
    KEY_PREFIX,
    LRUVerdictCache,
    RedisVerdictCache,
    TieredVerdictCache,
    VerdictCache,
    build_cache,
    verdict_cache_key,
)

SHARED_URL = "redis://127.0.0.1:6379/0"
RUN_ID = uuid.uuid4().hex[:12]  # every key this module writes to the shared Redis contains it
# Socket timeout for caches whose Redis must answer (the 0.25 s default is for production, where a slow Redis
# should cost little): on a busy machine a reply may be late, and a late reply must not count as a fault.
ANSWER_S = 5.0
RECOVERY_S = 60.0  # hang guard for "Redis is used again after a restart"; recovery is normally immediate


def _verdict(**kw) -> Verdict:
    base = dict(
        verdict="a",
        p_a=0.7,
        consistent=True,
        pattern="mixed",
        principles=["p1", "p2"],
        comparisons=[
            Comparison(principle="p1", winner="a", reason="r"),
            Comparison(principle="p2", winner="b"),
        ],
        orders=[
            OrderResult(
                a_first=True,
                status="ok",
                winner="a",
                p_a=0.8,
                probs={"a": 0.7, "b": 0.1, "tie": 0.2},
                pattern="all_a",
                comparisons=[Comparison(principle="p1", winner="a")],
            ),
            OrderResult(a_first=False, status="ok", winner="tie", p_a=0.6, pattern="tie"),
        ],
        model="judge@rev1",
        template_hash="t" * 8,
        principle_set_hash="p" * 8,
        usage=Usage(prompt_tokens=10, completion_tokens=5, calls=2),
        latency_ms=12.5,
    )
    base.update(kw)
    return Verdict(**base)


KEY_ARGS = dict(
    model="judge@rev1",
    template_hash="th1",
    principle_set_hash="ph1",
    mode="cot",
    template="compact",
    swap=True,
    seed=7,
    sampling={"temperature": 0.0, "max_tokens": 256},
    context=[ChatMessage(role="user", content="Hello there")],
    a="reply one",
    b="reply two",
)


def _key(**kw) -> tuple[str, bool]:
    return verdict_cache_key(**{**KEY_ARGS, **kw})


# --------------------------------------------------------------------------- keys


def test_key_stable_prefixed_and_canonical_context():
    k1, _ = _key()
    k2, _ = _key()
    assert k1 == k2 and k1.startswith(KEY_PREFIX) and len(k1) == len(KEY_PREFIX) + 64
    # A ChatMessage and the equal dict hash the same; dict key order and mapping order don't matter.
    assert _key(context=[{"content": "Hello there", "role": "user"}])[0] == k1
    assert _key(sampling={"max_tokens": 256, "temperature": 0.0})[0] == k1


def test_swap_on_shares_key_across_orders_and_reports_flip():
    k_ab, f_ab = _key(a="x", b="y")
    k_ba, f_ba = _key(a="y", b="x")
    assert k_ab == k_ba
    assert f_ab != f_ba  # exactly one orientation is the stored one
    # identical candidates: nothing to flip
    assert _key(a="same", b="same")[1] is False


def test_swap_off_keeps_order_and_never_flips():
    k_ab, f_ab = _key(swap=False, a="x", b="y")
    k_ba, f_ba = _key(swap=False, a="y", b="x")
    assert k_ab != k_ba and f_ab is False and f_ba is False
    assert k_ab != _key(swap=True, a="x", b="y")[0]


@pytest.mark.parametrize(
    "change",
    [
        {"model": "judge@rev2"},
        {"template_hash": "th2"},
        {"principle_set_hash": "ph2"},
        {"seed": 8},
        {"seed": None},
        {"context": [ChatMessage(role="user", content="Hello there!")]},
        {"context": "Hello there"},
        {"sampling": {"temperature": 0.7, "max_tokens": 256}},
        {"mode": "fast"},
        {"template": "her-rm"},
        {"a": "reply one."},
    ],
)
def test_key_changes_with_every_input(change):
    assert _key(**change)[0] != _key()[0]


@pytest.mark.parametrize(
    "bad, err",
    [
        ({"model": ""}, ValueError),
        ({"mode": "slow"}, ValueError),
        ({"template": "nope"}, ValueError),
        ({"seed": "7"}, TypeError),
        ({"sampling": {"temperature": float("nan")}}, ValueError),
        ({"context": object()}, TypeError),
        ({"a": None}, TypeError),
    ],
)
def test_key_rejects_bad_input(bad, err):
    with pytest.raises(err):
        _key(**bad)


# --------------------------------------------------------------------------- mirror


def test_mirror_swaps_everything_orientation_dependent():
    v = _verdict()
    m = mirror_verdict(v)
    assert m.verdict == "b" and m.p_a == pytest.approx(0.3)
    assert [c.winner for c in m.comparisons] == ["b", "a"]
    orders = [(o.a_first, o.winner, o.pattern) for o in m.orders]
    assert orders == [(False, "b", "all_b"), (True, "tie", "tie")]
    assert m.orders[0].p_a == pytest.approx(0.2) and m.orders[0].comparisons[0].winner == "b"
    assert m.orders[0].probs == {"b": 0.7, "a": 0.1, "tie": 0.2}
    assert m.consistent is True and m.usage == v.usage and m.model == v.model
    assert mirror_verdict(_verdict(pattern="all_a")).pattern == "all_b"
    assert v.verdict == "a" and v.comparisons[0].winner == "a"  # input untouched


def test_mirror_twice_is_identity():
    for v in (
        _verdict(),
        _verdict(p_a=0.5, verdict="tie", pattern="all_b"),
        Verdict(status="error", error="boom"),
    ):
        twice = mirror_verdict(mirror_verdict(v))
        assert twice.p_a == pytest.approx(v.p_a, abs=1e-12) if v.p_a is not None else twice.p_a is None
        # everything but float rounding of p_a is exactly equal
        strip = {"p_a": None, "orders": [o.model_copy(update={"p_a": None}) for o in v.orders]}
        strip2 = {"p_a": None, "orders": [o.model_copy(update={"p_a": None}) for o in twice.orders]}
        assert twice.model_copy(update=strip2) == v.model_copy(update=strip)
    exact = _verdict(p_a=0.25)
    assert mirror_verdict(mirror_verdict(exact)) == exact


# --------------------------------------------------------------------------- LRU


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_lru_roundtrip_marks_cached_and_stores_copy():
    c = LRUVerdictCache(max_entries=4)
    assert isinstance(c, VerdictCache)
    v = _verdict()
    await c.set("k", v)
    got = await c.get("k")
    assert got is not None and got.cached is True and v.cached is False
    assert got.model_copy(update={"cached": False}) == v
    got.comparisons.clear()  # mutating a returned verdict must not touch the cache
    assert len((await c.get("k")).comparisons) == 2
    assert await c.get("missing") is None


async def test_lru_evicts_least_recently_used():
    c = LRUVerdictCache(max_entries=2, ttl_s=None)
    await c.set("a", _verdict())
    await c.set("b", _verdict())
    assert await c.get("a") is not None  # touch a → b is now least recent
    await c.set("c", _verdict())
    assert len(c) == 2
    assert await c.get("b") is None
    assert await c.get("a") is not None and await c.get("c") is not None


async def test_lru_ttl_expires():
    clock = FakeClock()
    c = LRUVerdictCache(max_entries=10, ttl_s=60, clock=clock)
    await c.set("k", _verdict())
    clock.t += 59.9
    assert await c.get("k") is not None
    clock.t += 0.2
    assert await c.get("k") is None and len(c) == 0


async def test_lru_never_stores_errors():
    c = LRUVerdictCache()
    await c.set("k", Verdict(status="error", error="engine down"))
    assert await c.get("k") is None and len(c) == 0


def test_lru_rejects_bad_settings():
    with pytest.raises(ValueError):
        LRUVerdictCache(max_entries=0)
    with pytest.raises(ValueError):
        LRUVerdictCache(ttl_s=0)


def test_build_cache_picks_backend():
    assert isinstance(build_cache(None, max_entries=3), LRUVerdictCache)
    assert isinstance(build_cache("", max_entries=3), LRUVerdictCache)
    tiered = build_cache(SHARED_URL, ttl_s=5)
    assert isinstance(tiered, TieredVerdictCache) and isinstance(tiered.shared, RedisVerdictCache)
    with pytest.raises(ValueError):
        build_cache("http://not-redis:1")
    with pytest.raises(TypeError):
        build_cache(None, socket_timeout_s=1.0)


# --------------------------------------------------------------------------- shared Redis (6379)


@pytest.fixture
async def shared_redis():
    """A raw client for inspecting/cleaning the shared Redis; deletes only this run's keys."""
    raw = Redis.from_url(SHARED_URL)
    try:
        await raw.ping()
    except Exception as exc:  # noqa: BLE001
        await raw.aclose()
        pytest.fail(f"shared Redis at {SHARED_URL} is not answering: {exc}")
    yield raw
    # tests delete hashed keys themselves; this catches any named test key left by a failure
    keys = [k async for k in raw.scan_iter(match=f"{KEY_PREFIX}test-{RUN_ID}-*")]
    if keys:
        await raw.delete(*keys)
    await raw.aclose()


async def test_redis_roundtrip_ttl_and_no_errors(shared_redis):
    errors: list[str] = []
    c = RedisVerdictCache(SHARED_URL, ttl_s=120, on_error=errors.append, socket_timeout_s=ANSWER_S)
    try:
        key, flipped = _key(context=f"run {RUN_ID}")
        v = _verdict(model=f"judge@{RUN_ID}")
        assert await c.get(key) is None
        await c.set(key, v)
        got = await c.get(key)
        assert got is not None and got.cached is True
        assert got.model_copy(update={"cached": False}) == v
        stored = await shared_redis.get(key)
        assert Verdict.model_validate_json(stored).cached is False
        assert 0 < await shared_redis.ttl(key) <= 120
        assert await c.ping() is True
        assert errors == [] and c.errors == 0
    finally:
        await shared_redis.delete(key)
        await c.aclose()


async def test_redis_never_stores_errors(shared_redis):
    c = RedisVerdictCache(SHARED_URL)
    key = f"{KEY_PREFIX}test-{RUN_ID}-err"
    try:
        await c.set(key, Verdict(status="error", error="engine down"))
        assert await shared_redis.exists(key) == 0
        assert await c.get(key) is None
    finally:
        await c.aclose()


async def test_redis_bad_entry_is_a_miss(shared_redis):
    errors: list[str] = []
    c = RedisVerdictCache(SHARED_URL, on_error=errors.append, socket_timeout_s=ANSWER_S)
    key = f"{KEY_PREFIX}test-{RUN_ID}-garbage"
    try:
        await shared_redis.set(key, b"not json", ex=60)
        assert await c.get(key) is None
        assert errors == ["get"] and not c.circuit_open  # a bad value is not an outage
    finally:
        await shared_redis.delete(key)
        await c.aclose()


# --------------------------------------------------------------------------- private Redis: faults


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A throwaway redis-server (no persistence) that tests may SIGKILL and restart on the same port."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server binary not found (apt-get install redis-server)")
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # readiness wait (a process start on a busy box), not a timing assertion
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.kill()
        pytest.fail(f"private redis-server did not come up on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no clean shutdown, sockets just die
            self.proc.wait()
        self.proc = None


@pytest.fixture
def private_redis():
    r = PrivateRedis()
    r.start()
    yield r
    r.kill()


async def test_redis_fault_kill_and_recover(private_redis, caplog):
    errors: list[str] = []
    # circuit_open_s=0 so both get and set reach the dead server and report; the circuit has its own test.
    # A dead server refuses connections at once: the faults below need no socket timeout to show.
    c = RedisVerdictCache(private_redis.url, socket_timeout_s=ANSWER_S, on_error=errors.append, circuit_open_s=0)
    v = _verdict()
    try:
        await c.set("k1", v)
        assert (await c.get("k1")).verdict == "a"
        assert errors == []

        private_redis.kill()
        with caplog.at_level(logging.WARNING, logger="rm_server._cache"):
            assert await c.get("k1") is None
            assert await c.set("k2", v) is None
        assert errors == ["get", "set"] and c.errors == 2
        assert "redis get failed" in caplog.text
        assert await c.ping() is False

        private_redis.start()  # same port, empty data (no persistence)
        deadline = time.monotonic() + RECOVERY_S
        recovered = False
        while time.monotonic() < deadline:  # wait for recovery; the deadline only catches one that never comes
            await c.set("k3", v)
            got = await c.get("k3")
            if got is not None:
                recovered = got.cached and got.verdict == "a"
                break
            await asyncio.sleep(0.1)
        assert recovered, f"cache did not recover within {RECOVERY_S:g} s; errors={errors}"
        assert await c.get("k1") is None  # restarted server has no data: a clean miss, not an error
    finally:
        await c.aclose()


async def test_redis_circuit_skips_then_probes_again(private_redis):
    clock = FakeClock()
    errors: list[str] = []
    c = RedisVerdictCache(private_redis.url, on_error=errors.append, circuit_open_s=1.0, clock=clock,
                          socket_timeout_s=ANSWER_S)
    v = _verdict()
    try:
        await c.set("k", v)
        private_redis.kill()
        assert await c.get("k") is None
        assert errors == ["get"] and c.circuit_open
        # inside the window: no Redis call, no new error report
        assert await c.get("k") is None
        await c.set("k", v)
        assert errors == ["get"] and c.skipped == 2
        # window over, Redis still dead: the probe fails and reopens the circuit
        clock.t += 1.01
        assert await c.get("k") is None
        assert errors == ["get", "get"] and c.circuit_open
        # Redis back, window over: the next call goes through and closes the circuit
        private_redis.start()
        clock.t += 1.01
        await c.set("k", v)
        assert not c.circuit_open and errors == ["get", "get"]
        assert (await c.get("k")).cached is True
    finally:
        await c.aclose()


async def test_redis_down_at_startup_never_raises_and_the_local_cache_serves():
    errors: list[str] = []
    c = build_cache(f"redis://127.0.0.1:{_free_port()}/0", on_error=errors.append, circuit_open_s=0)
    try:
        assert await c.lookup("k") == (None, "error")  # the fault is a counted error, not a plain miss
        await c.set("k", _verdict())
        assert errors == ["get", "set"]
        verdict, result = await c.lookup("k")  # what this process judged is still served
        assert result == "hit" and verdict.cached and verdict.verdict == "a"
    finally:
        await c.aclose()


async def test_tiered_cache_survives_a_redis_restart(private_redis):
    """Redis killed mid-run: verdicts judged meanwhile are served from memory; Redis back: new verdicts reach
    it again (another process sees them) with no restart of ours."""
    errors: list[str] = []
    c = build_cache(private_redis.url, on_error=errors.append, circuit_open_s=0.2, socket_timeout_s=ANSWER_S)
    other = RedisVerdictCache(private_redis.url, socket_timeout_s=ANSWER_S)
    v = _verdict()
    try:
        await c.set("before", v)
        assert (await other.get("before")).verdict == "a"
        private_redis.kill()
        await c.set("during", v)
        assert (await c.lookup("during"))[1] == "hit" and "set" in errors
        private_redis.start()
        deadline = time.monotonic() + RECOVERY_S  # the circuit (0.2 s) closes again; this only catches a hang
        while time.monotonic() < deadline and await other.get("after") is None:
            await c.set("after", v)
            await asyncio.sleep(0.25)
        assert (await other.get("after")).verdict == "a", f"Redis not used again after restart; errors={errors}"
    finally:
        await c.aclose()
        await other.aclose()


async def test_redis_hung_server_times_out_without_raising():
    """A server that accepts connections but never answers (fault injection): the socket timeout fires."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # keep the connection open, say nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    errors: list[str] = []
    c = RedisVerdictCache(
        f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.1, on_error=errors.append, circuit_open_s=0
    )
    try:
        assert await c.get("k") is None
        await c.set("k", _verdict())
        assert errors == ["get", "set"]
    finally:
        await c.aclose()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
