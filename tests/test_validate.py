"""Reply validators: every finding code fails and passes on hand cases; the real CoSER fixture is
clean; arbitrary text never breaks the validator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from her_roleplay._format import coser_to_her
from her_roleplay._validate import FINDING_CODES, find_repeated_patterns, validate_reply

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
    (
        "action_first_person",
        "<role_action>I draw my sword</role_action>Stand back.",
        "<role_action>draws his sword</role_action>Stand back.",
        {},
    ),
    (
        "action_first_person",
        "<role_action>takes our hands</role_action>Come.",
        '<role_action>mouths "I am sorry"</role_action>Come.',
        {},
    ),
    (
        "whitespace_between_tags",
        "<role_thinking>I wait.</role_thinking>\n<role_action>bows</role_action>Sir.",
        "<role_thinking>I wait.</role_thinking><role_action>bows</role_action> Sir.\n",
        {},
    ),
    (
        "whitespace_between_tags",
        plan("Portray her as calm.").replace("Yes.", " <role_action>nods</role_action>"),
        plan("Portray her as calm.").replace("Yes.", "<role_action>nods</role_action>"),
        {},
    ),
    (
        "repeated_adjacent_tag",
        "<role_action>bows</role_action><role_action>smiles</role_action>Sir.",
        "<role_action>bows and smiles</role_action>Sir.",
        {},
    ),
    (
        "repeated_adjacent_tag",
        rt("I wait.", rt("I still wait.", "Yes.")),
        rt("I wait.", "Yes." + rt("I still wait.", "")),
        {},
    ),
    (
        "reply_too_long",
        rt("I think a great deal here, more words than the bound.", "one two three four five six"),
        rt("I think a great deal here, more words than the bound.", "<role_action>nods</role_action>one two three"),
        {"max_visible_words": 5},
    ),
]


@pytest.mark.parametrize(
    ("code", "bad", "good", "kwargs"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_each_code_fails_and_passes(code: str, bad: str, good: str, kwargs: dict) -> None:
    bad_findings = validate_reply(bad, **kwargs)
    assert code in [f.code for f in bad_findings], bad_findings
    assert validate_reply(good, **kwargs) == []


def test_every_code_is_documented_and_exercised() -> None:
    # repeated_turn_pattern is about a sequence of replies: see the find_repeated_patterns tests
    assert {case[0] for case in CASES} | {"repeated_turn_pattern"} == set(FINDING_CODES)
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


def test_new_layout_rules_spans_and_codes() -> None:
    text = "<role_action>I bow</role_action>  <role_action>smiles</role_action>Sir."
    findings = validate_reply(text)
    assert [f.code for f in findings] == ["action_first_person", "repeated_adjacent_tag", "whitespace_between_tags"]
    spans = {f.code: text[f.span[0] : f.span[1]] for f in findings}
    assert spans["action_first_person"] == "I"
    assert spans["whitespace_between_tags"] == "  "
    assert spans["repeated_adjacent_tag"].startswith("I bow") and spans["repeated_adjacent_tag"].endswith("smiles")


def test_reply_length_counts_only_visible_words() -> None:
    long_thought = rt("I " + "ponder " * 50, "<role_action>nods</role_action>Yes, sir.")
    assert validate_reply(long_thought, max_visible_words=3) == []
    found = validate_reply(long_thought, max_visible_words=2)
    assert [f.code for f in found] == ["reply_too_long"] and "3 visible words" in found[0].message
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="max_visible_words"):
            validate_reply("Hi.", max_visible_words=bad)  # type: ignore[arg-type]


def test_repeated_turn_pattern_needs_same_shape_and_same_opening() -> None:
    first = rt("I must keep calm here.", "<role_action>bows</role_action>Sir.")
    same = "<system_thinking>Portray her.</system_thinking>" + rt(
        "I must keep my temper.", "<role_action>nods</role_action>No."
    )
    other_shape = rt("I must keep my temper.", "No.")
    other_opening = rt("Why does he smile so?", "<role_action>nods</role_action>No.")
    found = find_repeated_patterns([first, same, other_shape, other_opening])
    assert [(i, f.code) for i, f in found] == [(1, "repeated_turn_pattern")]
    span = found[0][1].span
    assert same[span[0] : span[1]] == "I must keep my temper."
    # a short first segment is no evidence of a template; separated repeats are not consecutive
    assert find_repeated_patterns(["Yes.", "Yes."]) == []
    assert find_repeated_patterns([first, other_opening, first]) == []
    assert find_repeated_patterns([first, first], opening_words=1)[0][0] == 1
    assert find_repeated_patterns([]) == [] and find_repeated_patterns([first]) == []


def test_repeated_turn_pattern_bad_arguments() -> None:
    with pytest.raises(TypeError, match="sequence"):
        find_repeated_patterns("Yes.")
    with pytest.raises(TypeError, match="str"):
        find_repeated_patterns(["Yes.", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="opening_words"):
        find_repeated_patterns(["Yes."], opening_words=0)
