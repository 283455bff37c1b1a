"""Labelled pairs → judge training examples, built with the same prompt builder the judge serves with.

Each pair yields, per presentation order (both when ``swap``), a cot example (the JSON answer with
per-principle comparisons) and/or a fast example (the single verdict token). Winners are turned
from the caller's ``a``/``b`` into the slots ``A``/``B`` of that order, so a judge trained on both
orders cannot learn a position preference from the data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import get_args

from her_roleplay import for_judging

from ._templates import MAX_PRINCIPLES, MIN_PRINCIPLES, REASON_MAX_CHARS, CompactTemplate, Slot, render_compact
from ._types import LabelledPair, Mode, Winner

_UNSAFE_REASON = re.compile(r'["\\\x00-\x1f]')


def _slot(winner: Winner, a_first: bool) -> Slot:
    if winner == "tie":
        return "tie"
    return "A" if (winner == "a") == a_first else "B"


def _reason(text: str) -> str:
    # the same bounds the output schema puts on a served answer
    return _UNSAFE_REASON.sub("'", text)[:REASON_MAX_CHARS]


def training_examples(
    pair: LabelledPair, template: CompactTemplate, *, modes: Sequence[Mode] = get_args(Mode), swap: bool = True
) -> list[dict]:
    """Conversational prompt/completion rows (TRL's format) for one labelled pair.

    A pair without comparisons (no per-principle outcome is known, e.g. the book's line against a policy
    sample) has no cot target and yields fast rows only. Raises ValueError for a cot example whose
    comparisons the output schema would not allow (fewer than 3 or more than 5, or an id outside the
    template's library).
    """
    a, b = for_judging(pair.a), for_judging(pair.b)
    rows = []
    for a_first in ([True, False] if swap else [True]):
        first, second = (a, b) if a_first else (b, a)
        for mode in modes:
            messages = template.messages(pair.context, first, second, fast=mode == "fast")
            target: str
            if mode == "fast":
                target = _slot(pair.label, a_first)
            elif not pair.comparisons:
                continue
            else:
                if not MIN_PRINCIPLES <= len(pair.comparisons) <= MAX_PRINCIPLES:
                    raise ValueError(f"pair {pair.id}: {len(pair.comparisons)} comparisons; a cot answer holds "
                                     f"{MIN_PRINCIPLES} to {MAX_PRINCIPLES}")
                unknown = [c.principle for c in pair.comparisons if c.principle not in template.library]
                if unknown:
                    raise ValueError(f"pair {pair.id}: principle ids {unknown} are not in the library")
                target = render_compact(
                    _slot(pair.label, a_first),
                    [(c.principle, _slot(c.winner, a_first), _reason(c.reason)) for c in pair.comparisons],
                )
            rows.append({
                "prompt": [m.model_dump() for m in messages],
                "completion": [{"role": "assistant", "content": target}],
                "pair_id": pair.id, "mode": mode, "a_first": a_first,
            })
    return rows


def training_rows(
    pairs: Iterable[LabelledPair], template: CompactTemplate, *, modes: Sequence[Mode] = get_args(Mode),
    swap: bool = True,
) -> list[dict]:
    return [row for pair in pairs for row in training_examples(pair, template, modes=modes, swap=swap)]
