"""`her chat`: talk to a character from a CoSER scene file.

The model's turn is prefilled with an open `<system_thinking>` tag (the assistant message
is continued, not closed), so the dual-layer answer starts with the hidden plan.

`--list` shows the scenes of a file (and, with `--index`/`--scene-name`, one scene's characters)
without loading a model. At the prompt, `history`, `clear` and `quit`/`exit` are commands; an empty
line or Ctrl-D quits too. Every line of the chat is appended to a JSONL transcript as it happens
(see :class:`Transcript`), so Ctrl-C loses nothing that was said.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from her_engines import Engine, GenRequest, cache_root
from her_roleplay import (
    ENVIRONMENT,
    Scene,
    SceneLoadError,
    build_chat_prompt,
    load_scenes,
    parse_reply,
    render_display,
    strip_speaker_prefix,
)

from ._engine_args import add_engine_arguments, engine_from_args

SYSTEM_THINKING_OPEN = "<system_thinking>"
SYSTEM_THINKING_CLOSE = "</system_thinking>"

COMMANDS = {
    "history": "print the conversation so far",
    "clear": "forget the conversation (the character starts afresh; the transcript keeps it)",
    "quit": "end the chat (also: exit, an empty line, Ctrl-D)",
    "exit": "end the chat",
    "help": "list these commands",
}


@dataclass
class ChatSession:
    """One conversation with `character`; the user speaks as `user_name`."""

    engine: Engine
    scene: Scene
    character: str
    user_name: str
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    history: list[tuple[str, str]] = field(default_factory=list)

    @property
    def sampling(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed}

    def request(self) -> GenRequest:
        """The generation request for the character's next turn after the current history."""
        messages = build_chat_prompt(self.scene, self.character, self.history)
        return GenRequest(messages=messages, prefill=SYSTEM_THINKING_OPEN, **self.sampling)

    async def reply(self, user_text: str) -> str:
        """Add the user's line, generate the character's full HER reply, remember it.

        On a failed generation (or a Ctrl-C while generating) the user's line is taken back out of the
        history, so the conversation is as it was before."""
        self.history.append((self.user_name, user_text))
        try:
            [result] = await self.engine.generate([self.request()])
            if result.finish_reason == "error":
                raise RuntimeError(f"generation failed: {result.error}")
        except BaseException:
            self.history.pop()
            raise
        full = _without_speaker_prefix(SYSTEM_THINKING_OPEN + result.text, self.character)
        self.history.append((self.character, full))
        return full

    def clear(self) -> None:
        """Forget the conversation: the next reply sees only the scene."""
        self.history.clear()


def _without_speaker_prefix(full: str, character: str) -> str:
    """The reply with the character's own ``Name:`` label removed from its visible part (after the plan);
    the plan itself is kept as generated."""
    head, close, tail = full.partition(SYSTEM_THINKING_CLOSE)
    if not close:  # the plan never closed: nothing visible yet
        return full
    return head + close + strip_speaker_prefix(tail, character)


class Transcript:
    """The chat as JSONL, appended and flushed line by line (a Ctrl-C or a crash loses nothing said).

    Records (each with ``type`` and ``time``): one ``session`` (scene file and index, ``sample_id``, book,
    ``i_p``/``i_c``, character, user name, sampling settings, engine and model), then a ``turn`` per line
    (``speaker``, ``role`` user|character, ``text``: the full HER text, hidden plan included), ``clear``
    when the conversation was forgotten, ``error`` for a failed generation. An existing file is appended
    to: it then holds one session after another.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: TextIO = path.open("a", encoding="utf-8")

    def write(self, kind: str, **fields: Any) -> None:
        record = {"type": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def default_transcript_path(scene: Scene, character: str, *, now: float | None = None) -> Path:
    """``$HER_CACHE_DIR/chats`` (default ``~/.cache/her/chats``)/``<date>-<time>-<sample id>-<character>.jsonl``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    slug = re.sub(r"[^a-z0-9]+", "-", character.lower()).strip("-") or "character"
    folder = cache_root() / "chats"
    path = folder / f"{stamp}-{scene.sample_id}-{slug}.jsonl"
    n = 2
    while path.exists():  # two chats started in the same second
        path = folder / f"{stamp}-{scene.sample_id}-{slug}-{n}.jsonl"
        n += 1
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Chat with a character from a CoSER scene file. At the prompt: " + "; ".join(
            f"`{c}` {h}" for c, h in COMMANDS.items() if c != "exit") + ". The chat is saved as it goes "
        "(JSONL, full HER text incl. the hidden plan) to ~/.cache/her/chats/ ($HER_CACHE_DIR/chats) unless "
        "--save PATH or --no-save says otherwise."
    )
    parser.add_argument("--scene", required=True, metavar="FILE",
                        help="CoSER-format scene file (json or jsonl), e.g. a CoSER test set")
    parser.add_argument("--list", action="store_true",
                        help="list the file's scenes (index, book, scenario, characters) and exit; with --index or "
                             "--scene-name, list that scene's characters")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--index", type=int, default=None, help="which scene of the file, as --list numbers them "
                      "(default 0)")
    pick.add_argument("--scene-name", metavar="TEXT",
                      help="pick the scene whose book title, topic, chapter or sample id contains every word of TEXT "
                           "(case-insensitive); must match one scene")
    parser.add_argument("--character", metavar="NAME|N",
                        help="character the model plays: a name (or a unique part of one) or the number --list "
                             "shows (default: the first)")
    parser.add_argument("--as", dest="user_name", metavar="NAME|N",
                        help="who you speak as: a character of the scene (name or number) or any other name "
                             "(default: the next character of the scene)")
    parser.add_argument("--show-think", action="store_true", help="show the hidden <system_thinking> plan")
    parser.add_argument("--show-rolethink", action="store_true", help="show the character's inner thoughts")
    parser.add_argument("--message", action="append",
                        help="send this line and exit (repeatable; no prompt; commands such as history work too)")
    save = parser.add_mutually_exclusive_group()
    save.add_argument("--save", metavar="PATH", type=Path,
                      help="append the transcript to this JSONL file (a directory: a new file in it) "
                           "(default: a new file under ~/.cache/her/chats/)")
    save.add_argument("--no-save", action="store_true", help="do not write a transcript")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1.0: off)")
    parser.add_argument("--seed", type=int, default=None)
    add_engine_arguments(parser)


# --- choosing a scene and the names -----------------------------------------------------------------


def scene_characters(scene: Scene) -> list[str]:
    """Who can be played, as --list numbers them: major characters, the rest of the cast, then key
    characters without a line; Environment never."""
    out: list[str] = []
    seen: set[str] = set()
    for name in [*scene.major_characters, *scene.cast(), *(kc.name for kc in scene.key_characters)]:
        key = name.strip().casefold()
        if key and key != ENVIRONMENT.casefold() and key not in seen:
            seen.add(key)
            out.append(name.strip())
    return out


def _pick_scene(scenes: list[Scene], index: int | None, name: str | None) -> int:
    if name is None:
        index = 0 if index is None else index
        if not 0 <= index < len(scenes):
            raise SystemExit(f"--index {index} is out of range: the file has {len(scenes)} scene(s)")
        return index
    exact = [i for i, s in enumerate(scenes) if s.sample_id == name.strip()]
    words = name.casefold().split()
    matches = exact or [i for i, s in enumerate(scenes) if words and all(w in _haystack(s) for w in words)]
    if not matches:
        raise SystemExit(f"no scene matches --scene-name {name!r}; `--list` shows them")
    if len(matches) > 1:
        shown = "; ".join(f"{i}: {scenes[i].book} ({scenes[i].sample_id})" for i in matches[:10])
        more = f" and {len(matches) - 10} more" if len(matches) > 10 else ""
        raise SystemExit(f"{len(matches)} scenes match --scene-name {name!r}: {shown}{more}. "
                         "Add a word or pick one with --index")
    return matches[0]


def _haystack(scene: Scene) -> str:
    chapter = getattr(scene.plot, "chapter", None) if scene.plot is not None else None
    return " | ".join(str(x) for x in (scene.book, scene.topic, chapter, scene.sample_id) if x).casefold()


def _resolve(spec: str, names: list[str], flag: str) -> str | None:
    """A name from `names` for `spec` (a number, the name, or a unique part of it); None when nothing matches."""
    spec = spec.strip()
    if spec.isdigit():
        if int(spec) >= len(names):
            raise SystemExit(f"{flag} {spec}: the scene has {len(names)} character(s): {_numbered(names)}")
        return names[int(spec)]
    key = spec.casefold()
    exact = [n for n in names if n.casefold() == key]
    if exact:
        return exact[0]
    partial = [n for n in names if key and key in n.casefold()]
    if len(partial) > 1:
        raise SystemExit(f"{flag} {spec!r} matches {', '.join(partial)}; give more of the name")
    return partial[0] if partial else None


def _numbered(names: list[str]) -> str:
    return ", ".join(f"{i} {n}" for i, n in enumerate(names))


def _pick_names(scene: Scene, character: str | None, user_name: str | None) -> tuple[str, str]:
    names = scene_characters(scene)
    if not names:
        raise SystemExit(f"scene {scene.sample_id} has no character to play")
    picked = names[0] if character is None else _resolve(character, names, "--character")
    if picked is None:
        raise SystemExit(f"no character {character!r} in this scene; choose from {_numbered(names)}")
    if user_name is None:
        user = next((n for n in names if n != picked), "User")
    else:
        user = _resolve(user_name, names, "--as") or user_name.strip()
    if not user:
        raise SystemExit("--as needs a name")
    if user.casefold() == picked.casefold():
        raise SystemExit(f"you cannot speak as {picked}, the character the model plays; choose another --as")
    return picked, user


# --- listing ----------------------------------------------------------------------------------------


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def format_scene_list(scenes: list[Scene]) -> str:
    lines = []
    for i, s in enumerate(scenes):
        lines.append(f"{i:>3}  {s.book}  [{s.sample_id}]")
        lines.append(f"     {_one_line(s.scenario, 100)}")
        lines.append(f"     characters: {', '.join(scene_characters(s))}")
    lines.append(f"{len(scenes)} scene(s). `--list --index N` lists a scene's characters; "
                 "chat with `--index N --character NAME|N`.")
    return "\n".join(lines)


def format_character_list(scene: Scene, index: int) -> str:
    names = scene_characters(scene)
    width = max((len(n) for n in names), default=0)
    lines = [f"scene {index}: {scene.book}  [{scene.sample_id}]", _one_line(scene.scenario, 300), "characters:"]
    for i, name in enumerate(names):
        about = scene.description_of(name) or scene.profile_of(name) or ""
        lines.append(f"{i:>3}  {name:<{width}}  {_one_line(about, 90)}".rstrip())
    lines.append("`--character NAME|N` picks who the model plays, `--as NAME|N` who you are.")
    return "\n".join(lines)


# --- the chat ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        scenes = load_scenes(args.scene)
    except SceneLoadError as exc:
        raise SystemExit(str(exc)) from None
    if args.list:
        if args.index is None and args.scene_name is None:
            print(format_scene_list(scenes))
        else:
            index = _pick_scene(scenes, args.index, args.scene_name)
            print(format_character_list(scenes[index], index))
        return 0
    if not 0.0 < args.top_p <= 1.0:
        raise SystemExit(f"--top-p must be in (0, 1], got {args.top_p}")
    index = _pick_scene(scenes, args.index, args.scene_name)
    scene = scenes[index]
    character, user_name = _pick_names(scene, args.character, args.user_name)
    path = None
    if not args.no_save:  # decided (and its folder made) before the model loads, so a bad path fails fast
        path = args.save or default_transcript_path(scene, character)
        if path.is_dir():
            path = path / default_transcript_path(scene, character).name
        path.parent.mkdir(parents=True, exist_ok=True)
    with asyncio.Runner() as runner:  # one loop for the whole chat; Ctrl-C at the prompt is a plain interrupt
        engine = runner.run(_build_engine(args))
        try:
            session = ChatSession(engine, scene, character, user_name, max_tokens=args.max_tokens,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed)
            if path is None:
                return _converse(runner, session, None, args)
            transcript = Transcript(path)
            try:
                transcript.write("session", scene_file=str(Path(args.scene).resolve()), scene_index=index,
                                 sample_id=scene.sample_id, book=scene.book, i_p=scene.i_p, i_c=scene.i_c,
                                 character=character, user_name=user_name, sampling=session.sampling,
                                 engine=engine.kind, model=engine.model_id)
                return _converse(runner, session, transcript, args)
            finally:
                transcript.close()
                print(f"transcript: {transcript.path}", file=sys.stderr)
        finally:
            runner.run(engine.aclose())


async def _build_engine(args: argparse.Namespace) -> Engine:
    return engine_from_args(args)  # inside the loop: an engine may bind to the running loop


def _converse(runner: asyncio.Runner, session: ChatSession, transcript: Transcript | None,
              args: argparse.Namespace) -> int:
    interactive = args.message is None
    lines: Iterator[str] = iter(args.message or [])
    if interactive:
        if sys.stdin.isatty():
            import readline  # noqa: F401  (line editing and recall at the prompt)
        print(f"{session.scene.book}: you are {session.user_name}, talking to {session.character}. "
              "Commands: history, clear, quit (or an empty line / Ctrl-D), help.")
    log = transcript.write if transcript is not None else (lambda kind, **fields: None)
    while True:
        try:
            if interactive:
                try:
                    text = input(f"{session.user_name}> ").strip()
                except EOFError:
                    print()
                    return 0
            else:
                text = next(lines, "").strip()
            command = text.casefold().lstrip("/")
            if not text or command in ("quit", "exit"):
                return 0
            if command == "help":
                print("\n".join(f"  {c:<8} {h}" for c, h in COMMANDS.items()))
            elif command == "history":
                print(_format_history(session, args) or "(no conversation yet)", flush=True)
            elif command == "clear":
                session.clear()
                log("clear")
                print("(conversation cleared)", flush=True)
            else:
                log("turn", speaker=session.user_name, role="user", text=text)
                try:
                    full = runner.run(session.reply(text))
                except RuntimeError as exc:
                    log("error", message=str(exc))
                    print(f"error: {exc}", file=sys.stderr)
                    if not interactive:
                        return 1
                    continue
                log("turn", speaker=session.character, role="character", text=full)
                print(f"{session.character}: {_display(full, args)}", flush=True)
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
            return 0 if interactive else 130


def _display(full: str, args: argparse.Namespace) -> str:
    reply, _ = parse_reply(full)
    return render_display(reply, show_thoughts=args.show_rolethink, show_system_thinking=args.show_think)


def _format_history(session: ChatSession, args: argparse.Namespace) -> str:
    return "\n".join(f"{speaker}: {_display(text, args) if speaker == session.character else text}"
                     for speaker, text in session.history)
