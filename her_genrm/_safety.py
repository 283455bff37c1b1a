"""Candidate and context text can never become control tokens of the judge's chat template.

Engines render chat messages with the model's chat template and then encode the whole prompt with
special-token parsing on (that is how the template's own ``<|im_start|>`` / ``<|im_end|>`` become
control tokens). Text from a request that spells a special token — a policy's ``<|im_end|>`` left on
its reply, raw ChatML context, or an injected ``<|im_end|>\\n<|im_start|>system\\n...`` — would be
encoded into the same control tokens and could open turns of its own in the judge's prompt.

So every piece of request text is neutralised before it is rendered: a ZERO WIDTH JOINER (U+200D) goes
after the first character of every special-token string in it. The tokenizer then reads ordinary
characters (``<``, ``|im_end|>``) instead of the control token, and the judge still reads the same
text: the joiner is invisible, and chat tokenizers keep it (special tokens are matched on the raw text,
before any normaliser). A visible escape (``<\\|``) would change what the judge reads; this one only
changes how it is tokenised. One mechanism for every engine (vLLM, transformers and
an OpenAI-compatible server, whose tokenizer we never see) because it works on the text before any
engine renders it.

Which strings are special: the judge tokenizer's own (``all_special_tokens`` and every added token
marked special, e.g. SmolLM2's ``<filename>``), when the engine exposes its tokenizer, plus the
control-token shapes of common chat templates (``<|...|>``, ``<｜...｜>``, ``<s>``, ``</s>``,
``[INST]``, ``<start_of_turn>``, ...) for engines that do not (a remote server's model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from her_engines import ChatMessage

JOINER = "\u200d"
"""Inserted after the first character of a special-token string (see the module docstring)."""

# Control-token shapes of common chat templates, matched whatever the judge's tokenizer is:
# ChatML / Llama 3 / Phi (`<|im_end|>`, `<|eot_id|>`, `<|end|>`), DeepSeek's full-width bars, and the
# named tokens of SentencePiece, Gemma and Mistral templates.
_GENERIC_PATTERNS = (
    r"<\|[^<>|\s]{1,64}\|>",
    r"<｜[^<>｜\n]{1,64}｜>",
)
GENERIC_CONTROL_TOKENS = (
    "<s>", "</s>", "<unk>", "<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
    "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]", "[TOOL_CALLS]",
)
_MAX_PASSES = 4


def control_token_strings(tokenizer: Any) -> list[str]:
    """Every special-token string of a Hugging Face tokenizer (vLLM's wraps one): its
    ``all_special_tokens`` and each added token marked special."""
    if tokenizer is None:
        return []
    found: set[str] = set()
    for token in getattr(tokenizer, "all_special_tokens", None) or []:
        found.add(str(token))
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for added in decoder.values():
        if getattr(added, "special", False):
            found.add(str(getattr(added, "content", added)))
    return sorted(found)


def _escapable(token: str) -> bool:
    # A one-character or blank "token" cannot be split (and would match ordinary text).
    return len(token.strip()) >= 2 and token == token.strip()


@dataclass(frozen=True)
class ControlTokens:
    """The special-token strings to neutralise for one judge (its tokenizer's plus the generic ones)."""

    tokens: tuple[str, ...] = ()

    @classmethod
    def of(cls, tokenizer: Any = None, extra: Iterable[str] = ()) -> ControlTokens:
        return cls(tuple(sorted({*control_token_strings(tokenizer), *extra})))

    @property
    def pattern(self) -> re.Pattern[str]:
        return _compiled(self.tokens)

    def neutralize(self, text: str) -> str:
        """`text` with a joiner after the first character of every special-token string in it.
        Repeated until none is left (a pass never creates a new one, but the loop does not rely on it)."""
        pattern = self.pattern
        for _ in range(_MAX_PASSES):
            new = pattern.sub(lambda m: m.group(0)[0] + JOINER + m.group(0)[1:], text)
            if new == text:
                break
            text = new
        return text

    def neutralize_context(self, context: list[ChatMessage] | str) -> list[ChatMessage] | str:
        if isinstance(context, str):
            return self.neutralize(context)
        return [m.model_copy(update={"content": self.neutralize(m.content)}) for m in context]


_PATTERNS: dict[tuple[str, ...], re.Pattern[str]] = {}


def _compiled(tokens: tuple[str, ...]) -> re.Pattern[str]:
    pattern = _PATTERNS.get(tokens)
    if pattern is None:
        literals = sorted({t for t in (*tokens, *GENERIC_CONTROL_TOKENS) if _escapable(t)}, key=len, reverse=True)
        pattern = re.compile("|".join([*(re.escape(t) for t in literals), *_GENERIC_PATTERNS]))
        _PATTERNS[tokens] = pattern
    return pattern


def neutralize_control_tokens(text: str, tokenizer: Any = None) -> str:
    """`text` that no tokenizer of a common chat template (and not `tokenizer`) reads as a control token."""
    return ControlTokens.of(tokenizer).neutralize(text)


__all__ = ["GENERIC_CONTROL_TOKENS", "JOINER", "ControlTokens", "control_token_strings", "neutralize_control_tokens"]
