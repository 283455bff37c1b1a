"""`RewardClient`: a TRL reward function backed by rm_server's `POST /v1/rewards`.

    client = RewardClient(url="http://127.0.0.1:8000", strategy="reference")
    rewards = await client(prompts, completions, reference=refs)   # list[float | None]

One call: inputs normalised (plain strings or chat messages; the rollout's system_thinking stripped,
its tag grammar checked on the raw text) → units (one rollout, or one whole prompt group) → chunks of
at most `chunk_size` completions → concurrent POSTs (at most `max_concurrency` in flight per event
loop, one pooled httpx client per loop) → rewards back in input order.

Failures, per request:
- 408/429/500/502/503/504 and transport errors (connect, read, write, protocol, timeouts) are retried
  with exponential backoff + jitter capped at `max_backoff_s`, or exactly the server's Retry-After;
  no attempt starts once the call's `retry_budget_s` would be exceeded.
- any other 4xx is not retried; a 413/422 on a chunk of several units re-sends each unit alone, so
  one oversized rollout fails only itself. A per-item `status: error` fails only that item.
- `CircuitBreaker`: after `circuit_failure_threshold` consecutive failed attempts the server is left
  alone for `circuit_reset_s`, then one trial request probes it. Calls that meet an open circuit
  wait for the probe if their budget allows it, else give up at once.
- several URLs (`url="http://a:8000,http://b:8000"` or a list): one attempt starts at the URL the
  chunk's context hashes to and, on a transport error, 408/429 or 5xx there (or an open circuit),
  passes the same request on to the next URL; only when every URL failed does the backoff above
  start. Each URL has its own breaker. A chunk's rewards come from exactly one successful response:
  a request that failed on one server is sent on, never applied twice (a server that timed out may
  still have judged it, but its answer is never read). The context hash also goes out as the
  `x-session-id` header, which Ray Serve's consistent-hash router (`her serve --replicas`) uses to
  keep a context on one replica.
Every failure ends as None for the rollouts concerned (TRL turns it into NaN), never 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tenacity import RetryCallState

from her_genrm import RMTransport, api_key_from_env, format_violations
from her_genrm._transport import Rejected, Retryable
from her_roleplay import strip_system_thinking

from ._reward_config import RewardClientConfig, RewardStats
from ._shapes import completion_text, context_of, group_key, reference_text

log = logging.getLogger("policy_trainer.reward_client")


@dataclass
class _Item:
    context: str | list[dict[str, str]]
    completion: str
    reference: str | None
    group: str | None
    violations: list[str]


@dataclass
class _Tally:
    retries: int = 0


SPLIT_STATUSES = frozenset({413, 422})  # "this input is bad": worth isolating the bad unit


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


def _pack(units: list[list[int]], size: int) -> list[list[list[int]]]:
    """Consecutive units into chunks of at most `size` items (a larger unit goes alone)."""
    chunks: list[list[list[int]]] = []
    current: list[list[int]] = []
    count = 0
    for unit in units:
        if current and count + len(unit) > size:
            chunks.append(current)
            current, count = [], 0
        current.append(unit)
        count += len(unit)
    if current:
        chunks.append(current)
    return chunks


# ---------------------------------------------------------------------- the client


class RewardClient:
    """Reward function for RL trainers: `await client(prompts, completions, **columns)`.

    Contract (TRL's reward functions): `prompts[i]` and `completions[i]` are strings or chat
    message lists (a completion's text is its last assistant message); `columns` are the dataset
    columns, one value per completion, plus whatever the trainer adds (TRL: `log_metric`,
    `log_extra`, `trainer_state`, …). Returns one reward per completion, in order: a float, or None
    when the rollout could not be judged (never 0 for a failure).

    Example (TRL):

        client = RewardClient(url="http://127.0.0.1:8000", judge_mode="fast")
        trainer = GRPOTrainer(model, reward_funcs=[client], train_dataset=ds)  # ds has "reference"

    The client is picklable (HTTP clients, locks and the breaker are rebuilt after unpickling);
    `score_sync` serves synchronous callers; `aclose` / `close` release the connections.
    """

    __name__ = "her_genrm_reward"  # TRL names a reward function's metrics after its __name__

    def __init__(self, config: RewardClientConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = RewardClientConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.stats = RewardStats()
        self._api_key = config.api_key or api_key_from_env()
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        cfg = self.config
        self._transport = RMTransport(
            cfg.urls, api_key=self._api_key, request_timeout_s=cfg.request_timeout_s,
            max_concurrency=cfg.max_concurrency, retry_budget_s=cfg.retry_budget_s, max_backoff_s=cfg.max_backoff_s,
            circuit_failure_threshold=cfg.circuit_failure_threshold, circuit_reset_s=cfg.circuit_reset_s,
            stats=self.stats, lock=self._lock,
        )
        self._worker: LoopThread | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = {
            k: v for k, v in self.__dict__.items() if k not in ("_lock", "_transport", "_worker")
        }
        with self._lock:
            state["stats"] = dataclasses.replace(self.stats, http_errors=dict(self.stats.http_errors))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        c = self.config
        return f"RewardClient(url={c.url!r}, strategy={c.strategy!r}, judge_mode={c.judge_mode!r})"

    @property
    def circuit_state(self) -> Literal["closed", "open", "half_open"]:
        """The best state over the URLs: closed while any server takes requests."""
        return self._transport.circuit_state

    @property
    def circuit_states(self) -> dict[str, Literal["closed", "open", "half_open"]]:
        """Each URL's circuit breaker state."""
        return self._transport.circuit_states

    # ------------------------------------------------------------------ public calls

    async def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> list[float | None]:
        """One reward per completion (float, or None when it could not be judged)."""
        started = time.monotonic()
        items = self._prepare(prompts, completions, columns)
        if not items:
            return []
        tally = _Tally()
        deadline = started + self.config.retry_budget_s
        chunks = _pack(self._units(items), self.config.chunk_size)
        parts = await asyncio.gather(
            *(self._score_chunk(items, chunk, deadline, tally) for chunk in chunks)
        )
        outcomes = {i: outcome for part in parts for i, outcome in part.items()}
        rewards: list[float | None] = []
        for i, item in enumerate(items):
            value = outcomes[i][0]
            if value is not None and item.violations:
                value -= self.config.format_penalty
            rewards.append(value)
        errors = [outcomes[i][1] for i in range(len(items))]
        self._record(items, rewards, errors, tally, time.monotonic() - started, columns)
        return rewards

    def score_sync(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> list[float | None]:
        """`__call__` for synchronous code, on a private event loop in a worker thread (so it works
        whether or not an event loop runs in the calling thread)."""
        with self._lock:
            if self._worker is None:
                self._worker = LoopThread()
            worker = self._worker
        if threading.current_thread() is worker.thread:
            raise RuntimeError(
                "score_sync was called from the client's own event loop; await the client instead"
            )
        return worker.run(self(prompts, completions, **columns))

    async def aclose(self) -> None:
        """Close this event loop's HTTP client (and the private loop of `score_sync`, if any)."""
        await self._close_loop_state()
        with self._lock:
            worker = self._worker
            if worker is not None and worker.loop is asyncio.get_running_loop():
                worker = None  # we are on the private loop itself: `close()` from outside stops it
            else:
                self._worker = None
        if worker is not None:
            await asyncio.to_thread(self._stop_worker, worker)

    def close(self) -> None:
        """Synchronous counterpart of `aclose` for the `score_sync` side."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            self._stop_worker(worker)

    def _stop_worker(self, worker: LoopThread) -> None:
        worker.run(self._close_loop_state())
        worker.stop()

    async def _close_loop_state(self) -> None:
        await self._transport.aclose()

    def metrics(self) -> dict[str, float]:
        """Flat running counters for trainer logs (`reward_client/...`)."""
        with self._lock:
            s = self.stats
            out = {
                "calls": s.calls,
                "completions": s.completions,
                "rewarded": s.rewarded,
                "failed": s.failed,
                "failed_frac": s.failed / s.completions if s.completions else 0.0,
                "retries": s.retries,
                "failovers": s.failovers,
                "circuit_opens": s.circuit_opens,
                "circuit_rejections": s.circuit_rejections,
                "format_violations": s.format_violations,
                "mean": s.last_mean,
                "std": s.last_std,
                "min": s.last_min,
                "max": s.last_max,
            }
            out.update({f"http_errors/{kind}": count for kind, count in sorted(s.http_errors.items())})
        out["circuit_open"] = 0.0 if self.circuit_state == "closed" else 1.0
        return {f"reward_client/{k}": float(v) for k, v in out.items()}

    # ------------------------------------------------------------------ inputs

    def _prepare(
        self, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Any]
    ) -> list[_Item]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(
                f"got {len(prompts)} prompts for {n} completions; pass one prompt per completion"
            )
        cfg = self.config
        references: Sequence[Any] | None = None
        if cfg.strategy == "reference":
            if cfg.reference_column not in columns:
                raise ValueError(
                    f"strategy 'reference' reads each rollout's reference reply from the dataset column "
                    f"{cfg.reference_column!r}, but the columns passed are {sorted(columns)}; add that "
                    "column or set reference_column (or use strategy='group')"
                )
            references = columns[cfg.reference_column]
            if len(references) != n:
                raise ValueError(
                    f"column {cfg.reference_column!r} has {len(references)} values for {n} completions"
                )
        items = []
        for i in range(n):
            context = context_of(prompts[i], f"prompts[{i}]")
            raw = completion_text(completions[i], f"completions[{i}]")
            reference = None
            if references is not None:
                reference = strip_system_thinking(
                    reference_text(references[i], f"{cfg.reference_column}[{i}]")
                )
            items.append(
                _Item(
                    context=context,
                    completion=strip_system_thinking(raw),  # the judge never sees the private plan
                    reference=reference,
                    group=group_key(context) if cfg.strategy == "group" else None,
                    violations=format_violations(raw),  # grammar checked on what the policy wrote
                )
            )
        return items

    def _units(self, items: list[_Item]) -> list[list[int]]:
        """What must travel together: one rollout (reference) or a prompt's whole group (group)."""
        if self.config.strategy == "reference":
            return [[i] for i in range(len(items))]
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.group or "", []).append(i)
        return list(groups.values())

    def _body(self, items: list[_Item], indices: list[int]) -> dict[str, Any]:
        cfg = self.config
        body: dict[str, Any] = {
            "prompts": [items[i].context for i in indices],
            "completions": [items[i].completion for i in indices],
            "strategy": cfg.strategy,
            "mode": cfg.judge_mode,
            "reward": cfg.reward_kind,
            "format_penalty": 0.0,  # applied here, on the raw rollout (the server sees it stripped)
        }
        if cfg.strategy == "reference":
            body["references"] = [items[i].reference for i in indices]
        else:
            body["group_ids"] = [items[i].group for i in indices]
            body["aggregate"] = cfg.aggregate
        return body

    # ------------------------------------------------------------------ requests

    async def _score_chunk(
        self, items: list[_Item], chunk: list[list[int]], deadline: float, tally: _Tally
    ) -> dict[int, tuple[float | None, str | None]]:
        indices = [i for unit in chunk for i in unit]
        key = items[indices[0]].group or group_key(items[indices[0]].context)  # where this context goes
        try:
            data = await self._post(self._body(items, indices), key, deadline, tally)
        except Rejected as exc:
            if exc.status in SPLIT_STATUSES and len(chunk) > 1:  # isolate the unit the server refuses
                parts = await asyncio.gather(
                    *(self._score_chunk(items, [unit], deadline, tally) for unit in chunk)
                )
                return {i: outcome for part in parts for i, outcome in part.items()}
            log.debug("rm_server refused %d completion(s), no retry: %s", len(indices), exc)
            return {i: (None, str(exc)) for i in indices}
        except Retryable as exc:
            # one warning per call (in _record) instead of one per chunk
            log.debug(
                "no reward for %d completion(s): retry budget (%.0f s) used up or too short for the "
                "next wait: %s",
                len(indices),
                self.config.retry_budget_s,
                exc,
            )
            return {i: (None, f"gave up retrying: {exc}") for i in indices}
        return self._parse(data, indices)

    def _parse(self, data: Any, indices: list[int]) -> dict[int, tuple[float | None, str | None]]:
        n = len(indices)
        rewards = data.get("rewards") if isinstance(data, dict) else None
        status = data.get("status") if isinstance(data, dict) else None
        details = data.get("details") if isinstance(data, dict) else None
        if not isinstance(rewards, list) or len(rewards) != n or (status is not None and len(status) != n):
            error = f"malformed /v1/rewards response for {n} completions: {str(data)[:200]}"
            log.warning(error)
            return {i: (None, error) for i in indices}
        out: dict[int, tuple[float | None, str | None]] = {}
        for k, i in enumerate(indices):
            value, ok = rewards[k], (status[k] if status is not None else "ok") == "ok"
            if ok and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                out[i] = (float(value), None)
            else:
                detail = details[k] if isinstance(details, list) and len(details) == n else None
                reason = detail.get("error") if isinstance(detail, dict) else None
                out[i] = (None, reason or f"server status {status[k] if status else 'n/a'}, reward {value!r}")
        return out

    async def _post(self, body: dict[str, Any], key: str, deadline: float, tally: _Tally) -> Any:
        def counted(rs: RetryCallState) -> None:
            tally.retries += 1

        return await self._transport.post("/v1/rewards", body, key=key, deadline=deadline, on_retry=counted)

    # ------------------------------------------------------------------ bookkeeping

    def _record(
        self,
        items: list[_Item],
        rewards: list[float | None],
        errors: list[str | None],
        tally: _Tally,
        elapsed: float,
        columns: Mapping[str, Any],
    ) -> None:
        n = len(rewards)
        values = [r for r in rewards if r is not None]
        failed = n - len(values)
        violated = sum(bool(item.violations) for item in items)
        first_error = next((e for e in errors if e), None)
        with self._lock:
            s = self.stats
            s.calls += 1
            s.completions += n
            s.rewarded += len(values)
            s.failed += failed
            s.format_violations += violated
            if first_error:
                s.last_error = first_error
            s.last_mean = statistics.fmean(values) if values else math.nan
            s.last_std = statistics.pstdev(values) if values else math.nan
            s.last_min = min(values) if values else math.nan
            s.last_max = max(values) if values else math.nan
        if failed:
            log.warning("%d of %d completions got no reward (None); first error: %s", failed, n, first_error)
        log.debug(
            "rewards for %d completions in %.1f s: mean %.3f, %d retries",
            n,
            elapsed,
            self.stats.last_mean,
            tally.retries,
        )
        # TRL's hooks: per-call scalars (averaged per logging step) and a per-completion table column.
        log_metric = columns.get("log_metric")
        if callable(log_metric):
            for name, value in (
                ("failed", failed),
                ("failed_frac", failed / n),
                ("retries", tally.retries),
                ("latency_s", elapsed),
                ("format_violations_frac", violated / n),
                ("circuit_open", self.circuit_state != "closed"),
            ):
                log_metric(f"reward_client/{name}", float(value))
        log_extra = columns.get("log_extra")
        if callable(log_extra):
            log_extra(
                "reward_status",
                [
                    "ok" if r is not None else f"error: {e}"[:160]
                    for r, e in zip(rewards, errors, strict=True)
                ],
            )


__all__ = ["RewardClient", "RewardClientConfig", "RewardStats"]
