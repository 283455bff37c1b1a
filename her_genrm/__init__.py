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
    OUTCOME_SCORE,
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
from ._transcript import (
    DIMENSION_TITLES,
    FLAW_TYPES,
    MAX_INSTANCE_CHARS,
    TRANSCRIPT_DIMENSIONS,
    DimensionResult,
    Flaw,
    TranscriptDimension,
    TranscriptScore,
    TranscriptScorer,
    TranscriptScorerConfig,
    build_transcript_judge_prompt,
    count_actor_rounds,
    flaw_schema,
    parse_flaws,
    public_text,
    render_transcript,
    transcript_score,
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
    "MAX_INSTANCE_CHARS",
    "OUTCOME_SCORE",
    "DIMENSION_TITLES",
    "FAST_CHOICES",
    "FLAW_TYPES",
    "FORMAT_BREAKING_CODES",
    "TRANSCRIPT_DIMENSIONS",
    "CompactTemplate",
    "Comparison",
    "DimensionResult",
    "Flaw",
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
    "TranscriptDimension",
    "TranscriptScore",
    "TranscriptScorer",
    "TranscriptScorerConfig",
    "Usage",
    "Verdict",
    "Winner",
    "build_transcript_judge_prompt",
    "count_actor_rounds",
    "flaw_schema",
    "format_violations",
    "judge",
    "judge_file",
    "parse_compact",
    "parse_flaws",
    "parse_her_rm",
    "pattern_of",
    "public_text",
    "render_context",
    "render_transcript",
    "rollout_reward",
    "round_robin_pairs",
    "transcript_score",
    "verdict_reward",
    "win_rates",
]
