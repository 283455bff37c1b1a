"""`her chat`: talk to a character from a CoSER scene file.

The model's turn is prefilled with an open `<system_thinking>` tag (the assistant message
is continued, not closed), so the dual-layer answer starts with the hidden plan.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field

from her_engines import Engine, GenRequest
from her_roleplay import Scene, build_chat_prompt, load_scenes, parse_reply, render_display

from ._engine_args import add_engine_arguments, engine_from_args

SYSTEM_THINKING_OPEN = "<system_thinking>"


@dataclass
class ChatSession:
    """One conversation with `character`; the user speaks as `user_name`."""

    engine: Engine
    scene: Scene
    character: str
    user_name: str
    max_tokens: int = 256
    temperature: float = 0.7
    seed: int | None = None
    history: list[tuple[str, str]] = field(default_factory=list)

    async def reply(self, user_text: str) -> str:
        """Add the user's line, generate the character's full HER reply, remember it."""
        self.history.append((self.user_name, user_text))
        messages = build_chat_prompt(self.scene, self.character, self.history)
        request = GenRequest(messages=messages, prefill=SYSTEM_THINKING_OPEN, max_tokens=self.max_tokens,
                             temperature=self.temperature, seed=self.seed)
        [result] = await self.engine.generate([request])
        if result.finish_reason == "error":
            self.history.pop()
            raise RuntimeError(f"generation failed: {result.error}")
        full = SYSTEM_THINKING_OPEN + result.text
        self.history.append((self.character, full))
        return full


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scene", required=True, help="CoSER-format scene file (json or jsonl)")
    parser.add_argument("--index", type=int, default=0, help="which scene of the file (default 0)")
    parser.add_argument("--character", help="character the model plays (default: first major character)")
    parser.add_argument("--as", dest="user_name", help="name you speak as (default: another major character)")
    parser.add_argument("--show-think", action="store_true", help="show the hidden <system_thinking> plan")
    parser.add_argument("--show-rolethink", action="store_true", help="show the character's inner thoughts")
    parser.add_argument("--message", action="append", help="send this line and exit (repeatable; no prompt)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=None)
    add_engine_arguments(parser)


def _pick_names(scene: Scene, character: str | None, user_name: str | None) -> tuple[str, str]:
    cast = [c for c in scene.major_characters or scene.cast if c != "Environment"]
    character = character or cast[0]
    if not scene.has_character(character):
        raise SystemExit(f"no character {character!r} in this scene; choose from {', '.join(cast)}")
    user_name = user_name or next((c for c in cast if c != character), "User")
    return character, user_name


def run(args: argparse.Namespace) -> int:
    scenes = load_scenes(args.scene)
    if not 0 <= args.index < len(scenes):
        raise SystemExit(f"--index {args.index} is out of range: the file has {len(scenes)} scene(s)")
    scene = scenes[args.index]
    character, user_name = _pick_names(scene, args.character, args.user_name)
    return asyncio.run(_loop(args, scene, character, user_name))


async def _loop(args: argparse.Namespace, scene: Scene, character: str, user_name: str) -> int:
    engine = engine_from_args(args)
    session = ChatSession(engine, scene, character, user_name, max_tokens=args.max_tokens,
                          temperature=args.temperature, seed=args.seed)
    interactive = args.message is None
    if interactive:
        print(f"{scene.book}: you are {user_name}, talking to {character}. Empty line or Ctrl-D to quit.")
    lines = iter(args.message or [])
    try:
        while True:
            if interactive:
                try:
                    text = input(f"{user_name}> ").strip()
                except EOFError:
                    break
            else:
                text = next(lines, "")
            if not text:
                break
            full = await session.reply(text)
            reply, _ = parse_reply(full)
            shown = render_display(reply, show_thoughts=args.show_rolethink, show_system_thinking=args.show_think)
            print(f"{character}: {shown}", flush=True)
    finally:
        await engine.aclose()
    return 0


