"""The pairwise generative reward model (HER GenRM) as a library.

>>> from her_engines import create_engine
>>> from her_genrm import GenRM, JudgeRequest
>>> genrm = GenRM(create_engine())
>>> [verdict] = await genrm.judge([JudgeRequest(context="User: hi", a="...", b="...")])
"""

from ._api import judge, judge_file
from ._judge import FAST_CHOICES, GenRM, GenRMConfig, pattern_of
from ._rewards import (
    FORMAT_BREAKING_CODES,
    RewardKind,
    format_violations,
    rollout_reward,
    round_robin_pairs,
    verdict_reward,
    win_rates,
)
from ._templates import (
    CompactTemplate,
    HerRMTemplate,
    JudgeOutputError,
    parse_compact,
    parse_her_rm,
    render_context,
)
from ._types import (
    Comparison,
    JudgeRequest,
    Mode,
    OrderResult,
    Pattern,
    TemplateName,
    Usage,
    Verdict,
    Winner,
)

__all__ = [
    "FAST_CHOICES",
    "FORMAT_BREAKING_CODES",
    "Comparison",
    "CompactTemplate",
    "GenRM",
    "GenRMConfig",
    "HerRMTemplate",
    "JudgeOutputError",
    "JudgeRequest",
    "Mode",
    "OrderResult",
    "Pattern",
    "RewardKind",
    "TemplateName",
    "Usage",
    "Verdict",
    "Winner",
    "format_violations",
    "judge",
    "judge_file",
    "parse_compact",
    "parse_her_rm",
    "pattern_of",
    "render_context",
    "rollout_reward",
    "round_robin_pairs",
    "verdict_reward",
    "win_rates",
]
