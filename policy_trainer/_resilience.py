"""Resilience parts of the reward client: which failures to retry, how long to wait, and when
to stop calling a failing server at all. No knowledge of rewards here.

    Retryable           408/429/5xx or a transport error: try again (after Retry-After if given)
    └── CircuitOpen     the breaker holds requests back; retry_after = time to the next probe
    Rejected            any other 4xx or an unreadable answer: retrying cannot help
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
SPLIT_STATUSES = frozenset({413, 422})  # "this input is bad": worth isolating the bad unit
TRANSPORT_ERRORS = (
    httpx.ConnectError,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    httpx.TimeoutException,
)


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
    deadline: float, max_backoff_s: float, on_retry: Callable[[RetryCallState], None]
) -> AsyncRetrying:
    """Retry `Retryable` errors: wait the error's `retry_after` when it has one, else exponential
    backoff with jitter capped at `max_backoff_s`; never start an attempt past `deadline` (monotonic)."""
    backoff = wait_exponential_jitter(max=max_backoff_s, jitter=min(1.0, max_backoff_s))

    def wait(rs: RetryCallState) -> float:
        exc = rs.outcome.exception() if rs.outcome is not None else None
        if isinstance(exc, Retryable) and exc.retry_after is not None:
            return exc.retry_after  # the server (or the open circuit) says when to come back
        return backoff(rs)

    def stop(rs: RetryCallState) -> bool:
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

    def _state(self) -> Literal["closed", "open", "half_open"]:
        if self._opened_at is None:
            return "closed"
        return "open" if self._clock() - self._opened_at < self.reset_s else "half_open"

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        with self._lock:
            return self._state()

    def admit(self) -> float:
        with self._lock:
            state = self._state()
            if state == "closed":
                return 0.0
            if state == "open":
                return max(self.reset_s - (self._clock() - self._opened_at), 1e-3)  # type: ignore[operator]
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


class LoopThread:
    """A private event loop in a daemon thread, for synchronous callers (`score_sync`)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="reward-client-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


__all__ = [
    "RETRY_STATUSES",
    "CircuitBreaker",
    "CircuitOpen",
    "LoopThread",
    "Rejected",
    "Retryable",
    "retrying",
]
