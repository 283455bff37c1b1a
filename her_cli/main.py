"""`her`: one command line, a subcommand per job.

Each subcommand lives in its own module and is imported only when chosen, so
`her --help` stays fast and a missing optional dependency only affects its command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence

# subcommand -> (module exposing `add_arguments(parser)` and `run(args) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("her_cli._chat", "chat with a character from a CoSER scene file"),
    "judge": ("her_cli._judge", "judge pairs of replies from a jsonl file with the GenRM"),
    "serve": ("her_cli._serve", "run the GenRM service (rm_server)"),
    "train": ("policy_trainer.cli", "SFT cold start and GRPO training with remote rewards"),
    "build": ("data_builder.cli", "reverse-synthesise dual-layer data and preference pairs"),
    "eval": ("eval.cli", "evaluations: CoSER acting (coser), judge agreement on labelled pairs (judge)"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="her", description="HER role-play GenRM toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the chosen command's module
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
    return parser


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds `finally` blocks and atexit hooks, which shut engines down; the default
    # SIGTERM action would leave vLLM's engine processes running.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # `her serve`: uvicorn installs its own
    # Say which engine runs and why (a fallback from vLLM is a warning); other libraries stay quiet.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("her_engines").setLevel(logging.INFO)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
