"""Engine options shared by every subcommand that runs a model."""

from __future__ import annotations

import argparse

from her_engines import DEFAULT_MODEL, Engine, create_engine


def add_engine_arguments(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """`--engine/--model/--base-url/--api-key`, optionally prefixed (e.g. `judge-` for a second engine)."""
    p = f"--{prefix}"
    parser.add_argument(f"{p}engine", choices=["transformers", "openai", "vllm"], default="transformers",
                        help="engine backend (default: transformers on CPU)")
    parser.add_argument(f"{p}model", default=DEFAULT_MODEL,
                        help=f"model id, HF folder or .gguf path (default: {DEFAULT_MODEL}, bundled)")
    parser.add_argument(f"{p}base-url", default=None, help="server URL for --engine openai, e.g. http://127.0.0.1:8001")
    parser.add_argument(f"{p}api-key", default=None, help="API key for --engine openai")


def engine_from_args(args: argparse.Namespace, *, prefix: str = "") -> Engine:
    key = prefix.replace("-", "_")
    kind = getattr(args, f"{key}engine")
    options = {}
    if kind == "openai":
        base_url = getattr(args, f"{key}base_url")
        if not base_url:
            raise SystemExit(f"--{prefix}engine openai needs --{prefix}base-url")
        options = {"base_url": base_url, "api_key": getattr(args, f"{key}api_key")}
    return create_engine(kind, getattr(args, f"{key}model"), **options)
