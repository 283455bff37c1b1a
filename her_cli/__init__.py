"""The `her` command line (see `her --help`)."""

from .main import SUBCOMMANDS, main

__all__ = ["SUBCOMMANDS", "main"]
