"""The CoSER scene schema: one conversation from a book, with its cast, profiles and plot.

A scene loads a CoSER test-set record as published, without edits. Unknown fields are kept
(``extra="allow"``) so records survive a load/dump round trip and newer dumps still load.

The character's inner state for the scene is called ``thought`` in the released test set and
``motivation`` in older files; both load into :attr:`KeyCharacter.motivation`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ENVIRONMENT = "Environment"
"""The pseudo-character that narrates physical changes; never an actor with a perspective."""

__all__ = [
    "ENVIRONMENT",
    "DialogueLine",
    "KeyCharacter",
    "Plot",
    "PlotCharacter",
    "Scene",
    "SceneLoadError",
    "load_scenes",
]


class _Open(BaseModel):
    # Keep unknown keys: CoSER dumps differ between releases and we must not drop data.
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class KeyCharacter(_Open):
    """A character whose inner state for this scene is given (CoSER ``key_characters`` item)."""

    name: str = Field(min_length=1)
    motivation: str | None = Field(None, serialization_alias="thought")
    """First-person inner state for the scene; read from ``thought`` (current) or ``motivation`` (old)."""

    @model_validator(mode="before")
    @classmethod
    def _accept_both_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        has_thought, has_motivation = "thought" in data, "motivation" in data
        if has_thought and has_motivation and data["thought"] != data["motivation"]:
            # Two different inner states for one character: refuse rather than pick one silently.
            raise ValueError(
                f"key character {data.get('name')!r} has both `thought` and `motivation` with different "
                "text; keep only one"
            )
        if has_thought:
            # Normalise to the one attribute name; `serialization_alias` writes `thought` back out.
            data = {k: v for k, v in data.items() if k not in ("thought", "motivation")} | {
                "motivation": data["thought"]
            }
        return data


class DialogueLine(_Open):
    """One line of the original conversation. ``message`` uses CoSER brackets:
    ``[thought] (action) speech``; the ``Environment`` character narrates in plain text."""

    character: str = Field(min_length=1)
    message: str


class PlotCharacter(_Open):
    """A character as the plot summary describes them."""

    name: str = Field(min_length=1)
    description: str | None = None
    summary: str | None = None


class Plot(_Open):
    """The plot the scene belongs to; other keys (chapter, state, prominence, ...) are kept as extras."""

    summary: str | None = None
    key_characters: list[PlotCharacter] = Field(default_factory=list)


# Keys CoSER files give either at the top level or only inside `plot` -> what they mean.
_PLOT_KEYS: dict[str, str] = {"i_p": "index of the plot within the book"}


class Scene(_Open):
    """One CoSER conversation. Required: ``book``, ``i_p``, ``i_c``, ``scenario``, ``dialogues``.

    Optional fields default to empty (``None``, ``[]``, ``{}``): they are absent from some CoSER-like
    dumps, and every consumer treats "absent" as "no such section", never as made-up content.

    ``i_p`` may be given only inside ``plot`` (``{"plot": {"i_p": 3, ...}}``), as in CoSER's
    ``test_circumstance_{id,ood}.json``: it is lifted to the top level, so the scene's
    ``sample_id`` is the one the same conversation gets in the released test set (which carries both).
    """

    book: str = Field(min_length=1)
    i_p: int = Field(ge=0, description="index of the plot within the book")
    i_c: int = Field(ge=0, description="index of the conversation within the plot")
    tag: str | None = Field(None, description="'id' (in-distribution) or 'ood' in the test set")
    scenario: str = Field(min_length=1)
    topic: str | None = None
    key_characters: list[KeyCharacter] = Field(default_factory=list)
    dialogues: list[DialogueLine] = Field(min_length=1)
    speaking_characters_w_env: list[str] = Field(default_factory=list)
    major_characters: list[str] = Field(default_factory=list)
    weight: float | None = None
    character_profiles: dict[str, str] = Field(default_factory=dict)
    plot: Plot | None = None

    @model_validator(mode="before")
    @classmethod
    def _lift_plot_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        plot = data.get("plot")
        for key in _PLOT_KEYS:
            in_plot = plot.get(key) if isinstance(plot, dict) else None
            if data.get(key) is None:
                if in_plot is None:
                    raise ValueError(
                        f"the record has no `{key}` ({_PLOT_KEYS[key]}): give it at the top level or as "
                        f"`plot.{key}`"
                    )
                data = data | {key: in_plot}
            elif in_plot is not None and in_plot != data[key]:
                # Two different plot indexes: refuse rather than pick one (the sample id depends on it).
                raise ValueError(f"`{key}` is {data[key]!r} but `plot.{key}` is {in_plot!r}; keep only one")
        return data

    @property
    def sample_id(self) -> str:
        """Stable, file-name-safe id from (book, i_p, i_c): ``<book-slug>-<i_p>-<i_c>-<hash8>``.

        The hash is over the exact title, so two titles that slug alike still get distinct ids.
        """
        slug = re.sub(r"[^a-z0-9]+", "-", self.book.lower()).strip("-") or "book"
        return f"{slug}-{self.i_p}-{self.i_c}-{self._key_digest()[:8]}"

    @property
    def seed(self) -> int:
        """A per-sample seed derived from (book, i_p, i_c): same sample, same seed, in any subset run."""
        return int(self._key_digest()[8:16], 16)

    def _key_digest(self) -> str:
        key = json.dumps([self.book, self.i_p, self.i_c], ensure_ascii=False)
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    # --- look-ups -------------------------------------------------------------------------------

    def motivation_of(self, name: str) -> str | None:
        """The character's inner state for this scene, or None when the scene gives none."""
        for kc in self.key_characters:
            if _same_name(kc.name, name):
                text = (kc.motivation or "").strip()
                return text or None
        return None

    def profile_of(self, name: str) -> str | None:
        """The character's profile from ``character_profiles``, or None when absent or blank."""
        for key, text in self.character_profiles.items():
            if _same_name(key, name):
                return text.strip() or None
        return None

    def description_of(self, name: str) -> str | None:
        """The one-line description of the character in the plot's key characters, or None."""
        if self.plot is None:
            return None
        for pc in self.plot.key_characters:
            if _same_name(pc.name, name):
                return (pc.description or "").strip() or None
        return None

    def speakers(self) -> list[str]:
        """Everyone with at least one line (Environment included), in order of first line."""
        return _unique(line.character for line in self.dialogues)

    def cast(self) -> list[str]:
        """The characters present in the scene (Environment excluded): speaking characters, then major
        characters, then anyone else with a line. Plot characters who are only mentioned are not present."""
        names = _unique([*self.speaking_characters_w_env, *self.major_characters, *self.speakers()])
        return [n for n in names if not _same_name(n, ENVIRONMENT)]

    def other_characters(self, name: str) -> list[str]:
        """The cast of the scene without ``name`` (and without Environment)."""
        return [n for n in self.cast() if not _same_name(n, name)]

    def has_character(self, name: str) -> bool:
        """True when ``name`` is in the cast or among the key characters."""
        return any(_same_name(n, name) for n in [*self.cast(), *(kc.name for kc in self.key_characters)])


def _same_name(a: str, b: str) -> bool:
    # Case and surrounding spaces vary between fields of one record; punctuation ("Mr." vs "Mr") does
    # not get folded, because that could merge two different people.
    return a.strip().casefold() == b.strip().casefold()


def _unique(names: Any) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for n in names:
        key = n.strip().casefold()
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out


class SceneLoadError(ValueError):
    """A scene file could not be read or a record failed validation; the message names the record."""


def load_scenes(path: str | Path) -> list[Scene]:
    """Load scenes from a JSON file holding one object or a list of objects, or from JSONL.

    Raises :class:`SceneLoadError` naming the file and the record (index, or line for JSONL) with
    pydantic's field-level explanation; an empty file is an error too.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SceneLoadError(f"{path}: cannot read scene file: {exc}") from exc
    records = _records(text, path)
    if not records:
        raise SceneLoadError(f"{path}: no scene records found")
    scenes: list[Scene] = []
    for where, record in records:
        if not isinstance(record, dict):
            raise SceneLoadError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}")
        try:
            scenes.append(Scene.model_validate(record))
        except ValidationError as exc:
            raise SceneLoadError(f"{path}: {where} is not a valid CoSER scene:\n{exc}") from exc
    return scenes


def _records(text: str, path: Path) -> list[tuple[str, Any]]:
    """Split file text into (location, decoded record) pairs."""
    stripped = text.strip()
    if not stripped:
        return []
    try:
        whole = json.loads(stripped)
    except json.JSONDecodeError:
        whole = None
        is_json = False
    else:
        is_json = True
    if is_json:
        if isinstance(whole, list):
            return [(f"record {i}", rec) for i, rec in enumerate(whole)]
        return [("record 0", whole)]
    # Not one JSON document: read as JSONL (one object per non-blank line).
    out: list[tuple[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise SceneLoadError(f"{path}: line {lineno}: not one JSON document, nor JSONL: {exc}") from exc
    return out
