"""The GenRM principle library: the fixed menu of flaws and qualities the judge picks from.

The judge (her_genrm) chooses 3-5 principles per case out of this library and compares two candidate
replies on each. The library is data (``principles.yaml`` beside this module, or an operator's file);
this module loads and validates it, and gives it a version: the first 16 hex digits of the sha256 of
the canonical JSON of its principles sorted by id. That version is the ``principle_set_hash`` that
goes into verdicts and cache keys, so editing any field of any principle invalidates cached verdicts,
while reordering the file does not.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

DIMENSIONS: tuple[str, ...] = (
    "Character Development",
    "Relationship Development",
    "Emotional Expression",
    "Action Description",
    "Atmosphere & Environment",
    "Dialogue & Interaction",
    "Narrative & Plot",
    "Conflict & Tension",
    "Details & Description",
    "Overall Quality",
    "Safety & Boundaries",
    "Worldview Consistency",
)

Level = Literal["sentence", "session"]
Polarity = Literal["negative", "positive"]

_SLUG = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
_BUNDLED = "principles.yaml"
_POLARITY_TAG = {"negative": "neg", "positive": "pos"}


class Principle(BaseModel):
    """One judging criterion.

    ``level``: ``sentence`` = decidable from the reply alone; ``session`` = needs the conversation so
    far. ``polarity``: ``negative`` = a flaw (a candidate that shows it loses the comparison),
    ``positive`` = a quality.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    name: str
    dimension: str
    definition: str
    level: Level
    polarity: Polarity

    @field_validator("id")
    @classmethod
    def _id_is_slug(cls, v: str) -> str:
        # ids go into constrained-decoding schemas and cache keys: keep them plain ASCII slugs
        if not _SLUG.match(v):
            raise ValueError(f"id {v!r} is not a snake_case slug (lowercase letters, digits, single '_')")
        return v

    @field_validator("dimension")
    @classmethod
    def _known_dimension(cls, v: str) -> str:
        if v not in DIMENSIONS:
            raise ValueError(f"unknown dimension {v!r}; expected one of: {', '.join(DIMENSIONS)}")
        return v

    @field_validator("name", "definition")
    @classmethod
    def _one_line_text(cls, v: str) -> str:
        # rendered one line per principle in the judge prompt, so fold any line breaks
        text = " ".join(v.split())
        if not text:
            raise ValueError("must not be empty")
        return text


def _read_bundled() -> str:
    try:
        return resources.files(__package__ or "her_roleplay").joinpath(_BUNDLED).read_text("utf-8")
    except NotADirectoryError:
        # the package imported as a namespace package next to an editable-install path hook (no
        # __init__.py yet): importlib.resources cannot multiplex that path, but the file sits beside us
        return Path(__file__).with_name(_BUNDLED).read_text(encoding="utf-8")


def _canonical_hash(principles: Iterable[Principle]) -> str:
    rows = sorted((p.model_dump() for p in principles), key=lambda r: r["id"])
    blob = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class PrincipleLibrary:
    """An immutable, validated set of principles with a content hash (``version``).

    Order is the order of the source file; ``version`` does not depend on it.
    """

    __slots__ = ("principles", "version", "_by_id")

    def __init__(self, principles: Iterable[Principle]) -> None:
        items = tuple(principles)
        if not items:
            raise ValueError("a principle library needs at least one principle")
        by_id: dict[str, Principle] = {}
        dupes: list[str] = []
        for p in items:
            if p.id in by_id:
                dupes.append(p.id)
            by_id[p.id] = p
        if dupes:
            raise ValueError(f"duplicate principle ids: {', '.join(sorted(set(dupes)))}")
        self.principles: tuple[Principle, ...] = items
        self.version: str = _canonical_hash(items)
        self._by_id = by_id

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path | None = None) -> PrincipleLibrary:
        """Load a library from a YAML file (``None`` = the bundled ``principles.yaml``).

        The file is a mapping with a ``principles`` list. Raises ``ValueError`` listing every
        problem found (bad entries by index and id, unknown dimensions, non-slug ids, duplicates,
        unknown or missing fields), ``FileNotFoundError`` if the path does not exist.
        """
        if path is None:
            source = f"<bundled {_BUNDLED}>"
            text = _read_bundled()
        else:
            source = str(path)
            text = Path(path).read_text(encoding="utf-8")
        return cls.from_yaml_text(text, source=source)

    @classmethod
    def from_yaml_text(cls, text: str, *, source: str = "<text>") -> PrincipleLibrary:
        """Parse and validate YAML text; see :meth:`load` for the format and errors."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"principle library {source}: invalid YAML: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("principles"), list):
            raise ValueError(f"principle library {source}: expected a mapping with a 'principles' list")
        return cls.from_records(data["principles"], source=source)

    @classmethod
    def from_records(cls, records: list[Any], *, source: str = "<records>") -> PrincipleLibrary:
        """Validate a list of dicts (the YAML entries). Collects all problems before raising."""
        problems: list[str] = []
        good: list[Principle] = []
        seen: dict[str, int] = {}
        for i, rec in enumerate(records):
            label = f"entry {i}"
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                label += f" (id {rec['id']!r})"
                if rec["id"] in seen:
                    problems.append(f"{label}: duplicate id, first used by entry {seen[rec['id']]}")
                else:
                    seen[rec["id"]] = i
            if not isinstance(rec, dict):
                problems.append(f"{label}: expected a mapping, got {type(rec).__name__}")
                continue
            try:
                good.append(Principle.model_validate(rec))
            except ValidationError as exc:
                for err in exc.errors():
                    where = ".".join(str(x) for x in err["loc"]) or "entry"
                    problems.append(f"{label}: {where}: {err['msg']}")
        if not records:
            problems.append("no principles")
        if problems:
            listing = "\n  - ".join(problems)
            raise ValueError(f"principle library {source} has {len(problems)} problem(s):\n  - {listing}")
        return cls(good)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.principles)

    def __contains__(self, pid: object) -> bool:
        return pid in self._by_id

    def __repr__(self) -> str:
        return f"PrincipleLibrary({len(self.principles)} principles, version={self.version})"

    def get(self, pid: str) -> Principle:
        """The principle with this id; ``KeyError`` naming the id if there is none."""
        try:
            return self._by_id[pid]
        except KeyError:
            raise KeyError(f"unknown principle id {pid!r}") from None

    def ids(self) -> list[str]:
        return [p.id for p in self.principles]

    def negative(self) -> list[Principle]:
        return [p for p in self.principles if p.polarity == "negative"]

    def positive(self) -> list[Principle]:
        return [p for p in self.principles if p.polarity == "positive"]

    def by_dimension(self) -> dict[str, list[Principle]]:
        """All 12 dimensions in canonical order, each with its principles (possibly an empty list)."""
        out: dict[str, list[Principle]] = {d: [] for d in DIMENSIONS}
        for p in self.principles:
            out[p.dimension].append(p)
        return out

    # ------------------------------------------------------------------ rendering
    def render_for_prompt(
        self, *, ids: Iterable[str] | None = None, detail: Literal["definition", "name", "id"] = "definition"
    ) -> str:
        """A compact plain-text block for the judge prompt, grouped by dimension::

            Character Development
            - breaks_character (neg, sentence): The reply steps outside ...

        ``ids`` restricts the block to those principles (duplicates ignored; an unknown id raises
        ``KeyError``). Dimensions without any selected principle are left out. ``detail="name"``
        puts the short name in place of the definition (about a quarter of the length, for small
        context windows). ``detail="id"`` lists only the ids, one line per dimension, flaws then
        qualities (the ids are descriptive slugs; the cheapest form, for CPU judges)::

            Character Development: flaws breaks_character, ...; qualities consistent_voice, ...
        """
        if detail not in ("definition", "name", "id"):
            raise ValueError(f"detail must be 'definition', 'name' or 'id', got {detail!r}")
        if ids is None:
            chosen = set(self._by_id)
        else:
            chosen = {self.get(pid).id for pid in ids}
        blocks: list[str] = []
        if detail == "id":
            for dim, members in self.by_dimension().items():
                parts = []
                for polarity, label in (("negative", "flaws"), ("positive", "qualities")):
                    picked = [p.id for p in members if p.id in chosen and p.polarity == polarity]
                    if picked:
                        parts.append(f"{label} {', '.join(picked)}")
                if parts:
                    blocks.append(f"{dim}: {'; '.join(parts)}")
            return "\n".join(blocks)
        for dim, members in self.by_dimension().items():
            lines = [
                f"- {p.id} ({_POLARITY_TAG[p.polarity]}, {p.level}): {getattr(p, detail)}"
                for p in members
                if p.id in chosen
            ]
            if lines:
                blocks.append("\n".join([dim, *lines]))
        return "\n\n".join(blocks)

    def to_list(self) -> list[dict[str, str]]:
        """Plain dicts in library order (the body of ``GET /v1/principles``)."""
        return [p.model_dump() for p in self.principles]


@cache
def default_library() -> PrincipleLibrary:
    """The bundled library, loaded once per process."""
    return PrincipleLibrary.load()
