"""The LLM engine layer: one async `Engine` interface, three backends.

- ``transformers`` (default, CPU): HF folder or GGUF file, batched, xgrammar constraints.
- ``openai``: any OpenAI-compatible server (``vllm serve``, llama.cpp server, ...).
- ``vllm``: in-process ``AsyncLLM`` (extra ``[vllm]``, imported lazily).
"""

from ._factory import DEFAULT_MODEL, EngineKind, create_engine
from ._models import ResolvedModel, cache_root, ensure_hf_folder, resolve_model
from ._types import (
    ChatMessage,
    Engine,
    EngineBadRequest,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    FinishReason,
    GenRequest,
    GenResult,
)

__all__ = [
    "DEFAULT_MODEL",
    "ChatMessage",
    "Engine",
    "EngineBadRequest",
    "EngineError",
    "EngineKind",
    "EngineTimeout",
    "EngineUnavailable",
    "FinishReason",
    "GenRequest",
    "GenResult",
    "ResolvedModel",
    "cache_root",
    "create_engine",
    "ensure_hf_folder",
    "resolve_model",
]
