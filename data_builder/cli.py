"""`her build`: SFT samples per character perspective, and balanced preference pairs."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from her_roleplay import load_scenes

from ._pairs import MixConfig, balance
from ._sft import sft_records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="stage", required=True)
    sft = sub.add_parser("sft", help="one chat sample per character perspective of each scene")
    sft.add_argument("--scenes", required=True, help="CoSER-format scenes (json or jsonl)")
    sft.add_argument("--out", required=True, help="output jsonl")
    pairs = sub.add_parser("pairs", help="balance judged pairs (output of `her judge`) by pattern")
    pairs.add_argument("--verdicts", required=True, help="jsonl written by `her judge`")
    pairs.add_argument("--out", required=True, help="output folder (a `datasets` dataset + pairs.jsonl)")
    pairs.add_argument("--total", type=int, default=None)
    pairs.add_argument("--flip-fraction", type=float, default=0.05)
    pairs.add_argument("--seed", type=int, default=0)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    if args.stage == "sft":
        rows = sft_records(load_scenes(args.scenes))
        _write_jsonl(Path(args.out), rows)
        print(f"{len(rows)} SFT samples -> {args.out}")
        return 0
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
