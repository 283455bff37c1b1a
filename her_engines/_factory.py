"""Build an engine by name; backends are imported only when asked for."""

from __future__ import annotations

from typing import Any, Literal

from ._types import Engine, EngineUnavailable

EngineKind = Literal["transformers", "openai", "vllm"]
DEFAULT_MODEL = "smollm2-135m-instruct"


def create_engine(kind: EngineKind = "transformers", model: str = DEFAULT_MODEL, **options: Any) -> Engine:
    """Create an engine. `options` go to the backend's constructor (see each backend)."""
    if kind == "transformers":
        from ._transformers import TransformersEngine

        return TransformersEngine(model, **options)
    if kind == "openai":
        from ._openai import OpenAIEngine

        return OpenAIEngine(model, **options)
    if kind == "vllm":
        from ._vllm import VLLMEngine

        return VLLMEngine(model, **options)
    raise EngineUnavailable(f"unknown engine kind {kind!r}; expected transformers, openai or vllm")
