"""The shapes trainers hand a reward function, turned into what `/v1/rewards` takes.

TRL gives plain strings or conversational message lists; verl gives strings plus an `extra_info` dict.
`context_of` / `completion_text` / `reference_text` / `group_key` normalise them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = frozenset({"system", "user", "assistant"})
PROMPT_KEY = "prompt"  # where verl's extra_info carries the conversation the rollout answers


def _content_text(content: Any, where: str) -> str:
    """Text of a message's content: a string, or a list of parts of which the text ones are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise TypeError(f"{where}: only text content parts can be judged, got {part!r:.80}")
        return "".join(texts)
    raise TypeError(
        f"{where}: message content must be a string or a list of text parts, got {type(content).__name__}"
    )


def _messages(value: Sequence[Any], where: str) -> list[dict[str, str]]:
    out = []
    for k, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TypeError(f"{where}[{k}]: expected a {{'role', 'content'}} message, got {message!r:.80}")
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"{where}[{k}]: role {role!r} cannot be judged; expected one of {sorted(ROLES)}")
        out.append({"role": role, "content": _content_text(message["content"], f"{where}[{k}]")})
    return out


def context_of(prompt: Any, where: str = "prompt") -> str | list[dict[str, str]]:
    """The judge context of a prompt: plain text stays text; chat messages become {role, content} dicts."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and not isinstance(prompt, bytes):
        return _messages(prompt, where)
    raise TypeError(f"{where}: expected a string or a list of chat messages, got {type(prompt).__name__}")


def completion_text(completion: Any, where: str = "completion") -> str:
    """The rollout's text: a string as is, or the content of the last assistant message of a list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and not isinstance(completion, bytes):
        messages = _messages(completion, where)
        for message in reversed(messages):
            if message["role"] == "assistant":
                return message["content"]
        raise ValueError(f"{where}: the message list holds no assistant message to judge")
    raise TypeError(f"{where}: expected a string or a list of chat messages, got {type(completion).__name__}")


def reference_text(reference: Any, where: str = "reference") -> str:
    """A dataset's reference reply (same shapes as a completion); None is an error, not a default."""
    if reference is None:
        raise ValueError(f"{where} is missing (None): the reference strategy needs a reference reply per row")
    return completion_text(reference, where)


def group_key(context: str | list[dict[str, str]]) -> str:
    """Identity of a prompt: hash of its canonical JSON, so equal prompts land in one group."""
    blob = json.dumps(context, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]
