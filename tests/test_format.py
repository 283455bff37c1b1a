"""HER dual-layer format: parsing, rendering, conversions, on hand cases, the real CoSER fixture and
hypothesis-generated replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from her_roleplay._format import (
    Finding,
    Reply,
    Segment,
    coser_to_her,
    her_to_coser,
    parse_coser,
    parse_reply,
    public_view,
    render_coser,
    render_display,
    render_her,
    strip_system_thinking,
)
from her_roleplay._validate import FINDING_CODES

FIXTURE = Path(__file__).resolve().parent / "data" / "coser_test_sample_pride_and_prejudice.json"
MESSAGES = [d["message"] for d in json.loads(FIXTURE.read_text(encoding="utf-8"))["dialogues"]]
PARSER_CODES = {
    "malformed_tag",
    "nested_tag",
    "unknown_tag",
    "duplicate_system_thinking",
    "misplaced_system_thinking",
}

T, A, S = "thinking", "action", "speech"


def reply(*parts: tuple[str, str], plan: str | None = None) -> Reply:
    return Reply(plan, tuple(Segment(kind, text) for kind, text in parts))  # type: ignore[arg-type]


def codes(findings: list[Finding]) -> list[str]:
    return [f.code for f in findings]


# --- the model types ---------------------------------------------------------------------------------


def test_segment_strips_and_rejects_blank_or_unknown_kind() -> None:
    assert Segment("speech", "  Hello.\n").text == "Hello."
    with pytest.raises(ValueError, match="non-blank"):
        Segment("action", "   ")
    with pytest.raises(ValueError, match="kind"):
        Segment("narration", "x")  # type: ignore[arg-type]


def test_reply_joins_adjacent_speech_but_not_other_kinds() -> None:
    r = reply((S, "Hello."), (S, "Goodbye."), (T, "a"), (T, "b"), (A, "x"), (A, "y"))
    assert [(s.kind, s.text) for s in r.segments] == [
        (S, "Hello. Goodbye."),
        (T, "a"),
        (T, "b"),
        (A, "x"),
        (A, "y"),
    ]
    with pytest.raises(ValueError, match="None"):
        Reply("  ", ())
    assert Reply(" plan ", ()).system_thinking == "plan"


# --- parsing HER -------------------------------------------------------------------------------------


def test_parse_full_reply() -> None:
    text = (
        "<system_thinking>Portray Elizabeth as guarded.</system_thinking>"
        "<role_thinking>I feel dread.</role_thinking><role_action>follows her father</role_action>"
        "What is it, Papa?<role_thinking>Stay calm.</role_thinking>"
    )
    r, findings = parse_reply(text)
    assert findings == []
    assert r == reply(
        (T, "I feel dread."),
        (A, "follows her father"),
        (S, "What is it, Papa?"),
        (T, "Stay calm."),
        plan="Portray Elizabeth as guarded.",
    )


def test_parse_trims_whitespace_between_tags_and_drops_empty_segments() -> None:
    text = (
        "<system_thinking> plan </system_thinking>\n<role_action> nods </role_action>  Yes.  "
        "<role_thinking> </role_thinking>"
    )
    r, findings = parse_reply(text)
    assert findings == []
    assert r == reply((A, "nods"), (S, "Yes."), plan="plan")


def test_ordinary_angle_brackets_are_text() -> None:
    r, findings = parse_reply("If a < b and c > d, then 3<4.")
    assert findings == []
    assert r == reply((S, "If a < b and c > d, then 3<4."))


@pytest.mark.parametrize(
    ("code", "bad", "good"),
    [
        ("malformed_tag", "<role_thinking>I wait.", "<role_thinking>I wait.</role_thinking>Hi."),
        ("malformed_tag", "Hi.</role_action>", "<role_action>waves</role_action>Hi."),
        ("malformed_tag", "Hi. <role_thin", "Hi. <role_thinking>I</role_thinking>"),
        ("malformed_tag", "<role_action type='x'>waves</role_action>", "<role_action>waves</role_action>"),
        (
            "nested_tag",
            "<role_thinking>I <role_action>nod</role_action> see.</role_thinking>",
            "<role_thinking>I see.</role_thinking><role_action>nod</role_action>",
        ),
        (
            "unknown_tag",
            "<inner>I am tired.</inner>Hello.",
            "<role_thinking>I am tired.</role_thinking>Hello.",
        ),
        ("unknown_tag", "<Role_Thinking>x</Role_Thinking>", "<role_thinking>x</role_thinking>"),
        (
            "duplicate_system_thinking",
            "<system_thinking>a</system_thinking><system_thinking>b</system_thinking>Hi.",
            "<system_thinking>a b</system_thinking>Hi.",
        ),
        (
            "misplaced_system_thinking",
            "Hi.<system_thinking>plan</system_thinking>",
            "<system_thinking>plan</system_thinking>Hi.",
        ),
        (
            "misplaced_system_thinking",
            "<role_action>sits</role_action><system_thinking>p</system_thinking>",
            "  <system_thinking>p</system_thinking><role_action>sits</role_action>",
        ),
    ],
)
def test_parser_findings(code: str, bad: str, good: str) -> None:
    _, bad_findings = parse_reply(bad)
    assert code in codes(bad_findings)
    _, good_findings = parse_reply(good)
    assert good_findings == []


def test_finding_spans_point_at_the_tag() -> None:
    text = "Hello <inner>x</inner>"
    _, findings = parse_reply(text)
    assert [text[s:e] for s, e in (f.span for f in findings)] == ["<inner>", "</inner>"]
    assert all(f.message for f in findings)


def test_unclosed_tag_ends_at_next_tag() -> None:
    """A forgotten closing tag: the thought ends where the next tag starts, speech stays speech."""
    r, findings = parse_reply("<role_thinking>I must go<role_action>stands</role_action>Goodbye.")
    assert codes(findings) == ["malformed_tag"]
    assert findings[0].span == (0, len("<role_thinking>"))
    assert r == reply((T, "I must go"), (A, "stands"), (S, "Goodbye."))


def test_true_nesting_resumes_outer_segment() -> None:
    r, findings = parse_reply("<role_thinking>I <role_action>nods</role_action> agree.</role_thinking>Yes.")
    assert codes(findings) == ["nested_tag"]
    assert r == reply((T, "I"), (A, "nods"), (T, "agree."), (S, "Yes."))


def test_unclosed_system_thinking_does_not_swallow_the_reply() -> None:
    text = "<system_thinking>Portray her as calm.<role_thinking>I wait.</role_thinking>Well?"
    r, findings = parse_reply(text)
    assert codes(findings) == ["malformed_tag"]
    assert r == reply((T, "I wait."), (S, "Well?"), plan="Portray her as calm.")
    assert strip_system_thinking(text) == "<role_thinking>I wait.</role_thinking>Well?"


def test_stray_closing_tag_is_dropped_and_speech_stays_whole() -> None:
    r, findings = parse_reply("I see</role_thinking> what you mean.")
    assert codes(findings) == ["malformed_tag"]
    assert r == reply((S, "I see what you mean."))


def test_duplicate_system_thinking_keeps_both_texts() -> None:
    r, _ = parse_reply("<system_thinking>one</system_thinking><system_thinking>two</system_thinking>Hi.")
    assert r.system_thinking == "one\ntwo"


def test_parse_rejects_non_string() -> None:
    with pytest.raises(TypeError):
        parse_reply(None)  # type: ignore[arg-type]


# --- CoSER and conversions -----------------------------------------------------------------------------


def test_parse_coser_example() -> None:
    r = parse_coser("[I feel dread.] (follows her father) What is it, Papa?")
    assert r == reply((T, "I feel dread."), (A, "follows her father"), (S, "What is it, Papa?"))


def test_parse_coser_nesting_and_unmatched_brackets() -> None:
    assert parse_coser("(smiles (slightly)) Hm.") == reply((A, "smiles (slightly)"), (S, "Hm."))
    assert parse_coser("[a (b) c]") == reply((T, "a (b) c"))
    assert parse_coser("Point 1) is [not closed") == reply((S, "Point 1) is [not closed"))
    assert parse_coser("Well () then [ ]") == reply((S, "Well then"))
    assert parse_coser("") == Reply(None, ())


@pytest.mark.parametrize("message", MESSAGES)
def test_fixture_messages_round_trip(message: str) -> None:
    r = parse_coser(message)
    assert r.segments, message
    assert render_coser(r) == message
    her = coser_to_her(message)
    assert "[" not in her and "(" not in her  # no bracket survives as text
    parsed, findings = parse_reply(her)
    assert findings == []
    assert parsed == r
    assert her_to_coser(her) == message


def test_fixture_has_the_expected_shapes() -> None:
    kinds = {tuple(s.kind for s in parse_coser(m).segments) for m in MESSAGES}
    assert (T, S) in kinds and (T, A, S) in kinds and (T, A) in kinds and (S,) in kinds


def test_render_her_coser_display() -> None:
    r = reply((T, "I feel dread."), (A, "follows"), (S, "What is it?"), plan="Portray her.")
    assert render_her(r) == (
        "<system_thinking>Portray her.</system_thinking><role_thinking>I feel dread."
        "</role_thinking><role_action>follows</role_action>What is it?"
    )
    assert render_her(r, include_system_thinking=False).startswith("<role_thinking>")
    assert render_coser(r) == "[I feel dread.] (follows) What is it?"
    assert render_display(r) == "*follows* What is it?"
    assert render_display(r, show_thoughts=True) == "[I feel dread.] *follows* What is it?"
    shown = render_display(r, show_system_thinking=True)
    assert shown == "[system thinking: Portray her.]\n\n*follows* What is it?"
    assert render_display(reply((T, "hidden"))) == ""


def test_her_to_coser_drops_system_thinking() -> None:
    text = "<system_thinking>p</system_thinking><role_action>bows</role_action>Sir."
    assert her_to_coser(text) == "(bows) Sir."


# --- visibility helpers --------------------------------------------------------------------------------

PLAN = "<system_thinking>Portray Lizzy as wary.</system_thinking>"
BODY = "<role_thinking>I dread this.</role_thinking><role_action>sits</role_action>Yes, Papa?"


@pytest.mark.parametrize("sep", ["", "\n", "\n\n  "])
def test_strip_system_thinking_removes_exactly_the_leading_block(sep: str) -> None:
    assert strip_system_thinking(PLAN + sep + BODY) == BODY


def test_strip_system_thinking_elsewhere_and_absent() -> None:
    assert strip_system_thinking("Hi. " + PLAN + " there") == "Hi.  there"
    assert strip_system_thinking(BODY) == BODY
    assert strip_system_thinking("a < b") == "a < b"
    assert strip_system_thinking(PLAN) == ""
    # removing a block must not leave a new one behind
    assert strip_system_thinking("<system_<system_thinking>x</system_thinking>thinking>y") == ""


def test_public_view_keeps_actions_and_speech_only() -> None:
    view = public_view(PLAN + BODY + "<role_thinking>He knows.</role_thinking>Go on.")
    assert view == "<role_action>sits</role_action>Yes, Papa? Go on."
    r, findings = parse_reply(view)
    assert findings == [] and r.system_thinking is None and not r.of_kind(T)
    assert public_view("<role_thinking>only a thought</role_thinking>") == ""


# --- properties ----------------------------------------------------------------------------------------

SAFE = st.text(
    st.characters(codec="utf-8", exclude_characters="<>[]()", exclude_categories=("Cs", "Cc"))
    | st.sampled_from("\n\t"),
    min_size=1,
    max_size=30,
).filter(lambda s: s.strip() != "")
SEGMENTS = st.lists(st.tuples(st.sampled_from([T, A, S]), SAFE), max_size=6)
PLANS = st.none() | SAFE


@settings(max_examples=200, deadline=None)
@given(SEGMENTS, PLANS)
def test_her_round_trip(parts: list[tuple[str, str]], plan: str | None) -> None:
    r = reply(*parts, plan=plan)
    parsed, findings = parse_reply(render_her(r))
    assert findings == []
    assert parsed == r


@settings(max_examples=200, deadline=None)
@given(SEGMENTS)
def test_coser_round_trip(parts: list[tuple[str, str]]) -> None:
    r = reply(*parts)
    coser = render_coser(r)
    assert parse_coser(coser) == r
    assert her_to_coser(coser_to_her(coser)) == coser


TAGGY = st.lists(
    st.sampled_from(
        [
            "<system_thinking>",
            "</system_thinking>",
            "<role_thinking>",
            "</role_thinking>",
            "<role_action>",
            "</role_action>",
            "<role_thin",
            "<inner>",
            "</x>",
            "<",
            ">",
            "[",
            "]",
            "(",
            ")",
            " ",
            "I feel",
            "he is angry",
            "Hi.",
            "\n",
        ]
    )
    | st.text(max_size=5),
    max_size=25,
).map("".join)
ANY_TEXT = st.text(max_size=80) | TAGGY


@settings(max_examples=200, deadline=None)
@given(ANY_TEXT)
def test_parser_never_raises_and_findings_are_sane(text: str) -> None:
    r, findings = parse_reply(text)
    assert all(0 <= f.span[0] <= f.span[1] <= len(text) for f in findings)
    assert {f.code for f in findings} <= PARSER_CODES <= set(FINDING_CODES)
    assert findings == sorted(findings, key=lambda f: (f.span, f.code))
    assert isinstance(parse_coser(text), Reply)
    assert isinstance(her_to_coser(text), str) and isinstance(coser_to_her(text), str)
    # the hidden layers never survive the visibility helpers
    assert parse_reply(strip_system_thinking(text))[0].system_thinking is None
    seen, _ = parse_reply(public_view(text))
    assert seen.system_thinking is None and not seen.of_kind(T)
    assert seen.of_kind(A) == r.of_kind(A)
    # rendering what was parsed is stable
    assert parse_reply(render_her(r))[0] == r or "<" in text
