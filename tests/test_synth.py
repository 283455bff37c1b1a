"""HER reverse synthesis (role_thinking, system_thinking, setting) with the real bundled model as teacher:
every unit is accounted for (output or reject with findings), outputs pass the validators and load
again, a killed run resumes without repeating or losing units, and a dry run loads no model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from data_builder import STAGES, SynthConfig, UnitStore, dry_run, quote_in_source, synthesize
from data_builder._books import load_sources, turn_id
from data_builder._synth import check_addition, describe_shape, plot_source, role_thinking_prompt, source_excerpt
from her_roleplay import ENVIRONMENT, build_character_samples, load_scenes, validate_reply

COSER = Path(__file__).resolve().parent / "data" / "coser"
KING_LEAR = COSER / "book_king_lear.json"
HER = str(Path(sys.executable).with_name("her"))


def first_scene(lines: int):
    scene = load_sources([KING_LEAR])[0]
    return scene.model_copy(update={"dialogues": scene.dialogues[:lines]})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# --- no model ------------------------------------------------------------------------------------------

def test_quote_check_rejects_quotes_not_in_source() -> None:
    scene = first_scene(4)
    source = plot_source(scene)
    config = SynthConfig()
    real = " ".join(source.split()[10:20])
    # line breaks inside the quote do not matter, words do
    assert quote_in_source(real.replace(" ", "\n  ", 3), source)
    assert check_addition({"text": "Kent and Gloucester talk first.", "quote": real}, source, config) == []
    made_up = {"text": "Lear is tired.", "quote": "the King yawned and said he was very tired"}
    assert [f.code for f in check_addition(made_up, source, config)] == ["quote_not_in_source"]
    tampered = {"text": "x", "quote": real.replace(real.split()[3], "banana")}
    assert [f.code for f in check_addition(tampered, source, config)] == ["quote_not_in_source"]
    short = {"text": " ", "quote": "the King"}
    assert sorted(f.code for f in check_addition(short, source, config)) == ["empty_addition", "quote_too_short"]
    assert not quote_in_source("   ", source)


def test_excerpt_fits_the_limit_and_comes_from_the_source() -> None:
    scene = first_scene(14)
    excerpt = source_excerpt(scene, 3000)
    assert 0 < len(excerpt) <= 3000 < len(plot_source(scene))
    assert quote_in_source(excerpt, plot_source(scene))
    assert "Lear" in excerpt


def test_role_thinking_prompt_names_previous_shapes() -> None:
    scene = first_scene(14)
    lear_lines = [i for i, d in enumerate(scene.dialogues) if d.character == "King Lear"]
    earlier = ["<role_thinking>I must know.</role_thinking>Tell me."]
    prompt = role_thinking_prompt(scene, lear_lines[1], earlier, SynthConfig())
    assert describe_shape(earlier[0]) == 'thought -> speech, opening "I must know."'
    assert describe_shape(earlier[0]) in prompt[1].content
    assert "user" not in prompt[0].content.lower()


def test_config_and_store_reject_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="subset"):
        SynthConfig(stages=("role_thinking", "plot_twist"))
    with pytest.raises(ValueError, match="thought_chars"):
        SynthConfig(thought_chars=(200, 50))
    store_file = tmp_path / "units.jsonl"
    store_file.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        UnitStore(store_file)
    store_file.write_text('{"key": "a"}\n{"key": "b", "te', encoding="utf-8")  # torn by a kill
    store = UnitStore(store_file)
    store.put({"key": "c"})
    store.close()
    assert store.torn_lines == 1
    assert [r["key"] for r in read_jsonl(store_file)] == ["a", "c"]


def test_dry_run_counts_units_and_tokens_without_a_model(tmp_path: Path) -> None:
    sources = [str(KING_LEAR), str(COSER / "example_test_set.json")]
    proc = subprocess.run([HER, "build", "synth", "--sources", *sources, "--out", str(tmp_path / "d"),
                           "--limit-scenes", "2", "--max-lines", "5", "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    scenes = load_sources(sources)[:2]
    lines = sum(d.character != ENVIRONMENT for s in scenes for d in s.dialogues[:5])
    assert {s: r["units"] for s, r in report["stages"].items()} == {
        "role_thinking": lines, "system_thinking": lines, "setting": 2}
    for row in report["stages"].values():
        assert row["prompt_tokens"] > 100 * row["units"]
        assert 0 < row["completion_tokens"] <= row["completion_tokens_max"]
    assert "vLLM" not in proc.stderr and "Loading weights" not in proc.stderr
    assert not (tmp_path / "d" / "units.jsonl").exists()


def test_cli_rejects_unknown_stage(tmp_path: Path) -> None:
    proc = subprocess.run([HER, "build", "synth", "--sources", str(KING_LEAR), "--out", str(tmp_path),
                           "--stages", "role_thinking,banter", "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 2 and "subset of role_thinking, system_thinking, setting" in proc.stderr


# --- the real teacher ----------------------------------------------------------------------------------

def test_end_to_end_every_unit_is_output_or_rejected(engine, tmp_path: Path) -> None:
    scene = first_scene(4)  # Environment + 3 character lines
    config = SynthConfig()
    out = tmp_path / "synth"
    summary = asyncio.run(synthesize([scene], engine, out, config, concurrency=4, progress=False))
    planned = dry_run([scene], config)["stages"]
    assert {s: summary.units[s] for s in STAGES} == {s: planned[s]["units"] for s in STAGES}
    assert all(summary.called[s] == summary.units[s] for s in STAGES)  # a fresh folder: nothing cached
    assert sum(summary.prompt_tokens.values()) > 0 and sum(summary.completion_tokens.values()) > 0

    records = read_jsonl(out / "scenes.jsonl")
    rejects = read_jsonl(out / "rejects.jsonl")
    assert len(records) == 1
    rejected = Counter((r["id"], r["stage"]) for r in rejects if r["stage"] != "setting")
    assert all(r["findings"] and all(f["code"] and f["message"] for f in r["findings"]) for r in rejects)
    cast = scene.cast()
    for i, line in enumerate(records[0]["dialogues"]):
        if line["character"] == ENVIRONMENT:
            assert "synth" not in line
            continue
        assert line["original"] == scene.dialogues[i].message
        for stage in ("role_thinking", "system_thinking"):
            status = line["synth"][stage]
            assert (status == "rejected") == ((turn_id(scene, i), stage) in rejected), (i, stage)
        if all(v == "accepted" for v in line["synth"].values()):
            others = [n for n in cast if n != line["character"]]
            assert validate_reply(line["message"], speaker=line["character"], others=others,
                                  require_system_thinking=True, max_visible_words=config.max_visible_words) == []
    for stage in ("role_thinking", "system_thinking"):
        assert summary.accepted[stage] + summary.rejected[stage] == summary.units[stage]
        assert summary.rejected[stage] == sum(1 for (_i, s) in rejected if s == stage)
    # setting: the unit is kept or rejected whole; kept additions quote the source, dropped ones are rejects
    assert summary.accepted["setting"] + summary.rejected["setting"] == 1
    for addition in records[0].get("setting_additions", []):
        assert quote_in_source(addition["quote"], plot_source(scene))
    for r in rejects:
        if r["stage"] == "setting" and r["id"] != scene.sample_id:
            assert {f["code"] for f in r["findings"]} <= {"quote_not_in_source", "quote_too_short", "empty_addition"}

    # the records still load as scenes and still make training samples
    reloaded = load_scenes(out / "scenes.jsonl")[0]
    assert [d.character for d in reloaded.dialogues] == [d.character for d in scene.dialogues]
    assert build_character_samples(reloaded)
    usage = json.loads((out / "usage.json").read_text())
    assert usage["stages"]["role_thinking"]["teacher_calls"] == summary.units["role_thinking"]

    # a second run answers everything from the store: no teacher call, same outputs
    again = asyncio.run(synthesize([scene], engine, out, config, concurrency=4, progress=False))
    assert sum(again.called.values()) == 0 and again.cached == summary.units
    assert read_jsonl(out / "scenes.jsonl") == records and read_jsonl(out / "rejects.jsonl") == rejects


def _unit_lines(path: Path) -> int:
    if not path.exists():
        return 0
    return path.read_bytes().count(b"\n")


def test_killed_cli_run_resumes_without_repeats_or_losses(tmp_path: Path) -> None:
    out = tmp_path / "run"
    units_file = out / "units.jsonl"
    command = [HER, "build", "synth", "--sources", str(KING_LEAR), "--out", str(out), "--limit-scenes", "1",
               "--max-lines", "3", "--stages", "role_thinking,system_thinking", "--concurrency", "1",
               "--no-progress", "--teacher-engine", "transformers"]
    total = 4  # 2 character lines x 2 stages
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # hang guard only: a model load and two teacher calls on a slow box
        while _unit_lines(units_file) < 2:  # concurrency 1: units land one by one
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no unit was written in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = read_jsonl(units_file)
    assert 2 <= len(before) < total, "the run was not interrupted midway"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = read_jsonl(units_file)
    keys = Counter(r["key"] for r in after)
    assert len(after) == total and all(n == 1 for n in keys.values())
    assert after[: len(before)] == before  # done units kept as they were, not redone
    usage = json.loads((out / "usage.json").read_text())["stages"]
    assert sum(row["from_store"] for row in usage.values()) == len(before)
    assert sum(row["teacher_calls"] for row in usage.values()) == total - len(before)
    ids = Counter((r["id"], r["stage"]) for r in after)
    assert len(ids) == total
