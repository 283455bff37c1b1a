"""Engine flags for every subcommand that runs a model, generated from `EngineSettings`' fields.

`--engine`, `--model`, `--engine-base-url`, `--engine-api-key`, `--dtype`, `--max-model-len`,
`--enforce-eager`, `--kv-cache-gib`, ... (with a prefix, e.g. `--judge-engine`, for a second engine).
Help text and defaults come from the settings' docstrings, so the CLI and the service never disagree.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from typing import Any, Literal, get_args, get_origin

from her_engines import Engine, EngineSettings, build_engine

FIELDS = EngineSettings.model_fields


def add_engine_arguments(parser: argparse.ArgumentParser, *, prefix: str = "", inherit: str | None = None,
                         exclude: Collection[str] = ()) -> None:
    """Add one flag per engine setting. With `inherit`, unset flags fall back to that flag's value
    (e.g. the judge engine defaults to the engine of the model under test). `exclude` names settings
    the command sets another way (e.g. `her eval judge` takes each model from `--judge`)."""
    for name, field in FIELDS.items():
        if name in exclude:
            continue
        flag = f"--{prefix}{name.replace('_', '-')}"
        if inherit is not None:
            default = f"the --{inherit}{name.replace('_', '-')} value"
        else:
            default = field.default if field.default is not None else "unset"
        extra: dict[str, Any] = {}
        if get_origin(field.annotation) is Literal:
            extra["choices"] = list(get_args(field.annotation))
        parser.add_argument(flag, dest=_dest(prefix, name), default=None, metavar=name.upper(), **extra,
                            help=f"{field.description or ''} (default: {default})")


def engine_settings_from_args(args: argparse.Namespace, *, prefix: str = "", inherit: str | None = None,
                              ) -> EngineSettings:
    values: dict[str, Any] = {}
    for name in FIELDS:
        value = getattr(args, _dest(prefix, name), None)  # None also for an excluded flag
        if value is None and inherit is not None:
            value = getattr(args, _dest(inherit, name), None)
        if value is not None:
            values[name] = value
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


def _dest(prefix: str, name: str) -> str:
    return f"{prefix.replace('-', '_')}{name}"
