"""A verdict seen with its two replies exchanged: what the cache stores once for both orientations of a
pair, and what a group reward reads from the losing side."""

from __future__ import annotations

from ._types import Comparison, OrderResult, Pattern, Verdict, Winner

_WINNER_MIRROR: dict[Winner, Winner] = {"a": "b", "b": "a", "tie": "tie"}
_PATTERN_MIRROR: dict[Pattern, Pattern] = {"all_a": "all_b", "all_b": "all_a", "mixed": "mixed", "tie": "tie"}


def mirror_winner(w: Winner | None) -> Winner | None:
    """The winner seen from the other slot: a↔b; tie and None stay."""
    return None if w is None else _WINNER_MIRROR[w]


def _mirror_p(p: float | None) -> float | None:
    return None if p is None else 1.0 - p


def _mirror_pattern(p: Pattern | None) -> Pattern | None:
    return None if p is None else _PATTERN_MIRROR[p]


def _mirror_comparisons(comps: list[Comparison]) -> list[Comparison]:
    return [c.model_copy(update={"winner": _WINNER_MIRROR[c.winner], "a_performance": c.b_performance,
                                 "b_performance": c.a_performance}) for c in comps]


def _mirror_order(o: OrderResult) -> OrderResult:
    return o.model_copy(
        update={
            "a_first": not o.a_first,
            "winner": mirror_winner(o.winner),
            "p_a": _mirror_p(o.p_a),
            "probs": {mirror_winner(w): p for w, p in o.probs.items()} if o.probs else o.probs,
            "comparisons": _mirror_comparisons(o.comparisons),
            "pattern": _mirror_pattern(o.pattern),
        }
    )


def mirror_verdict(v: Verdict) -> Verdict:
    """The same judgment seen with a and b exchanged.

    Winners a↔b (tie stays), ``p_a → 1 - p_a``, each order's outcome probabilities a↔b, pattern
    all_a↔all_b, every comparison's winner and its a/b performances, and
    each order's ``a_first`` flipped. ``consistent``, status, usage and metadata are unchanged. Applying
    it twice gives the input back (``p_a`` up to float rounding of ``1 - (1 - p)``).
    """
    return v.model_copy(
        update={
            "verdict": mirror_winner(v.verdict),
            "p_a": _mirror_p(v.p_a),
            "pattern": _mirror_pattern(v.pattern),
            "comparisons": _mirror_comparisons(v.comparisons),
            "orders": [_mirror_order(o) for o in v.orders],
        }
    )
