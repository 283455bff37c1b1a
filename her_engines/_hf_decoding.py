"""The per-row parts of batched decoding in the transformers engine: seeded sampling, stop strings,
grammar masks and logprob recording, as logits processors and a stopping criterion that act on one row
each, so requests with different settings share one ``model.generate`` batch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from ._types import GenRequest, TokenLogprobs


def sample_index(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Draw one index from softmax(logits / temperature), restricted to the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token while the mass before it is below top_p, so the first token always stays.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def seeded_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@dataclass
class Prepared:
    """One request after rendering and checks, ready for the model."""

    index: int
    req: GenRequest
    ids: list[int]
    grammar: Any = None  # xgrammar.CompiledGrammar for json_schema requests
    choice_ids: list[list[int]] = field(default_factory=list)


class RowStop(StoppingCriteria):
    """Per-row stop: end-of-sequence token, a stop string, or the row's own max_tokens.

    Records why and after how many new tokens each row finished (`done`), which is what the
    result's text and finish_reason are cut from.
    """

    def __init__(self, rows: list[Prepared], prompt_len: int, eos: set[int], tokenizer: Any) -> None:
        self.rows = rows
        self.prompt_len = prompt_len
        self.eos = eos
        self.tokenizer = tokenizer
        self.done: list[tuple[int, str] | None] = [None] * len(rows)
        # A stop string of n characters spans at most n tokens; a few more absorb tokens that decode
        # to nothing on their own (partial UTF-8 bytes).
        self.windows = [max((len(s) for s in p.req.stop), default=0) + 4 for p in rows]

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        n_new = input_ids.shape[1] - self.prompt_len
        for i, p in enumerate(self.rows):
            if self.done[i] is not None:
                continue
            if int(input_ids[i, -1]) in self.eos:
                self.done[i] = (n_new, "eos")
            elif p.req.stop and self._hit_stop(input_ids[i, self.prompt_len :], p.req.stop, self.windows[i]):
                self.done[i] = (n_new, "stop")
            elif n_new >= p.req.max_tokens:
                self.done[i] = (n_new, "length")
        done = torch.tensor([d is not None for d in self.done], dtype=torch.bool, device=input_ids.device)
        return done  # type: ignore[return-value]  # transformers annotates a BoolTensor it never constructs

    def _hit_stop(self, new_ids: torch.Tensor, stops: list[str], window: int) -> bool:
        tail = self.tokenizer.decode(new_ids[-window:].tolist(), skip_special_tokens=True)
        return any(s in tail for s in stops)


class GrammarMask(LogitsProcessor):
    """Masks each constrained row's logits with its own xgrammar matcher; other rows pass through.

    Works like ``xgrammar.contrib.hf.LogitsProcessor`` but allows unconstrained rows in the same
    batch and rows that our stopping criterion has already finished (they receive pad tokens).
    """

    def __init__(self, grammars: list[Any], vocab_size: int, stop: RowStop) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
        self.rows = [i for i, m in enumerate(self.matchers) if m is not None]
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
        self.vocab_size = vocab_size
        self.stop = stop
        self.first_call = True

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        active = []
        for i in self.rows:
            matcher = self.matchers[i]
            assert matcher is not None  # rows are the requests with a grammar
            if self.stop.done[i] is not None or matcher.is_terminated():
                continue
            # The first call sees only the prompt; later calls see the token chosen last step.
            if not self.first_call and not matcher.accept_token(int(input_ids[i, -1])):
                raise RuntimeError(f"grammar rejected token {int(input_ids[i, -1])} that it allowed")
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(self.bitmask, i)
                active.append(i)
        self.first_call = False
        if active:
            self.xgr.apply_token_bitmask_inplace(
                scores, self.bitmask, vocab_size=self.vocab_size, indices=active
            )
        return scores


class RowSampler(LogitsProcessor):
    """Samples the rows with temperature > 0 from their own generators and leaves a one-hot score.

    `generate` then runs greedy (argmax), which picks exactly our sample for those rows and the
    argmax for greedy rows.
    """

    def __init__(self, rows: list[Prepared]) -> None:
        self.sampled = [(i, p.req.temperature, p.req.top_p, seeded_generator(p.req.seed))
                        for i, p in enumerate(rows) if p.req.temperature > 0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, temperature, top_p, gen in self.sampled:
            token = sample_index(scores[i], temperature, top_p, gen)
            scores[i].fill_(-math.inf)
            scores[i, token] = 0.0
        return scores


class TokenLogprobRecorder(LogitsProcessor):
    """Keeps, for rows that asked for `logprobs`, each step's top-k alternatives (scored after the
    grammar mask, before a row's sampling) and the log-probability of the token then chosen.

    The chosen token is only known one step later (it is the last input id of the next call), so the
    previous step's distribution of each such row is kept until then.
    """

    def __init__(self, rows: list[Prepared]) -> None:
        self.k = {i: p.req.logprobs for i, p in enumerate(rows) if p.req.logprobs}
        self.top: dict[int, list[tuple[list[int], list[float]]]] = {i: [] for i in self.k}
        self.chosen: dict[int, list[float]] = {i: [] for i in self.k}
        self._previous: dict[int, torch.Tensor] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, k in self.k.items():
            if i in self._previous:
                self.chosen[i].append(float(self._previous[i][int(input_ids[i, -1])]))
            logprobs = torch.log_softmax(scores[i].float(), dim=-1)
            best = torch.topk(logprobs, k)
            self.top[i].append((best.indices.tolist(), best.values.tolist()))
            self._previous[i] = logprobs
        return scores

    def entries(self, row: int, new_ids: list[int], tokenizer: Any) -> list[TokenLogprobs]:
        chosen = list(self.chosen[row])
        if row in self._previous and len(chosen) < len(new_ids):  # the last step's token
            chosen.append(float(self._previous[row][new_ids[len(chosen)]]))
        out: list[TokenLogprobs] = []
        for token, logprob, (alt_ids, alt_logprobs) in zip(new_ids, chosen, self.top[row], strict=False):
            texts = tokenizer.batch_decode([[a] for a in alt_ids])
            out.append((tokenizer.decode([token]), logprob, list(zip(texts, alt_logprobs, strict=True))))
        return out
