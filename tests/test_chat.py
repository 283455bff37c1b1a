"""`her chat`: a character from the fixture scene answers with the real model, plan first."""

from __future__ import annotations

import pytest

from her_cli import main
from her_cli._chat import SYSTEM_THINKING_OPEN, ChatSession
from her_engines import GenRequest
from her_roleplay import build_chat_prompt, parse_reply

pytestmark = pytest.mark.model


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


def test_chat_cli_one_shot(scene_file, capsys):
    # The CLI's plumbing on the quick-loading fallback engine (the default, vLLM, is covered by `her judge`).
    code = main(["chat", "--scene", str(scene_file), "--character", "Mr Bennet", "--as", "Elizabeth Bennet",
                 "--message", "What is it, Papa?", "--max-tokens", "16", "--temperature", "0", "--show-think",
                 "--engine", "transformers"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("Mr Bennet: ")


def test_chat_cli_rejects_an_unknown_character(scene_file):
    with pytest.raises(SystemExit, match="no character"):
        main(["chat", "--scene", str(scene_file), "--character", "Mr Darcy", "--message", "hi"])
