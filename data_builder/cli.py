"""`her build`: policy training data (SFT, GRPO, verl) and balanced preference pairs.

`sft` is the quick case: one jsonl, one sample per character perspective (its last turn), no splits.
`policy` is the training build: every own turn as a target, grouped splits, evaluation scenes removed.
`verl` brings rows of other layouts (GRPO rows, `reward_model.answer`, verl rows without
`extra_info.prompt`) into the layout verl and the HER reward function read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from her_roleplay import SceneLoadError, load_scenes

from ._books import scenes_for_pairs
from ._negatives import FLAW_KINDS, hard_negatives
from ._pairs import MixConfig, balance
from ._policy import SPLITS, VERL_DATA_SOURCE, SplitConfig, build_and_export, parse_fractions
from ._rollout_pairs import add_rollout_pair_arguments, run_rollout_pairs
from ._sft import sft_records
from ._stages import add_synth_arguments, run_synth
from ._teacher_pairs import add_teacher_pair_arguments, run_teacher_pairs
from ._verl import convert_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="stage", required=True)
    sft = sub.add_parser("sft", help="one chat sample per character perspective of each scene")
    sft.add_argument("--scenes", required=True, help="CoSER-format scenes (json or jsonl)")
    sft.add_argument("--out", required=True, help="output jsonl")
    policy = sub.add_parser(
        "policy", help="SFT, GRPO and verl rows for every own turn, split by conversation (jsonl + parquet)"
    )
    policy.add_argument("--sources", nargs="+", required=True,
                        help="CoSER book-level files, test-set scene files or `her build synth` scenes (jsonl)")
    policy.add_argument("--out", required=True, help="output folder: sft/, grpo/, verl/, summary.json")
    policy.add_argument("--exclude", nargs="+", default=[],
                        help="evaluation scene files: scenes with the same (book, i_p, i_c) are dropped")
    policy.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1), metavar="TRAIN,VAL,TEST",
                        help="fractions of conversations per split, summing to 1 (default 0.8,0.1,0.1)")
    policy.add_argument("--holdout-book", action="append", default=[], metavar="TITLE",
                        help="put this whole book into the test split (repeatable)")
    policy.add_argument("--seed", type=int, default=0, help="changes which conversations land in which split")
    verl = sub.add_parser("verl", help="rows of other layouts (GRPO rows, reward_model.answer, verl rows without "
                          "extra_info.prompt) in verl's layout with extra_info.prompt (jsonl + parquet)")
    verl.add_argument("--in", dest="inputs", nargs="+", required=True, metavar="FILE",
                      help="jsonl, json (a list) or parquet files; each becomes <out>/<name>.jsonl + .parquet")
    verl.add_argument("--out", required=True, help="output folder")
    verl.add_argument("--data-source", default=VERL_DATA_SOURCE,
                      help=f"data_source of rows that carry none (default {VERL_DATA_SOURCE})")
    synth = sub.add_parser("synth", help="HER reverse synthesis with a teacher model: role_thinking, "
                           "system_thinking and setting stages, resumable")
    add_synth_arguments(synth)
    negatives = sub.add_parser("negatives", help="labelled pairs: real replies against copies with one named flaw")
    negatives.add_argument("--sources", nargs="+", required=True,
                           help="CoSER book-level files, test-set scene files or `her build synth` scenes")
    negatives.add_argument("--out", required=True, help="output jsonl of labelled pairs")
    negatives.add_argument("--kinds", default=None, help=f"comma-separated flaw kinds (default all: "
                           f"{', '.join(FLAW_KINDS)})")
    negatives.add_argument("--per-turn", type=int, default=None, help="flaw kinds drawn per real turn (default all)")
    negatives.add_argument("--books", nargs="+", default=None, metavar="TITLE", help="keep only these books")
    negatives.add_argument("--exclude", nargs="+", default=[],
                           help="evaluation scene files: scenes with the same (book, i_p, i_c) are dropped")
    negatives.add_argument("--seed", type=int, default=0)
    teacher = sub.add_parser("teacher-pairs", help="labelled pairs: policy samples judged by a teacher GenRM "
                             "that sees the principle library, balanced by pattern")
    add_teacher_pair_arguments(teacher)
    rollout = sub.add_parser("rollout-pairs", help="labelled pairs shaped like RL's: the book's line against a "
                             "policy sample of the same turn, or the same character's line from another moment")
    add_rollout_pair_arguments(rollout)
    pairs = sub.add_parser("pairs", help="balance judged pairs (output of `her judge`) by pattern")
    pairs.add_argument("--verdicts", required=True, help="jsonl written by `her judge`")
    pairs.add_argument("--out", required=True, help="output folder (a `datasets` dataset + pairs.jsonl)")
    pairs.add_argument("--total", type=int, default=None)
    pairs.add_argument("--flip-fraction", type=float, default=0.05)
    pairs.add_argument("--seed", type=int, default=0)


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        fractions = parse_fractions(text)
        SplitConfig(fractions=fractions)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return fractions


def _run_policy(args: argparse.Namespace) -> int:
    split = SplitConfig(fractions=args.split, holdout_books=tuple(args.holdout_book), seed=args.seed)
    try:
        summary = build_and_export(args.sources, args.out, split, exclude_files=args.exclude)
    except (SceneLoadError, ValueError) as exc:
        print(f"her build policy: {exc}", file=sys.stderr)
        return 2
    dropped = ", ".join(f"{n} {why}" for why, n in sorted(summary["dropped_on_load"].items())) or "nothing"
    print(f"{summary['scenes_loaded']} scenes loaded (dropped {dropped}); "
          f"{summary['excluded']['count']} evaluation scenes excluded; "
          f"{len(summary['scenes_without_turns'])} scenes without a character turn")
    for name in SPLITS:
        counts = summary["splits"][name]
        print(f"  {name}: {counts['scenes']} scenes, {counts['samples']} samples")
    print(f"-> {args.out} (sft/, grpo/, verl/, summary.json)")
    return 0


def _run_verl(args: argparse.Namespace) -> int:
    try:
        summary = convert_files(args.inputs, args.out, data_source=args.data_source)
    except (OSError, ValueError) as exc:
        print(f"her build verl: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{name} {n}" for name, n in summary["rows"].items())
    print(f"verl rows ({counts}) -> {args.out} ({', '.join(summary['files'])})")
    return 0


def _run_negatives(args: argparse.Namespace) -> int:
    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds else None
    unknown = sorted(set(kinds or ()) - set(FLAW_KINDS))
    if unknown:
        print(f"her build negatives: unknown flaw kinds {unknown}; known: {', '.join(FLAW_KINDS)}", file=sys.stderr)
        return 2
    try:
        scenes = scenes_for_pairs(args.sources, books=args.books, exclude=args.exclude)
    except SceneLoadError as exc:
        print(f"her build negatives: {exc}", file=sys.stderr)
        return 2
    pairs = hard_negatives(scenes, kinds=kinds, per_turn=args.per_turn, seed=args.seed)
    _write_jsonl(Path(args.out), [p.model_dump(mode="json") for p in pairs])
    by_kind = Counter(p.flaw_kind for p in pairs)
    print(f"{len(pairs)} labelled pairs from {len(scenes)} scenes -> {args.out} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(by_kind.items()))})")
    return 0


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    if args.stage == "sft":
        rows = sft_records(load_scenes(args.scenes))
        _write_jsonl(Path(args.out), rows)
        print(f"{len(rows)} SFT samples -> {args.out}")
        return 0
    if args.stage == "policy":
        return _run_policy(args)
    if args.stage == "verl":
        return _run_verl(args)
    if args.stage == "synth":
        return run_synth(args)
    if args.stage == "negatives":
        return _run_negatives(args)
    if args.stage == "teacher-pairs":
        return run_teacher_pairs(args)
    if args.stage == "rollout-pairs":
        return run_rollout_pairs(args)
    from datasets import Dataset

    records = [json.loads(x) for x in Path(args.verdicts).read_text(encoding="utf-8").splitlines() if x.strip()]
    picked = balance(records, MixConfig(total=args.total, flip_fraction=args.flip_fraction, seed=args.seed))
    out = Path(args.out)
    _write_jsonl(out / "pairs.jsonl", picked)
    # nested/optional fields vary by template: keep them as JSON text so every row has one schema
    flat = [{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()} for r in picked]
    Dataset.from_list(flat).save_to_disk(str(out / "dataset"))
    mix = Counter(r["pattern"] for r in picked)
    print(f"{len(picked)} pairs -> {out} ({', '.join(f'{k} {v}' for k, v in sorted(mix.items()))})")
    return 0
