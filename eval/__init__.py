"""CoSER-style evaluation of a role-play model: given-circumstance acting plus a flaw-list judge.

>>> from eval import EvalConfig, evaluate_coser
>>> results, outcome = await evaluate_coser("test_set.json", actor=engine, judge=scorer,
...                                         config=EvalConfig(out_dir="runs/coser"))

The command line is ``her eval coser`` (see ``eval.cli``).
"""

from ._api import evaluate_coser
from ._remote import RemoteScorerOptions, RemoteScoringError, RemoteTranscriptScorer
from ._report import mean_ci, write_report
from ._runner import EvalConfig, MeteredEngine, RunOutcome, TranscriptJudge, run_eval
from ._simulate import (
    END_CHAT,
    Fallback,
    SimLine,
    Simulation,
    SimulationConfig,
    resolve_next_speaker,
    simulate,
)
from ._textmetrics import bleu, rouge_l

__all__ = [
    "END_CHAT",
    "EvalConfig",
    "Fallback",
    "MeteredEngine",
    "RemoteScorerOptions",
    "RemoteScoringError",
    "RemoteTranscriptScorer",
    "RunOutcome",
    "SimLine",
    "Simulation",
    "SimulationConfig",
    "TranscriptJudge",
    "bleu",
    "evaluate_coser",
    "mean_ci",
    "resolve_next_speaker",
    "rouge_l",
    "run_eval",
    "simulate",
    "write_report",
]
