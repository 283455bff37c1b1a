"""Group rewards from round-robin verdicts: win rate and Bradley–Terry on tournaments with known answers."""

from __future__ import annotations

import math

import pytest

from her_genrm import Verdict, bradley_terry, group_rewards, round_robin_pairs, win_rates


def _won(winner: str) -> Verdict:
    return Verdict(verdict=winner, p_a={"a": 1.0, "b": 0.0, "tie": 0.5}[winner])


def _priced(p_a: float) -> Verdict:
    return Verdict(verdict="a" if p_a > 0.5 else "b", p_a=p_a)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bradley_terry_recovers_known_strengths_from_exact_probabilities():
    theta = [0.0, 1.0, 2.5, -0.7]
    pairs = round_robin_pairs(4)
    verdicts = [_priced(_sigmoid(theta[i] - theta[j])) for i, j in pairs]
    rewards = bradley_terry(4, pairs, verdicts, kind="prob", prior_games=0.0)
    expected = [sum(_sigmoid(theta[i] - theta[j]) for j in range(4) if j != i) / 3 for i in range(4)]
    assert rewards == pytest.approx(expected, abs=1e-6)


def test_beating_a_strong_member_counts_more_than_beating_a_weak_one():
    # X beat S, Y beat W, S beat W: X and Y both won everything they played, but S is stronger than W
    x, y, s, w = range(4)
    pairs = [(x, s), (y, w), (s, w)]
    verdicts = [_won("a"), _won("a"), _won("a")]
    rates = win_rates(4, pairs, verdicts)
    assert rates[x] == rates[y] == 1.0
    bt = bradley_terry(4, pairs, verdicts)
    assert bt[x] > bt[y] > bt[s] > bt[w]
    assert all(0.0 < r < 1.0 for r in bt)  # the prior keeps undefeated members finite


def test_a_transitive_round_robin_keeps_the_win_rate_order_and_ties_count_half():
    pairs = round_robin_pairs(3)  # (0,1) (0,2) (1,2)
    verdicts = [_won("a"), _won("a"), _won("tie")]
    bt = group_rewards(3, pairs, verdicts, aggregate="bradley_terry")
    assert bt[0] > bt[1] == pytest.approx(bt[2])
    assert group_rewards(3, pairs, verdicts) == win_rates(3, pairs, verdicts)


def test_unjudged_pairs_are_left_out_and_a_member_without_verdicts_gets_none():
    pairs = round_robin_pairs(3)
    failed = Verdict(status="error", error="engine down")
    bt = bradley_terry(3, pairs, [_won("a"), failed, failed])
    assert bt[2] is None and bt[0] is not None and bt[0] > bt[1]
