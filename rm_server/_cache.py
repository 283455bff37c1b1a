"""Verdict cache: Redis when a URL is configured, an in-process LRU otherwise.

Contract
--------
- Key (`verdict_cache_key`): ``her:v1:verdict:<sha256>`` over canonical JSON of everything that can
  change a verdict — model id + revision, template name and hash, principle-set hash, mode, swap,
  seed, sampling params, context, and the pair. With swap on the pair is stored in a canonical order
  (sorted by the sha256 of each text) so (a, b) and (b, a) share one entry; the returned ``flipped``
  tells the caller the request is the mirror of the stored orientation. Callers store
  ``her_genrm.mirror_verdict(v) if flipped else v`` and mirror what they read back the same way.
- Only ``status == "ok"`` verdicts are stored; ``set()`` silently skips error verdicts so a transient
  judge failure is retried on the next request instead of being served for a day.
- Storage holds the verdict JSON with ``cached=false``; ``get()`` returns it with ``cached=True``.
- ``RedisVerdictCache`` never raises to its caller: a Redis fault makes ``get`` a miss and ``set`` a
  no-op, reports ``on_error("get" | "set")`` (for ``rm_cache_errors_total``) and logs one line.

Fault handling (RedisVerdictCache)
----------------------------------
- Each command is bounded by ``socket_timeout_s`` (connect and read), with one immediate retry on a
  connection error: that retry is what turns a pooled connection left dead by a Redis restart into a
  fresh one, so the first call after Redis returns succeeds. ``health_check_interval`` pings
  connections that sat idle, for the same reason.
- Circuit: after a failure, Redis is skipped for ``circuit_open_s`` (default 1 s) — calls in that
  window are plain misses/no-ops with no socket work and no ``on_error`` (they are counted in
  ``skipped``). Without it a hung Redis would add a socket timeout to every judged request. The
  first call after the window probes Redis again (half-open); success closes the circuit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, get_args, runtime_checkable

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from her_genrm import Mode, TemplateName, Verdict

__all__ = [
    "KEY_PREFIX",
    "LRUVerdictCache",
    "RedisVerdictCache",
    "VerdictCache",
    "build_cache",
    "verdict_cache_key",
]

log = logging.getLogger(__name__)

KEY_PREFIX = "her:v1:verdict:"

_MODES = frozenset(get_args(Mode))
_TEMPLATES = frozenset(get_args(TemplateName))


# --------------------------------------------------------------------------- keys


def _canonical(value: Any, where: str) -> Any:
    """A JSON-ready copy of `value` whose dump is stable (pydantic models → dicts, tuples → lists)."""
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="json"), where)
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: non-finite float {value!r} cannot be part of a cache key")
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: mapping keys must be str, got {type(k).__name__} ({k!r})")
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable for a cache key")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verdict_cache_key(
    *,
    model: str,
    template_hash: str,
    principle_set_hash: str,
    mode: str,
    template: str,
    swap: bool,
    seed: int | None,
    sampling: Mapping[str, Any],
    context: Any,
    a: str,
    b: str,
) -> tuple[str, bool]:
    """Return ``(key, flipped)`` for one judgment.

    `model` is the model id plus its revision (e.g. ``"org/judge@abc123"``). `context` is chat messages
    (pydantic models or dicts) or text; it is hashed as canonical JSON, so a ``ChatMessage`` and the
    equal dict give the same key. With `swap` on, (a, b) and (b, a) give the same key and ``flipped``
    is True for the orientation that is the mirror of the stored one; with `swap` off order matters
    and ``flipped`` is always False. Raises ValueError/TypeError on malformed input.
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty string (id + revision), got {model!r}")
    for name, val in (("template_hash", template_hash), ("principle_set_hash", principle_set_hash)):
        if not isinstance(val, str):
            raise TypeError(f"{name} must be a str, got {type(val).__name__}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    if template not in _TEMPLATES:
        raise ValueError(f"template must be one of {sorted(_TEMPLATES)}, got {template!r}")
    if not isinstance(swap, bool):
        raise TypeError(f"swap must be a bool, got {type(swap).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not isinstance(sampling, Mapping):
        raise TypeError(f"sampling must be a mapping, got {type(sampling).__name__}")
    if not isinstance(a, str) or not isinstance(b, str):
        raise TypeError("candidates a and b must be str")

    first, second, flipped = a, b, False
    # Sorting by digest (not by text) keeps the rule cheap and independent of locale/collation.
    if swap and _sha(b) < _sha(a):
        first, second, flipped = b, a, True
    payload = {
        "model": model,
        "template": template,
        "template_hash": template_hash,
        "principle_set_hash": principle_set_hash,
        "mode": mode,
        "swap": swap,
        "seed": seed,
        "sampling": _canonical(sampling, "sampling"),
        "context": _canonical(context, "context"),
        "pair": [first, second],
    }
    return KEY_PREFIX + _sha(_dumps(payload)), flipped


# --------------------------------------------------------------------------- caches


CacheResult = Literal["hit", "miss", "error"]


@runtime_checkable
class VerdictCache(Protocol):
    """What rm_server needs from a verdict cache. Implementations never raise on get/set/lookup."""

    async def get(self, key: str) -> Verdict | None: ...

    async def lookup(self, key: str) -> tuple[Verdict | None, CacheResult]:
        """The verdict and how the look-up went: "error" when the store failed (a miss the fault caused)."""
        ...

    async def set(self, key: str, verdict: Verdict) -> None: ...

    async def aclose(self) -> None: ...


def _encode(verdict: Verdict) -> str | None:
    """Storage form, or None when the verdict must not be cached (errors)."""
    if verdict.status != "ok":
        return None
    return verdict.model_copy(update={"cached": False}).model_dump_json()


def _decode(raw: str | bytes) -> Verdict:
    return Verdict.model_validate_json(raw).model_copy(update={"cached": True})


class LRUVerdictCache:
    """In-process LRU with optional TTL, used when no Redis URL is configured.

    Holds JSON strings (not objects) so a caller mutating a returned verdict cannot alter the cache.
    Single event loop, no awaits inside operations: no lock needed. `clock` is injectable for tests.
    """

    def __init__(
        self,
        max_entries: int = 100_000,
        ttl_s: float | None = 86400,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
        if ttl_s is not None and not (isinstance(ttl_s, (int, float)) and ttl_s > 0):
            raise ValueError(f"ttl_s must be > 0 or None (no expiry), got {ttl_s!r}")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()  # key -> (expires_at, json)

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> Verdict | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires_at, raw = item
        if expires_at <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return _decode(raw)

    async def lookup(self, key: str) -> tuple[Verdict | None, CacheResult]:
        verdict = await self.get(key)
        return verdict, "hit" if verdict is not None else "miss"

    async def set(self, key: str, verdict: Verdict) -> None:
        raw = _encode(verdict)
        if raw is None:
            return
        expires_at = math.inf if self.ttl_s is None else self._clock() + self.ttl_s
        self._data[key] = (expires_at, raw)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def aclose(self) -> None:
        self._data.clear()


class RedisVerdictCache:
    """Redis-backed verdict cache (redis-py asyncio) that degrades to "uncached" on any fault.

    The client is created lazily on first use (no I/O in the constructor), so a Redis that is down at
    startup does not stop the service. See the module docstring for retry and circuit behaviour.
    Counters `errors` and `skipped` mirror what was reported / short-circuited.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int = 86400,
        socket_timeout_s: float = 0.25,
        on_error: Callable[[str], None] | None = None,
        circuit_open_s: float = 1.0,
        health_check_interval_s: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError(f"url must be a non-empty redis URL, got {url!r}")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
            raise ValueError(f"ttl_s must be an int >= 1 (Redis EX seconds), got {ttl_s!r}")
        if not socket_timeout_s > 0:
            raise ValueError(f"socket_timeout_s must be > 0, got {socket_timeout_s!r}")
        if circuit_open_s < 0:
            raise ValueError(f"circuit_open_s must be >= 0, got {circuit_open_s!r}")
        self.ttl_s = ttl_s
        self.circuit_open_s = circuit_open_s
        self.errors = 0
        self.skipped = 0
        self._on_error = on_error
        self._clock = clock
        self._open_until = -math.inf
        # One immediate retry, on connection errors only: it replaces a pooled socket killed by a
        # Redis restart. Timeouts are not retried (a hung server would double the added latency).
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        # from_url parses (and rejects bad schemes) without connecting.
        self._redis: Redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=retry,
            health_check_interval=health_check_interval_s,
        )
        # Belt and braces over the socket timeouts (e.g. slow DNS): the whole op, retry included.
        self._op_deadline_s = 4 * socket_timeout_s

    @property
    def circuit_open(self) -> bool:
        return self._clock() < self._open_until

    def _fail(self, kind: str, exc: BaseException) -> None:
        self.errors += 1
        self._open_until = self._clock() + self.circuit_open_s
        log.warning(
            "verdict cache: redis %s failed (%s: %s); skipping redis for %.1fs",
            kind, type(exc).__name__, exc, self.circuit_open_s,
        )
        if self._on_error is not None:
            self._on_error(kind)

    async def get(self, key: str) -> Verdict | None:
        return (await self.lookup(key))[0]

    async def lookup(self, key: str) -> tuple[Verdict | None, CacheResult]:
        if self.circuit_open:
            self.skipped += 1
            return None, "error"
        try:
            async with asyncio.timeout(self._op_deadline_s):
                raw = await self._redis.get(key)
        except Exception as exc:  # noqa: BLE001 - contract: a cache fault never fails a request
            self._fail("get", exc)
            return None, "error"
        self._open_until = -math.inf
        if raw is None:
            return None, "miss"
        try:
            return _decode(raw), "hit"
        except ValueError as exc:  # a stale/foreign value under our key: a miss, not an outage
            log.warning("verdict cache: undecodable entry %s dropped (%s)", key, exc)
            if self._on_error is not None:
                self._on_error("get")
            self.errors += 1
            return None, "error"

    async def set(self, key: str, verdict: Verdict) -> None:
        raw = _encode(verdict)
        if raw is None:
            return
        if self.circuit_open:
            self.skipped += 1
            return
        try:
            async with asyncio.timeout(self._op_deadline_s):
                await self._redis.set(key, raw, ex=self.ttl_s)
        except Exception as exc:  # noqa: BLE001 - contract: a cache fault never fails a request
            self._fail("set", exc)
            return
        self._open_until = -math.inf

    async def ping(self) -> bool:
        """True when Redis answers now (for /readyz or /v1/info); never raises, ignores the circuit."""
        try:
            async with asyncio.timeout(self._op_deadline_s):
                return bool(await self._redis.ping())
        except Exception:  # noqa: BLE001
            return False

    async def aclose(self) -> None:
        try:
            await self._redis.aclose()
        except Exception as exc:  # noqa: BLE001 - closing a dead connection must not fail shutdown
            log.warning("verdict cache: closing redis client failed (%s: %s)", type(exc).__name__, exc)


class TieredVerdictCache:
    """An in-process LRU in front of the shared Redis cache.

    Verdicts are immutable under their key, so the local copy is never stale. While Redis is down the LRU
    keeps serving what this process has seen (the fault is reported as an "error" look-up); when Redis is
    back, the circuit's half-open probe finds it again with no restart.
    """

    def __init__(self, shared: RedisVerdictCache, local: LRUVerdictCache) -> None:
        self.shared, self.local = shared, local

    async def get(self, key: str) -> Verdict | None:
        return (await self.lookup(key))[0]

    async def lookup(self, key: str) -> tuple[Verdict | None, CacheResult]:
        verdict = await self.local.get(key)
        if verdict is not None:
            return verdict, "hit"
        verdict, result = await self.shared.lookup(key)
        if verdict is not None:
            await self.local.set(key, verdict.model_copy(update={"cached": False}))
        return verdict, result

    async def set(self, key: str, verdict: Verdict) -> None:
        await self.local.set(key, verdict)
        await self.shared.set(key, verdict)

    async def ping(self) -> bool:
        return await self.shared.ping()

    async def aclose(self) -> None:
        await self.shared.aclose()
        await self.local.aclose()


def build_cache(
    redis_url: str | None,
    *,
    ttl_s: int = 86400,
    max_entries: int = 100_000,
    on_error: Callable[[str], None] | None = None,
    **redis_options: Any,
) -> VerdictCache:
    """With a Redis URL (an empty string counts as none): the in-process LRU in front of Redis; else the LRU.

    `max_entries` applies to the LRU; `on_error` and `redis_options` (e.g. `circuit_open_s`)
    to Redis only (the LRU cannot fail).
    """
    if redis_url:
        shared = RedisVerdictCache(redis_url, ttl_s=ttl_s, on_error=on_error, **redis_options)
        return TieredVerdictCache(shared, LRUVerdictCache(max_entries=max_entries, ttl_s=ttl_s))
    if redis_options:
        raise TypeError(f"options {sorted(redis_options)} apply to Redis only, but no redis_url was given")
    return LRUVerdictCache(max_entries=max_entries, ttl_s=ttl_s)
