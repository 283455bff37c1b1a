"""Verdicts → rewards. An unjudgeable rollout gets `None`, never 0."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from typing import Literal

from her_roleplay import validate_reply

from ._types import Verdict

RewardKind = Literal["discrete", "prob"]
# reference: each rollout against the dataset's reference reply; group: rollouts of one prompt against each other.
RewardStrategy = Literal["reference", "group"]

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


def _judged_games(n: int, pairs: Sequence[tuple[int, int]], verdicts: Sequence[Verdict], kind: RewardKind,
                  ) -> tuple[list[float], dict[tuple[int, int], int]]:
    """Each member's summed score and the number of judged games per unordered pair (unjudged left out)."""
    wins = [0.0] * n
    games: dict[tuple[int, int], int] = {}
    for (i, j), verdict in zip(pairs, verdicts, strict=True):
        score = verdict_reward(verdict, kind)
        if score is None:
            continue
        wins[i] += score
        wins[j] += 1.0 - score
        key = (min(i, j), max(i, j))
        games[key] = games.get(key, 0) + 1
    return wins, games


def win_rates(n: int, pairs: Sequence[tuple[int, int]], verdicts: Sequence[Verdict],
              kind: RewardKind = "discrete") -> list[float | None]:
    """Mean score of each member over its judged pairs; None for a member with no judged pair."""
    wins, games = _judged_games(n, pairs, verdicts, kind)
    counts = [0] * n
    for (i, j), count in games.items():
        counts[i] += count
        counts[j] += count
    return [wins[k] / counts[k] if counts[k] else None for k in range(n)]


GroupAggregate = Literal["winrate", "bradley_terry"]


def bradley_terry(n: int, pairs: Sequence[tuple[int, int]], verdicts: Sequence[Verdict],
                  kind: RewardKind = "discrete", *, prior_games: float = 1.0,
                  max_iter: int = 1000, tol: float = 1e-10) -> list[float | None]:
    """Each member's expected score against the rest of its group under a Bradley–Terry fit.

    Strengths π are fitted to the judged pairs (a tie, or P(a≻b) with kind="prob", is a fractional win)
    by Hunter's MM iteration. ``prior_games`` adds that many drawn games of each member against a fixed
    member of strength 1, so an undefeated member stays finite. The reward of member i is the mean of
    π_i / (π_i + π_j) over the other judged members j: on the win-rate scale (0..1), but a win over a
    strong member counts more than one over a weak member. None for a member with no judged pair.
    """
    wins, games = _judged_games(n, pairs, verdicts, kind)
    members = sorted({k for pair in games for k in pair})
    strength = [1.0] * n
    for _ in range(max_iter):
        updated = list(strength)
        for i in members:
            denominator = prior_games / (strength[i] + 1.0)
            for (x, y), count in games.items():
                if i in (x, y):
                    other = y if i == x else x
                    denominator += count / (strength[i] + strength[other])
            updated[i] = (wins[i] + 0.5 * prior_games) / denominator if denominator > 0 else strength[i]
        if prior_games == 0:  # without the fixed member only ratios are identified: geometric mean 1
            scale = math.exp(sum(math.log(max(updated[i], 1e-300)) for i in members) / max(len(members), 1))
            updated = [s / scale for s in updated]
        change = max((abs(math.log(updated[i] / strength[i])) for i in members), default=0.0)
        strength = updated
        if change < tol:
            break
    rewards: list[float | None] = [None] * n
    for i in members:
        others = [j for j in members if j != i]
        if others:
            rewards[i] = sum(strength[i] / (strength[i] + strength[j]) for j in others) / len(others)
    return rewards


def group_rewards(n: int, pairs: Sequence[tuple[int, int]], verdicts: Sequence[Verdict],
                  kind: RewardKind = "discrete", aggregate: GroupAggregate = "winrate") -> list[float | None]:
    """Rewards of a group's members from their pairwise verdicts: win rate or Bradley–Terry."""
    if aggregate == "bradley_terry":
        return bradley_terry(n, pairs, verdicts, kind)
    return win_rates(n, pairs, verdicts, kind)
