"""CoSER scene schema: the real test-set record loads unchanged; aliases, ids, helpers, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from her_roleplay._scene import ENVIRONMENT, KeyCharacter, Scene, SceneLoadError, load_scenes

FIXTURE = Path(__file__).resolve().parent / "data" / "coser_test_sample_pride_and_prejudice.json"


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def scene() -> Scene:
    (only,) = load_scenes(FIXTURE)
    return only


def test_real_record_loads_and_dumps_back_unchanged(scene: Scene, raw: dict) -> None:
    assert scene.book == "Pride and Prejudice" and (scene.i_p, scene.i_c, scene.tag) == (70, 0, "id")
    assert len(scene.dialogues) == 15 and scene.dialogues[7].character == ENVIRONMENT
    assert scene.speaking_characters_w_env == ["Mr Bennet", "Elizabeth Bennet", "Environment"]
    # Every key, the `thought` spelling and the plot's extra keys survive a round trip.
    assert scene.model_dump(by_alias=True, exclude_unset=True) == raw


def test_unknown_fields_are_kept(scene: Scene, raw: dict) -> None:
    assert scene.plot is not None
    assert scene.plot.chapter == "Chapter 57" and scene.plot.prominence == 80  # type: ignore[attr-defined]
    extra = copy.deepcopy(raw) | {"source_release": "v2"}
    extra["dialogues"][0]["emotion"] = "amused"
    loaded = Scene.model_validate(extra)
    assert loaded.model_extra == {"source_release": "v2"}
    assert loaded.dialogues[0].model_extra == {"emotion": "amused"}


def test_thought_and_old_motivation_key_give_the_same_attribute(scene: Scene, raw: dict) -> None:
    old = copy.deepcopy(raw)
    for kc in old["key_characters"]:
        kc["motivation"] = kc.pop("thought")
    old_scene = Scene.model_validate(old)
    for name in ("Elizabeth Bennet", "Mr Bennet"):
        assert old_scene.motivation_of(name) == scene.motivation_of(name)
    assert scene.motivation_of("Elizabeth Bennet").startswith("I am deeply anxious")
    # Written back under the current key.
    assert old_scene.key_characters[0].model_dump(by_alias=True)["thought"].startswith("I am deeply anxious")


def test_conflicting_thought_and_motivation_are_refused() -> None:
    with pytest.raises(ValidationError, match="both `thought` and `motivation`"):
        KeyCharacter.model_validate({"name": "A", "thought": "x", "motivation": "y"})
    same = KeyCharacter.model_validate({"name": "A", "thought": "x", "motivation": "x"})
    assert same.motivation == "x"


def test_sample_id_is_stable_and_distinguishes_records(scene: Scene, raw: dict) -> None:
    again = Scene.model_validate(copy.deepcopy(raw))
    assert scene.sample_id == again.sample_id and scene.seed == again.seed
    assert scene.sample_id.startswith("pride-and-prejudice-70-0-")
    other = Scene.model_validate(copy.deepcopy(raw) | {"i_c": 1})
    assert other.sample_id != scene.sample_id and other.seed != scene.seed
    # Titles that slug alike still differ by the hash part.
    punct = Scene.model_validate(copy.deepcopy(raw) | {"book": "Pride & Prejudice"})
    assert punct.sample_id != scene.sample_id


def test_helpers(scene: Scene) -> None:
    assert scene.profile_of("Mr Bennet").startswith("Mr. Bennet is the patriarch")
    assert scene.profile_of("mr bennet ") == scene.profile_of("Mr Bennet")  # case/space-insensitive
    assert scene.profile_of("Mr Collins") is None and scene.motivation_of("Mr Collins") is None
    assert scene.description_of("Mr Collins").startswith("A clergyman")
    assert scene.other_characters("Mr Bennet") == ["Elizabeth Bennet"]
    assert scene.other_characters("Elizabeth Bennet") == ["Mr Bennet"]
    assert ENVIRONMENT not in scene.cast()
    assert scene.has_character("Elizabeth Bennet") and not scene.has_character("Mr Darcy")


def test_load_list_single_object_and_jsonl(tmp_path: Path, raw: dict) -> None:
    second = copy.deepcopy(raw) | {"i_c": 1}
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([raw, second]), encoding="utf-8")
    as_jsonl = tmp_path / "scenes.jsonl"
    as_jsonl.write_text(json.dumps(raw) + "\n\n" + json.dumps(second) + "\n", encoding="utf-8")
    one = tmp_path / "one.json"
    one.write_text(json.dumps(raw, indent=2), encoding="utf-8")
    for path, count in ((as_list, 2), (as_jsonl, 2), (one, 1)):
        scenes = load_scenes(path)
        assert [s.i_c for s in scenes] == [0, 1][:count]


def test_invalid_record_error_names_record_and_field(tmp_path: Path, raw: dict) -> None:
    broken = copy.deepcopy(raw)
    del broken["book"]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(raw) + "\n" + json.dumps(broken) + "\n", encoding="utf-8")
    with pytest.raises(SceneLoadError, match=r"line 2 is not a valid CoSER scene") as info:
        load_scenes(path)
    assert "book" in str(info.value) and isinstance(info.value.__cause__, ValidationError)


def test_other_load_errors(tmp_path: Path, raw: dict) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(SceneLoadError, match="no scene records"):
        load_scenes(empty)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text(json.dumps(raw) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(SceneLoadError, match="line 2"):
        load_scenes(garbage)
    not_object = tmp_path / "numbers.json"
    not_object.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(SceneLoadError, match="record 0: expected a JSON object"):
        load_scenes(not_object)
    with pytest.raises(SceneLoadError, match="cannot read"):
        load_scenes(tmp_path / "missing.json")
    no_lines = copy.deepcopy(raw) | {"dialogues": []}
    with pytest.raises(ValidationError, match="dialogues"):
        Scene.model_validate(no_lines)


# --- CoSER's test_circumstance_{id,ood}.json shape: `i_p` only inside `plot`, fewer top-level keys ----------

CIRCUMSTANCE = Path(__file__).resolve().parent / "data" / "coser_circumstance_sample.json"


def test_circumstance_shape_loads_with_i_p_lifted_from_plot() -> None:
    records = json.loads(CIRCUMSTANCE.read_text(encoding="utf-8"))
    assert all("i_p" not in r and "major_characters" not in r and "tag" not in r for r in records)
    darcy, holmes = load_scenes(CIRCUMSTANCE)
    assert (darcy.i_p, darcy.i_c, holmes.i_p, holmes.i_c) == (12, 0, 3, 1)
    assert darcy.major_characters == [] and darcy.tag is None and darcy.weight is None
    assert darcy.cast() == ["Mr Darcy", "Elizabeth Bennet"]
    assert darcy.motivation_of("Mr Darcy").startswith("Miss Elizabeth's wit")  # the old `motivation` key
    assert darcy.plot is not None and darcy.plot.i_p == 12  # type: ignore[attr-defined]  # kept in the plot too
    assert darcy.sample_id.startswith("pride-and-prejudice-12-0-")


def test_lifted_i_p_gives_the_released_test_set_sample_id(scene: Scene, raw: dict) -> None:
    # The released test set carries `i_p` at the top level and in the plot; the circumstance files only in
    # the plot. Both spellings of one conversation are one sample (same id, same seed).
    plot_only = copy.deepcopy(raw)
    del plot_only["i_p"]
    lifted = Scene.model_validate(plot_only)
    assert (lifted.sample_id, lifted.seed) == (scene.sample_id, scene.seed)
    assert lifted.model_dump(by_alias=True, exclude_unset=True) == raw  # dumps in the released shape


def test_missing_or_conflicting_i_p_is_a_clear_error(tmp_path: Path, raw: dict) -> None:
    nowhere = copy.deepcopy(raw)
    del nowhere["i_p"], nowhere["plot"]["i_p"]
    path = tmp_path / "no_i_p.json"
    path.write_text(json.dumps([raw, nowhere]), encoding="utf-8")
    with pytest.raises(SceneLoadError, match=r"record 1 is not a valid CoSER scene[\s\S]*no `i_p`.*`plot.i_p`"):
        load_scenes(path)
    no_plot = copy.deepcopy(nowhere)
    del no_plot["plot"]
    with pytest.raises(ValidationError, match="no `i_p`"):
        Scene.model_validate(no_plot)
    conflict = copy.deepcopy(raw)
    conflict["plot"]["i_p"] = 71
    with pytest.raises(ValidationError, match=r"`i_p` is 70 but `plot.i_p` is 71"):
        Scene.model_validate(conflict)
