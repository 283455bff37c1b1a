"""data_builder policy data: per-turn samples, grouped splits, evaluation exclusion, exports that
the trainers and the verl reward function read as they are. Real CoSER book files, no model."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from data_builder import SplitConfig, build_policy_data, turn_samples
from data_builder._books import load_sources
from data_builder._policy import SPLITS, build_and_export, evaluation_keys, parse_fractions
from her_cli.main import main
from her_roleplay import Scene, build_character_samples, coser_to_her

DATA = Path(__file__).resolve().parent / "data" / "coser"
BOOKS = [DATA / "book_king_lear.json", DATA / "book_othello.json"]
TEST_SET = DATA / "example_test_set.json"
PLAN = "<system_thinking>"


@pytest.fixture(scope="module")
def book_scenes() -> list[Scene]:
    return load_sources(BOOKS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, book_scenes) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("policy")
    return out, build_and_export(BOOKS, out, SplitConfig(), exclude_files=[TEST_SET])


def _own_turns(scene: Scene) -> dict[str, int]:
    """Assistant messages of each character's full sample: the own turns the existing builder sees."""
    return {s.character: sum(m.role == "assistant" for m in s.messages) for s in build_character_samples(scene)}


def _with_plans(scene: Scene) -> Scene:
    """The scene as `her build synth` writes it: every character line in HER tags with its own plan."""
    lines = [
        {"character": d.character,
         "message": d.message if d.character == "Environment"
         else f"<system_thinking>Plan for line {k}.</system_thinking>{coser_to_her(d.message)}"}
        for k, d in enumerate(scene.dialogues)
    ]
    return Scene.model_validate({**scene.model_dump(), "dialogues": lines})


# --- samples -------------------------------------------------------------------------------------------


def test_one_sample_per_own_turn_each_a_prefix_of_the_next(book_scenes, scene):
    for sc in [scene, *book_scenes]:
        samples = turn_samples(sc)
        per_character = Counter(ts.character for ts in samples)
        assert per_character == _own_turns(sc), sc.sample_id
        assert len({ts.sample_id for ts in samples}) == len(samples)
        by_character = defaultdict(list)
        for ts in samples:
            by_character[ts.character].append(ts.sample.messages)
        for character, chats in by_character.items():
            # plain CoSER carries no plans: each prefix is the start of the next one, and the last is
            # exactly the sample the one-per-perspective builder makes
            for shorter, longer in zip(chats, chats[1:], strict=False):
                assert longer[: len(shorter)] == shorter
            full = next(s for s in build_character_samples(sc) if s.character == character)
            assert chats[-1] == full.messages


def test_merged_runs_and_bare_plans_make_the_expected_turns():
    scene = Scene.model_validate({
        "book": "Test Book", "i_p": 0, "i_c": 0, "scenario": "A room.",
        "dialogues": [
            {"character": "Environment", "message": "Rain on the window."},
            {"character": "Ann", "message": "(waves) Hello."},
            {"character": "Ben", "message": "Hi."},
            {"character": "Ben", "message": "[She looks tired.] (sits) Long day?"},
            {"character": "Ann", "message": "Very."},
            {"character": "Environment", "message": "Thunder."},
            {"character": "Ann", "message": "<system_thinking>Ann stays quiet.</system_thinking>"},
        ],
    })
    samples = turn_samples(scene)
    assert [(ts.character, ts.line) for ts in samples] == [("Ann", 1), ("Ben", 3), ("Ann", 4)]
    assert samples[1].sample_id == f"{scene.sample_id}-t3-ben"
    ben_target = samples[1].target()["content"]
    assert "Hi." in ben_target and "Long day?" in ben_target  # the two lines form one turn


def test_plans_only_on_targets(scene):
    planned = _with_plans(scene)
    samples = turn_samples(planned)
    assert Counter(ts.character for ts in samples) == _own_turns(scene)
    for ts in samples:
        target = ts.target()["content"]
        # the plan of the target's own (last) line, once, at the start
        assert target.startswith(f"<system_thinking>Plan for line {ts.line}.</system_thinking>")
        assert target.count(PLAN) == 1
        assert all(PLAN not in m["content"] for m in ts.prompt()[1:])
        assert "Start every reply with one <system_thinking>" in ts.prompt()[0]["content"]
        assert PLAN not in ts.reference() and ts.reference()
    for ts in turn_samples(scene):  # plain CoSER: no plan anywhere, and the prompt asks for none
        assert PLAN not in ts.target()["content"]
        assert "Start every reply with one <system_thinking>" not in ts.prompt()[0]["content"]


# --- splits and exclusion ------------------------------------------------------------------------------


def test_splits_never_share_a_conversation(book_scenes):
    data = build_policy_data(book_scenes, SplitConfig(fractions=(0.5, 0.25, 0.25), seed=7))
    scene_ids = {name: {ts.scene.sample_id for ts in data.splits[name]} for name in SPLITS}
    assert all(scene_ids.values()), "every split should get conversations at these fractions"
    assert not (scene_ids["train"] & scene_ids["validation"])
    assert not (scene_ids["train"] & scene_ids["test"])
    assert not (scene_ids["validation"] & scene_ids["test"])
    assert sum(len(v) for v in data.splits.values()) == sum(len(turn_samples(s)) for s in book_scenes)
    again = build_policy_data(list(reversed(book_scenes)), SplitConfig(fractions=(0.5, 0.25, 0.25), seed=7))
    assert {n: {ts.scene.sample_id for ts in again.splits[n]} for n in SPLITS} == scene_ids
    other = build_policy_data(book_scenes, SplitConfig(fractions=(0.5, 0.25, 0.25), seed=8))
    assert {n: {ts.scene.sample_id for ts in other.splits[n]} for n in SPLITS} != scene_ids


def test_holdout_book_goes_to_test_whole(book_scenes):
    data = build_policy_data(book_scenes, SplitConfig(holdout_books=("othello",)))
    othello = {s.sample_id for s in book_scenes if s.book == "Othello"}
    assert othello <= {ts.scene.sample_id for ts in data.splits["test"]}
    assert all(ts.scene.book == "King Lear" for n in ("train", "validation") for ts in data.splits[n])
    with pytest.raises(ValueError, match=r"holdout book\(s\) \['Hamlet'\] match no scene"):
        build_policy_data(book_scenes, SplitConfig(holdout_books=("Hamlet",)))


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="sum to 1.1"):
        SplitConfig(fractions=(0.8, 0.2, 0.1))
    with pytest.raises(ValueError, match="three fractions"):
        parse_fractions("0.9,0.1")
    with pytest.raises(ValueError, match="three numbers"):
        parse_fractions("0.8,a,0.1")


def test_evaluation_scenes_are_excluded_and_counted(book_scenes):
    keys = evaluation_keys([TEST_SET])
    assert {("king lear", 16, 0), ("king lear", 17, 0)} <= keys
    in_books = [s for s in book_scenes if (s.book, s.i_p, s.i_c) in {("King Lear", 16, 0), ("King Lear", 17, 0)}]
    assert len(in_books) == 2  # the test set's King Lear scenes really are in the book file
    data = build_policy_data(book_scenes, SplitConfig(), exclude=keys)
    assert ("King Lear", 16, 0) in data.excluded and ("King Lear", 17, 0) in data.excluded
    kept = {ts.scene.sample_id for name in SPLITS for ts in data.splits[name]}
    assert not kept & {s.sample_id for s in in_books}
    assert sum(data.counts()[n]["scenes"] for n in SPLITS) == len(book_scenes) - len(data.excluded)


# --- exports and their readers -------------------------------------------------------------------------


def test_exports_read_back_with_datasets(exported):
    from datasets import Dataset

    out, summary = exported
    assert summary["excluded"]["count"] == 3  # King Lear 16/0, 17/0 and Othello 9/0
    assert summary["dropped_on_load"] == {"plots without conversations": 2}
    assert json.loads((out / "summary.json").read_text()) == summary
    for name in SPLITS:
        expected = summary["splits"][name]["samples"]
        for shape in ("sft", "grpo", "verl"):
            assert len(Dataset.from_parquet(str(out / shape / f"{name}.parquet"))) == expected
            assert len(Dataset.from_json(str(out / shape / f"{name}.jsonl"))) == expected
    sft = Dataset.from_parquet(str(out / "sft" / "train.parquet"))
    assert {"prompt", "completion", "sample_id", "scene_id", "character", "line"} <= set(sft.column_names)


def test_trainer_loaders_read_the_jsonl_as_is(exported):
    from policy_trainer._data import DataSpec, load_grpo_dataset, load_sft_dataset

    out, summary = exported
    n = summary["splits"]["train"]["samples"]
    sft = load_sft_dataset(DataSpec(jsonl=[str(out / "sft" / "train.jsonl")]))
    assert len(sft) == n
    first = json.loads((out / "sft" / "train.jsonl").read_text().splitlines()[0])
    assert sft[0]["prompt"] == first["prompt"] and sft[0]["completion"] == first["completion"]
    assert sft[0]["prompt"][-1]["role"] == "user" and sft[0]["completion"][0]["role"] == "assistant"
    grpo = load_grpo_dataset(DataSpec(jsonl=[str(out / "grpo" / "train.jsonl")]))
    assert len(grpo) == n and grpo[0]["reference"] and grpo[0]["scene_id"] == first["scene_id"]


def test_verl_rows_feed_the_reward_functions_row_reading(exported):
    import pandas as pd

    from policy_trainer._reward_client import RewardClient
    from policy_trainer._shapes import context_of, reference_text
    from policy_trainer._verl import _verl_batch

    out, _ = exported
    rows = pd.read_parquet(out / "verl" / "validation.parquet")  # numpy arrays, as verl hands them over
    assert set(rows.columns) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    client = RewardClient(url="http://127.0.0.1:9")  # builds no connection until it scores
    prompts, completions, columns = _verl_batch(
        client, list(rows["data_source"]), ["A rollout."] * len(rows),
        [r["ground_truth"] for r in rows["reward_model"]], list(rows["extra_info"]),
    )
    assert completions == ["A rollout."] * len(rows)
    for i, prompt in enumerate(prompts):
        context = context_of(prompt)
        assert context == [dict(m) for m in rows["prompt"][i]]  # extra_info repeats verl's prompt
        assert context[0]["role"] == "system" and context[-1]["role"] == "user"
        assert PLAN not in reference_text(columns["reference"][i])
    assert rows["reward_model"][0]["style"] == "model"


def test_synthesised_scenes_jsonl_exports_plans_for_sft_only(tmp_path, scene):
    source = tmp_path / "synth_scenes.jsonl"
    source.write_text(json.dumps(_with_plans(scene).model_dump(by_alias=True)) + "\n")
    summary = build_and_export([source], tmp_path / "out", SplitConfig(fractions=(1.0, 0.0, 0.0)))
    assert summary["splits"]["train"]["samples"] == sum(_own_turns(scene).values())
    shapes, formats = ("sft", "grpo", "verl"), ("jsonl", "parquet")
    assert summary["files"] == [f"{shape}/train.{ext}" for shape in shapes for ext in formats]  # no empty splits
    sft = [json.loads(x) for x in (tmp_path / "out" / "sft" / "train.jsonl").read_text().splitlines()]
    grpo = [json.loads(x) for x in (tmp_path / "out" / "grpo" / "train.jsonl").read_text().splitlines()]
    assert all(r["completion"][0]["content"].startswith(PLAN) for r in sft)
    assert all(PLAN not in r["reference"] for r in grpo)


# --- the command ---------------------------------------------------------------------------------------


def test_build_policy_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "policy"
    code = main(["build", "policy", "--sources", *map(str, BOOKS), "--out", str(out), "--exclude", str(TEST_SET),
                 "--split", "0.6,0.2,0.2", "--holdout-book", "Othello", "--seed", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert "3 evaluation scenes excluded" in printed
    for name in SPLITS:
        counts = summary["splits"][name]
        assert f"{name}: {counts['scenes']} scenes, {counts['samples']} samples" in printed
    assert summary["holdout_books"] == ["Othello"] and summary["fractions"] == [0.6, 0.2, 0.2]
    test_books = {json.loads(x)["book"] for x in (out / "grpo" / "test.jsonl").read_text().splitlines()}
    assert "Othello" in test_books

    assert main(["build", "policy", "--sources", str(BOOKS[0]), "--out", str(out), "--holdout-book", "Hamlet"]) == 2
    assert "match no scene" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["build", "policy", "--sources", str(BOOKS[0]), "--out", str(out), "--split", "0.9,0.9,0.1"])
    assert stop.value.code == 2
    assert "sum to 1.9" in capsys.readouterr().err
