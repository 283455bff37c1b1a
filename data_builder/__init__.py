"""HER data building, one module per step:

- CoSER book-level files and test scenes → scenes with stable ids (``load_sources``, :mod:`._books`);
- reverse synthesis with a teacher model (role-thinking augmentation, system-thinking construction,
  setting completion), resumable: ``synthesize`` / ``her build synth`` (:mod:`._stages`, :mod:`._synth`);
- policy data: SFT/GRPO/verl rows per turn, grouped splits (``build_policy_data``, :mod:`._policy`);
- GenRM pairs: principle-grounded hard negatives (``hard_negatives``, :mod:`._negatives`) and
  teacher-labelled pairs mixed by pattern (``teacher_pairs``, ``balance_labelled``, :mod:`._teacher_pairs`);
  rollout-shaped pairs, the book's line against a policy sample or a line from another moment
  (``policy_sample_pairs``, ``wrong_moment_pairs``, :mod:`._rollout_pairs`).
"""

from ._books import LoadReport, evaluation_keys, load_book, load_sources, scenes_for_pairs
from ._negatives import FLAW_KINDS, hard_negatives, judge_context
from ._pairs import DEFAULT_MIX, MixConfig, balance, flip
from ._policy import PolicyData, SplitConfig, TurnSample, build_policy_data, export_policy_data, turn_samples
from ._rollout_pairs import ROLLOUT_FAMILIES, policy_sample_pairs, wrong_moment_pairs
from ._sft import sft_records
from ._stages import SynthSummary, UnitStore, dry_run, synthesize
from ._synth import STAGES, SYNTH_FINDING_CODES, SynthConfig, quote_in_source
from ._teacher_pairs import balance_labelled, teacher_pairs

__all__ = [
    "DEFAULT_MIX",
    "FLAW_KINDS",
    "ROLLOUT_FAMILIES",
    "STAGES",
    "SYNTH_FINDING_CODES",
    "LoadReport",
    "MixConfig",
    "PolicyData",
    "SplitConfig",
    "SynthConfig",
    "SynthSummary",
    "TurnSample",
    "UnitStore",
    "balance",
    "balance_labelled",
    "build_policy_data",
    "dry_run",
    "evaluation_keys",
    "export_policy_data",
    "flip",
    "hard_negatives",
    "judge_context",
    "load_book",
    "load_sources",
    "policy_sample_pairs",
    "quote_in_source",
    "scenes_for_pairs",
    "sft_records",
    "synthesize",
    "teacher_pairs",
    "turn_samples",
    "wrong_moment_pairs",
]
