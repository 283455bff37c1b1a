"""`RMTransport`: the one way a client reaches the judge service over HTTP.

The reward client (`policy_trainer.RewardClient`) and eval's remote transcript scorer both send their
requests through it, so both retry, back off, fail over and break circuits the same way:

    Retryable           408/429/5xx or a transport error: try again (after Retry-After if given)
    └── CircuitOpen     every URL's breaker holds requests back; retry_after = time to the next probe
    Rejected            any other 4xx or an unreadable answer: retrying cannot help

- Several base URLs: one attempt starts at the URL the request's `key` hashes to (no key: the URLs take
  turns) and passes the same request on to the next URL after a retryable failure there; only when every
  URL failed does the backoff start. A request's answer comes from exactly one response.
- Backoff: the server's Retry-After (delta-seconds or HTTP date) exactly, else exponential with jitter
  capped at `max_backoff_s`; no attempt starts past the deadline, nor after `max_attempts`.
- Each URL has its own `CircuitBreaker`. A 429 says "alive but busy" and leaves the breaker alone.
- The key also goes out as the `x-session-id` header, which Ray Serve's consistent-hash router uses to
  keep one context on one replica.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

log = logging.getLogger("her_genrm.transport")

# Ray Serve's session header (`RAY_SERVE_SESSION_ID_HEADER_KEY`): its consistent-hash router sends equal
# values to one replica. Plain rm_server ignores it.
AFFINITY_HEADER = "x-session-id"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TRANSPORT_ERRORS = (
    httpx.ConnectError,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    httpx.TimeoutException,
)
CircuitState = Literal["closed", "open", "half_open"]


class Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitOpen(Retryable):
    pass


class Rejected(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def split_urls(value: str | Sequence[str], name: str = "url") -> list[str]:
    """Base URLs from one URL, a comma-separated string or a list; each checked, trailing slash dropped."""
    if isinstance(value, str):
        parts: list = [p for p in value.split(",") if p.strip()]  # "a,b," from a shell loop is fine
    else:
        parts = list(value) if isinstance(value, Sequence) else [value]
    urls: list[str] = []
    for part in parts:
        url = part.strip().rstrip("/") if isinstance(part, str) else part
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"{name}={part!r} must be an http(s) base URL such as http://127.0.0.1:8000")
        if url not in urls:
            urls.append(url)
    if not urls:
        raise ValueError(f"{name}={value!r} names no server; give a base URL such as http://127.0.0.1:8000")
    return urls


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except Exception:  # not our envelope: show the start of the body
        return response.text[:200]


def transport_kind(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return "connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return "transport"


def retrying(
    deadline: float, max_backoff_s: float, on_retry: Callable[[RetryCallState], None],
    max_attempts: int | None = None,
) -> AsyncRetrying:
    """Retry `Retryable` errors: wait the error's `retry_after` when it has one, else exponential
    backoff with jitter capped at `max_backoff_s`; never start an attempt past `deadline` (monotonic)
    or beyond `max_attempts`."""
    backoff = wait_exponential_jitter(max=max_backoff_s, jitter=min(1.0, max_backoff_s))

    def wait(rs: RetryCallState) -> float:
        exc = rs.outcome.exception() if rs.outcome is not None else None
        if isinstance(exc, Retryable) and exc.retry_after is not None:
            return exc.retry_after  # the server (or the open circuit) says when to come back
        return backoff(rs)

    def stop(rs: RetryCallState) -> bool:
        if max_attempts is not None and rs.attempt_number >= max_attempts:
            return True
        return time.monotonic() + rs.upcoming_sleep >= deadline

    return AsyncRetrying(
        retry=retry_if_exception_type(Retryable), wait=wait, stop=stop, before_sleep=on_retry, reraise=True
    )


class CircuitBreaker:
    """Stops a client from hammering a server that keeps failing.

    closed ──(threshold consecutive failures)──► open ──(reset_s later)──► half_open
    half_open admits exactly one trial request: success → closed, failure → open again.
    `admit()` returns 0 when a request may go, else how long to wait before asking again.
    Thread-safe with a plain lock: one client may serve several event loops.
    """

    def __init__(self, failure_threshold: int, reset_s: float, clock: Any = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False

    def _state(self) -> CircuitState:
        if self._opened_at is None:
            return "closed"
        return "open" if self._clock() - self._opened_at < self.reset_s else "half_open"

    @property
    def state(self) -> CircuitState:
        with self._lock:
            return self._state()

    def admit(self) -> float:
        with self._lock:
            state = self._state()
            if state == "closed":
                return 0.0
            if state == "open":
                assert self._opened_at is not None  # an open circuit has an opening time
                return max(self.reset_s - (self._clock() - self._opened_at), 1e-3)
            if self._trial:  # someone else is probing: ask again shortly
                return min(1.0, self.reset_s)
            self._trial = True
            return 0.0

    def success(self) -> None:
        with self._lock:
            self._failures, self._opened_at, self._trial = 0, None, False

    def failure(self) -> bool:
        """Record a failed attempt; True when this failure opened the circuit."""
        with self._lock:
            was_trial, self._trial = self._trial, False
            self._failures += 1
            if was_trial or (self._opened_at is None and self._failures >= self.failure_threshold):
                self._opened_at = self._clock()
                return True
            return False

    def release(self) -> None:
        """An admitted request ended without saying anything about the server's health."""
        with self._lock:
            self._trial = False


@dataclass
class TransportStats:
    """What the transport counts. `http_errors` counts failed attempts by HTTP status ("503") or transport
    failure ("connect", "timeout", "transport"); `failovers` counts requests passed on to the next URL."""

    retries: int = 0
    failovers: int = 0
    circuit_opens: int = 0
    circuit_rejections: int = 0
    http_errors: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None


@dataclass
class _LoopState:
    clients: dict[str, httpx.AsyncClient]
    semaphore: asyncio.Semaphore


class RMTransport:
    """POSTs to the judge service with the retry, failover and breaker policy above.

    `stats` (and the `lock` guarding it) may be shared with the caller, whose own counters extend them.
    httpx clients belong to one event loop: one pooled client per URL per loop that calls `post`.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        request_timeout_s: float = 300.0,
        max_concurrency: int = 8,
        retry_budget_s: float = 600.0,
        max_attempts: int | None = None,
        max_backoff_s: float = 30.0,
        circuit_failure_threshold: int = 5,
        circuit_reset_s: float = 30.0,
        stats: TransportStats | None = None,
        lock: threading.Lock | None = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.urls = tuple(split_urls(urls))
        self.request_timeout_s = request_timeout_s
        self.max_concurrency = max_concurrency
        self.retry_budget_s = retry_budget_s
        self.max_attempts = max_attempts
        self.max_backoff_s = max_backoff_s
        self.circuit_failure_threshold = circuit_failure_threshold
        self.circuit_reset_s = circuit_reset_s
        self.stats = stats if stats is not None else TransportStats()
        self.lock = lock or threading.Lock()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http_transport = http_transport
        self._breakers = {url: CircuitBreaker(circuit_failure_threshold, circuit_reset_s) for url in self.urls}
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()
        self._turn = itertools.count()

    @property
    def circuit_states(self) -> dict[str, CircuitState]:
        """Each URL's circuit breaker state."""
        return {url: breaker.state for url, breaker in self._breakers.items()}

    @property
    def circuit_state(self) -> CircuitState:
        """The best state over the URLs: closed while any server takes requests."""
        states = set(self.circuit_states.values())
        return "closed" if "closed" in states else "half_open" if "half_open" in states else "open"

    async def post(
        self,
        route: str,
        body: dict[str, Any],
        *,
        key: str | None = None,
        deadline: float | None = None,
        on_retry: Callable[[RetryCallState], None] | None = None,
    ) -> Any:
        """The JSON answer to `body` POSTed at `route`, after retries; raises `Retryable` once the deadline
        (default: now + retry_budget_s) or `max_attempts` is reached, `Rejected` at once for a 4xx."""
        deadline = time.monotonic() + self.retry_budget_s if deadline is None else deadline
        state = self._loop_state()

        def retried(rs: RetryCallState) -> None:
            with self.lock:
                self.stats.retries += 1
            log.debug("retrying %s in %.2f s (attempt %d): %s", route, rs.upcoming_sleep, rs.attempt_number,
                      rs.outcome.exception() if rs.outcome else None)
            if on_retry is not None:
                on_retry(rs)

        data = None
        async for attempt in retrying(deadline, self.max_backoff_s, retried, self.max_attempts):
            with attempt:
                data = await self._attempt(state, route, body, key)
        return data

    async def aclose(self) -> None:
        """Close this event loop's HTTP clients."""
        with self.lock:
            state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            for client in state.clients.values():
                await client.aclose()

    # ------------------------------------------------------------------ one attempt

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        with self.lock:
            state = self._loops.get(loop)
            if state is None:
                timeout = httpx.Timeout(self.request_timeout_s, connect=min(10.0, self.request_timeout_s))
                limits = httpx.Limits(max_connections=self.max_concurrency,
                                      max_keepalive_connections=self.max_concurrency)
                clients = {url: httpx.AsyncClient(base_url=url, headers=self._headers, timeout=timeout, limits=limits,
                                                  transport=self._http_transport)
                           for url in self.urls}
                state = self._loops[loop] = _LoopState(clients, asyncio.Semaphore(self.max_concurrency))
        return state

    def _route(self, key: str | None) -> list[str]:
        """The URLs in the order one attempt tries them: from the one `key` hashes to (no key: the next in
        turn), round the list."""
        urls = self.urls
        if len(urls) == 1:
            return list(urls)
        start = int(key[:8], 16) % len(urls) if key else next(self._turn) % len(urls)
        return [*urls[start:], *urls[:start]]

    async def _attempt(self, state: _LoopState, route: str, body: dict[str, Any], key: str | None) -> Any:
        """One attempt: the request goes to the first URL that takes it; the next URL gets it only after
        the previous one failed (so one response at most is ever read)."""
        failed: list[Retryable] = []
        waits: list[float] = []
        async with state.semaphore:
            for url in self._route(key):
                wait = self._breakers[url].admit()
                if wait > 0:
                    waits.append(wait)
                    continue
                if failed:
                    with self.lock:
                        self.stats.failovers += 1
                    log.debug("passing the request on to %s after: %s", url, failed[-1])
                try:
                    return await self._attempt_one(state, url, route, body, key)
                except Retryable as exc:
                    failed.append(exc)
        if failed:  # every URL that took the request failed: back off, then try them all again
            raise failed[-1]
        with self.lock:
            self.stats.circuit_rejections += 1
            last = self.stats.last_error
        raise CircuitOpen(f"circuit open after repeated failures (last: {last})", retry_after=min(waits))

    async def _attempt_one(self, state: _LoopState, url: str, route: str, body: dict[str, Any],
                           key: str | None) -> Any:
        breaker = self._breakers[url]
        headers = {AFFINITY_HEADER: key} if key else None
        try:
            response = await state.clients[url].post(route, json=body, headers=headers)
        except TRANSPORT_ERRORS as exc:
            self._failed_attempt(url, transport_kind(exc), f"{type(exc).__name__} from {url}: {exc}")
            raise Retryable(f"{type(exc).__name__} from {url}: {exc}") from exc
        except BaseException:
            breaker.release()
            raise
        code = response.status_code
        if code >= 400:
            message = f"HTTP {code} from {url}{route}: {error_message(response)}"
            if code in RETRY_STATUSES:
                if code == 429:  # alive but busy: says nothing about the server's health
                    breaker.release()
                    self._count_error(str(code), message)
                else:
                    self._failed_attempt(url, str(code), message)
                raise Retryable(message, retry_after=retry_after(response))
            breaker.success()  # it answered: the server is up, the request is at fault
            self._count_error(str(code), message)
            if code == 401:
                message += " (set the client's api_key or env RM_API_KEY)"
            raise Rejected(message, status=code)
        breaker.success()
        try:
            return response.json()
        except ValueError as exc:
            raise Rejected(f"unreadable JSON from {url}{route}: {response.text[:200]}") from exc

    def _count_error(self, kind: str, message: str) -> None:
        with self.lock:
            self.stats.http_errors[kind] = self.stats.http_errors.get(kind, 0) + 1
            self.stats.last_error = message

    def _failed_attempt(self, url: str, kind: str, message: str) -> None:
        self._count_error(kind, message)
        if self._breakers[url].failure():
            with self.lock:
                self.stats.circuit_opens += 1
            log.warning("circuit of %s opened after %d consecutive failures (last: %s); next probe in %.0f s",
                        url, self.circuit_failure_threshold, message, self.circuit_reset_s)


__all__ = [
    "AFFINITY_HEADER",
    "RETRY_STATUSES",
    "CircuitBreaker",
    "CircuitOpen",
    "RMTransport",
    "Rejected",
    "Retryable",
    "TransportStats",
    "split_urls",
]
