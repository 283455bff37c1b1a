"""Reply validators: every finding code fails and passes on hand cases; the real CoSER fixture is
clean; arbitrary text never breaks the validator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from her_roleplay._format import coser_to_her
from her_roleplay._validate import FINDING_CODES, validate_reply

FIXTURE = Path(__file__).resolve().parent / "data" / "coser_test_sample_pride_and_prejudice.json"
RAW = json.loads(FIXTURE.read_text(encoding="utf-8"))
LIZZY = "Elizabeth Bennet"
OTHERS = ["Mr Bennet", "Mr. Darcy", "Jane Bennet", "Mr. Collins"]


def rt(thought: str, rest: str = "Yes.") -> str:
    return f"<role_thinking>{thought}</role_thinking>{rest}"


def plan(text: str) -> str:
    return f"<system_thinking>{text}</system_thinking>Yes."


# (code, failing reply, passing reply, extra kwargs)
CASES = [
    ("malformed_tag", "<role_action>bows", "<role_action>bows</role_action>", {}),
    (
        "nested_tag",
        "<role_action>bows <role_thinking>I</role_thinking></role_action>",
        "<role_action>bows</role_action><role_thinking>I</role_thinking>",
        {},
    ),
    ("unknown_tag", "<thought>I wait.</thought>Yes.", rt("I wait."), {}),
    ("duplicate_system_thinking", plan("Portray her.") + plan("Again."), plan("Portray her."), {}),
    ("misplaced_system_thinking", "Yes." + plan("Portray her."), plan("Portray her."), {}),
    (
        "missing_system_thinking",
        rt("I wait."),
        plan("Portray her as calm.") + rt("I wait."),
        {"require_system_thinking": True},
    ),
    (
        "system_thinking_first_person",
        plan("I must hide my feelings from Papa."),
        plan("Portray Elizabeth as hiding her feelings from her father."),
        {},
    ),
    (
        "system_thinking_first_person",
        plan("Show composure; keep my secret."),
        plan('Show composure; she may answer "I am quite well" to deflect.'),
        {},
    ),
    (
        "system_thinking_mentions_user",
        plan("Answer the user's question with wit."),
        plan("Answer her father's question with wit."),
        {},
    ),
    (
        "role_thinking_third_person",
        rt("Elizabeth must not show her feelings."),
        rt("I must not show my feelings."),
        {"speaker": LIZZY},
    ),
    (
        "role_thinking_third_person",
        rt("Elizabeth's heart races at the name."),
        rt("Elizabeth, stay calm. My heart races at the name."),
        {"speaker": LIZZY},
    ),
    (
        "role_thinking_third_person",
        rt("She feels a sense of dread but must appear calm."),
        rt("I feel a sense of dread but must appear calm."),
        {},
    ),
    (
        "role_thinking_third_person",
        rt("He can barely contain his amusement; he must keep a straight face."),
        rt("I can barely contain my amusement; he must not see it."),
        {},
    ),
    (
        "mind_reading",
        rt("Darcy secretly loves me."),
        rt("I wonder whether Darcy loves me."),
        {"speaker": LIZZY, "others": OTHERS},
    ),
    ("mind_reading", rt("I look at him: he is furious inside."), rt("I look at him: he seems furious."), {}),
    (
        "mind_reading",
        rt("Papa teases me, and I know she feels ashamed."),
        rt("Papa teases me, and I think she might feel ashamed."),
        {},
    ),
    (
        "mind_reading",
        rt("Mr. Collins despises me, I am sure of it."),
        rt("Perhaps Mr. Collins despises me."),
        {"speaker": LIZZY, "others": OTHERS},
    ),
    (
        "mind_reading",
        rt("I smile, but Jane is heartbroken."),
        rt("I smile, but is Jane heartbroken?"),
        {"speaker": LIZZY, "others": OTHERS},
    ),
    (
        "empty_reply",
        rt("I say nothing.", ""),
        rt("I say nothing.", "<role_action>looks away</role_action>"),
        {},
    ),
    (
        "empty_reply",
        "<system_thinking>Portray her as silent.</system_thinking>  ",
        "<system_thinking>Portray her as silent.</system_thinking>...",
        {},
    ),
    ("empty_reply", "", "Oh.", {}),
]


@pytest.mark.parametrize(
    ("code", "bad", "good", "kwargs"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_each_code_fails_and_passes(code: str, bad: str, good: str, kwargs: dict) -> None:
    bad_findings = validate_reply(bad, **kwargs)
    assert code in [f.code for f in bad_findings], bad_findings
    assert validate_reply(good, **kwargs) == []


def test_every_code_is_documented_and_exercised() -> None:
    assert {case[0] for case in CASES} == set(FINDING_CODES)
    assert all(desc and "\n" not in desc for desc in FINDING_CODES.values())


def test_hedges_and_observations_are_not_mind_reading() -> None:
    for thought in [
        "I think he might be angry.",
        "Perhaps she is ashamed of me.",
        "He seems angry with me.",
        "I suspect Darcy loves me.",
        "Is he angry with me?",
        "She looks as if she feels ashamed of me.",
        "He must be furious with me.",
        "Her reaction is delightful, I must say.",
        "He frowns at me.",
        "Mr. Darcy probably hates me.",
    ]:
        assert validate_reply(rt(thought), speaker=LIZZY, others=OTHERS) == [], thought


def test_pronoun_in_thought_without_first_person_is_read_as_the_speaker() -> None:
    """No "I" anywhere: "she" is the speaker narrated from outside, so no mind-reading is claimed."""
    found = [f.code for f in validate_reply(rt("She feels ashamed."))]
    assert found == ["role_thinking_third_person"]


def test_quoted_words_are_ignored() -> None:
    assert validate_reply(rt('I recall his words: "she is furious with you".'), others=OTHERS) == []
    assert validate_reply(plan("Portray her saying 'I am not amused' drily.")) == []


def test_shared_surname_is_not_used_but_full_names_are() -> None:
    # "Bennet" belongs to the speaker and to Mr Bennet: ambiguous, so it proves nothing.
    assert validate_reply(rt("I wait. Bennet pride is at stake."), speaker=LIZZY, others=OTHERS) == []
    found = validate_reply(rt("I wait. Mr Bennet is secretly delighted."), speaker=LIZZY, others=OTHERS)
    assert [f.code for f in found] == ["mind_reading"]


def test_speaker_listed_among_others_is_ignored() -> None:
    assert validate_reply(rt("I feel calm."), speaker=LIZZY, others=[LIZZY, *OTHERS]) == []


def test_findings_sorted_with_spans_on_the_offending_words() -> None:
    text = "<system_thinking>I plan.</system_thinking>" + rt("Darcy loves me.") + "<x>Hi.</x>"
    findings = validate_reply(text, speaker=LIZZY, others=OTHERS)
    assert [f.code for f in findings] == [
        "system_thinking_first_person",
        "mind_reading",
        "unknown_tag",
        "unknown_tag",
    ]
    assert [text[s:e] for s, e in (f.span for f in findings)] == ["I", "Darcy loves", "<x>", "</x>"]
    assert findings == sorted(findings, key=lambda f: f.span)


def test_bad_arguments_raise() -> None:
    with pytest.raises(TypeError, match="sequence"):
        validate_reply("Hi.", others="Mr Darcy")
    with pytest.raises(ValueError, match="speaker"):
        validate_reply("Hi.", speaker="  ")
    with pytest.raises(ValueError, match="others"):
        validate_reply("Hi.", others=["Mr Darcy", ""])
    with pytest.raises(TypeError):
        validate_reply(b"Hi.")  # type: ignore[arg-type]


def _cast() -> list[str]:
    names = [c["name"] for c in RAW["key_characters"]] + list(RAW["speaking_characters_w_env"])
    names += [c["name"] for c in RAW["plot"].get("key_characters", [])]
    return sorted(set(names))


@pytest.mark.parametrize("line", RAW["dialogues"], ids=lambda d: d["message"][:30])
def test_fixture_dialogue_is_clean(line: dict) -> None:
    others = [n for n in _cast() if n != line["character"]]
    assert validate_reply(coser_to_her(line["message"]), speaker=line["character"], others=others) == []


@pytest.mark.parametrize("character", RAW["key_characters"], ids=lambda c: c["name"])
def test_fixture_motivations_are_clean_thoughts(character: dict) -> None:
    """The first-person motivations of the fixture read as good role_thinking."""
    others = [n for n in _cast() if n != character["name"]]
    text = rt(character["thought"], "Well.")
    assert validate_reply(text, speaker=character["name"], others=others) == []


def test_third_person_rewrite_of_fixture_thought_is_flagged() -> None:
    text = rt("Elizabeth feels a sense of dread but must appear calm.")
    assert [f.code for f in validate_reply(text, speaker=LIZZY)] == ["role_thinking_third_person"]


@settings(max_examples=150, deadline=None)
@given(
    st.text(max_size=120)
    | st.lists(
        st.sampled_from(
            [
                "<role_thinking>",
                "</role_thinking>",
                "<system_thinking>",
                "</system_thinking>",
                "<role_action>",
                "</role_action>",
                "I ",
                "he is furious ",
                "Darcy loves ",
                "Elizabeth's ",
                '"',
                "'",
                "Mr. ",
                ". ",
                "?",
                "perhaps ",
                "<q>",
                "[",
                "(",
                "\n",
            ]
        ),
        max_size=20,
    ).map("".join)
)
def test_validator_never_raises(text: str) -> None:
    findings = validate_reply(text, speaker=LIZZY, others=OTHERS, require_system_thinking=True)
    assert {f.code for f in findings} <= set(FINDING_CODES)
    assert all(0 <= f.span[0] <= f.span[1] <= len(text) for f in findings)
    assert findings == sorted(findings, key=lambda f: (f.span, f.code))
