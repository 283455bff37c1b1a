"""HER step 1: read CoSER sources into scenes with stable ids.

Two source shapes load:

- a CoSER **book-level file** (``data/final/<book>.json``): ``plots[]`` each with ``text``,
  ``summary``, ``chapter``, ``key_characters`` and ``conversation[]`` (scenario, topic,
  key_characters with motivations, dialogues), plus ``character_datasets{name: {profile, ...}}``;
- **test-set scenes** (one object, a list, or jsonl; see ``her_roleplay.load_scenes``).

Every conversation becomes one :class:`her_roleplay.Scene` keyed by (book, i_p, i_c), with the
plot's source text kept in ``plot.text`` (setting completion quotes from it). Cleaning drops plots
without conversations, conversations with no character line, and dialogue lines with an empty
message; key characters without a name are dropped. What was dropped is counted, never silent.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from her_roleplay import ENVIRONMENT, Scene, SceneLoadError, load_scenes

__all__ = [
    "LoadReport", "SceneKey", "book_title_from_path", "evaluation_keys", "key_of", "load_book", "load_sources",
    "scene_key", "scenes_for_pairs", "turn_id",
]


@dataclass
class LoadReport:
    """What a load kept and dropped, by reason."""

    scenes: int = 0
    dropped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "nothing"
        return f"{self.scenes} scenes; dropped {drops}"


def book_title_from_path(path: str | Path) -> str:
    """``book_king_lear.json`` → ``King Lear`` (CoSER's test set spells titles this way)."""
    stem = re.sub(r"^book_", "", Path(path).stem)
    return " ".join(w.capitalize() for w in re.split(r"[_\-\s]+", stem) if w)


def turn_id(scene: Scene, turn: int) -> str:
    """Stable id of one dialogue line: the scene's id and the line's index."""
    return f"{scene.sample_id}-t{turn}"


def _is_book_file(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("plots"), list) and "character_datasets" in data


def load_book(path: str | Path, *, title: str | None = None, report: LoadReport | None = None) -> list[Scene]:
    """Scenes of every usable conversation of a CoSER book-level file, in (i_p, i_c) order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SceneLoadError(f"{path}: cannot read book file: {exc}") from exc
    if not _is_book_file(data):
        raise SceneLoadError(f"{path}: not a CoSER book-level file (needs 'plots' and 'character_datasets')")
    report = report if report is not None else LoadReport()
    book = title or book_title_from_path(path)
    profiles = {
        name: str(info.get("profile") or "").strip()
        for name, info in (data.get("character_datasets") or {}).items()
        if isinstance(info, dict) and str(info.get("profile") or "").strip()
    }
    scenes: list[Scene] = []
    for i_p, plot in enumerate(data["plots"]):
        conversations = plot.get("conversation") or []
        if not conversations:
            report.dropped["plots without conversations"] += 1
            continue
        plot_record = {
            "summary": (plot.get("summary") or "").strip() or None,
            "text": plot.get("text") or "",
            "chapter": plot.get("chapter"),
            "key_characters": [
                {k: v for k, v in kc.items() if k in ("name", "description", "summary", "experience")}
                for kc in plot.get("key_characters") or []
                if str(kc.get("name") or "").strip()
            ],
        }
        for i_c, conv in enumerate(conversations):
            scene = _scene_from_conversation(book, i_p, i_c, conv, plot_record, profiles, report)
            if scene is not None:
                scenes.append(scene)
    report.scenes += len(scenes)
    return scenes


def _scene_from_conversation(
    book: str, i_p: int, i_c: int, conv: dict, plot: dict, profiles: dict[str, str], report: LoadReport
) -> Scene | None:
    dialogues = []
    for line in conv.get("dialogues") or []:
        who, text = str(line.get("character") or "").strip(), str(line.get("message") or "").strip()
        if not who or not text:
            report.dropped["empty dialogue lines"] += 1
            continue
        dialogues.append({"character": who, "message": text})
    if not any(d["character"] != ENVIRONMENT for d in dialogues) or not str(conv.get("scenario") or "").strip():
        report.dropped["conversations without a scenario or character line"] += 1
        return None
    key_characters = [
        {"name": kc["name"].strip(), "motivation": (kc.get("motivation") or kc.get("thought") or "").strip() or None}
        for kc in conv.get("key_characters") or []
        if str(kc.get("name") or "").strip()
    ]
    speakers = list(dict.fromkeys(d["character"] for d in dialogues))
    cast = [n for n in speakers if n != ENVIRONMENT]
    return Scene.model_validate({
        "book": book,
        "i_p": i_p,
        "i_c": i_c,
        "scenario": conv["scenario"].strip(),
        "topic": (conv.get("topic") or "").strip() or None,
        "key_characters": key_characters,
        "dialogues": dialogues,
        "speaking_characters_w_env": speakers,
        "major_characters": [kc["name"] for kc in key_characters],
        "character_profiles": {n: profiles[n] for n in cast if n in profiles},
        "plot": plot,
    })


def load_sources(paths: Iterable[str | Path], *, report: LoadReport | None = None) -> list[Scene]:
    """Scenes from book-level files and test-set scene files, in the order given.

    Raises SceneLoadError when two sources yield the same (book, i_p, i_c) with different dialogue
    (a book file and a test set holding the same conversation agree and keep the first).
    """
    report = report if report is not None else LoadReport()
    out: dict[tuple[str, int, int], Scene] = {}
    for path in paths:
        path = Path(path)
        try:
            head = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            head = None  # jsonl scenes
        except OSError as exc:
            raise SceneLoadError(f"{path}: cannot read: {exc}") from exc
        if _is_book_file(head):
            scenes = load_book(path, report=report)
        else:
            scenes = load_scenes(path)
            report.scenes += len(scenes)
        for scene in scenes:
            key = (scene.book, scene.i_p, scene.i_c)
            if key in out:
                if _lines(out[key]) != _lines(scene):
                    raise SceneLoadError(f"{path}: scene {key} differs from the one already loaded")
                report.dropped["duplicate scenes"] += 1
                continue
            out[key] = scene
    return list(out.values())


def _lines(scene: Scene) -> Sequence[tuple[str, str]]:
    return [(d.character, d.message) for d in scene.dialogues]


SceneKey = tuple[str, int, int]


def scene_key(book: str, i_p: int, i_c: int) -> SceneKey:
    """The identity of a conversation; titles compare without case or surrounding spaces."""
    return (book.strip().casefold(), i_p, i_c)


def key_of(scene: Scene) -> SceneKey:
    return scene_key(scene.book, scene.i_p, scene.i_c)


def evaluation_keys(paths: Iterable[str | Path]) -> set[SceneKey]:
    """Keys of every scene in evaluation files (CoSER test sets, or any source ``load_sources`` reads)."""
    return {key_of(s) for s in load_sources(paths)}


def scenes_for_pairs(
    sources: Iterable[str | Path], *, books: Sequence[str] | None = None, exclude: Iterable[str | Path] = ()
) -> list[Scene]:
    """Scenes to build pairs from: `sources` kept to `books` (titles, if given), with every scene of
    the `exclude` files (evaluation sets) removed by (book, i_p, i_c)."""
    held_out = evaluation_keys(exclude)
    wanted = {b.strip().casefold() for b in books} if books else None
    return [s for s in load_sources(sources)
            if key_of(s) not in held_out and (wanted is None or key_of(s)[0] in wanted)]
