"""The one verdict schema shared by the judge library, rm_server, data_builder and eval."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from her_engines import ChatMessage

Mode = Literal["cot", "fast"]
TemplateName = Literal["compact", "her-rm"]
Winner = Literal["a", "b", "tie"]
Pattern = Literal["all_a", "all_b", "mixed", "tie"]
Status = Literal["ok", "error"]
# hard_negative: a real line against a corrupted copy (data_builder/_negatives.py); teacher: two policy samples
# judged by a teacher; policy_sample / wrong_moment: the book's line against a policy sample of the same turn /
# the same character's line from another moment (data_builder/_rollout_pairs.py).
PairSource = Literal["hard_negative", "teacher", "policy_sample", "wrong_moment"]


class JudgeRequest(BaseModel):
    """One pair to judge. `context` is chat messages (the conversation before the reply) or plain text."""

    context: list[ChatMessage] | str
    a: str
    b: str
    mode: Mode = "cot"
    template: TemplateName = "compact"
    swap: bool = True
    seed: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="carried through untouched")


class Comparison(BaseModel):
    principle: str
    winner: Winner
    reason: str = ""
    a_performance: str = Field("", description="how candidate a did on this principle (judges that write it)")
    b_performance: str = Field("", description="how candidate b did on this principle")


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            calls=self.calls + other.calls,
        )


class OrderResult(BaseModel):
    """The judge's answer for one presentation order. Winners are mapped back to a/b
    (so `winner="a"` means candidate a won, whichever slot it was shown in)."""

    a_first: bool
    status: Status
    winner: Winner | None = None
    p_a: float | None = None
    probs: dict[Winner, float] | None = Field(None, description="fast mode: P(a wins), P(b wins), P(tie)")
    principles: list[str] = Field(default_factory=list)
    comparisons: list[Comparison] = Field(default_factory=list)
    pattern: Pattern | None = None
    raw: str | None = None
    error: str | None = None
    parse: Literal["json", "regex"] | None = Field(
        None, description='cot: how the answer was read; "regex": not valid JSON, its verdict read as HER reads it')
    usage: Usage = Field(default_factory=Usage)


class Verdict(BaseModel):
    """The judgment of one pair. `verdict`/`p_a` are None when `status == "error"`."""

    id: str | int | None = Field(None, description="the caller's id of the pair, echoed back")
    verdict: Winner | None = None
    p_a: float | None = None
    consistent: bool | None = None
    status: Status = "ok"
    error: str | None = None
    pattern: Pattern | None = None
    principles: list[str] = Field(default_factory=list)
    comparisons: list[Comparison] = Field(default_factory=list)
    orders: list[OrderResult] = Field(default_factory=list)
    mode: Mode = "cot"
    template: TemplateName = "compact"
    cached: bool = False
    model: str = ""
    template_hash: str = ""
    principle_set_hash: str = ""
    usage: Usage = Field(default_factory=Usage)
    latency_ms: float | None = None


class LabelledPair(BaseModel):
    """A pair whose better reply is known: GenRM training data and the yardstick of `her eval judge`.

    Winners name the caller's candidates (``a``/``b``), never presentation slots, so one record
    yields both presentation orders. ``comparisons`` are the per-principle outcomes that support
    ``label`` (for a hard negative: the flaw the corrupted reply commits, known by construction).
    """

    id: str
    context: list[ChatMessage] | str
    a: str
    b: str
    label: Winner
    comparisons: list[Comparison] = Field(default_factory=list)
    pattern: Pattern | None = None
    source: PairSource
    flaw_kind: str | None = Field(None, description="the corruption applied, for hard negatives")
    book: str | None = None
    scene_id: str | None = None
    turn: int | None = None
    character: str | None = None
