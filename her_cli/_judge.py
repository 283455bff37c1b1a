"""`her judge`: judge a jsonl file of pairs with the GenRM."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import get_args

from her_genrm import HerRMStage, Mode, TemplateName, build_genrm, judge_file

from ._engine_args import add_engine_arguments, engine_from_args

EXIT_PAIRS_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="in_path", required=True,
                        help='jsonl, one pair a line: {"id": ..., "context": [messages] | "text", "a": "...", '
                             '"b": "..."} (a /v1/judge body; other keys are carried through)')
    parser.add_argument("--out", dest="out_path", required=True, help="jsonl of verdicts (input keys kept)")
    parser.add_argument("--mode", choices=get_args(Mode), default="cot")
    parser.add_argument("--template", choices=get_args(TemplateName), default="compact")
    parser.add_argument("--her-rm-template", help="template file for --template her-rm (from the HER repository)")
    parser.add_argument("--her-rm-stage", choices=get_args(HerRMStage), default="sft",
                        help="the HER-RM checkpoint served: after reward SFT, or after reward RL (gets HER's "
                             "RL-stage request appended)")
    parser.add_argument("--principles", help="principle library yaml (default: bundled)")
    parser.add_argument("--no-swap", action="store_true", help="judge one order only (no position debiasing)")
    parser.add_argument("--batch-size", type=int, default=16)
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    engine = engine_from_args(args)
    try:
        genrm = build_genrm(engine, args.model, principles=args.principles, her_rm_template=args.her_rm_template,
                            her_rm_stage=args.her_rm_stage)
        counts = await judge_file(args.in_path, args.out_path, genrm, mode=args.mode, template=args.template,
                                  swap=not args.no_swap, batch_size=args.batch_size)
    finally:
        await engine.aclose()
    print(f"judged {counts['ok'] + counts['error']} pairs: {counts['ok']} ok, {counts['error']} errors "
          f"-> {args.out_path}")
    if counts["error"]:
        print(f"her judge: {counts['error']} pair(s) got no verdict (status error; the reason is in their "
              f"`error` field)", file=sys.stderr)
        return EXIT_PAIRS_FAILED
    return 0
