"""Actor prompt and per-character histories, on the real CoSER Pride and Prejudice record."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from her_engines import ChatMessage
from her_roleplay._format import coser_to_her, parse_reply
from her_roleplay._prompts import (
    CONVERSATION_START,
    CharacterSample,
    build_actor_system_prompt,
    build_character_samples,
    build_chat_prompt,
)
from her_roleplay._scene import Scene

FIXTURE = Path(__file__).resolve().parent / "data" / "coser_test_sample_pride_and_prejudice.json"
LIZZY, FATHER = "Elizabeth Bennet", "Mr Bennet"


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def scene(raw: dict) -> Scene:
    return Scene.model_validate(raw)


def _thoughts_of(scene: Scene, name: str) -> list[str]:
    """The bracketed thoughts in a character's original CoSER lines."""
    lines = [line.message for line in scene.dialogues if line.character == name]
    return [thought for message in lines for thought in re.findall(r"\[(.*?)\]", message)]


def _by_character(samples: list[CharacterSample]) -> dict[str, CharacterSample]:
    return {s.character: s for s in samples}


# --- actor prompt ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [LIZZY, FATHER])
def test_actor_prompt_has_every_section_and_no_placeholder(scene: Scene, name: str) -> None:
    prompt = build_actor_system_prompt(scene, name)
    other = FATHER if name == LIZZY else LIZZY
    assert name in prompt and "Pride and Prejudice" in prompt
    assert scene.profile_of(name) in prompt
    assert scene.scenario in prompt and scene.topic in prompt
    assert scene.motivation_of(name) in prompt
    assert f"- {other}: {scene.description_of(other)}" in prompt
    assert "<system_thinking>" in prompt and "<role_thinking>" in prompt and "<role_action>" in prompt
    assert "60 words" in prompt and CONVERSATION_START in prompt
    # The other's inner state is theirs alone.
    assert scene.motivation_of(other) not in prompt
    assert "{" not in prompt and "}" not in prompt and "None" not in prompt


def test_actor_prompt_without_system_thinking(scene: Scene) -> None:
    prompt = build_actor_system_prompt(scene, LIZZY, with_system_thinking=False)
    assert "system_thinking" not in prompt and "<role_thinking>" in prompt


def test_missing_profile_and_motivation_drop_their_sections(raw: dict) -> None:
    bare = copy.deepcopy(raw)
    bare["character_profiles"].pop(LIZZY)
    bare["key_characters"] = [kc for kc in bare["key_characters"] if kc["name"] != LIZZY]
    bare.pop("topic")
    bare.pop("plot")  # no short descriptions: the other's profile is clipped instead
    scene = Scene.model_validate(bare)
    prompt = build_actor_system_prompt(scene, LIZZY)
    full = build_actor_system_prompt(Scene.model_validate(raw), LIZZY)
    assert f"Who {LIZZY} is" in full and f"Who {LIZZY} is" not in prompt
    assert "inner state at the start" in full and "inner state at the start" not in prompt
    assert "What the conversation is about" not in prompt
    assert "None" not in prompt and "{" not in prompt
    father_line = next(line for line in prompt.splitlines() if line.startswith(f"- {FATHER}: "))
    assert father_line.startswith(f"- {FATHER}: Mr. Bennet is the patriarch")
    assert len(father_line) < 420  # clipped, not the 2.6k-character profile


def test_actor_prompt_refuses_environment_and_strangers(scene: Scene) -> None:
    with pytest.raises(ValueError, match="not an actor"):
        build_actor_system_prompt(scene, "Environment")
    with pytest.raises(ValueError, match="not in scene"):
        build_actor_system_prompt(scene, "Mr Darcy")


# --- training samples --------------------------------------------------------------------------------


def test_one_sample_per_speaking_character(scene: Scene) -> None:
    samples = build_character_samples(scene)
    assert [s.character for s in samples] == [FATHER, LIZZY]
    for s in samples:
        assert s.scene_id == scene.sample_id
        roles = [m.role for m in s.messages]
        assert roles[0] == "system" and roles[1] == "user"
        assert all(roles[i] == ("user" if i % 2 else "assistant") for i in range(1, len(roles)))
        assert s.target_index == len(s.messages) - 1 and roles[-1] == "assistant"
        assert s.messages[1].content.startswith(CONVERSATION_START)
        assert s.prompt_messages == s.messages[:-1]
        assert all("None" not in m.content for m in s.messages)


def test_first_user_message_and_merging_of_others(scene: Scene) -> None:
    by = _by_character(build_character_samples(scene))
    # Mr Bennet opens the scene: his first user message is the marker alone.
    assert by[FATHER].messages[1].content == CONVERSATION_START
    first_lizzy_user = by[LIZZY].messages[1].content
    assert first_lizzy_user.startswith(f"{CONVERSATION_START}\n\n{FATHER}: ")
    assert "Lizzy, I was going to look for you" in first_lizzy_user
    # Mr Bennet, Environment, Mr Bennet in a row reach Elizabeth as one user message.
    merged = next(m.content for m in by[LIZZY].messages if "Environment: " in m.content)
    paragraphs = merged.split("\n\n")
    assert [p.split(": ", 1)[0] for p in paragraphs] == [FATHER, "Environment", FATHER]
    # ...and Mr Bennet sees the Environment line between two of his own turns.
    env_index = next(i for i, m in enumerate(by[FATHER].messages) if m.content.startswith("Environment: "))
    assert by[FATHER].messages[env_index - 1].role == by[FATHER].messages[env_index + 1].role == "assistant"


@pytest.mark.parametrize("name", [LIZZY, FATHER])
def test_no_thought_of_another_character_leaks(scene: Scene, name: str) -> None:
    sample = _by_character(build_character_samples(scene))[name]
    other = FATHER if name == LIZZY else LIZZY
    everything = "\n".join(m.content for m in sample.messages)
    others_thoughts = _thoughts_of(scene, other)
    assert len(others_thoughts) >= 6  # every line of both characters opens with a thought
    for thought in others_thoughts:
        assert thought not in everything
    assert f"{other}: " in everything
    # Their actions stay visible.
    if other == LIZZY:
        assert "forces a smile" in everything
    # The character's own thoughts are kept, as role_thinking in assistant turns only.
    own_turns = "\n".join(m.content for m in sample.messages if m.role == "assistant")
    for thought in _thoughts_of(scene, name):
        assert f"<role_thinking>{thought}</role_thinking>" in own_turns
    assert "<role_thinking>" not in "\n".join(m.content for m in sample.messages if m.role == "user")


def test_sample_ends_at_the_characters_last_line(scene: Scene) -> None:
    by = _by_character(build_character_samples(scene))
    assert by[LIZZY].target == coser_to_her(scene.dialogues[13].message)
    assert "remains silent" in by[LIZZY].target
    # Mr Bennet's closing line comes after Elizabeth's last turn: not in her sample.
    assert "MISSISH" not in "\n".join(m.content for m in by[LIZZY].messages)
    assert by[FATHER].target == coser_to_her(scene.dialogues[14].message)
    assert "system_thinking" not in by[FATHER].messages[0].content  # data has no plan: prompt asks none


def test_final_system_thinking_goes_on_the_target_only(scene: Scene) -> None:
    plan = "Portray Mr Bennet as a father who masks his puzzlement with one more gentle jab."
    by = _by_character(build_character_samples(scene, final_system_thinking={FATHER: plan}))
    target = by[FATHER].target
    assert target.startswith(f"<system_thinking>{plan}</system_thinking>")
    reply, _findings = parse_reply(target)
    assert reply.system_thinking == plan
    assert sum("<system_thinking>" in m.content for m in by[FATHER].messages[1:]) == 1
    assert "<system_thinking>" in by[FATHER].messages[0].content  # the prompt asks for the plan
    assert not any("<system_thinking>" in m.content for m in by[LIZZY].messages)
    with pytest.raises(ValueError, match="no perspective"):
        build_character_samples(scene, final_system_thinking={"Environment": plan})


def test_consecutive_own_lines_merge_into_one_assistant_turn(raw: dict) -> None:
    doubled = copy.deepcopy(raw)
    # Mr Bennet speaks twice in a row, then Elizabeth has a line made only of a thought.
    extra_line = {"character": FATHER, "message": "[Let her wait.] (folds the letter) Sit down."}
    doubled["dialogues"].insert(2, extra_line)
    doubled["dialogues"].insert(4, {"character": LIZZY, "message": "[Only a thought here.]"})
    scene = Scene.model_validate(doubled)
    by = _by_character(build_character_samples(scene))
    roles = [m.role for m in by[FATHER].messages]
    assert all(a != b for a, b in zip(roles[1:], roles[2:], strict=False))  # strict alternation
    assert "What is it, Papa?" in by[FATHER].messages[3].content  # system, marker, own, Elizabeth
    own = by[FATHER].messages[4].content
    assert "<role_thinking>Let her wait.</role_thinking>" in own and "astonished me exceedingly" in own
    assert own.index("Let her wait.") < own.index("astonished me exceedingly")
    segments = parse_reply(own)[0].segments
    assert [seg.kind for seg in segments].count("thinking") == 2
    # The thought-only line shows nothing to Mr Bennet: no empty "Elizabeth Bennet:" line.
    assert "Only a thought here." not in "\n".join(m.content for m in by[FATHER].messages)
    assert not any(m.content.rstrip().endswith(f"{LIZZY}:") for m in by[FATHER].messages)


def test_her_tagged_dialogue_passes_through(raw: dict) -> None:
    tagged = copy.deepcopy(raw)
    her = "<role_thinking>I must stay calm.</role_thinking><role_action>smiles</role_action>Go on, Papa."
    tagged["dialogues"][1]["message"] = her
    by = _by_character(build_character_samples(Scene.model_validate(tagged)))
    assert by[LIZZY].messages[2] == ChatMessage(role="assistant", content=her)
    assert "I must stay calm." not in "\n".join(m.content for m in by[FATHER].messages)


def test_plans_carried_by_the_data_stay_on_the_target_only(raw: dict) -> None:
    planned = copy.deepcopy(raw)
    planned["dialogues"][1]["message"] = "<system_thinking>Portray Elizabeth as wary.</system_thinking>Yes?"
    target = "<system_thinking>Portray her as mortified.</system_thinking><role_action>sits</role_action>"
    planned["dialogues"][13]["message"] = target
    # A line holding only a plan gives Elizabeth nothing to say: it is no turn at all.
    plan_only = "<system_thinking>Plan only.</system_thinking>"
    planned["dialogues"].append({"character": LIZZY, "message": plan_only})
    sample = _by_character(build_character_samples(Scene.model_validate(planned)))[LIZZY]
    assert sample.messages[2].content == "Yes?"
    assert sample.target == target
    assert "<system_thinking>" in sample.messages[0].content
    assert "Plan only." not in "\n".join(m.content for m in sample.messages)


def test_sample_shape_is_validated() -> None:
    system = ChatMessage(role="system", content="s")
    user, asst = ChatMessage(role="user", content="u"), ChatMessage(role="assistant", content="a")
    with pytest.raises(ValidationError, match="alternation"):
        CharacterSample(character="A", scene_id="x", messages=[system, user, asst, asst], target_index=3)
    with pytest.raises(ValidationError, match="target_index"):
        CharacterSample(character="A", scene_id="x", messages=[system, user, asst, user], target_index=3)


# --- live chat prompt --------------------------------------------------------------------------------


def test_chat_prompt_for_the_opening_speaker(scene: Scene) -> None:
    messages = build_chat_prompt(scene, FATHER, [])
    assert [m.role for m in messages] == ["system", "user"]
    assert messages[1].content == CONVERSATION_START
    assert messages[0].content == build_actor_system_prompt(scene, FATHER)


def test_chat_prompt_applies_visibility_rules(scene: Scene) -> None:
    history = [
        (
            FATHER,
            "<system_thinking>Portray Mr Bennet as teasing.</system_thinking>"
            "<role_thinking>This will be fun.</role_thinking>Lizzy, come in.",
        ),
        (
            LIZZY,
            "<system_thinking>Portray Elizabeth as wary.</system_thinking><role_thinking>I dread this."
            "</role_thinking><role_action>steps inside</role_action>Yes, Papa?",
        ),
        ("Environment", "A clock ticks on the mantel."),
    ]
    messages = build_chat_prompt(scene, FATHER, history)
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2].content == "<role_thinking>This will be fun.</role_thinking>Lizzy, come in."
    last = messages[3].content
    assert last.startswith(f"{LIZZY}: ") and "steps inside" in last and "Yes, Papa?" in last
    assert "I dread this." not in last and "wary" not in last
    assert last.endswith("Environment: A clock ticks on the mantel.")
    for_lizzy = build_chat_prompt(scene, LIZZY, history[:1])
    assert for_lizzy[1].content == f"{CONVERSATION_START}\n\n{FATHER}: Lizzy, come in."
    with pytest.raises(ValueError, match="own turn"):
        build_chat_prompt(scene, LIZZY, history[:2])
    with pytest.raises(ValueError, match="no speaker"):
        build_chat_prompt(scene, LIZZY, [("", "hello")])
