"""Command-line flags generated from a pydantic model's fields: one flag per field, help from its
description, choices from a Literal. Settings, engine options and judge options are each defined once,
as a model; every subcommand that exposes them goes through here, so a CLI cannot drift from the model.

Flags default to None, so a value reaches the model only when given, and pydantic converts and bounds it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo


def flag_name(name: str, prefix: str = "") -> str:
    return f"--{prefix}{name.replace('_', '-')}"


def default_text(field: FieldInfo) -> str:
    return str(field.default) if field.default is not None else "unset"


def add_model_arguments(
    parser: argparse._ActionsContainer,
    model: type[BaseModel],
    *,
    names: Collection[str] | None = None,
    flags: Mapping[str, str] | None = None,
    prefix: str = "",
    dest_prefix: str = "",
    note: Callable[[str, FieldInfo], str] | None = None,
) -> None:
    """One flag per field of ``model`` (only ``names``, if given): ``--{prefix}{field-name}`` unless
    ``flags`` names it. ``note(name, field)`` replaces the default "(default: ...)" note of the help."""
    for name, field in model.model_fields.items():
        if names is not None and name not in names:
            continue
        extra: dict[str, Any] = {}
        if get_origin(field.annotation) is Literal:
            extra["choices"] = list(get_args(field.annotation))
        tail = note(name, field) if note else f"default: {default_text(field)}"
        parser.add_argument((flags or {}).get(name) or flag_name(name, prefix), dest=dest_prefix + name,
                            default=None, metavar=name.upper(), **extra,
                            help=f"{field.description or ''} ({tail})".replace("%", "%%"))


def model_values(args: argparse.Namespace, model: type[BaseModel], *, names: Collection[str] | None = None,
                 dest_prefix: str = "") -> dict[str, Any]:
    """The values given on the command line for ``model``'s fields (unset flags left out)."""
    values = {}
    for name in model.model_fields:
        if names is not None and name not in names:
            continue
        value = getattr(args, dest_prefix + name, None)
        if value is not None:
            values[name] = value
    return values
