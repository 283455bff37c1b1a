"""`her eval coser`: CoSER given-circumstance acting with the model under test, scored by a flaw judge.

    her eval coser --test-file FILE --out DIR [--engine ...] [--max-rounds N] [--runs K] [--judge-url URL]
                   [--protocol coser|her] [--actor-format her|coser|plain] [--env-model M] [--nsp-model M]

The judge is a local engine (by default the model under test itself) or, with ``--judge-url``, a
running rm_server (``POST /v1/score/transcript``). Environment and the next-speaker predictor default
to the model under test; CoSER plays them with fixed models (GPT-4o, GPT-4o-mini), so scores compare
with CoSER's (or across actors) only when ``--env-*``/``--nsp-*`` name the same models. Rerunning the
same command resumes, mid-sample too.

`her eval judge`: agreement of one or more pairwise judges with labelled pairs, side by side.

    her eval judge --pairs PAIRS.jsonl --judge base=smollm2-135m-instruct [--judge trained=DIR ...] --out DIR

`her eval policy`: policies' replies on held-out prompts, judged by a running rm_server the way RL rewards them
(win rate against the book's line, head to head), with the validator pass rate, length and distinct-n.

    her eval policy --prompts runs/policy/grpo/test.jsonl --policy sft=runs/sft --policy rl=runs/rl \
        --judge-url http://127.0.0.1:8000 --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import get_args

from her_cli._engine_args import add_engine_arguments, build_engine_or_exit, engine_settings_from_args
from her_cli._flags import add_model_arguments, model_values
from her_engines import Engine, EngineSettings
from her_genrm import SCORING_PROTOCOLS, Mode, TranscriptScorerConfig, api_key_from_env
from her_roleplay import REPLY_FORMATS, SceneLoadError, load_scenes

# The flaw judge's options as `her eval coser` flags (the protocol comes from --protocol).
JUDGE_OPTIONS = ("max_tokens", "max_flaws", "max_instance_chars", "attempts")
JUDGE_FLAGS = {"max_tokens": "--judge-max-tokens", "attempts": "--judge-attempts"}
JUDGE_DEST = "flaw_judge_"


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
    coser.add_argument("--concurrency", type=int, default=4,
                       help="samples in flight at once; their requests share the engine's batches (default 4)")
    coser.add_argument(
        "--judge-concurrency", type=int, default=2, help="transcripts judged at once (default 2)"
    )
    coser.add_argument("--no-progress", action="store_true", help="no progress bars")
    coser.add_argument(
        "--protocol", choices=SCORING_PROTOCOLS, default="coser",
        help="coser (default): CoSER's ending rule (<END CHAT> from the 6th line), greedy actors and "
        "narrator, CoSER's judge rules; her: this project's earlier rules (end from the 5th line, "
        "temperature 0.7, top-p 0.95). Explicit flags below override the protocol's values",
    )

    g = coser.add_argument_group("model under test")
    add_engine_arguments(g)
    g.add_argument(
        "--actor-format", choices=REPLY_FORMATS, default="her",
        help="how actors are asked to write: her (HER tags after a <system_thinking> plan; default), "
        "coser ([thought] (action) speech) or plain (speech only, e.g. a chat model as a baseline)",
    )
    g.add_argument("--max-rounds", type=int, default=20, help="lines per re-enactment at most (default 20)")
    g.add_argument("--min-end-round", type=int, default=None,
                   help="the scene may end once this many lines are written (coser 6, her 5)")
    g.add_argument("--actor-max-tokens", type=int, default=None, help="token limit of an actor reply (512)")
    g.add_argument("--env-max-tokens", type=int, default=None, help="token limit of an Environment line (160)")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature of actors and Environment, seeded per sample (coser 0, her 0.7)")
    g.add_argument("--top-p", type=float, default=None, help="(coser 1.0, her 0.95)")

    e = coser.add_argument_group("Environment (narrator); unset flags take the model under test's values")
    add_engine_arguments(e, prefix="env-", inherit="")
    n = coser.add_argument_group("next-speaker predictor; unset flags take the model under test's values")
    add_engine_arguments(n, prefix="nsp-", inherit="")

    j = coser.add_argument_group("judge")
    j.add_argument("--judge-url", default=None,
                   help="score on this rm_server instead of a local engine (several comma-separated: failover)")
    j.add_argument(
        "--judge-key",
        default=None,
        help="Bearer key for --judge-url (default: env RM_API_KEY, the name the server reads too)",
    )
    add_engine_arguments(j, prefix="judge-", inherit="")
    add_model_arguments(j, TranscriptScorerConfig, names=JUDGE_OPTIONS, flags=JUDGE_FLAGS, dest_prefix=JUDGE_DEST,
                        note=_judge_option_default)
    coser.set_defaults(_run_eval=_run_coser)
    _add_judge_arguments(sub)
    _add_policy_arguments(sub)


def _add_policy_arguments(sub: argparse._SubParsersAction) -> None:
    policy = sub.add_parser(
        "policy", help="policies' replies on held-out prompts, judged by a served GenRM (win rate vs the book)",
        description="Each --policy answers every prompt of a GRPO row file (one model loaded at a time); a running "
        "rm_server judges each reply against the book's line as RL's reference reward does (both orders; win 1, "
        "tie 0.5, loss 0) and the first policy head to head against each other. Writes samples_NAME.jsonl and "
        "metrics.json into --out.")
    policy.add_argument("--prompts", required=True, help="GRPO rows (`her build policy` grpo/test.jsonl)")
    policy.add_argument("--policy", dest="policies", action="append", required=True, metavar="NAME=MODEL",
                        help="a policy to sample (repeatable): bundled id or HF folder (e.g. `her train` output)")
    policy.add_argument("--judge-url", required=True, help="the rm_server that judges (several comma-separated: "
                        "failover)")
    policy.add_argument("--judge-mode", choices=get_args(Mode), default="fast")
    policy.add_argument("--out", required=True, help="output folder (metrics.json, samples_NAME.jsonl)")
    policy.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    policy.add_argument("--max-tokens", type=int, default=160, help="longest reply a policy writes (default 160)")
    policy.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    policy.add_argument("--seed", type=int, default=0)
    add_engine_arguments(policy.add_argument_group("engine (every policy)"), exclude={"model"})
    policy.set_defaults(_run_eval=_run_policy)


def _run_policy(args: argparse.Namespace) -> int:
    from ._policy_eval import PolicyEvalConfig, PolicySpec, evaluate_policies

    try:
        config = PolicyEvalConfig(prompts=Path(args.prompts), policies=[PolicySpec.parse(p) for p in args.policies],
                                  judge_url=args.judge_url, out_dir=Path(args.out), judge_mode=args.judge_mode,
                                  limit=args.limit, max_tokens=args.max_tokens, temperature=args.temperature,
                                  seed=args.seed)
        settings = engine_settings_from_args(args)
        summary = evaluate_policies(
            config, lambda model: build_engine_or_exit(settings.model_copy(update={"model": model})))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"her eval policy: {exc}") from None
    for name, m in summary["policies"].items():
        win = m["win_rate_vs_book"]
        shown = "n/a" if win["rate"] is None else f"{win['rate']:.3f}" + (
            f" [{win['ci95'][0]:.3f}, {win['ci95'][1]:.3f}]" if win["ci95"] else "")
        print(f"{name}: win rate vs the book {shown} ({win['judged']} judged, {win['errors']} errors); format pass "
              f"{m['format_pass_rate']}, mean words {m['mean_words']}, distinct-2 {m['distinct_2']}")
    for name, duel in summary["head_to_head"].items():
        print(f"{name}: {duel['rate']} over {duel['judged']} prompts")
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    return 0


def _judge_option_default(name, field) -> str:
    if name == "max_tokens":
        return "default: what --max-flaws flaws of --max-instance-chars can take, at most 1024"
    return f"default: {field.default}"


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
    judge.add_argument("--mode", choices=get_args(Mode), action="append", dest="modes",
                       help="judge mode; repeat to evaluate each judge in several modes while it is loaded "
                            "(default fast)")
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


def judge_token_budget(max_flaws: int, max_instance_chars: int, ceiling: int = 1024) -> int:
    """Tokens a full flaw list can need: per flaw its instance (~3 characters a token, JSON escapes
    included), the type name, severity and JSON punctuation; plus the object around them."""
    per_flaw = -(-max_instance_chars // 3) + 32
    return min(ceiling, 24 + max_flaws * per_flaw)


async def _coser(args: argparse.Namespace) -> int:
    from her_genrm import TranscriptJudgeOptions, TranscriptScorer

    from ._api import evaluate_coser
    from ._remote import RemoteTranscriptScorer
    from ._runner import EvalConfig, TranscriptJudge
    from ._simulate import SimulationConfig

    try:
        sim = SimulationConfig(
            protocol=args.protocol,
            actor_format=args.actor_format,
            max_rounds=args.max_rounds,
            min_end_round=args.min_end_round,
            actor_max_tokens=args.actor_max_tokens,
            env_max_tokens=args.env_max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
        )
        chosen = model_values(args, TranscriptScorerConfig, names=JUDGE_OPTIONS, dest_prefix=JUDGE_DEST)
        judge_cfg = TranscriptScorerConfig(protocol=args.protocol, **chosen)
        if "max_tokens" not in chosen:
            judge_cfg = judge_cfg.model_copy(update={
                "max_tokens": judge_token_budget(judge_cfg.max_flaws, judge_cfg.max_instance_chars)})
    except ValueError as exc:
        raise SystemExit(f"her eval coser: {exc}") from None
    try:  # read the test file before loading any model: a bad file should fail fast
        scenes = load_scenes(args.test_file)
    except SceneLoadError as exc:
        raise SystemExit(f"her eval coser: {exc}") from None
    actor_settings = engine_settings_from_args(args)
    env_settings = engine_settings_from_args(args, prefix="env-", inherit="")
    nsp_settings = engine_settings_from_args(args, prefix="nsp-", inherit="")
    judge_settings = None if args.judge_url else engine_settings_from_args(args, prefix="judge-", inherit="")
    loaded: list[tuple[EngineSettings, Engine]] = []  # one load per distinct model setting

    def engine_for(settings: EngineSettings, prefix: str = "") -> Engine:
        for known, eng in loaded:
            if known == settings:
                return eng
        eng = build_engine_or_exit(settings, prefix=prefix)
        loaded.append((settings, eng))
        return eng

    def name(eng: Engine) -> str:
        return f"{eng.kind}:{eng.model_id}"

    owned: list[RemoteTranscriptScorer] = []  # clients to close besides the engines
    try:
        actor = engine_for(actor_settings)
        env = engine_for(env_settings, "env-")
        nsp = engine_for(nsp_settings, "nsp-")
        judge: TranscriptJudge
        if args.judge_url:
            remote = RemoteTranscriptScorer(
                args.judge_url,
                api_key=args.judge_key or api_key_from_env(),
                options=TranscriptJudgeOptions(**judge_cfg.model_dump(include=set(TranscriptJudgeOptions.model_fields))),
            )
            owned.append(remote)
            judge, judge_name = remote, "rm_server"
        else:
            assert judge_settings is not None  # read with the other flags, before any model loads
            judge_engine = engine_for(judge_settings, "judge-")
            judge = TranscriptScorer(judge_engine, judge_cfg)
            judge_name = name(judge_engine)
        config = EvalConfig(
            out_dir=Path(args.out),
            runs=args.runs,
            concurrency=args.concurrency,
            judge_concurrency=args.judge_concurrency,
            simulation=sim,
            progress=not args.no_progress,
            env_engine=env,
            nsp_engine=nsp,
            identity={
                "actor": name(actor),
                "environment": name(env),
                "predictor": name(nsp),
                "judge": judge_name,
                "judge_settings": judge_cfg.model_dump(include={*JUDGE_OPTIONS, "protocol"}),
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
        for _settings, eng in reversed(loaded):
            await eng.aclose()
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
            modes=tuple(dict.fromkeys(args.modes or ["fast"])),
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
        cal = m["calibration"]
        ece = "n/a" if cal["ece"] is None else f"{cal['ece']:.3f}"
        print(f"{j['name']}: accuracy {shown} over {m['judged_ok']}/{m['pairs']} pairs judged ok, "
              f"{m['errors']['hits']} errors; calibration ECE {ece}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
