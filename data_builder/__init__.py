"""HER data building: policy data (SFT/GRPO/verl rows per turn, grouped splits) and balanced
preference pairs.

Reverse synthesis with a teacher model (role-thinking augmentation, system-thinking construction,
setting completion): ``synthesize`` / ``her build synth`` (:mod:`data_builder._stages`).
"""

from ._pairs import DEFAULT_MIX, MixConfig, balance, flip
from ._policy import PolicyData, SplitConfig, TurnSample, build_policy_data, export_policy_data, turn_samples
from ._sft import sft_records
from ._stages import SynthSummary, UnitStore, dry_run, synthesize
from ._synth import STAGES, SYNTH_FINDING_CODES, SynthConfig, quote_in_source

__all__ = [
    "DEFAULT_MIX",
    "STAGES",
    "SYNTH_FINDING_CODES",
    "MixConfig",
    "PolicyData",
    "SplitConfig",
    "SynthConfig",
    "SynthSummary",
    "TurnSample",
    "UnitStore",
    "balance",
    "build_policy_data",
    "dry_run",
    "export_policy_data",
    "flip",
    "quote_in_source",
    "sft_records",
    "synthesize",
    "turn_samples",
]
