"""Rollout-shaped labelled pairs: the book's own line against a losing side that no corruption rule wrote.

RL compares a policy's rollout with a reference (or two rollouts), so a judge has to be right on those pairs,
not only on a real line against its corrupted copy. Two families, each its own ``source``:

- ``policy_sample``: the book's line against a reply the policy wrote for the same turn (the actor prompt of
  `her_roleplay.build_chat_prompt`, sampled). The book is preferred, as in self-play fine-tuning. No
  per-principle outcome is known by construction, so these pairs carry no comparisons: fast targets only.
- ``wrong_moment``: the book's line against the same character's line from another moment of the same scene:
  the right voice at the wrong time, which only the context tells apart. The real line wins on responding to
  the last turn; both are the character's own words, so voice and staying in character tie.

The book's line sits in slot ``a`` or ``b`` at random (balanced labels); everything is deterministic per seed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from her_engines import Engine, GenRequest
from her_genrm import Comparison, LabelledPair, PairSource
from her_roleplay import Scene, for_judging, render_her

from ._negatives import Turn, actor_turns, judge_context, turns_of

__all__ = ["ROLLOUT_FAMILIES", "policy_sample_pairs", "wrong_moment_pairs"]

ROLLOUT_FAMILIES: tuple[PairSource, ...] = ("policy_sample", "wrong_moment")
MIN_DISTANCE = 2
"""Lines between a turn and the moment its displaced line comes from, at least (the next line often fits)."""

_WRONG_MOMENT_OUTCOMES = (
    ("responds_to_last_turn", "real", "only the real line answers the last turn"),
    ("profile_speech_style", "tie", "both are the character's own words"),
    ("breaks_character", "tie", "neither leaves the character"),
)


def _pair_id(scene: Scene, index: int, family: str, other: str) -> str:
    key = f"{scene.sample_id}\x00{index}\x00{family}\x00{other}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _record(turn: Turn, family: PairSource, real: str, other: str, rng: random.Random,
            comparisons: Sequence[tuple[str, str, str]] = ()) -> LabelledPair:
    real_side = "a" if rng.random() < 0.5 else "b"
    a, b = (real, other) if real_side == "a" else (other, real)
    return LabelledPair(
        id=_pair_id(turn.scene, turn.index, family, other),
        context=judge_context(turn.scene, turn.index, turn.speaker),
        a=a, b=b, label=real_side,
        comparisons=[Comparison(principle=pid, winner=real_side if who == "real" else "tie", reason=reason)
                     for pid, who, reason in comparisons],
        pattern=("all_a" if real_side == "a" else "all_b") if comparisons else None,
        source=family, book=turn.scene.book, scene_id=turn.scene.sample_id, turn=turn.index,
        character=turn.speaker,
    )


def wrong_moment_pairs(scenes: Iterable[Scene], *, per_turn: int = 1, seed: int = 0) -> list[LabelledPair]:
    """For every character turn, up to ``per_turn`` pairs of its real line against the same character's line
    from a moment at least :data:`MIN_DISTANCE` lines away (a different text)."""
    if per_turn < 1:
        raise ValueError(f"per_turn must be >= 1, got {per_turn}")
    pairs = []
    for scene in scenes:
        turns = list(turns_of(scene))
        for turn in turns:
            real = for_judging(render_her(turn.reply))
            elsewhere = sorted({
                text for other in turns
                if other.speaker == turn.speaker and abs(other.index - turn.index) >= MIN_DISTANCE
                and (text := for_judging(render_her(other.reply))).strip() != real.strip()
            })
            rng = random.Random(f"{seed}:wrong_moment:{scene.sample_id}:{turn.index}")
            for other_text in rng.sample(elsewhere, min(per_turn, len(elsewhere))):
                pairs.append(_record(turn, "wrong_moment", real, other_text, rng, _WRONG_MOMENT_OUTCOMES))
    return pairs


async def policy_sample_pairs(
    scenes: Sequence[Scene], policy: Engine, *, per_turn: int = 1, turns_per_scene: int | None = None,
    temperature: float = 0.9, max_tokens: int = 160, seed: int = 0, batch_size: int = 8,
) -> tuple[list[LabelledPair], Counter]:
    """(pairs, counts of turns dropped and why): the book's line against ``per_turn`` policy samples of it."""
    if per_turn < 1:
        raise ValueError(f"per_turn must be >= 1, got {per_turn}")
    units = [(turn, prompt, k) for turn, prompt in actor_turns(scenes, turns_per_scene) for k in range(per_turn)]
    pairs: list[LabelledPair] = []
    dropped: Counter = Counter()
    for start in range(0, len(units), batch_size):
        chunk = units[start : start + batch_size]
        samples = await policy.generate([
            GenRequest(messages=prompt, max_tokens=max_tokens, temperature=temperature,
                       seed=int(hashlib.sha256(f"{seed}:{turn.scene.sample_id}:{turn.index}:{k}".encode())
                                .hexdigest()[:8], 16))
            for turn, prompt, k in chunk
        ])
        for (turn, _, k), sample in zip(chunk, samples, strict=True):
            real = for_judging(render_her(turn.reply))
            written = for_judging(sample.text) if sample.finish_reason != "error" else ""
            if not written.strip():
                dropped["policy wrote nothing usable"] += 1
                continue
            if written.strip() == real.strip():
                dropped["policy repeated the book's line"] += 1
                continue
            rng = random.Random(f"{seed}:policy_sample:{turn.scene.sample_id}:{turn.index}:{k}")
            pairs.append(_record(turn, "policy_sample", real, written, rng))
    return pairs, dropped


def add_rollout_pair_arguments(parser: argparse.ArgumentParser) -> None:
    from her_cli._engine_args import add_engine_arguments

    parser.add_argument("--sources", nargs="+", required=True, help="CoSER book files or scene files")
    parser.add_argument("--out", required=True, help="output jsonl of labelled pairs (every family in one file)")
    parser.add_argument("--families", default=",".join(ROLLOUT_FAMILIES),
                        help=f"comma-separated (default: {','.join(ROLLOUT_FAMILIES)}); policy_sample loads the "
                             "--policy-* model")
    parser.add_argument("--books", nargs="+", default=None, metavar="TITLE", help="keep only these books")
    parser.add_argument("--exclude", nargs="+", default=[], help="evaluation scene files to leave out")
    parser.add_argument("--per-turn", type=int, default=1, help="pairs per real turn and family (default 1)")
    parser.add_argument("--turns-per-scene", type=int, default=None, help="policy_sample: cap turns per scene")
    parser.add_argument("--temperature", type=float, default=0.9, help="policy_sample: sampling temperature")
    parser.add_argument("--max-tokens", type=int, default=160, help="policy_sample: longest reply the policy writes")
    parser.add_argument("--seed", type=int, default=0)
    add_engine_arguments(parser, prefix="policy-")


def run_rollout_pairs(args: argparse.Namespace) -> int:
    from her_cli._engine_args import build_engine_or_exit, engine_settings_from_args
    from her_roleplay import SceneLoadError

    from ._books import scenes_for_pairs

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(ROLLOUT_FAMILIES))
    if unknown or not families:
        print(f"her build rollout-pairs: unknown families {unknown or families}; known: {', '.join(ROLLOUT_FAMILIES)}",
              file=sys.stderr)
        return 2
    try:
        scenes = scenes_for_pairs(args.sources, books=args.books, exclude=args.exclude)
        pairs = wrong_moment_pairs(scenes, per_turn=args.per_turn, seed=args.seed) if "wrong_moment" in families else []
    except (SceneLoadError, ValueError) as exc:
        print(f"her build rollout-pairs: {exc}", file=sys.stderr)
        return 2
    dropped: Counter = Counter()
    if "policy_sample" in families:
        policy = build_engine_or_exit(engine_settings_from_args(args, prefix="policy-"), prefix="policy-")
        try:
            sampled, dropped = asyncio.run(policy_sample_pairs(
                scenes, policy, per_turn=args.per_turn, turns_per_scene=args.turns_per_scene,
                temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed))
        finally:
            asyncio.run(policy.aclose())
        pairs += sampled
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(p.model_dump_json() + "\n" for p in pairs), encoding="utf-8")
    by_family = Counter(p.source for p in pairs)
    print(json.dumps({"pairs": len(pairs), "scenes": len(scenes), "by_family": dict(by_family),
                      "dropped": dict(dropped), "out": str(out)}))
    return 0 if pairs else 1
