"""Verdicts → rewards. An unjudgeable rollout gets `None`, never 0."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Literal

from her_roleplay import validate_reply

from ._types import Verdict

RewardKind = Literal["discrete", "prob"]

# Findings that mean the rollout broke the tag grammar (style findings such as
# mind-reading are the judge's business, not a format failure).
FORMAT_BREAKING_CODES = frozenset(
    {"malformed_tag", "nested_tag", "unknown_tag", "duplicate_system_thinking", "misplaced_system_thinking"}
)
# Score of candidate `a` for each verdict: win 1, tie 0.5, loss 0.
OUTCOME_SCORE = {"a": 1.0, "tie": 0.5, "b": 0.0}


def verdict_reward(verdict: Verdict, kind: RewardKind = "discrete") -> float | None:
    """Reward of candidate `a`: win 1 / tie 0.5 / loss 0, or P(a≻b) with kind="prob"."""
    if verdict.status != "ok" or verdict.verdict is None:
        return None
    if kind == "prob":
        return verdict.p_a
    return OUTCOME_SCORE[verdict.verdict]


def format_violations(text: str) -> list[str]:
    """Codes of the grammar-breaking findings in a rollout (empty when it is well formed)."""
    return [f.code for f in validate_reply(text) if f.code in FORMAT_BREAKING_CODES]


def rollout_reward(
    verdict: Verdict, rollout: str, *, kind: RewardKind = "discrete", format_penalty: float = 0.0
) -> float | None:
    """Reward of a rollout judged as candidate `a` against a reference, minus the format penalty."""
    reward = verdict_reward(verdict, kind)
    if reward is None:
        return None
    return reward - (format_penalty if format_violations(rollout) else 0.0)


def round_robin_pairs(n: int) -> list[tuple[int, int]]:
    """Every unordered pair of members of a group of `n`."""
    return list(combinations(range(n), 2))


def win_rates(n: int, pairs: Sequence[tuple[int, int]], verdicts: Sequence[Verdict],
              kind: RewardKind = "discrete") -> list[float | None]:
    """Mean score of each member over its judged pairs; None for a member with no judged pair."""
    totals = [0.0] * n
    counts = [0] * n
    for (i, j), verdict in zip(pairs, verdicts, strict=True):
        score = verdict_reward(verdict, kind)
        if score is None:
            continue
        totals[i] += score
        totals[j] += 1.0 - score
        counts[i] += 1
        counts[j] += 1
    return [totals[k] / counts[k] if counts[k] else None for k in range(n)]
