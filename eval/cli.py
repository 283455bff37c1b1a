"""`her eval coser`: CoSER given-circumstance acting with the model under test, scored by a flaw judge.

    her eval coser --test-file FILE --out DIR [--engine ...] [--max-rounds N] [--runs K] [--judge-url URL]

The judge is a local engine (by default the model under test itself) or, with ``--judge-url``, a
running rm_server (``POST /v1/score/transcript``). Rerunning the same command resumes.

`her eval judge`: agreement of one or more pairwise judges with labelled pairs, side by side.

    her eval judge --pairs PAIRS.jsonl --judge base=smollm2-135m-instruct [--judge trained=DIR ...] --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from her_cli._engine_args import add_engine_arguments, build_engine_or_exit, engine_settings_from_args
from her_roleplay import SceneLoadError, load_scenes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="BENCHMARK", required=True)
    coser = sub.add_parser(
        "coser",
        help="CoSER given-circumstance acting (multi-agent re-enactment + flaw judge)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    coser.add_argument("--test-file", required=True, help="CoSER test set: JSON (object or list) or JSONL")
    coser.add_argument(
        "--out", required=True, help="output folder (results.json, report.md, scores.png, samples/)"
    )
    coser.add_argument(
        "--runs", type=int, default=1, help="independent runs; 3 or more give 95%% CIs (default 1)"
    )
    coser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    coser.add_argument("--concurrency", type=int, default=2, help="samples in flight at once (default 2)")
    coser.add_argument(
        "--judge-concurrency", type=int, default=2, help="transcripts judged at once (default 2)"
    )
    coser.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = coser.add_argument_group("model under test")
    add_engine_arguments(g)
    g.add_argument("--max-rounds", type=int, default=20, help="lines per re-enactment at most (default 20)")
    g.add_argument(
        "--min-end-round", type=int, default=5, help="the scene may end from this round (default 5)"
    )
    g.add_argument("--actor-max-tokens", type=int, default=512, help="token limit of an actor reply")
    g.add_argument("--env-max-tokens", type=int, default=160, help="token limit of an Environment line")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (seeded per sample)")
    g.add_argument("--top-p", type=float, default=0.95)

    j = coser.add_argument_group("judge")
    j.add_argument("--judge-url", default=None, help="score on this rm_server instead of a local engine")
    j.add_argument(
        "--judge-key",
        default=os.environ.get("HER_JUDGE_KEY"),
        help="Bearer key for --judge-url (default: $HER_JUDGE_KEY)",
    )
    add_engine_arguments(j, prefix="judge-", inherit="")
    j.add_argument("--judge-max-tokens", type=int, default=1024, help="token limit of one flaw list")
    j.add_argument("--max-flaws", type=int, default=10, help="flaws listed per dimension at most")
    j.add_argument("--max-instance-chars", type=int, default=200, help="length limit of a flaw's instance")
    j.add_argument("--judge-attempts", type=int, default=2, help="tries per dimension before it is an error")
    coser.set_defaults(_run_eval=_run_coser)
    _add_judge_arguments(sub)


def _add_judge_arguments(sub: argparse._SubParsersAction) -> None:
    judge = sub.add_parser(
        "judge",
        help="agreement of pairwise judges with labelled pairs (accuracy, biases), side by side",
        description="Judge labelled pairs (her_genrm.LabelledPair jsonl) with each --judge in turn, one model "
        "loaded at a time, and compare them: accuracy with 95% Wilson CIs, by flaw kind and label pattern, "
        "swap consistency, first-slot and prefer-longer rates, ties, errors. Writes verdicts_NAME.jsonl, "
        "metrics.json, report.md and charts into --out.",
    )
    judge.add_argument("--pairs", required=True,
                       help="jsonl of her_genrm.LabelledPair records (e.g. hard negatives from the data builder)")
    judge.add_argument(
        "--judge", dest="judges", action="append", required=True, metavar="NAME=MODEL",
        help="a judge to evaluate (repeatable): MODEL is the bundled id, an HF folder (e.g. from her train "
        "genrm; its her_judge.json card picks the prompt) or what --engine takes",
    )
    judge.add_argument("--out", required=True, help="output folder (report.md, metrics.json, verdicts_*.jsonl, PNGs)")
    judge.add_argument("--mode", choices=["fast", "cot"], default="fast", help="judge mode (default fast)")
    judge.add_argument("--swap", action=argparse.BooleanOptionalAction, default=True,
                       help="judge both presentation orders (default on)")
    judge.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    judge.add_argument("--batch-size", type=int, default=16, help="pairs per engine call (default 16)")
    judge.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_arguments(judge.add_argument_group("engine (every judge)"), exclude={"model"})
    judge.set_defaults(_run_eval=_run_judge)


def run(args: argparse.Namespace) -> int:
    return int(args._run_eval(args))


def _run_coser(args: argparse.Namespace) -> int:
    return asyncio.run(_coser(args))


async def _coser(args: argparse.Namespace) -> int:
    from her_genrm import TranscriptScorer, TranscriptScorerConfig

    from ._api import evaluate_coser
    from ._remote import RemoteScorerOptions, RemoteTranscriptScorer
    from ._runner import EvalConfig
    from ._simulate import SimulationConfig

    try:
        sim = SimulationConfig(
            max_rounds=args.max_rounds,
            min_end_round=args.min_end_round,
            actor_max_tokens=args.actor_max_tokens,
            env_max_tokens=args.env_max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
        )
        judge_cfg = TranscriptScorerConfig(
            max_tokens=args.judge_max_tokens,
            max_flaws=args.max_flaws,
            max_instance_chars=args.max_instance_chars,
            attempts=args.judge_attempts,
        )
    except ValueError as exc:
        raise SystemExit(f"her eval coser: {exc}") from None
    try:  # read the test file before loading any model: a bad file should fail fast
        scenes = load_scenes(args.test_file)
    except SceneLoadError as exc:
        raise SystemExit(f"her eval coser: {exc}") from None
    actor_settings = engine_settings_from_args(args)
    actor = build_engine_or_exit(actor_settings)
    owned: list = [actor]
    try:
        if args.judge_url:
            judge = RemoteTranscriptScorer(
                args.judge_url,
                api_key=args.judge_key,
                options=RemoteScorerOptions(
                    max_tokens=judge_cfg.max_tokens,
                    max_flaws=judge_cfg.max_flaws,
                    max_instance_chars=judge_cfg.max_instance_chars,
                ),
            )
            owned.append(judge)
            judge_name = "rm_server"
        else:
            judge_settings = engine_settings_from_args(args, prefix="judge-", inherit="")
            same = judge_settings == actor_settings
            judge_engine = actor if same else build_engine_or_exit(judge_settings, prefix="judge-")
            if judge_engine is not actor:
                owned.append(judge_engine)
            judge = TranscriptScorer(judge_engine, judge_cfg)
            judge_name = f"{getattr(judge_engine, 'kind', 'engine')}:{judge_engine.model_id}"
        config = EvalConfig(
            out_dir=Path(args.out),
            runs=args.runs,
            concurrency=args.concurrency,
            judge_concurrency=args.judge_concurrency,
            simulation=sim,
            progress=not args.no_progress,
            identity={
                "actor": f"{getattr(actor, 'kind', 'engine')}:{actor.model_id}",
                "judge": judge_name,
                "judge_settings": {
                    "max_tokens": judge_cfg.max_tokens,
                    "max_flaws": judge_cfg.max_flaws,
                    "max_instance_chars": judge_cfg.max_instance_chars,
                    "attempts": judge_cfg.attempts,
                },
            },
        )
        try:
            results, outcome = await evaluate_coser(
                scenes, actor=actor, judge=judge, config=config, limit=args.limit
            )
        except ValueError as exc:  # duplicate samples, a folder holding another evaluation, bad --limit
            raise SystemExit(f"her eval coser: {exc}") from None
    finally:
        for thing in reversed(owned):
            await thing.aclose()
    avg = results["summary"]["average"]
    ci = f" ± {avg['ci95']:.2f}" if avg["ci95"] is not None else ""
    mean = "n/a" if avg["mean"] is None else f"{avg['mean']:.2f}{ci}"
    print(
        f"average score {mean} over {results['samples_ok']} ok samples "
        f"({results['samples_error']} judge errors, {len(outcome.failed)} failed); "
        f"report: {Path(args.out) / 'report.md'}"
    )
    return 1 if outcome.failed else 0


def _run_judge(args: argparse.Namespace) -> int:
    return asyncio.run(_judge(args))


async def _judge(args: argparse.Namespace) -> int:
    from ._judge_eval import JudgeEvalConfig, JudgeSpec, evaluate_judges, load_labelled_pairs

    try:  # check everything before loading any model
        judges = [JudgeSpec.parse(text) for text in args.judges]
        pairs = load_labelled_pairs(args.pairs, limit=args.limit)
        config = JudgeEvalConfig(
            out_dir=Path(args.out),
            mode=args.mode,
            swap=args.swap,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            engine_settings=engine_settings_from_args(args),
            pairs_file=str(args.pairs),
        )
        summary = await evaluate_judges(pairs, judges, config, build=build_engine_or_exit)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"her eval judge: {exc}") from None
    for j in summary["judges"]:
        m = j["metrics"]
        acc = m["accuracy"]
        shown = "n/a" if acc["value"] is None else f"{acc['value']:.3f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}]"
        print(f"{j['name']}: accuracy {shown} over {m['judged_ok']}/{m['pairs']} pairs judged ok, "
              f"{m['errors']['hits']} errors")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
