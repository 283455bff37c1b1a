"""OpenRLHF's remote reward protocol (`--reward.remote_url .../get_reward`) as pure functions.

What OpenRLHF 0.11's ``SingleTurnAgentExecutor`` posts, one rollout per request::

    {"query":   [tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)],
     "prompts": [the dataset prompt, as text (raw ChatML when --data.apply_chat_template)],
     "labels":  [the dataset's --data.label_key value, "" when that flag is omitted]}

So the response keeps the policy's end-of-turn token (``...<|im_end|>``), the prompt is chat markup,
and when the prompt is longer than ``max_len - max_new_tokens`` tokens OpenRLHF keeps only its last
tokens: the query then starts inside the prompt, not with it. It answers ``{rewards, scores,
extra_logs}``; a non-2xx answer is retried 5 times and then the rollout has no reward.

Here each item becomes a pair to judge (context, response vs label) or the reason it cannot be judged;
one bad item never fails the request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from her_engines import ChatMessage
from her_genrm import render_context

EMPTY_LABEL = "empty label (pass --data.label_key)"
NO_LABELS = "no labels sent (pass --data.label_key)"
PROMPT_NOT_FOUND = "the prompt was not found in the query: cannot tell where the response starts"

# End-of-turn / end-of-text strings a policy leaves after its reply (ChatML, Llama 3, Phi, Gemma,
# SentencePiece, gpt-oss, DeepSeek). The service adds the judge tokenizer's own eos.
END_OF_TURN = (
    "<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>",
    "<end_of_turn>", "<eos>", "<|return|>", "<｜end▁of▁sentence｜>",
)
# Tokens that may open a rendered prompt and carry no text.
_BEGIN = ("<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>", "<｜begin▁of▁sentence｜>", "<|endoftext|>")

How = Literal["prefix", "truncated", "suffix"]
"""Where the response was found: after the whole prompt; after the part of a left-truncated prompt
that starts the query; after the longest tail of the prompt found anywhere in the query."""


# --------------------------------------------------------------------------- the response


def split_query(query: str, prompt: str, *, max_skip: int = 8, min_overlap: int = 8) -> tuple[str, How] | None:
    """The response inside `query` (OpenRLHF's decoded prompt + response) and how it was found; None
    when no part of `prompt` can be found to tell where the response starts.

    A left-truncated prompt leaves a tail of `prompt` at the start of the query; decoding from a
    token in the middle may garble up to a few characters before it (a multi-byte character split
    between tokens), so up to `max_skip` characters are skipped. The tail must be at least
    `min_overlap` characters (or the whole prompt, if shorter), so one stray character never matches.
    """
    if query.startswith(prompt):
        return query[len(prompt):], "prefix"
    need = min(min_overlap, len(prompt))
    for skip in range(min(max_skip, len(query)) + 1):
        rest = query[skip:]
        kept = _prompt_tail_opening(rest, prompt, need)
        if kept is not None:
            return rest[kept:], "truncated"
    # The prompt was altered inside (a decode that does not give the text back): the response follows
    # the longest tail of the prompt that the query holds, at its first occurrence.
    tail = _longest_tail_in(query, prompt, max(need, min(2 * min_overlap, len(prompt))))
    if tail is None:
        return None
    return query[query.find(tail) + len(tail):], "suffix"


def _prompt_tail_opening(text: str, prompt: str, need: int) -> int | None:
    """Length of the longest tail of `prompt` (at least `need` characters) that `text` starts with."""
    if need == 0 or len(text) < need:
        return None
    anchor = text[:need]
    start = prompt.find(anchor)
    while start != -1:
        if text.startswith(prompt[start:]):  # the earliest start is the longest tail
            return len(prompt) - start
        start = prompt.find(anchor, start + 1)
    return None


def _longest_tail_in(text: str, prompt: str, need: int) -> str | None:
    """The longest tail of `prompt`, at least `need` characters, that occurs in `text` (every shorter
    tail of an occurring tail occurs too, so a binary search finds it)."""
    if need == 0 or prompt[-need:] not in text:
        return None
    lo, hi = need, len(prompt)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prompt[-mid:] in text:
            lo = mid
        else:
            hi = mid - 1
    return prompt[-lo:]


def strip_end_of_turn(response: str, extra: Iterable[str] = ()) -> str:
    """`response` without the end-of-turn tokens (and the whitespace around them) a policy leaves at its end."""
    tokens = sorted({*END_OF_TURN, *(t for t in extra if t and t.strip())}, key=len, reverse=True)
    text = response
    while True:
        trimmed = text.rstrip()
        token = next((t for t in tokens if trimmed.endswith(t)), None)
        if token is None:
            return response if text is response else trimmed
        text = trimmed[: -len(token)]


# --------------------------------------------------------------------------- the context


@dataclass(frozen=True)
class _ChatFormat:
    turn: re.Pattern[str]  # groups: role, content


_FORMATS = (
    # ChatML (Qwen, SmolLM, ...): <|im_start|>role\ncontent<|im_end|>
    _ChatFormat(re.compile(r"<\|im_start\|>([^\n<]*)\n(.*?)(?:<\|im_end\|>|(?=<\|im_start\|>)|\Z)", re.DOTALL)),
    # Llama 3: <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
    _ChatFormat(re.compile(
        r"<\|start_header_id\|>([^<]*)<\|end_header_id\|>\n*(.*?)(?:<\|eot_id\|>|(?=<\|start_header_id\|>)|\Z)",
        re.DOTALL)),
    # Gemma: <start_of_turn>role\ncontent<end_of_turn>
    _ChatFormat(re.compile(r"<start_of_turn>([^\n<]*)\n(.*?)(?:<end_of_turn>|(?=<start_of_turn>)|\Z)", re.DOTALL)),
)
_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user",
          "assistant": "assistant", "model": "assistant", "gpt": "assistant", "bot": "assistant"}


def parse_chat_markup(prompt: str) -> list[ChatMessage] | None:
    """The chat messages of a prompt rendered with a chat template (ChatML, Llama 3, Gemma), without
    the template's markup; None when `prompt` is not such markup. The open assistant turn a generation
    prompt ends with is dropped; text outside any turn (a BOS token) too, unless it is real text,
    which becomes a user message; roles other than system/user/assistant become user turns that name
    their role."""
    for fmt in _FORMATS:
        turns = list(fmt.turn.finditer(prompt))
        if not turns:
            continue
        messages: list[ChatMessage] = []
        outside = _without_begin(prompt[: turns[0].start()] + "".join(
            prompt[a.end(): b.start()] for a, b in zip(turns, turns[1:], strict=False)))
        if outside:
            messages.append(ChatMessage(role="user", content=outside))
        for turn in turns:
            raw_role, content = turn.group(1).strip(), turn.group(2).strip()
            if not content:
                continue
            role = _ROLES.get(raw_role.lower())
            if role is None:
                role, content = "user", f"[{raw_role}] {content}"
            messages.append(ChatMessage(role=role, content=content))
        return messages or None
    return None


def _without_begin(text: str) -> str:
    for token in _BEGIN:
        text = text.replace(token, "")
    return text.strip()


def judge_context(prompt: str) -> list[ChatMessage] | str:
    """What the judge gets as the conversation: chat messages for chat markup, else the prompt's text."""
    return parse_chat_markup(prompt) or _without_begin(prompt)


def fit_context(context: list[ChatMessage] | str, max_chars: int) -> list[ChatMessage] | str:
    """`context` cut to at most `max_chars` rendered characters, as OpenRLHF cut the policy's prompt:
    the oldest turns go first (a leading system turn stays while another turn is left), then the
    start of the longest turn."""
    if len(render_context(context)) <= max_chars:
        return context
    if isinstance(context, str):
        text = context.strip()
        return "…" + text[len(text) - max(0, max_chars - 1):]
    messages = list(context)
    first = 1 if messages[0].role == "system" else 0  # the oldest turn that may go
    while len(messages) > first + 1 and len(render_context(messages)) > max_chars:
        del messages[first]
    # One turn is left (or a system turn and one more): cut the start of the longest.
    while (excess := len(render_context(messages)) - max_chars) > 0:
        longest = max(range(len(messages)), key=lambda i: len(messages[i].content))
        content = messages[longest].content.strip()
        keep = len(content) - excess - 1
        if keep <= 0:
            if len(messages) == 1:  # a limit smaller than one turn's label: nothing sensible is left
                return messages
            del messages[longest]
            continue
        messages[longest] = messages[longest].model_copy(update={"content": "…" + content[len(content) - keep:]})
    return messages


# --------------------------------------------------------------------------- one item


@dataclass(frozen=True)
class Sample:
    """One OpenRLHF item: the pair to judge (`context`, `response` vs `label`), or why it cannot be."""

    context: list[ChatMessage] | str = ""
    response: str = ""
    label: str = ""
    how: How | None = None
    error: str | None = None

    @property
    def truncated(self) -> bool:
        return self.how not in (None, "prefix")


def prepare_sample(
    query: str,
    prompt: str,
    label: Any,
    *,
    end_of_turn: Iterable[str] = (),
    max_context_chars: int | None = None,
    max_candidate_chars: int | None = None,
) -> Sample:
    """The pair OpenRLHF asks about in one item, or the reason it cannot be judged."""
    if label is None:
        return Sample(error=NO_LABELS)
    if isinstance(label, int | float) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str):
        return Sample(error=f"the label is a {type(label).__name__}, not the reference reply's text")
    if not label.strip():
        return Sample(error=EMPTY_LABEL)
    found = split_query(query, prompt)
    if found is None:
        return Sample(error=PROMPT_NOT_FOUND)
    raw, how = found
    response = strip_end_of_turn(raw, end_of_turn)
    if max_candidate_chars is not None:
        for name, text in (("response", response), ("label", label)):
            if len(text) > max_candidate_chars:
                return Sample(how=how, error=f"the {name} has {len(text)} characters; the limit is "
                                             f"{max_candidate_chars} (RM_MAX_CANDIDATE_CHARS)")
    context = judge_context(prompt)
    if max_context_chars is not None:
        context = fit_context(context, max_context_chars)
    return Sample(context=context, response=response, label=label, how=how)


def prepare_samples(
    query: Sequence[str],
    prompts: Sequence[str],
    labels: Sequence[Any] | None,
    **limits: Any,
) -> list[Sample]:
    label_of = list(labels) if labels is not None else [None] * len(query)
    return [prepare_sample(q, p, lab, **limits) for q, p, lab in zip(query, prompts, label_of, strict=True)]


@dataclass(frozen=True)
class Judged:
    """What the judge said about one prepared item."""

    reward: float | None
    outcome: float | None = None
    error: str | None = None


def reward_response(samples: Sequence[Sample], judged: dict[int, Judged]) -> dict[str, Any]:
    """OpenRLHF's answer: `rewards` = `scores` (null for an item that could not be judged), and
    `extra_logs` of numbers OpenRLHF can log per rollout; `judge_error` (the reason of each null, ""
    for the others) appears only when some item has one, since OpenRLHF turns every extra_logs value
    into a tensor."""
    rewards: list[float | None] = []
    errors: list[str] = []
    outcomes: list[float | None] = []
    for i, sample in enumerate(samples):
        result = judged.get(i)
        if sample.error is not None or result is None:
            rewards.append(None)
            outcomes.append(None)
            errors.append(sample.error or "not judged")
            continue
        rewards.append(result.reward)
        outcomes.append(result.outcome)
        errors.append("" if result.reward is not None else (result.error or "the judge gave no verdict"))
    extra_logs: dict[str, list[Any]] = {
        "judge_ok": [0.0 if r is None else 1.0 for r in rewards],
        "judge_outcome": outcomes,
        "prompt_truncated": [1.0 if s.truncated else 0.0 for s in samples],
    }
    if any(errors):
        extra_logs["judge_error"] = errors
    return {"rewards": rewards, "scores": list(rewards), "extra_logs": extra_logs if samples else {}}


__all__ = [
    "EMPTY_LABEL",
    "END_OF_TURN",
    "NO_LABELS",
    "PROMPT_NOT_FOUND",
    "Judged",
    "Sample",
    "fit_context",
    "judge_context",
    "parse_chat_markup",
    "prepare_sample",
    "prepare_samples",
    "reward_response",
    "split_query",
    "strip_end_of_turn",
]
