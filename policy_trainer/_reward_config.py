"""Settings and counters of the reward client (`RewardClientConfig`, `RewardStats`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

from her_genrm import GroupAggregate, Mode, RewardKind, RewardStrategy, TransportStats, split_urls


@dataclass
class RewardClientConfig:
    """Settings of `RewardClient`. Every field can also be given to `RewardClient(**overrides)`.

    Parameters:
        url: rm_server base URL (no path), or several for failover: a comma-separated string or a
            list (stored as the comma-separated string; `urls` lists them). Each request starts at
            the URL its context hashes to (so one context keeps hitting one server) and moves to the
            next on a transport error, 408/429 or 5xx; every URL keeps its own circuit breaker.
        api_key: Bearer key when the server has `RM_API_KEYS` set; None reads env `RM_API_KEY`.
        strategy: `reference` judges each rollout against the dataset's reference reply, both
            orders (HER); `group` judges every pair of rollouts sharing a prompt and gives each its
            win rate (needs ≥2 rollouts per prompt, e.g. GRPO's num_generations).
        aggregate: `group` only: `winrate`, or `bradley_terry` (expected score under a Bradley–Terry
            fit of the group's verdicts: beating a strong rollout counts more than beating a weak one).
        reference_column: dataset column holding the reference reply (`reference` strategy only).
        judge_mode: `cot` (principles, comparisons, verdict) or `fast` (verdict from one step's logprobs).
        reward_kind: `discrete` (win 1 / tie 0.5 / loss 0) or `prob` (P(win)).
        format_penalty: subtracted from the reward of a rollout that breaks the dual-layer tag
            grammar (checked here on the raw rollout, before system_thinking is stripped).
        request_timeout_s: read/write timeout of one HTTP request (a cot judgment on CPU is slow).
        max_concurrency: HTTP requests in flight at once (per event loop).
        chunk_size: completions per request; `group` keeps each prompt's group whole, so a group
            larger than this goes alone.
        retry_budget_s: wall time from the start of a call after which no new attempt starts; then
            the rollouts still unscored get None. 0 disables retries.
        max_backoff_s: cap of one exponential backoff wait (a server's Retry-After is obeyed as is).
        circuit_failure_threshold: consecutive failed attempts (5xx, 408, transport errors) that
            open the circuit.
        circuit_reset_s: how long an open circuit sends nothing before one trial request.
    """

    url: str | list[str] = "http://127.0.0.1:8000"
    api_key: str | None = None
    strategy: RewardStrategy = "reference"
    aggregate: GroupAggregate = "winrate"
    reference_column: str = "reference"
    judge_mode: Mode = "cot"
    reward_kind: RewardKind = "discrete"
    format_penalty: float = 0.0
    request_timeout_s: float = 300.0
    max_concurrency: int = 8
    chunk_size: int = 64
    retry_budget_s: float = 600.0
    max_backoff_s: float = 30.0
    circuit_failure_threshold: int = 5
    circuit_reset_s: float = 30.0

    def __post_init__(self) -> None:
        self.url = ",".join(split_urls(self.url))
        for name, literal in (
            ("strategy", RewardStrategy),
            ("aggregate", GroupAggregate),
            ("judge_mode", Mode),
            ("reward_kind", RewardKind),
        ):
            allowed = get_args(literal)
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if not isinstance(self.reference_column, str) or not self.reference_column:
            raise ValueError(f"reference_column={self.reference_column!r} must name a dataset column")
        if not (math.isfinite(self.format_penalty) and self.format_penalty >= 0):
            raise ValueError(
                f"format_penalty={self.format_penalty} must be a finite number >= 0 "
                "(it is subtracted from the reward)"
            )
        for name in ("request_timeout_s", "max_backoff_s", "circuit_reset_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not self.retry_budget_s >= 0:
            raise ValueError(f"retry_budget_s={self.retry_budget_s} must be >= 0 (0 disables retries)")
        for name in ("max_concurrency", "chunk_size", "circuit_failure_threshold"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if self.strategy == "group" and self.chunk_size < 2:
            raise ValueError(
                "strategy='group' judges rollouts against each other: chunk_size must be >= 2 "
                f"(got {self.chunk_size})"
            )

    @property
    def urls(self) -> tuple[str, ...]:
        """The server base URLs, in the order given."""
        return tuple(str(self.url).split(","))


@dataclass
class RewardStats(TransportStats):
    """Running counters of a client (process-local; a pickled copy starts from the current values).

    The transport's counters (retries, failovers, circuit events, `http_errors`) plus the rewards'.
    `last_*` describe the rewards of the most recent call (NaN when it had none).
    """

    calls: int = 0
    completions: int = 0
    rewarded: int = 0
    failed: int = 0
    format_violations: int = 0
    last_mean: float = math.nan
    last_std: float = math.nan
    last_min: float = math.nan
    last_max: float = math.nan


__all__ = ["RewardClientConfig", "RewardStats"]
