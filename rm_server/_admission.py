"""Admission control before the queue: a token bucket per client and a fair share of the queue under overload.

The queue bound alone (429 when full) lets one client fill it and starve the rest. Here each client (its API
key, or its address when auth is off) spends one token per pair from its own bucket, and once the queue is
over half full nobody may hold more than an equal share of it. Both refusals are `RateLimited` (429 with
`Retry-After`); the caller's request never reaches the queue, so nothing is half-done.
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from ._batcher import QueueFull

# Who is asking, set by the auth dependency for the request's task (a key's fingerprint, never the key).
current_client: contextvars.ContextVar[str] = contextvars.ContextVar("current_client", default="anonymous")


class RateLimited(QueueFull):
    """A client is over its rate or its fair share of the queue (429 + Retry-After)."""


class TokenBucket:
    """`rate` tokens per second up to `burst`; `take(n)` or say how long until n tokens are there."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic) -> None:  # noqa: ANN001
        self.rate, self.burst, self._clock = rate, burst, clock
        self.tokens, self.stamp = burst, clock()

    def take(self, n: float) -> float:
        """0.0 when taken; else the seconds to wait (nothing is taken)."""
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if n <= self.tokens:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


class Admission:
    """Per-client rate limits and fair share; `admit(client, pairs, queue_depth)` around each request's pairs."""

    def __init__(self, *, rate_per_s: float, burst: int | None, max_queue: int, capacity: int,
                 fair_share: bool) -> None:
        """`capacity`: pairs the service holds at once (queued + inside the engine), shared out under overload."""
        self.rate_per_s = rate_per_s
        self.burst = float(burst if burst is not None else max(1.0, 2 * rate_per_s))
        self.max_queue = max_queue
        self.capacity = capacity
        self.fair_share = fair_share
        self._buckets: dict[str, TokenBucket] = {}
        self._held: defaultdict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    @contextmanager
    def admit(self, client: str, pairs: int, queue_depth: int) -> Iterator[None]:
        """Raise `RateLimited`, or hold `pairs` of the queue's share for `client` until the block exits."""
        with self._lock:
            self._check_rate(client, pairs)
            self._check_share(client, pairs, queue_depth)
            self._held[client] += pairs
        try:
            yield
        finally:
            with self._lock:
                self._held[client] -= pairs
                if self._held[client] <= 0:
                    del self._held[client]

    def _check_rate(self, client: str, pairs: int) -> None:
        if self.rate_per_s <= 0:
            return
        if pairs > self.burst:
            raise RateLimited(f"{pairs} pairs in one request exceed the per-client burst of {self.burst:.0f} "
                              "(RM_RATE_LIMIT_BURST); split the request", retry_after_s=1)
        bucket = self._buckets.setdefault(client, TokenBucket(self.rate_per_s, self.burst))
        wait = bucket.take(pairs)
        if wait:
            raise RateLimited(f"rate limit: {self.rate_per_s:g} pairs/s per client (RM_RATE_LIMIT_PAIRS_PER_S)",
                              retry_after_s=wait)

    def _check_share(self, client: str, pairs: int, queue_depth: int) -> None:
        # Pairs admitted a moment ago may not be queued yet: count what is held, not only the queue.
        load = max(queue_depth, sum(self._held.values()))
        if not self.fair_share or load + pairs <= self.max_queue // 2:
            return
        clients = len(self._held) + (client not in self._held)
        if clients < 2:  # alone, a client competes with nobody: the queue bound applies as usual
            return
        share = max(1, math.floor(self.capacity / clients))
        if self._held.get(client, 0) + pairs > share:
            raise RateLimited(f"the queue is over half full and this client holds more than its fair share "
                              f"({share} of {self.capacity} pairs among {clients} clients); retry shortly",
                              retry_after_s=1)
