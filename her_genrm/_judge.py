"""The pairwise GenRM: principle-guided verdicts in `cot` or `fast` mode, debiased by swapping.

One call to `GenRM.judge` turns every pair into one or two engine requests (both
presentation orders when `swap` is on), sends them to the engine together, and folds the
answers back into one `Verdict` per pair. A failure of one order is that pair's error,
never a default verdict.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from her_engines import Engine, GenRequest, GenResult
from her_roleplay import PrincipleLibrary, default_library, for_judging

from ._rewards import OUTCOME_SCORE
from ._safety import ControlTokens
from ._templates import (
    HER_RM_BASE_TOKENS,
    HER_RM_NO_FAST,
    SLOTS,
    CompactTemplate,
    HerRMTemplate,
    JudgeOutputError,
    JudgeTemplate,
    ParsedJudgment,
    PrincipleDetail,
    Slot,
    fast_request,
    parse_compact,
    parse_her_rm,
    verdict_probabilities,
)
from ._types import Comparison, JudgeRequest, OrderResult, Pattern, Usage, Verdict, Winner

# A fast answer is the verdict value itself: it starts where the generated text starts.
_VALUE_AT_START = re.compile(r"^")


def pattern_of(winners: Sequence[Winner]) -> Pattern | None:
    """HER's judgment pattern from per-principle winners: which side won any principle."""
    if not winners:
        return None
    a_wins, b_wins = "a" in winners, "b" in winners
    if a_wins and b_wins:
        return "mixed"
    if a_wins:
        return "all_a"
    if b_wins:
        return "all_b"
    return "tie"


def _slot_to_winner(slot: Slot, a_first: bool) -> Winner:
    if slot == "tie":
        return "tie"
    return "a" if (slot == "A") == a_first else "b"


def _priced(probs: dict[Slot, float], a_first: bool) -> dict[str, object]:
    """P(a≻b) (a tie counts half) and the outcome distribution in a/b terms, from slot probabilities."""
    by_winner = {_slot_to_winner(slot, a_first): p for slot, p in probs.items()}
    return {"p_a": by_winner["a"] + 0.5 * by_winner["tie"], "probs": by_winner}


@dataclass
class GenRMConfig:
    """Decoding settings of the judge. Changing any of them changes cached verdicts' keys."""

    principle_detail: PrincipleDetail = "id"
    cot_max_tokens: int = CompactTemplate.max_output_tokens()
    her_rm_max_tokens: int | None = None
    """None: sized from each pair's inputs (HER-RM repeats both candidates before judging)."""
    temperature: float = 0.0
    top_p: float = 1.0
    verdict_logprobs: int = 20
    """Alternatives read per token to price the verdict (P(a≻b) in both modes); 0 in cot mode falls
    back to the written verdict's 1 / 0.5 / 0."""

    def sampling(self) -> dict[str, float | int | None]:
        """Every setting (a field added later joins the cache key by itself)."""
        return dataclasses.asdict(self)


@dataclass
class GenRM:
    """A pairwise judge bound to one engine, one principle library and its templates."""

    engine: Engine
    library: PrincipleLibrary = field(default_factory=default_library)
    her_rm_template: HerRMTemplate | None = None
    config: GenRMConfig = field(default_factory=GenRMConfig)

    def __post_init__(self) -> None:
        self.compact = CompactTemplate(self.library, principle_detail=self.config.principle_detail)
        self._known_ids = set(self.library.ids())
        # Request text must never spell a control token of the judge's template (see `_safety`);
        # the engine's own tokenizer, where it exposes one, says which strings are special.
        self.control_tokens = ControlTokens.of(self.engine.tokenizer)

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    def check(self, req: JudgeRequest) -> None:
        """Raise ValueError (the caller's to fix) for a template this judge lacks or a mode it has no
        faithful reading for."""
        if self.template(req.template).name == "her-rm" and req.mode == "fast":
            raise ValueError(HER_RM_NO_FAST)

    def template(self, name: str) -> JudgeTemplate:
        if name == "compact":
            return self.compact
        if name == "her-rm":
            if self.her_rm_template is None:
                raise ValueError("template 'her-rm' needs a template file (her_rm_template / RM_HER_RM_TEMPLATE)")
            return self.her_rm_template
        raise ValueError(f"unknown template {name!r}; expected compact or her-rm")

    # ------------------------------------------------------------------ requests

    def build_requests(self, req: JudgeRequest) -> list[tuple[bool, GenRequest]]:
        """(a_first, engine request) for each presentation order of one pair. Its texts are neutralised
        first: none of them can spell a control token of the judge's template."""
        self.check(req)
        template = self.template(req.template)
        neutralize = self.control_tokens.neutralize
        a, b = neutralize(for_judging(req.a)), neutralize(for_judging(req.b))
        context = self.control_tokens.neutralize_context(req.context)
        orders = [True, False] if req.swap else [True]
        fast = req.mode == "fast"
        out = []
        for a_first in orders:
            first, second = (a, b) if a_first else (b, a)
            messages = template.messages(context, first, second, fast=fast)
            common: dict[str, Any] = {"messages": messages, "seed": req.seed, "temperature": self.config.temperature,
                      "logprobs": self.config.verdict_logprobs or None}
            if fast:
                assert isinstance(template, CompactTemplate)  # check() refuses fast mode for her-rm
                prefill, choices, max_tokens = fast_request(template)
                gen = GenRequest(**common, prefill=prefill, max_tokens=max_tokens, choices=choices)
            elif isinstance(template, CompactTemplate):
                gen = GenRequest(
                    **common,
                    max_tokens=self.config.cot_max_tokens,
                    top_p=self.config.top_p,
                    json_schema=template.output_schema(),
                )
            else:
                # The opening HER-RM would write anyway (the echo of both candidates) is prefilled, not decoded.
                prefill = template.prefill(first, second)
                budget = self.config.her_rm_max_tokens or (
                    HER_RM_BASE_TOKENS if prefill else template.max_output_tokens(first, second))
                gen = GenRequest(**common, prefill=prefill, max_tokens=budget, top_p=self.config.top_p)
            out.append((a_first, gen))
        return out

    # ------------------------------------------------------------------ answers

    def _read_order(self, req: JudgeRequest, a_first: bool, result: GenResult, prefill: str = "") -> OrderResult:
        """One order's answer; `prefill` is the opening of a cot answer that was given rather than decoded."""
        usage = Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens, calls=1)
        text = prefill + result.text if req.mode == "cot" else result.text
        base = {"a_first": a_first, "raw": text, "usage": usage}
        if result.finish_reason == "error":
            return OrderResult(**base, status="error", error=result.error or "engine error")
        template = self.template(req.template)
        if req.mode == "fast":
            probs = self._fast_probabilities(result, template)
            if probs is None:
                return OrderResult(**base, status="error",
                                   error=f"engine returned no usable verdict logprobs: {result.choice_logprobs}")
            best: Slot = max(SLOTS, key=probs.__getitem__)
            return OrderResult(**base, status="ok", **_priced(probs, a_first), winner=_slot_to_winner(best, a_first))
        if result.finish_reason == "length":
            return OrderResult(**base, status="error", error="judge output hit max_tokens before finishing")
        try:
            parsed: ParsedJudgment = (
                parse_compact(text, self._known_ids) if req.template == "compact" else parse_her_rm(text)
            )
        except JudgeOutputError as exc:
            return OrderResult(**base, status="error", error=str(exc))
        winner = _slot_to_winner(parsed.verdict, a_first)
        if self.config.verdict_logprobs:
            probs = verdict_probabilities(result.token_logprobs or [], template.verdict_anchor, template.verdict_values)
            if probs is None:
                return OrderResult(**base, status="error", error="engine returned no logprobs at the verdict")
            priced = _priced(probs, a_first)
        else:
            priced = {"p_a": OUTCOME_SCORE[winner]}
        comparisons = []
        for c in parsed.comparisons:
            a_said, b_said = (c.first_performance, c.second_performance) if a_first else \
                (c.second_performance, c.first_performance)
            comparisons.append(Comparison(principle=c.principle, winner=_slot_to_winner(c.winner, a_first),
                                          reason=c.reason, a_performance=a_said, b_performance=b_said))
        return OrderResult(
            **base,
            **priced,
            status="ok",
            winner=winner,
            parse=parsed.parse,
            principles=list(dict.fromkeys(c.principle for c in comparisons)),
            comparisons=comparisons,
            pattern=pattern_of([c.winner for c in comparisons]),
        )

    @staticmethod
    def _fast_probabilities(result: GenResult, template: JudgeTemplate) -> dict[Slot, float] | None:
        """P(slot) of a fast answer: walked from the token alternatives when the engine lists them
        (values sharing a first token, like cand_1/cand_2, are split where they diverge), else the
        engine's own choice scores (exact on the transformers engine)."""
        if result.token_logprobs:
            probs = verdict_probabilities(result.token_logprobs, _VALUE_AT_START, template.verdict_values)
            if probs is not None:
                return probs
        logprobs = result.choice_logprobs or {}
        slot_of = dict(template.verdict_values)
        if set(logprobs) != set(slot_of) or not all(math.isfinite(v) for v in logprobs.values()):
            return None
        total = sum(math.exp(v) for v in logprobs.values())
        return {slot_of[k]: math.exp(v) / total for k, v in logprobs.items()}

    def combine(self, req: JudgeRequest, orders: list[OrderResult]) -> Verdict:
        """Fold the orders of one pair: mean P(a≻b). cot: disagreeing winners → tie, inconsistent.
        fast: the argmax of the order-averaged P(a), P(b), P(tie) (`consistent` still says whether
        the orders' own argmaxes agreed)."""
        template = self.template(req.template)
        usage = sum((o.usage for o in orders), Usage())
        common = {
            "orders": orders,
            "mode": req.mode,
            "template": req.template,
            "model": self.model_id,
            "template_hash": template.template_hash,
            "principle_set_hash": self.library.version,
            "usage": usage,
        }
        failed = [o for o in orders if o.status != "ok"]
        if failed:
            return Verdict(**common, status="error", error="; ".join(o.error or "error" for o in failed))
        winners = {o.winner for o in orders}
        consistent = len(winners) == 1 if len(orders) > 1 else None
        if req.mode == "fast":
            # fast mode: the most likely outcome of the order-averaged distribution, so a judge's
            # preference for one slot cancels out instead of turning every split decision into a tie
            outcomes: tuple[Winner, ...] = ("a", "b", "tie")
            mean = {w: sum((o.probs or {})[w] for o in orders) / len(orders) for w in outcomes}
            verdict: Winner = max(outcomes, key=mean.__getitem__)
        else:
            verdict = orders[0].winner if len(winners) == 1 else "tie"  # type: ignore[assignment]
        all_comparisons = [c for o in orders for c in o.comparisons]
        return Verdict(
            **common,
            status="ok",
            verdict=verdict,
            p_a=sum(o.p_a or 0.0 for o in orders) / len(orders),
            consistent=consistent,
            pattern=pattern_of([c.winner for c in all_comparisons]),
            principles=list(dict.fromkeys(c.principle for c in all_comparisons)),
            comparisons=orders[0].comparisons,
        )

    # ------------------------------------------------------------------ entry point

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        """Judge every pair; all orders of all pairs go to the engine in one call."""
        started = time.perf_counter()
        plan: list[tuple[int, bool]] = []
        gen_requests: list[GenRequest] = []
        setup_errors: dict[int, str] = {}
        for i, req in enumerate(requests):
            try:
                built = self.build_requests(req)
            except ValueError as exc:
                setup_errors[i] = str(exc)
                continue
            for a_first, gen in built:
                plan.append((i, a_first))
                gen_requests.append(gen)
        results = await self.engine.generate(gen_requests) if gen_requests else []
        if len(results) != len(gen_requests):
            raise RuntimeError(f"engine returned {len(results)} results for {len(gen_requests)} requests")
        per_pair: dict[int, list[OrderResult]] = {}
        for (i, a_first), gen, result in zip(plan, gen_requests, results, strict=True):
            per_pair.setdefault(i, []).append(self._read_order(requests[i], a_first, result, gen.prefill))
        latency_ms = (time.perf_counter() - started) * 1000
        verdicts = []
        for i, req in enumerate(requests):
            if i in setup_errors:
                verdict = Verdict(status="error", error=setup_errors[i], mode=req.mode, template=req.template,
                                  model=self.model_id, principle_set_hash=self.library.version)
            else:
                verdict = self.combine(req, per_pair[i])
            verdict.latency_ms = latency_ms
            verdicts.append(verdict)
        return verdicts
