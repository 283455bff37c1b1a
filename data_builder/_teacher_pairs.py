"""Teacher-labelled pairs: two replies sampled from a policy, judged by a teacher GenRM.

For each character turn of a scene the policy writes two candidates for that turn (the actor prompt
of `her_roleplay.build_chat_prompt`, sampled at a temperature). A teacher judge that sees the whole
principle library (definitions in its prompt) compares them in both presentation orders. A pair is
kept when the teacher's answer parsed and compared at least 3 principles; the kept pairs are then
mixed by judgment pattern (default Mixed 60 / All-A 15 / All-B 15 / Tie 10, 5% flipped).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rich.progress import Progress

from her_engines import Engine, GenRequest
from her_genrm import GenRM, GenRMConfig, JudgeRequest, LabelledPair, pattern_of
from her_roleplay import Scene, for_judging

from ._negatives import actor_turns, judge_context
from ._pairs import MixConfig, balance

__all__ = ["MIN_TEACHER_COMPARISONS", "balance_labelled", "teacher_pairs"]

MIN_TEACHER_COMPARISONS = 3


async def teacher_pairs(
    scenes: Sequence[Scene], policy: Engine, teacher: GenRM, *, turns_per_scene: int | None = None,
    temperature: float = 0.9, max_tokens: int = 160, seed: int = 0, batch_size: int = 8,
) -> tuple[list[LabelledPair], Counter]:
    """(kept pairs, counts of what was dropped and why). Nothing is labelled when the teacher failed."""
    units = actor_turns(scenes, turns_per_scene)
    kept: list[LabelledPair] = []
    dropped: Counter = Counter()
    with Progress() as progress:
        task = progress.add_task("teacher pairs", total=len(units))
        for start in range(0, len(units), batch_size):
            chunk = units[start : start + batch_size]
            requests = [
                GenRequest(messages=prompt, max_tokens=max_tokens, temperature=temperature,
                           seed=seed * 1000 + start + i * 2 + k)
                for i, (_, prompt) in enumerate(chunk) for k in range(2)
            ]
            samples = await policy.generate(requests)
            judge_requests, owners = [], []
            for i, (turn, _) in enumerate(chunk):
                first, second = samples[2 * i], samples[2 * i + 1]
                a, b = (for_judging(r.text) for r in (first, second))
                if first.finish_reason == "error" or second.finish_reason == "error" or not a or not b or a == b:
                    dropped["policy gave no two distinct replies"] += 1
                    continue
                context = judge_context(turn.scene, turn.index, turn.speaker)
                judge_requests.append(JudgeRequest(context=context, a=a, b=b, mode="cot", swap=True, seed=seed))
                owners.append(turn)
            verdicts = await teacher.judge(judge_requests) if judge_requests else []
            for turn, req, verdict in zip(owners, judge_requests, verdicts, strict=True):
                if verdict.status != "ok" or verdict.verdict is None:
                    dropped["teacher answer unusable"] += 1
                    continue
                if len({c.principle for c in verdict.comparisons}) < MIN_TEACHER_COMPARISONS:
                    dropped[f"fewer than {MIN_TEACHER_COMPARISONS} principles compared"] += 1
                    continue
                key = f"{turn.scene.sample_id}\x00{turn.index}\x00{req.a}\x00{req.b}"
                kept.append(LabelledPair(
                    id=hashlib.sha256(key.encode()).hexdigest()[:16], context=req.context, a=req.a, b=req.b,
                    label=verdict.verdict, comparisons=verdict.comparisons,
                    pattern=pattern_of([c.winner for c in verdict.comparisons]), source="teacher",
                    book=turn.scene.book, scene_id=turn.scene.sample_id, turn=turn.index, character=turn.speaker,
                ))
            progress.advance(task, len(chunk))
    return kept, dropped


def balance_labelled(pairs: Sequence[LabelledPair], mix: MixConfig) -> list[LabelledPair]:
    """The pattern mix of `data_builder.balance`, applied to labelled pairs (flips mirror the label)."""
    rows = [{**p.model_dump(mode="json"), "status": "ok", "verdict": p.label} for p in pairs]
    out = []
    for row in balance(rows, mix):
        row["label"] = row.pop("verdict")
        row.pop("status")
        flipped = row.pop("flipped", False)
        row.pop("p_a", None)
        pair = LabelledPair.model_validate(row)
        out.append(pair.model_copy(update={"id": pair.id + "-flip"}) if flipped else pair)
    return out


def add_teacher_pair_arguments(parser: argparse.ArgumentParser) -> None:
    from her_cli._engine_args import add_engine_arguments

    parser.add_argument("--sources", nargs="+", required=True, help="CoSER book files or scene files")
    parser.add_argument("--out", required=True, help="output folder: pairs.jsonl (mixed), judged.jsonl (all kept)")
    parser.add_argument("--books", nargs="+", default=None, metavar="TITLE", help="keep only these books")
    parser.add_argument("--exclude", nargs="+", default=[], help="evaluation scene files to leave out")
    parser.add_argument("--turns-per-scene", type=int, default=None, help="cap turns sampled per scene")
    parser.add_argument("--temperature", type=float, default=0.9, help="policy sampling temperature")
    parser.add_argument("--max-tokens", type=int, default=160, help="longest candidate the policy may write")
    parser.add_argument("--total", type=int, default=None, 
                        help="pairs to keep after mixing (default: all the mix allows)")
    parser.add_argument("--flip-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    # --policy-* : the model that writes candidates; --teacher-* : the judge (unset flags follow --policy-*)
    add_engine_arguments(parser, prefix="policy-")
    add_engine_arguments(parser, prefix="teacher-", inherit="policy-")


def run_teacher_pairs(args: argparse.Namespace) -> int:
    from her_cli._engine_args import build_engine_or_exit, engine_settings_from_args

    from ._books import scenes_for_pairs

    scenes = scenes_for_pairs(args.sources, books=args.books, exclude=args.exclude)
    policy_settings = engine_settings_from_args(args, prefix="policy-")
    teacher_settings = engine_settings_from_args(args, prefix="teacher-", inherit="policy-")
    policy = build_engine_or_exit(policy_settings, prefix="policy-")
    # one model for both roles loads once
    teacher_engine = (policy if teacher_settings == policy_settings
                      else build_engine_or_exit(teacher_settings, prefix="teacher-"))
    teacher = GenRM(teacher_engine, config=GenRMConfig(principle_detail="definition"))
    try:
        kept, dropped = asyncio.run(teacher_pairs(scenes, policy, teacher, turns_per_scene=args.turns_per_scene,
                                                  temperature=args.temperature, max_tokens=args.max_tokens,
                                                  seed=args.seed))
    finally:
        for engine in {id(policy): policy, id(teacher_engine): teacher_engine}.values():
            asyncio.run(engine.aclose())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "judged.jsonl").write_text("".join(p.model_dump_json() + "\n" for p in kept), encoding="utf-8")
    try:
        mixed = balance_labelled(kept, MixConfig(total=args.total, flip_fraction=args.flip_fraction, seed=args.seed))
    except ValueError as exc:
        print(f"her build teacher-pairs: {len(kept)} judged pairs kept in {out / 'judged.jsonl'}, but the mix "
              f"cannot be met: {exc}", file=sys.stderr)
        mixed = []
    (out / "pairs.jsonl").write_text("".join(p.model_dump_json() + "\n" for p in mixed), encoding="utf-8")
    summary = {"kept": len(kept), "mixed": len(mixed), "dropped": dict(dropped),
               "patterns_kept": dict(Counter(p.pattern for p in kept)),
               "patterns_mixed": dict(Counter(p.pattern for p in mixed))}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary))
    return 0 if kept else 1
