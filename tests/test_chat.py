"""`her chat`: a character from the fixture scene answers with the real model, plan first; scene and name
picking, `--list`, the interactive commands and the JSONL transcript."""

from __future__ import annotations

import copy
import io
import json
import sys
from pathlib import Path

import pytest

from her_cli import main
from her_cli._chat import SYSTEM_THINKING_OPEN, ChatSession, _pick_names, default_transcript_path
from her_engines import Engine, GenRequest, GenResult
from her_roleplay import Scene, build_chat_prompt, load_scenes, parse_reply

DATA = Path(__file__).resolve().parent / "data"
# CoSER's test_circumstance shape: `i_p` only in the plot, no `major_characters`.
CIRCUMSTANCE = DATA / "coser_circumstance_sample.json"


@pytest.mark.model
async def test_reply_continues_the_open_system_thinking_turn(engine, transformers_engine, scene):
    session = ChatSession(engine, scene, "Elizabeth Bennet", "Mr Bennet", max_tokens=24, temperature=0.0)
    full = await session.reply("Lizzy, I was going to look for you; come into my room.")
    assert full.startswith(SYSTEM_THINKING_OPEN)
    parse_reply(full)  # never raises, even on a truncated reply
    assert session.history[-1] == ("Elizabeth Bennet", full)
    # the prompt the model continued ends with the open tag, not with an end-of-turn token
    messages = build_chat_prompt(scene, "Elizabeth Bennet", session.history[:1])
    rendered = transformers_engine.render(GenRequest(messages=messages, prefill=SYSTEM_THINKING_OPEN))
    assert rendered.endswith(SYSTEM_THINKING_OPEN)
    # the next turn shows the character's own earlier reply without its hidden plan
    await session.reply("Well, Lizzy?")
    own_turns = [m.content for m in build_chat_prompt(scene, "Elizabeth Bennet", session.history[:3])
                 if m.role == "assistant"]
    assert own_turns and all("<system_thinking>" not in t for t in own_turns)


@pytest.mark.model
def test_chat_cli_one_shot(scene_file, tmp_path, capsys):
    # The CLI's plumbing on the quick-loading fallback engine (the default, vLLM, is covered by `her judge`).
    code = main(["chat", "--scene", str(scene_file), "--character", "Mr Bennet", "--as", "Elizabeth Bennet",
                 "--message", "What is it, Papa?", "--max-tokens", "16", "--temperature", "0", "--show-think",
                 "--top-p", "0.5", "--save", str(tmp_path), "--engine", "transformers"])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Mr Bennet: ")
    [saved] = tmp_path.glob("*-pride-and-prejudice-70-0-*-mr-bennet.jsonl")  # --save DIR: a new file in it
    assert f"transcript: {saved}" in captured.err
    session, *turns = [json.loads(line) for line in saved.read_text(encoding="utf-8").splitlines()]
    assert session["sampling"] == {"max_tokens": 16, "temperature": 0.0, "top_p": 0.5, "seed": None}
    assert [(t["role"], t["speaker"]) for t in turns] == [("user", "Elizabeth Bennet"), ("character", "Mr Bennet")]


@pytest.mark.model
def test_chat_cli_interactive_commands_and_transcript(tmp_path, monkeypatch, capsys):
    # A scene without major characters (it used to crash the name picking), chosen by name; the character by
    # part of its name, the user by number; history / clear / quit at the prompt.
    monkeypatch.setattr(sys, "stdin", io.StringIO("What do you make of it?\nhistory\nclear\nhistory\nWell?\n"
                                                  "quit\nnever sent\n"))
    out_file = tmp_path / "chats" / "holmes.jsonl"
    code = main(["chat", "--scene", str(CIRCUMSTANCE), "--scene-name", "sherlock", "--character", "wats",
                 "--as", "0", "--max-tokens", "8", "--temperature", "0", "--seed", "3", "--save", str(out_file),
                 "--engine", "transformers"])
    assert code == 0
    out = capsys.readouterr().out
    assert "you are Sherlock Holmes, talking to Dr Watson" in out
    assert out.count("Dr Watson: ") == 3  # two replies, one in the history
    assert "Sherlock Holmes: What do you make of it?" in out
    assert out.index("(conversation cleared)") < out.index("(no conversation yet)")
    records = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert [r["type"] for r in records] == ["session", "turn", "turn", "clear", "turn", "turn"]
    session = records[0]
    assert session["sample_id"] == load_scenes(CIRCUMSTANCE)[1].sample_id and session["scene_index"] == 1
    assert (session["character"], session["user_name"], session["engine"]) == (
        "Dr Watson", "Sherlock Holmes", "transformers")
    assert session["sampling"] == {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": 3}
    assert [r["text"] for r in records if r.get("role") == "user"] == ["What do you make of it?", "Well?"]
    replies = [r["text"] for r in records if r.get("role") == "character"]
    assert all(t.startswith(SYSTEM_THINKING_OPEN) for t in replies)  # the full HER text, plan included


def test_clear_forgets_the_conversation(scene: Scene):
    session = ChatSession(None, scene, "Mr Bennet", "Elizabeth Bennet")  # type: ignore[arg-type]  # no generation
    session.history[:] = [("Elizabeth Bennet", "Papa?"), ("Mr Bennet", "<role_action>smiles</role_action>Lizzy.")]
    session.clear()
    request = session.request()
    assert [m.role for m in request.messages or []] == ["system", "user"]
    assert "Papa?" not in request.messages[-1].content and request.top_p == 1.0


class Scripted(Engine):
    """An engine that answers every request with one fixed result (for the session's own logic)."""

    kind, model_id = "scripted", "scripted"

    def __init__(self, result: GenResult) -> None:
        self.result = result

    async def generate(self, requests):
        return [self.result for _ in requests]


async def test_reply_drops_the_own_speaker_label_after_the_plan(scene: Scene):
    text = "Mr Bennet: a plan.</system_thinking>\n**Mr Bennet:** <role_action>smiles</role_action>Lizzy."
    session = ChatSession(Scripted(GenResult(text=text)), scene, "Mr Bennet", "Elizabeth Bennet")  # type: ignore[arg-type]
    full = await session.reply("Papa?")
    assert full == "<system_thinking>Mr Bennet: a plan.</system_thinking>\n<role_action>smiles</role_action>Lizzy."
    assert session.history[-1] == ("Mr Bennet", full)


async def test_failed_generation_leaves_the_history_as_it_was(scene: Scene):
    failing = Scripted(GenResult(text="", finish_reason="error", error="boom"))
    session = ChatSession(failing, scene, "Mr Bennet", "Elizabeth Bennet")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="boom"):
        await session.reply("Papa?")
    assert session.history == []


def test_names_without_major_characters(scene: Scene):
    darcy, _holmes = load_scenes(CIRCUMSTANCE)
    assert darcy.major_characters == []
    assert _pick_names(darcy, None, None) == ("Mr Darcy", "Elizabeth Bennet")
    no_majors = Scene.model_validate(copy.deepcopy(scene.model_dump(by_alias=True, exclude_unset=True))
                                     | {"major_characters": []})
    assert _pick_names(no_majors, None, None) == ("Mr Bennet", "Elizabeth Bennet")
    # by number, by (part of) the name, or anyone else for the user
    assert _pick_names(darcy, "1", "0") == ("Elizabeth Bennet", "Mr Darcy")
    assert _pick_names(darcy, "elizabeth", "Mr Bingley") == ("Elizabeth Bennet", "Mr Bingley")
    for character, user, error in [("a", None, "matches Mr Darcy, Elizabeth Bennet"), ("5", None, "has 2 character"),
                                   ("Jane", None, "no character 'Jane'"), ("0", "darcy", "cannot speak as")]:
        with pytest.raises(SystemExit, match=error):
            _pick_names(darcy, character, user)


def test_list_scenes_and_characters(capsys):
    assert main(["chat", "--scene", str(CIRCUMSTANCE), "--list"]) == 0
    out = capsys.readouterr().out
    assert "  0  Pride and Prejudice" in out and "  1  The Adventures of Sherlock Holmes" in out
    assert "characters: Mr Darcy, Elizabeth Bennet" in out and "Baker Street on a wet morning." in out
    assert main(["chat", "--scene", str(CIRCUMSTANCE), "--list", "--scene-name", "pride chapter 10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("scene 0: Pride and Prejudice")
    assert "  1  Elizabeth Bennet  The witty second daughter" in out
    assert main(["chat", "--scene", str(CIRCUMSTANCE), "--list", "--index", "1"]) == 0
    assert "  1  Dr Watson" in capsys.readouterr().out
    lear = str(DATA / "coser" / "example_test_set.json")
    with pytest.raises(SystemExit, match="2 scenes match --scene-name 'lear'"):
        main(["chat", "--scene", lear, "--list", "--scene-name", "lear"])
    with pytest.raises(SystemExit, match="no scene matches"):
        main(["chat", "--scene", lear, "--scene-name", "hamlet", "--message", "hi"])
    with pytest.raises(SystemExit, match="out of range"):
        main(["chat", "--scene", lear, "--index", "3", "--message", "hi"])


def test_default_transcript_path(scene: Scene, tmp_path, monkeypatch):
    monkeypatch.setenv("HER_CACHE_DIR", str(tmp_path))
    first = default_transcript_path(scene, "Mr Bennet", now=0)
    assert first.parent == tmp_path / "chats"
    assert first.name.endswith(f"-{scene.sample_id}-mr-bennet.jsonl")
    first.parent.mkdir()
    first.touch()
    assert default_transcript_path(scene, "Mr Bennet", now=0).name.endswith("-mr-bennet-2.jsonl")


def test_chat_cli_rejects_an_unknown_character(scene_file):
    with pytest.raises(SystemExit, match="no character"):
        main(["chat", "--scene", str(scene_file), "--character", "Mr Darcy", "--message", "hi"])
