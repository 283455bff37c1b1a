"""Engine flags for every subcommand that runs a model, generated from `EngineSettings`' fields.

`--engine`, `--model`, `--engine-base-url`, `--engine-api-key`, `--dtype`, `--max-model-len`,
`--enforce-eager`, `--kv-cache-gib`, ... (with a prefix, e.g. `--judge-engine`, for a second engine).
Help text and defaults come from the settings' docstrings, so the CLI and the service never disagree.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection

from her_engines import Engine, EngineSettings, build_engine

from ._flags import add_model_arguments, default_text, flag_name, model_values


def add_engine_arguments(parser: argparse._ActionsContainer, *, prefix: str = "", inherit: str | None = None,
                         exclude: Collection[str] = ()) -> None:
    """Add one flag per engine setting. With `inherit`, unset flags fall back to that flag's value
    (e.g. the judge engine defaults to the engine of the model under test). `exclude` names settings
    the command sets another way (e.g. `her eval judge` takes each model from `--judge`)."""
    names = [name for name in EngineSettings.model_fields if name not in exclude]

    def note(name, field) -> str:
        return f"default: the {flag_name(name, inherit)} value" if inherit is not None else \
            f"default: {default_text(field)}"

    add_model_arguments(parser, EngineSettings, names=names, prefix=prefix, dest_prefix=_dest(prefix), note=note)


def engine_settings_from_args(args: argparse.Namespace, *, prefix: str = "", inherit: str | None = None,
                              ) -> EngineSettings:
    values = model_values(args, EngineSettings, dest_prefix=_dest(prefix))  # excluded flags are unset
    if inherit is not None:
        values = {**model_values(args, EngineSettings, dest_prefix=_dest(inherit)), **values}
    try:
        return EngineSettings(**values)
    except ValueError as exc:
        raise SystemExit(f"invalid engine flags: {exc}") from None


def engine_from_args(args: argparse.Namespace, *, prefix: str = "", inherit: str | None = None) -> Engine:
    """Build the engine the flags describe; a configuration mistake exits with the reason."""
    return build_engine_or_exit(engine_settings_from_args(args, prefix=prefix, inherit=inherit), prefix=prefix)


def build_engine_or_exit(settings: EngineSettings, *, prefix: str = "") -> Engine:
    """`build_engine`, with a configuration mistake reported in terms of the `--{prefix}` flags."""
    try:
        return build_engine(settings)
    except ValueError as exc:
        raise SystemExit(str(exc).replace("engine_base_url", f"--{prefix}engine-base-url")) from None


def _dest(prefix: str) -> str:
    return prefix.replace("-", "_")
