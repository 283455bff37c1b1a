"""Turns of a re-enactment: who may speak next (CoSER's next-speaker rule) and what is kept of a line
(nothing written for another character, no repetition loop, no own name label)."""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Sequence

from her_roleplay import ENVIRONMENT, Scene, public_view, strip_speaker_prefix, strip_system_thinking

END_CHAT = "<END CHAT>"
MAX_STOP_STRINGS = 4  # OpenAI's chat API takes at most four


def resolve_next_speaker(
    predicted: str,
    *,
    current: str,
    candidates: Sequence[str],
    fallback_pool: Sequence[str],
    end_allowed: bool,
    rng: random.Random,
    blocked: Collection[str] = (),
) -> tuple[str | None, str | None]:
    """Apply CoSER's rule to a predictor answer: ``(next speaker or None to end, fallback reason)``.

    Valid: a name in ``candidates`` other than ``current`` (and not ``blocked``: actors whose last
    visible turn is their own), or ``<END CHAT>`` when ``end_allowed``. Anything else becomes
    ``rng.choice`` over ``fallback_pool`` without ``current`` and ``blocked`` (if that leaves nobody:
    over the unblocked candidates, then Environment). The reason says why the answer was replaced.
    """
    text = _clean_prediction(predicted)
    excluded = [current, *blocked]
    reason: str | None
    if text.casefold() == END_CHAT.casefold():
        if end_allowed:
            return None, None
        reason = "end_too_early"
    else:
        match = next((c for c in candidates if _same(c, text)), None)
        if match is not None and not any(_same(match, x) for x in excluded):
            return match, None
        reason = "unknown_speaker" if match is None else "repeated_speaker"
    for group in (fallback_pool, candidates):
        # sorted: the pool must not depend on set or input order, only on the sample's seed
        pool = sorted({p for p in group if not any(_same(p, x) for x in excluded)})
        if pool:
            return rng.choice(pool), reason
    return ENVIRONMENT, reason  # the narrator may always add a line


def _clean_prediction(text: str) -> str:
    text = text.strip().strip("`*\"' ")
    text = re.sub(r"^(?:next\s+speaker\s*:\s*)", "", text, flags=re.IGNORECASE).strip()
    return text.splitlines()[0].strip() if text else ""


def _same(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def _is_env(name: str) -> bool:
    return _same(name, ENVIRONMENT)


def _speaking_order(scene: Scene) -> list[str]:
    names = list(dict.fromkeys(scene.speaking_characters_w_env)) or [*scene.cast(), ENVIRONMENT]
    if not any(_is_env(n) for n in names):
        names.append(ENVIRONMENT)
    return names


def can_take_turn(history: Sequence[tuple[str, str]], name: str) -> bool:
    """False when ``name``'s last turn, as ``name`` sees the conversation, is its own: someone must
    visibly act first (lines that show nothing, e.g. only a thought, do not count)."""
    if _is_env(name):
        return True
    for who, text in reversed(history):
        if _same(who, name):
            if strip_system_thinking(text).strip():
                return False
        elif public_view(text).strip():
            return True
    return True


def _cut_at_other_speaker(text: str, speaker: str, names: Sequence[str]) -> str:
    """Drop whatever the model wrote for another character (``\\nName: ...``) after its own turn."""
    others = [re.escape(n) for n in names if not _same(n, speaker)]
    if not others:
        return text
    match = re.search(rf"\n\s*\**(?:{'|'.join(others)})\**\s*:", text)
    return text[: match.start()] if match else text


_TOKEN = re.compile(r"\w+|[^\w\s]")
_LETTER_RUN = re.compile(r"[^\W\d_]{100,}")


def cut_repetition(text: str) -> str:
    """Cut a degenerate reply where it starts repeating itself, as CoSER does for every actor that is
    not an API model (its ``fix_repeation``): a run of 100+ letters keeps its first 20; a span of
    5-30 tokens repeated five times in a row keeps its first occurrence; else a span of 15-30 tokens
    seen again later ends the text before the second occurrence. Unlike CoSER the original text is
    cut (tags and spacing kept) instead of re-joined from tokens. Text without repetition is unchanged.
    """
    text = _LETTER_RUN.sub(lambda m: m.group(0)[:20], text)
    spans = [(m.start(), m.end(), m.group(0)) for m in _TOKEN.finditer(text)]
    toks = [t for _, _, t in spans]
    n = len(toks)
    for length in range(5, min(30, n) + 1):  # consecutive: the shortest repeating unit first
        for i in range(n - 5 * length + 1):
            unit = toks[i : i + length]
            if all(toks[i + k * length : i + (k + 1) * length] == unit for k in range(1, 5)):
                return text[: spans[i + length - 1][1]]
    first_repeat = n
    for length in range(15, min(30, n) + 1):  # non-consecutive: the earliest second occurrence
        seen: dict[tuple[str, ...], int] = {}
        for i in range(n - length + 1):
            key = tuple(toks[i : i + length])
            if key in seen:
                if i - seen[key] >= length:
                    first_repeat = min(first_repeat, i)
            else:
                seen[key] = i
    if first_repeat < n:
        return text[: spans[first_repeat][0]].rstrip()
    return text


def _stops(speaker: str, names: Sequence[str]) -> list[str]:
    """Stop strings: another character's line starting (cut afterwards anyway; this saves the tokens)."""
    return [f"\n{n}:" for n in names if not _same(n, speaker)][:MAX_STOP_STRINGS]


def _clean(generated: str, speaker: str, names: Sequence[str], prefill: str) -> str:
    """What is kept of a generated line: nothing written for others, no repetition loop, no own
    name label."""
    text = cut_repetition(_cut_at_other_speaker(generated, speaker, names))
    return strip_speaker_prefix(prefill + text, speaker).strip()
