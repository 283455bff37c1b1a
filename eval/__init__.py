"""CoSER-style evaluation of a role-play model (given-circumstance acting plus a flaw-list judge), and
agreement of pairwise judges with labelled pairs.

>>> from eval import EvalConfig, evaluate_coser
>>> results, outcome = await evaluate_coser("test_set.json", actor=engine, judge=scorer,
...                                         config=EvalConfig(out_dir="runs/coser"))
>>> from eval import JudgeEvalConfig, JudgeSpec, evaluate_judges, load_labelled_pairs
>>> summary = await evaluate_judges(load_labelled_pairs("pairs.jsonl"), [JudgeSpec("base", "smollm2-135m-instruct")],
...                                 JudgeEvalConfig(out_dir="runs/judge"))

The command lines are ``her eval coser`` and ``her eval judge`` (see ``eval.cli``).
"""

from ._agreement import (
    Rate,
    accuracy,
    accuracy_by,
    accuracy_errors_as_wrong,
    agreement_metrics,
    calibration,
    error_rate,
    first_slot_win_rate,
    prefer_longer_rate,
    swap_consistency,
    tie_rate,
    wilson_interval,
)
from ._api import evaluate_coser
from ._judge_eval import (
    JudgeEvalConfig,
    JudgeSpec,
    evaluate_judges,
    judge_labelled_pairs,
    load_labelled_pairs,
    read_verdict_records,
)
from ._judge_report import write_judge_report
from ._remote import RemoteScoringError, RemoteTranscriptScorer
from ._report import mean_ci, write_report
from ._runner import EvalConfig, MeteredEngine, RunOutcome, TranscriptJudge, run_eval
from ._simulate import Fallback, SimLine, Simulation, SimulationConfig, simulate
from ._textmetrics import bleu, rouge_l
from ._turns import END_CHAT, resolve_next_speaker

__all__ = [
    "END_CHAT",
    "EvalConfig",
    "Fallback",
    "JudgeEvalConfig",
    "JudgeSpec",
    "MeteredEngine",
    "Rate",
    "RemoteScoringError",
    "RemoteTranscriptScorer",
    "RunOutcome",
    "SimLine",
    "Simulation",
    "SimulationConfig",
    "TranscriptJudge",
    "accuracy",
    "accuracy_by",
    "accuracy_errors_as_wrong",
    "agreement_metrics",
    "bleu",
    "calibration",
    "error_rate",
    "evaluate_coser",
    "evaluate_judges",
    "first_slot_win_rate",
    "judge_labelled_pairs",
    "load_labelled_pairs",
    "mean_ci",
    "prefer_longer_rate",
    "read_verdict_records",
    "resolve_next_speaker",
    "rouge_l",
    "run_eval",
    "simulate",
    "swap_consistency",
    "tie_rate",
    "wilson_interval",
    "write_judge_report",
    "write_report",
]
