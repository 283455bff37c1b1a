"""Wire types of every route (request and response bodies). No behaviour here."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from her_engines import ChatMessage
from her_genrm import GroupAggregate, Mode, RewardKind, RewardStrategy, TemplateName, Verdict

# Engines take 64-bit seeds; a larger one fails inside the engine instead of at the door.
Seed = Annotated[int, Field(ge=-(2**63), lt=2**63)]


def _check_unicode(value: Any, where: str = "body") -> None:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer can encode: refuse them here (422)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: text is not valid Unicode (a lone surrogate escape)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_unicode(item, f"{where}[{i}]")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data


class JudgeBody(_Body):
    """One pair: the conversation so far and two candidate next turns. A line of a `her judge` input file
    with these keys posts as it is."""

    id: str | int | None = Field(None, description="your id of the pair; the verdict carries it back")
    context: list[ChatMessage] | str = Field(description="chat messages before the reply, or plain text")
    a: str = Field(description="first candidate reply (system_thinking is stripped before judging)")
    b: str = Field(description="second candidate reply")
    mode: Mode = "cot"
    template: TemplateName = "compact"
    swap: bool = Field(True, description="judge both presentation orders (position debiasing)")
    seed: Seed | None = None
    use_cache: bool = True


class JudgeBatchBody(_Body):
    items: list[JudgeBody] = Field(min_length=1)


class JudgeBatchResponse(BaseModel):
    verdicts: list[Verdict]


Prompt = str | list[ChatMessage]


class RewardsBody(_Body):
    """Rewards for completions, judged against references or inside groups.

    strategy `reference` (HER): each completion vs `references[i]` (both orders).
    strategy `group`: every pair of completions sharing a group id → each member's win rate, or with
    `aggregate: bradley_terry` its expected score under a Bradley–Terry fit of the group's verdicts.
    Default: `group` when `group_ids` is given, else `reference`.
    """

    prompts: list[Prompt] = Field(description="context of each completion (text or chat messages)")
    completions: list[str]
    references: list[str] | None = None
    group_ids: list[str | int] | None = None
    strategy: RewardStrategy | None = None
    aggregate: GroupAggregate = Field("winrate", description="group strategy: winrate or bradley_terry")
    mode: Mode = "cot"
    template: TemplateName = "compact"
    reward: RewardKind = Field("discrete", description="discrete: win 1 / tie 0.5 / loss 0; prob: P(win)")
    format_penalty: float = Field(0.0, ge=0.0, description="subtracted when a completion breaks the tag grammar")

    @model_validator(mode="after")
    def _check(self) -> RewardsBody:
        n = len(self.completions)
        if len(self.prompts) != n:
            raise ValueError(f"prompts has {len(self.prompts)} items but completions has {n}")
        for name in ("references", "group_ids"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} items but completions has {n}")
        strategy = self.resolved_strategy
        if strategy == "reference" and self.references is None:
            raise ValueError("strategy 'reference' needs references (or give group_ids for group rewards)")
        if strategy == "group" and self.group_ids is None:
            raise ValueError("strategy 'group' needs group_ids")
        return self

    @property
    def resolved_strategy(self) -> RewardStrategy:
        return self.strategy or ("group" if self.group_ids is not None else "reference")


class RewardDetail(BaseModel):
    status: Literal["ok", "error"]
    error: str | None = None
    verdicts: list[str | None] = Field(default_factory=list, description="verdict of each judged pair")
    format_violations: list[str] = Field(default_factory=list)
    cached: int = 0


class RewardsResponse(BaseModel):
    rewards: list[float | None]
    status: list[Literal["ok", "error"]]
    details: list[RewardDetail]


class OpenRLHFRewardBody(BaseModel):
    """OpenRLHF remote reward protocol (`--reward.remote_url`), as its `SingleTurnAgentExecutor` posts it.
    Extra keys are ignored. Only a body whose lists cannot be paired is refused (422): an item that cannot
    be judged (empty label, prompt not found in its query) gets a null reward and its reason instead."""

    query: list[str] = Field(description="prompt + response as the trainer decoded them (special tokens kept); "
                                         "a prompt longer than the trainer's budget is cut at its start")
    prompts: list[str] = Field(default_factory=list, description="each sample's whole prompt")
    labels: list[Any] | None = Field(None, description="the reference reply of each sample ('' when OpenRLHF "
                                                       "runs without --data.label_key)")

    @model_validator(mode="after")
    def _check(self) -> OpenRLHFRewardBody:
        if len(self.prompts) != len(self.query):
            raise ValueError(f"prompts has {len(self.prompts)} items but query has {len(self.query)}")
        if self.labels is not None and len(self.labels) != len(self.query):
            raise ValueError(f"labels has {len(self.labels)} items but query has {len(self.query)}")
        return self


class OpenRLHFRewardResponse(BaseModel):
    rewards: list[float | None] = Field(description="per item; null when it could not be judged")
    scores: list[float | None] = Field(description="the same as rewards")
    extra_logs: dict[str, list[Any]] = Field(
        description="judge_ok, judge_outcome, prompt_truncated per item, and judge_error (the reason of each "
                    "null reward, '' for the others) when some item has one")


class TranscriptScoreBody(_Body):
    """A finished CoSER-style simulation to score (filled in by the eval service)."""

    scene: dict[str, Any]
    transcript: list[dict[str, str]]


class InfoResponse(BaseModel):
    model: str
    engine: str
    templates: dict[str, str] = Field(description="template name -> template hash")
    principle_set_hash: str
    principles: int
    batching: str = Field(description="continuous (pairs reach the engine on arrival) or micro (batched)")
    max_batch_size: int
    max_queue: int
    cache: str
    auth: bool
    version: str


class ErrorBody(BaseModel):
    type: str
    message: str
    details: Any = None


class ErrorEnvelope(BaseModel):
    """The one shape of every error response."""

    error: ErrorBody
