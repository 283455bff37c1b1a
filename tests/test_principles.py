"""The GenRM principle library: bundled content, validation, versioning and prompt rendering."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from her_roleplay._principles import DIMENSIONS, Principle, PrincipleLibrary, default_library

BUNDLED = Path(__file__).resolve().parents[1] / "her_roleplay" / "principles.yaml"


@pytest.fixture(scope="module")
def lib() -> PrincipleLibrary:
    return PrincipleLibrary.load()


def _records() -> list[dict]:
    return yaml.safe_load(BUNDLED.read_text(encoding="utf-8"))["principles"]


def _write(tmp_path: Path, records: list, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"principles": records}, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------- bundled content
def test_dimensions_are_the_twelve_in_order() -> None:
    assert DIMENSIONS == (
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


def test_bundled_library_size_and_coverage(lib: PrincipleLibrary) -> None:
    assert len(lib.principles) >= 48
    counts = Counter(p.dimension for p in lib.principles)
    assert set(counts) == set(DIMENSIONS)
    assert min(counts.values()) >= 3, counts
    neg, pos = lib.negative(), lib.positive()
    assert len(neg) + len(pos) == len(lib.principles)
    # flaws decide first in the judge, so they must be well represented
    assert len(neg) >= len(lib.principles) // 3 and len(pos) >= 12
    assert {p.level for p in lib.principles} == {"sentence", "session"}


def test_bundled_ids_unique_slugs(lib: PrincipleLibrary) -> None:
    ids = lib.ids()
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", i) for i in ids), ids
    assert all(p.definition and "\n" not in p.definition for p in lib.principles)


def test_bundled_has_the_core_role_play_flaws(lib: PrincipleLibrary) -> None:
    for pid in (
        "breaks_character",
        "mind_reading",
        "system_thinking_leak",
        "repeats_earlier_lines",
        "speaks_for_others",
        "contradicts_setting",
        "empty_or_degenerate",
        "broken_format",
        "overlong_monologue",
        "out_of_era_language",
        "unsafe_beyond_scene",
    ):
        assert lib.get(pid).polarity == "negative", pid
    assert lib.get("inner_thought_subtext").polarity == "positive"


def test_accessors(lib: PrincipleLibrary) -> None:
    p = lib.get("mind_reading")
    assert p.dimension == "Emotional Expression" and p.level == "sentence"
    with pytest.raises(KeyError, match="no_such_principle"):
        lib.get("no_such_principle")
    groups = lib.by_dimension()
    assert list(groups) == list(DIMENSIONS)
    assert sum(len(v) for v in groups.values()) == len(lib.principles)
    assert all(q.dimension == d for d, members in groups.items() for q in members)
    rows = lib.to_list()
    assert [r["id"] for r in rows] == lib.ids()
    assert set(rows[0]) == {"id", "name", "dimension", "definition", "level", "polarity"}
    assert all(isinstance(v, str) for r in rows for v in r.values())


def test_principle_is_frozen(lib: PrincipleLibrary) -> None:
    with pytest.raises(ValidationError):
        lib.principles[0].definition = "changed"  # type: ignore[misc]


def test_default_library_is_cached_and_equal_to_load(lib: PrincipleLibrary) -> None:
    assert default_library() is default_library()
    assert default_library().version == lib.version


# ---------------------------------------------------------------- version
def test_version_is_stable_and_order_independent(tmp_path: Path, lib: PrincipleLibrary) -> None:
    assert re.fullmatch(r"[0-9a-f]{16}", lib.version)
    assert PrincipleLibrary.load().version == lib.version
    assert PrincipleLibrary.load(BUNDLED).version == lib.version
    shuffled = list(reversed(_records()))
    assert PrincipleLibrary.load(_write(tmp_path, shuffled)).version == lib.version


@pytest.mark.parametrize(
    "field,value",
    [
        ("definition", "Something else entirely."),
        ("level", "flip"),
        ("polarity", "flip"),
        ("name", "Renamed"),
    ],
)
def test_version_changes_with_any_field(
    tmp_path: Path, lib: PrincipleLibrary, field: str, value: str
) -> None:
    recs = _records()
    if value == "flip":
        options = {"level": ("sentence", "session"), "polarity": ("negative", "positive")}[field]
        value = options[1] if recs[0][field] == options[0] else options[0]
    recs[0][field] = value
    changed = PrincipleLibrary.load(_write(tmp_path, recs))
    assert changed.version != lib.version
    assert changed.get(recs[0]["id"]).model_dump()[field] == value


def test_whitespace_only_edits_keep_the_version(tmp_path: Path, lib: PrincipleLibrary) -> None:
    recs = _records()
    recs[0]["definition"] = "  " + recs[0]["definition"].replace(" ", "\n   ", 1) + "  "
    assert PrincipleLibrary.load(_write(tmp_path, recs)).version == lib.version


# ---------------------------------------------------------------- validation
def test_bad_file_lists_every_problem(tmp_path: Path) -> None:
    recs = _records()
    recs[1]["id"] = recs[0]["id"]  # duplicate
    recs[2]["dimension"] = "Vibes"  # unknown dimension
    recs[3]["id"] = "Bad-Id"  # not a slug
    recs[4]["polarity"] = "neutral"  # bad enum
    del recs[5]["definition"]  # missing field
    recs[6]["weight"] = 2  # unknown field
    with pytest.raises(ValueError) as info:
        PrincipleLibrary.load(_write(tmp_path, recs))
    msg = str(info.value)
    assert "6 problem(s)" in msg
    assert f"entry 1 (id {recs[0]['id']!r}): duplicate id" in msg
    assert "'Vibes'" in msg and recs[2]["id"] in msg
    assert "'Bad-Id'" in msg and "slug" in msg
    assert "entry 4" in msg and "polarity" in msg
    assert "entry 5" in msg and "definition" in msg
    assert "entry 6" in msg and "weight" in msg


@pytest.mark.parametrize(
    "text,needle",
    [
        ("principles: [\n  - id: x", "invalid YAML"),
        ("- id: a\n", "'principles' list"),
        ("principles: []\n", "no principles"),
        ("principles: [42]\n", "expected a mapping"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(needle)) as info:
        PrincipleLibrary.load(path)
    assert str(path) in str(info.value)


def test_missing_file_is_not_silently_replaced(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        PrincipleLibrary.load(tmp_path / "absent.yaml")


def test_principle_validates_on_its_own() -> None:
    ok = dict(
        id="a_b",
        name="N",
        dimension="Overall Quality",
        definition="D.",
        level="sentence",
        polarity="positive",
    )
    assert Principle(**ok).id == "a_b"
    with pytest.raises(ValidationError, match="unknown dimension"):
        Principle(**{**ok, "dimension": "overall quality"})
    with pytest.raises(ValidationError, match="slug"):
        Principle(**{**ok, "id": "a__b"})
    with pytest.raises(ValidationError, match="empty"):
        Principle(**{**ok, "definition": "   "})
    with pytest.raises(ValueError, match="duplicate principle ids: a_b"):
        PrincipleLibrary([Principle(**ok), Principle(**ok)])


# ---------------------------------------------------------------- rendering
def test_render_contains_every_id_once(lib: PrincipleLibrary) -> None:
    text = lib.render_for_prompt()
    bullets = re.findall(r"^- ([a-z0-9_]+) \((neg|pos), (sentence|session)\): \S", text, flags=re.M)
    assert sorted(b[0] for b in bullets) == sorted(lib.ids())
    for pid in lib.ids():
        assert len(re.findall(rf"(?<![a-z0-9_]){pid}(?![a-z0-9_])", text)) == 1, pid
    for dim in DIMENSIONS:
        assert re.search(rf"^{re.escape(dim)}$", text, flags=re.M), dim
    # no Python reprs or leftovers from a model dump
    for junk in ("Principle(", "id=", "{'", "['", "None", "polarity=", "\\n"):
        assert junk not in text, junk
    # dimension headers come in canonical order
    positions = [text.index(f"{d}\n") for d in DIMENSIONS]
    assert positions == sorted(positions)


def test_render_subset_and_names(lib: PrincipleLibrary) -> None:
    text = lib.render_for_prompt(ids=["advances_scene", "mind_reading", "mind_reading"])
    assert text.splitlines() == [
        "Emotional Expression",
        f"- mind_reading (neg, sentence): {lib.get('mind_reading').definition}",
        "",
        "Narrative & Plot",
        f"- advances_scene (pos, session): {lib.get('advances_scene').definition}",
    ]
    short = lib.render_for_prompt(detail="name")
    assert "- breaks_character (neg, sentence): Breaks character" in short
    assert len(short) < len(lib.render_for_prompt()) / 2
    with pytest.raises(KeyError, match="nope"):
        lib.render_for_prompt(ids=["nope"])
    with pytest.raises(ValueError, match="detail"):
        lib.render_for_prompt(detail="full")  # type: ignore[arg-type]
