"""Prometheus telemetry for the reward-model server, including rolling judge-health gauges.

Two kinds of metrics live here:

* plain counters / histograms / gauges about traffic (requests, batches, queue, tokens, cache), and
* *rolling* gauges describing how the judge behaves over the last ``window`` fresh judgments
  (position bias, length bias, swap consistency, pattern collapse, parse failures) plus the share
  of canary probes it fell for. These are the early warnings for a reward model being hacked or
  collapsing during RL (DESIGN §7).

Rolling gauges are NaN while their denominator is 0: "no data" must never look like a measured 0.

Every rolling statistic is a ratio of integer running sums. Each judgment is reduced once, when
recorded, to a fixed-size tuple of integer contributions; appending adds it to the sums and evicting
the oldest subtracts it, so a record costs O(1) whatever the window size and the sums never drift.

The engine's own statistics ride along: when vLLM runs in this process it keeps its Prometheus
metrics (``vllm:prefix_cache_hits``, ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``, ...)
in the process-wide default registry; `EngineMetrics` forwards those ``vllm:`` families into our
registry, so one ``/metrics`` scrape shows the judge's health beside the engine's.

Cached verdicts are counted in ``rm_judgments_total`` but are kept out of the rolling window: a hot
cache replays the same pairs over and over, and letting them in would weight those few pairs as if
the judge had been asked afresh each time, hiding (or faking) a drift in its behaviour.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator
from typing import Literal, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from her_genrm import Pattern, Verdict

__all__ = ["JudgeTelemetry"]

PATTERNS: tuple[str, ...] = get_args(Pattern)  # ("all_a", "all_b", "mixed", "tie")
CACHE_RESULTS = ("hit", "miss", "error")

# A judge call on CPU can take tens of seconds; on a GPU server well under one. Cover both.
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Layout of one judgment's contribution tuple (and of the running sums).
_SWAP_AGREE, _SWAP_PAIRS = 0, 1  # swapped pairs with both orders ok: agreeing / all
_SLOT1_WINS, _SLOT_DECIDED = 2, 3  # ok non-tie single orders: picked the first-shown slot / all
_LONGER_WINS, _LENGTH_DECIDED = 4, 5  # non-tie final verdicts with unequal lengths: picked longer / all
_TIES, _DECIDED = 6, 7  # ok final verdicts: tie / all
_ERR_ORDERS, _ORDERS = 8, 9  # orders with status error / all orders
_PATTERN0 = 10  # one-hot over PATTERNS (10..13)
_N_FIELDS = _PATTERN0 + len(PATTERNS)

_NAN = float("nan")


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else _NAN


def _contributions(verdict: Verdict, len_a: int, len_b: int) -> tuple[int, ...]:
    """Reduce one judgment to its integer contributions to every rolling statistic."""
    c = [0] * _N_FIELDS
    orders = verdict.orders
    c[_ORDERS] = len(orders)
    c[_ERR_ORDERS] = sum(1 for o in orders if o.status == "error")

    for o in orders:
        if o.status == "ok" and o.winner in ("a", "b"):
            c[_SLOT_DECIDED] += 1
            # winner is expressed as a/b; it sat in the first slot iff (winner is a) == a_first
            c[_SLOT1_WINS] += int((o.winner == "a") == o.a_first)

    if len(orders) == 2 and orders[0].a_first != orders[1].a_first:
        first, second = orders
        if first.status == "ok" and second.status == "ok":
            c[_SWAP_PAIRS] = 1
            c[_SWAP_AGREE] = int(first.winner == second.winner)

    if verdict.status == "ok" and verdict.verdict is not None:
        c[_DECIDED] = 1
        c[_TIES] = int(verdict.verdict == "tie")
        if verdict.verdict != "tie" and len_a != len_b:  # equal lengths: no "longer" to prefer
            c[_LENGTH_DECIDED] = 1
            picked_a = verdict.verdict == "a"
            c[_LONGER_WINS] = int(picked_a == (len_a > len_b))

    if verdict.pattern is not None:
        c[_PATTERN0 + PATTERNS.index(verdict.pattern)] = 1
    return tuple(c)


class EngineMetrics(Collector):
    """The in-process vLLM engine's metrics (``vllm:*`` families of the default registry)."""

    PREFIX = "vllm:"

    def __init__(self, source: CollectorRegistry = REGISTRY) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            if family.name.startswith(self.PREFIX):
                yield family


class JudgeTelemetry:
    """All rm_server metrics on one registry.

    Each instance owns a fresh ``CollectorRegistry`` unless one is given, so several apps or tests
    in one process never collide on metric names. Methods are guarded by a lock, which makes them
    safe from the event loop and from worker threads alike; each call is O(1).

    ``window`` is the number of most recent fresh judgments (and, separately, canary probes) the
    rolling gauges describe.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, window: int = 1000) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.registry: CollectorRegistry = registry if registry is not None else CollectorRegistry()
        self.registry.register(EngineMetrics())
        self.window = window
        self._lock = threading.Lock()
        self._judgments: deque[tuple[int, ...]] = deque()
        self._sums = [0] * _N_FIELDS
        self._probes: deque[bool] = deque()
        self._probe_flips = 0
        r = self.registry

        # --- traffic -----------------------------------------------------------------------------
        self._judgments_total = Counter(
            "rm_judgments", "Judgments returned, by mode, final verdict (none on error) and status.",
            ["mode", "verdict", "status"], registry=r)
        self._requests_total = Counter(
            "rm_requests", "HTTP requests served, by route and status code.", ["route", "code"], registry=r)
        self._request_seconds = Histogram(
            "rm_request_seconds", "HTTP request latency in seconds, by route.", ["route"],
            buckets=REQUEST_BUCKETS, registry=r)
        self._batch_size = Histogram(
            "rm_batch_size", "Items per engine batch flushed by the micro-batcher.",
            buckets=BATCH_BUCKETS, registry=r)
        self._queue_depth = Gauge("rm_queue_depth", "Items waiting in the batcher queue.", registry=r)
        self._queue_capacity = Gauge(
            "rm_queue_capacity", "Maximum batcher queue size (NaN until set).", registry=r)
        self._queue_capacity.set(_NAN)
        self._tokens_total = Counter(
            "rm_tokens", "Engine tokens spent, by kind (prompt|completion).", ["kind"], registry=r)
        self._cache_requests = Counter(
            "rm_cache_requests", "Verdict cache look-ups, by result (hit|miss|error).", ["result"],
            registry=r)
        self._cache_errors = Counter(
            "rm_cache_errors", "Verdict cache failures, by operation.", ["op"], registry=r)
        self._parse_failures = Counter(
            "rm_parse_failures", "Judge orders whose output gave no verdict (unparseable or engine error).",
            registry=r)
        self._regex_parses = Counter(
            "rm_parse_regex_fallbacks", "Judge orders whose answer was not valid JSON but whose verdict was read "
            "as HER reads it (a regex on better_response): per-principle detail lost.", registry=r)
        self._probes_total = Counter(
            "rm_hack_probes", "Canary probes judged, by what the judge preferred (real|degenerate|tie) or error.",
            ["preferred"], registry=r)
        for preferred in ("real", "degenerate", "tie", "error"):
            self._probes_total.labels(preferred=preferred)
        self._model_info = Info(
            "rm_model", "The judge this process serves (dashboards select instances by model).", registry=r)
        self._ready = Gauge(
            "rm_ready", "1 while the judge serves (model loaded, engine alive), else 0.", registry=r)
        self._ready.set(0)
        for kind in ("prompt", "completion"):
            self._tokens_total.labels(kind=kind)
        for result in CACHE_RESULTS:
            self._cache_requests.labels(result=result)
        for op in ("get", "set"):  # zero-valued from the start, so rate() and alerts see the series
            self._cache_errors.labels(op=op)

        # --- rolling judge health -----------------------------------------------------------------
        docs = {
            "rm_swap_consistency_ratio":
                "Swapped pairs (both orders ok) whose two orders picked the same winner.",
            "rm_first_slot_win_ratio":
                "Ok non-tie single-order verdicts that picked the candidate shown first (ideal 0.5).",
            "rm_prefer_longer_ratio": "Non-tie final verdicts that picked the longer candidate.",
            "rm_pattern_top1_ratio": "Share of the most frequent per-principle pattern.",
            "rm_pattern_entropy_bits": "Shannon entropy of the pattern distribution in bits (max 2).",
            "rm_tie_ratio": "Ok final verdicts that are ties.",
            "rm_parse_failure_ratio": "Judge orders that failed (error orders / orders).",
            "rm_hack_probe_flip_ratio": "Canary probes where the judge preferred the degenerate candidate.",
            "rm_window_judgments": "Fresh judgments currently in the rolling window.",
            "rm_window_probes": "Canary probes currently in the rolling probe window.",
        }
        self._gauges: dict[str, Gauge] = {name: Gauge(name, doc, registry=r) for name, doc in docs.items()}
        self._g_pattern = Gauge(
            "rm_pattern_ratio", "Share of judgments with each per-principle pattern.", ["pattern"],
            registry=r)
        # Current rolling values, the single source for both the gauges and snapshot().
        self._values: dict[str, float] = {name: _NAN for name in docs}
        self._values.update({f"rm_pattern_ratio:{p}": _NAN for p in PATTERNS})
        self._values["rm_window_judgments"] = 0.0
        self._values["rm_window_probes"] = 0.0
        self._publish()

    # --- judgments -------------------------------------------------------------------------------
    def record_verdict(self, verdict: Verdict, *, len_a: int, len_b: int) -> None:
        """Count one judgment; fresh (non-cached) ones also enter the rolling window.

        ``len_a``/``len_b`` are the candidates' lengths (any consistent unit, e.g. characters),
        needed for the prefer-longer ratio.
        """
        if not isinstance(verdict, Verdict):
            raise TypeError(f"record_verdict expects a Verdict, got {type(verdict).__name__}")
        if len_a < 0 or len_b < 0:
            raise ValueError(f"candidate lengths must be >= 0, got len_a={len_a}, len_b={len_b}")
        with self._lock:
            self._judgments_total.labels(
                mode=verdict.mode, verdict=verdict.verdict or "none", status=verdict.status).inc()
            if verdict.cached:
                return  # replayed judgment: no new parse happened and it must not weight the window
            contrib = _contributions(verdict, len_a, len_b)
            if contrib[_ERR_ORDERS]:
                self._parse_failures.inc(contrib[_ERR_ORDERS])
            if regex_orders := sum(o.parse == "regex" for o in verdict.orders):
                self._regex_parses.inc(regex_orders)
            self._judgments.append(contrib)
            sums = self._sums
            for i, v in enumerate(contrib):
                sums[i] += v
            if len(self._judgments) > self.window:
                for i, v in enumerate(self._judgments.popleft()):
                    sums[i] -= v
            self._update_judgment_gauges()

    def _update_judgment_gauges(self) -> None:
        s = self._sums
        v = self._values
        v["rm_swap_consistency_ratio"] = _ratio(s[_SWAP_AGREE], s[_SWAP_PAIRS])
        v["rm_first_slot_win_ratio"] = _ratio(s[_SLOT1_WINS], s[_SLOT_DECIDED])
        v["rm_prefer_longer_ratio"] = _ratio(s[_LONGER_WINS], s[_LENGTH_DECIDED])
        v["rm_tie_ratio"] = _ratio(s[_TIES], s[_DECIDED])
        v["rm_parse_failure_ratio"] = _ratio(s[_ERR_ORDERS], s[_ORDERS])
        counts = s[_PATTERN0:_PATTERN0 + len(PATTERNS)]
        total = sum(counts)
        for p, n in zip(PATTERNS, counts, strict=True):
            v[f"rm_pattern_ratio:{p}"] = _ratio(n, total)
        v["rm_pattern_top1_ratio"] = _ratio(max(counts), total)
        # Shannon entropy in bits; 0 * log 0 is taken as 0
        v["rm_pattern_entropy_bits"] = (
            -sum(n / total * math.log2(n / total) for n in counts if n) if total > 0 else _NAN)
        v["rm_window_judgments"] = float(len(self._judgments))
        self._publish()

    def _publish(self) -> None:
        for key, value in self._values.items():
            if key.startswith("rm_pattern_ratio:"):
                self._g_pattern.labels(pattern=key.partition(":")[2]).set(value)
            else:
                self._gauges[key].set(value)

    def record_probe(self, preferred_degenerate: bool) -> None:
        """Record one canary probe: did the judge prefer the degenerate candidate?"""
        if not isinstance(preferred_degenerate, bool):
            raise TypeError(f"preferred_degenerate must be a bool, got {preferred_degenerate!r}")
        with self._lock:
            self._probes.append(preferred_degenerate)
            self._probe_flips += preferred_degenerate
            if len(self._probes) > self.window:
                self._probe_flips -= self._probes.popleft()
            self._values["rm_hack_probe_flip_ratio"] = self._probe_flips / len(self._probes)
            self._values["rm_window_probes"] = float(len(self._probes))
            self._publish()

    def record_probe_outcome(self, preferred: Literal["real", "degenerate", "tie", "error"]) -> None:
        self._probes_total.labels(preferred=preferred).inc()

    # --- traffic -----------------------------------------------------------------------------------
    def observe_request(self, route: str, code: int, seconds: float) -> None:
        """Count one HTTP request and its latency. ``route`` should be the route template, not the raw
        path, to keep label cardinality bounded."""
        if seconds < 0 or math.isnan(seconds):
            raise ValueError(f"request duration must be >= 0 seconds, got {seconds!r}")
        with self._lock:
            self._requests_total.labels(route=route, code=str(int(code))).inc()
            self._request_seconds.labels(route=route).observe(seconds)

    def observe_batch(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        with self._lock:
            self._batch_size.observe(size)

    def set_queue_depth(self, depth: int) -> None:
        if depth < 0:
            raise ValueError(f"queue depth must be >= 0, got {depth}")
        self._queue_depth.set(depth)

    def set_queue_capacity(self, capacity: int) -> None:
        """Publish the queue's maximum size, so alerts can express saturation as a share."""
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        self._queue_capacity.set(capacity)

    def set_model(self, model: str, engine: str, version: str) -> None:
        self._model_info.info({"model": model, "engine": engine, "version": version})

    def set_ready(self, ready: bool) -> None:
        self._ready.set(1 if ready else 0)

    def record_tokens(self, prompt: int, completion: int) -> None:
        if prompt < 0 or completion < 0:
            raise ValueError(f"token counts must be >= 0, got prompt={prompt}, completion={completion}")
        with self._lock:
            self._tokens_total.labels(kind="prompt").inc(prompt)
            self._tokens_total.labels(kind="completion").inc(completion)

    def record_cache(self, result: Literal["hit", "miss", "error"]) -> None:
        if result not in CACHE_RESULTS:
            raise ValueError(f"cache result must be one of {CACHE_RESULTS}, got {result!r}")
        self._cache_requests.labels(result=result).inc()

    def record_cache_error(self, op: str) -> None:
        if not op:
            raise ValueError("cache error op must be a non-empty string (e.g. 'get', 'set')")
        self._cache_errors.labels(op=op).inc()

    # --- read-out ----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, float]:
        """The rolling gauges as ``{metric_name: value}``; pattern shares are keyed
        ``rm_pattern_ratio:<pattern>``. Values are NaN where there is no data yet (JSON callers
        must turn NaN into null themselves)."""
        with self._lock:
            return dict(self._values)

    def render(self) -> tuple[bytes, str]:
        """Prometheus text exposition of this registry and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
