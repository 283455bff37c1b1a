"""GenRM preference data: principle-grounded hard negatives and the judge's training examples (no model)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from data_builder._books import load_book, load_sources, scenes_for_pairs
from data_builder._negatives import FLAW_KINDS, hard_negatives
from data_builder._pairs import MixConfig
from data_builder._teacher_pairs import balance_labelled
from her_genrm import CompactTemplate, LabelledPair, parse_compact, training_examples
from her_genrm._templates import REASON_MAX_CHARS
from her_roleplay import default_library, validate_reply

COSER = Path(__file__).resolve().parent / "data" / "coser"
LEAR, OTHELLO, TEST_SET = COSER / "book_king_lear.json", COSER / "book_othello.json", COSER / "example_test_set.json"


@pytest.fixture(scope="module")
def othello_pairs() -> list[LabelledPair]:
    return hard_negatives(load_book(OTHELLO), seed=0)


def test_book_file_loads_with_stable_ids_and_cleaning():
    scenes = load_book(LEAR)
    again = load_book(LEAR)
    assert [s.sample_id for s in scenes] == [s.sample_id for s in again]
    assert len({s.sample_id for s in scenes}) == len(scenes)
    # King Lear has two plots without any conversation: dropped, the rest kept in (i_p, i_c) order
    assert all(s.book == "King Lear" and s.dialogues for s in scenes)
    assert [(s.i_p, s.i_c) for s in scenes] == sorted((s.i_p, s.i_c) for s in scenes)
    assert 4 not in {s.i_p for s in scenes} and 5 not in {s.i_p for s in scenes}


def test_evaluation_scenes_are_excluded_by_key():
    kept = scenes_for_pairs([LEAR, OTHELLO], exclude=[TEST_SET])
    keys = {(s.book, s.i_p, s.i_c) for s in kept}
    test_keys = {(s.book, s.i_p, s.i_c) for s in load_sources([TEST_SET])}
    assert test_keys and not keys & test_keys
    assert len(kept) == len(load_sources([LEAR, OTHELLO])) - len(test_keys)


def test_every_flaw_kind_is_built_with_known_winners(othello_pairs):
    library = default_library()
    kinds = Counter(p.flaw_kind for p in othello_pairs)
    assert set(kinds) == set(FLAW_KINDS)
    for pair in othello_pairs:
        assert pair.a != pair.b
        assert pair.label in ("a", "b") and pair.pattern == f"all_{pair.label}"
        assert len(pair.comparisons) == 3
        assert all(c.principle in library for c in pair.comparisons)
        flaw = pair.comparisons[0]
        assert flaw.principle == FLAW_KINDS[pair.flaw_kind].principle and flaw.winner == pair.label
        assert all(c.winner in (pair.label, "tie") for c in pair.comparisons)
    # the real reply sits on either side, about half the time each
    labels = Counter(p.label for p in othello_pairs)
    assert abs(labels["a"] - labels["b"]) < 0.15 * len(othello_pairs)


def test_corruptions_commit_the_flaw_the_validators_know(othello_pairs):
    """Where our format validators cover the flaw, they see it in the corrupted reply and not in the real one."""
    checked, seen = Counter(), Counter()
    for pair in othello_pairs:
        real, bad = (pair.a, pair.b) if pair.label == "a" else (pair.b, pair.a)
        codes = {f.code for f in validate_reply(bad, speaker=pair.character)}
        real_codes = {f.code for f in validate_reply(real, speaker=pair.character)}
        if pair.flaw_kind == "broken_format":
            assert codes & {"malformed_tag", "unknown_tag"} and not real_codes & {"malformed_tag", "unknown_tag"}
            checked[pair.flaw_kind] += 1
        elif pair.flaw_kind == "third_person_thought" and "role_thinking_third_person" not in real_codes:
            # the validator is narrow on purpose (a name as clause subject): most edits, not all, trip it
            checked[pair.flaw_kind] += 1
            seen[pair.flaw_kind] += "role_thinking_third_person" in codes
    assert checked["broken_format"] > 10 and checked["third_person_thought"] > 3
    assert seen["third_person_thought"] >= 0.5 * checked["third_person_thought"]


def test_hard_negatives_are_deterministic_and_capped():
    scenes = load_book(OTHELLO)[:3]
    first = hard_negatives(scenes, per_turn=2, seed=7)
    assert [p.model_dump() for p in first] == [p.model_dump() for p in hard_negatives(scenes, per_turn=2, seed=7)]
    per_turn = Counter((p.scene_id, p.turn) for p in first)
    assert max(per_turn.values()) <= 2
    assert len({p.id for p in first}) == len(first)


def test_training_examples_mirror_slots_and_parse_as_served_answers(othello_pairs):
    library = default_library()
    template = CompactTemplate(library, principle_detail="none")
    pair = othello_pairs[0]
    rows = training_examples(pair, template, modes=("cot", "fast"), swap=True)
    assert [(r["mode"], r["a_first"]) for r in rows] == [("cot", True), ("fast", True), ("cot", False),
                                                          ("fast", False)]
    winner_slot = {True: "A" if pair.label == "a" else "B", False: "B" if pair.label == "a" else "A"}
    for row in rows:
        target = row["completion"][0]["content"]
        system = row["prompt"][0]["content"]
        assert "breaks_character" not in system  # the trained-judge prompt carries no principle list
        if row["mode"] == "fast":
            assert target == winner_slot[row["a_first"]]
            assert system.endswith("Answer with a single token: A, B or tie.")
        else:
            parsed = parse_compact(target, set(library.ids()))
            assert parsed.verdict == winner_slot[row["a_first"]]
            assert parsed.comparisons[0][1] == winner_slot[row["a_first"]]
            assert all(len(c.reason) <= REASON_MAX_CHARS for c in parsed.comparisons)
            assert ": " not in target and ", " not in target.split('"reason"')[0]  # compact like the decoder
    # the shown candidates swap between the orders
    assert rows[0]["prompt"][1]["content"] != rows[2]["prompt"][1]["content"]


def test_training_examples_refuse_answers_the_schema_forbids(othello_pairs):
    template = CompactTemplate(default_library(), principle_detail="none")
    short = othello_pairs[0].model_copy(update={"comparisons": othello_pairs[0].comparisons[:2]})
    with pytest.raises(ValueError, match="3 to 5"):
        training_examples(short, template, modes=("cot",))
    assert len(training_examples(short, template, modes=("fast",))) == 2  # fast needs no comparisons


def test_balance_labelled_meets_the_mix_and_mirrors_flips(othello_pairs):
    tie = othello_pairs[0].model_copy(update={"label": "tie", "pattern": "tie", "id": "t"})
    mixed = othello_pairs[1].model_copy(update={"pattern": "mixed", "id": "m"})
    pool = othello_pairs[:40] + [tie.model_copy(update={"id": f"t{i}"}) for i in range(10)] + [
        mixed.model_copy(update={"id": f"m{i}"}) for i in range(60)]
    out = balance_labelled(pool, MixConfig(total=20, flip_fraction=0.5, seed=1))
    patterns = Counter(p.pattern for p in out)
    assert (patterns["mixed"], patterns["tie"], patterns["all_a"] + patterns["all_b"]) == (12, 2, 6)
    assert sum(1 for p in out if p.id.endswith("-flip")) == 10
    by_id = {p.id: p for p in pool}
    for p in out:
        if p.id.endswith("-flip"):
            original = by_id[p.id.removesuffix("-flip")]
            assert (p.a, p.b) == (original.b, original.a)
            assert p.label == {"a": "b", "b": "a", "tie": "tie"}[original.label]


def test_build_negatives_cli_writes_labelled_pairs(tmp_path):
    from her_cli.main import main

    out = tmp_path / "pairs.jsonl"
    assert main(["build", "negatives", "--sources", str(OTHELLO), "--exclude", str(TEST_SET),
                 "--kinds", "assistant_voice,mind_reading", "--out", str(out)]) == 0
    pairs = [LabelledPair.model_validate(json.loads(line)) for line in out.read_text().splitlines()]
    assert pairs and {p.flaw_kind for p in pairs} == {"assistant_voice", "mind_reading"}
    assert all(p.scene_id and not p.scene_id.startswith("othello-9-0-") for p in pairs)
    assert main(["build", "negatives", "--sources", str(OTHELLO), "--kinds", "nonsense", "--out", str(out)]) == 2
