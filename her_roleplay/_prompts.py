"""Actor prompts and per-character chat histories for multi-character scenes.

One actor prompt layout serves training samples, live chat and simulation, so the policy always sees
the same instructions. A scene with N speaking characters gives N training samples, one per
perspective:

- ``messages[0]`` is the system prompt (:func:`build_actor_system_prompt`);
- the first user message opens with ``===Conversation Start===``, followed by whatever the others
  said before the character's first line;
- other characters' lines (Environment included) are user messages ``Name: text`` showing only what
  the character could perceive (actions and speech, no thoughts); consecutive lines from others share
  one user message, separated by a blank line;
- the character's own lines are assistant messages in HER tags, keeping their role_thinking;
  system_thinking appears only on the final (target) turn, if at all;
- the sample ends at the character's last own turn, the target.

Consecutive own lines (the character speaks twice with nobody in between) are merged into one
assistant message: HER segments may interleave freely, so the merge is still one valid reply, and the
chat keeps strict user/assistant alternation that chat templates expect.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, get_args

from pydantic import BaseModel, Field, model_validator

from her_engines import ChatMessage

from ._format import (
    Reply,
    Segment,
    as_her,
    parse_reply,
    public_view,
    render_coser,
    render_display,
    render_her,
    strip_system_thinking,
)
from ._scene import ENVIRONMENT, Scene, _same_name

CONVERSATION_START = "===Conversation Start==="
"""The marker that opens the first user message of every conversation."""

REPLY_WORD_BUDGET = 60
"""Visible words (action + speech) an actor reply should stay around."""

ReplyFormat = Literal["her", "coser", "plain"]
"""How an actor is asked to write, and how it sees the conversation:

- ``her``: HER tags (``<role_thinking>``, ``<role_action>``, speech), optionally after a
  ``<system_thinking>`` plan;
- ``coser``: CoSER's brackets, ``[thought] (action) speech``;
- ``plain``: spoken words only (e.g. a general chat model as a baseline); others' actions reach it
  in ``*asterisks*``.

Whatever the format, a reply is stored in HER tags (:func:`actor_reply_to_her`), so every visibility
rule works on one representation."""
REPLY_FORMATS: tuple[str, ...] = get_args(ReplyFormat)

_OTHER_PROFILE_CHARS = 400  # others' profiles are context, not the focus: keep them short

__all__ = [
    "CONVERSATION_START",
    "REPLY_FORMATS",
    "REPLY_WORD_BUDGET",
    "CharacterSample",
    "ReplyFormat",
    "actor_reply_to_her",
    "build_actor_system_prompt",
    "build_character_samples",
    "build_chat_prompt",
]


# --- the actor prompt ------------------------------------------------------------------------------


def build_actor_system_prompt(
    scene: Scene, character: str, *, with_system_thinking: bool = True, reply_format: ReplyFormat = "her"
) -> str:
    """The system prompt that casts ``character`` in ``scene``.

    Sections: the role and book; the character's profile; the scenario (and topic); the other
    characters, briefly; the character's inner state for the scene; the reply format. A section whose
    source is missing from the scene is left out entirely. ``reply_format`` picks the reply format
    (:data:`ReplyFormat`); with ``her``, ``with_system_thinking`` asks for a third-person
    ``<system_thinking>`` plan before each reply (the other formats have no plan).

    Raises ValueError when ``character`` is Environment or not part of the scene, or for an unknown
    format.
    """
    _check_actor(scene, character)
    _check_format(reply_format)
    parts = [
        f"You are {character} from the book {scene.book}. Play {character} and nobody else for the whole "
        f"conversation: say, do and think only what {character} would, in {character}'s own voice."
    ]
    profile = scene.profile_of(character)
    if profile:
        parts.append(f"## Who {character} is\n{profile}")
    scene_text = scene.scenario.strip()
    if scene.topic and scene.topic.strip():
        scene_text += f"\n\nWhat the conversation is about: {scene.topic.strip()}"
    parts.append(f"## The scene\n{scene_text}")
    others = _others_section(scene, character)
    if others:
        parts.append(f"## Others present\n{others}")
    motivation = scene.motivation_of(character)
    if motivation:
        parts.append(f"## {character}'s inner state at the start of the scene\n{motivation}")
    rules = (
        _format_rules(character, with_system_thinking)
        if reply_format == "her"
        else _bracket_rules(character)
        if reply_format == "coser"
        else _plain_rules(character)
    )
    parts.append(f"## How to write each reply\n{rules}")
    return "\n\n".join(parts)


def _others_section(scene: Scene, character: str) -> str:
    blocks = []
    for name in scene.other_characters(character):
        # The plot's one-line description is short by nature; fall back to a clipped profile.
        brief = scene.description_of(name) or _clip(scene.profile_of(name), _OTHER_PROFILE_CHARS)
        blocks.append(f"- {name}: {brief}" if brief else f"- {name}")
    return "\n".join(blocks)


def _clip(text: str | None, limit: int) -> str | None:
    if not text:
        return None
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit]
    # End on a sentence if one finishes in the second half, else on a word.
    stop = cut.rfind(". ")
    if stop >= limit // 2:
        return cut[: stop + 1]
    return cut[: cut.rfind(" ")].rstrip(",;:") + " ..."


def _format_rules(character: str, with_system_thinking: bool) -> str:
    lines = []
    if with_system_thinking:
        lines.append(
            "Start every reply with one <system_thinking>...</system_thinking> block: a short plan written "
            f"in the third person about {character} (for example \"Portray {character} as ...\"), covering "
            f"the situation, what {character} wants right now and how the reply will show it. It is "
            "hidden from everyone and appears only once, at the very beginning."
        )
        lines.append("After it, compose the reply from these pieces, in any order and as often as needed:")
    else:
        lines.append("Compose the reply from these pieces, in any order and as often as needed:")
    lines += [
        f"- <role_thinking>...</role_thinking>: what {character} privately thinks, in the first person. "
        "Only you know it; never claim to know what others feel inside.",
        f"- <role_action>...</role_action>: what {character} visibly does: a gesture, movement or "
        "expression.",
        f"- plain text outside any tag: what {character} says aloud.",
        f"Keep the visible part (actions and speech) brief, about {REPLY_WORD_BUDGET} words. Write only "
        f"{character}'s turn: never speak, act or decide for another character, and do not narrate the "
        "surroundings.",
        f"The conversation opens with {CONVERSATION_START}; the others' words and actions reach you as "
        "\"Name: text\".",
    ]
    shape = "<role_thinking>...</role_thinking><role_action>...</role_action>Spoken words."
    if with_system_thinking:
        shape = "<system_thinking>...</system_thinking>" + shape
    lines.append(f"One possible shape: {shape}")
    return "\n".join(lines)


def _closing_rules(character: str) -> list[str]:
    return [
        f"Keep the visible part (actions and speech) brief, about {REPLY_WORD_BUDGET} words. Write only "
        f"{character}'s turn: never speak, act or decide for another character, and do not narrate the "
        "surroundings.",
        f"The conversation opens with {CONVERSATION_START}; the others' words and actions reach you as "
        "\"Name: text\".",
    ]


def _bracket_rules(character: str) -> str:
    """CoSER's layers: [thought] (action) speech."""
    lines = [
        "Compose the reply from these pieces, in any order and as often as needed:",
        f"- [square brackets]: what {character} privately thinks, in the first person. Nobody else sees "
        "it; never claim to know what others feel inside.",
        f"- (round brackets): what {character} visibly does: a gesture, movement or expression.",
        f"- plain text outside any bracket: what {character} says aloud.",
        *_closing_rules(character),
        "One possible shape: [I must not show how afraid I am.] (folds hands) Spoken words.",
    ]
    return "\n".join(lines)


def _plain_rules(character: str) -> str:
    """Speech only."""
    lines = [
        f"Reply with what {character} says aloud, as plain text: no tags, no brackets, no stage "
        "directions and no name label.",
        *_closing_rules(character),
    ]
    return "\n".join(lines)


def _check_format(reply_format: str) -> None:
    if reply_format not in REPLY_FORMATS:
        raise ValueError(f"unknown reply format {reply_format!r}; expected one of {', '.join(REPLY_FORMATS)}")


def actor_reply_to_her(text: str, reply_format: ReplyFormat) -> str:
    """An actor's raw reply in HER tags, the form every line is stored in.

    ``her`` passes through; ``coser`` brackets become tags (a reply already in HER tags is kept);
    ``plain`` is all speech (brackets and asterisks included). Blank text gives "".
    """
    _check_format(reply_format)
    if reply_format == "her":
        return text
    if reply_format == "coser":
        return as_her(text).strip()
    return render_her(Reply(None, (Segment("speech", text),))) if text.strip() else ""


def _check_actor(scene: Scene, character: str) -> None:
    if not character.strip():
        raise ValueError("character name is empty")
    if _same_name(character, ENVIRONMENT):
        raise ValueError(f"{ENVIRONMENT!r} narrates the scene and is not an actor")
    if not scene.has_character(character):
        raise ValueError(
            f"{character!r} is not in scene {scene.sample_id}; its cast is {scene.cast()}"
        )


# --- per-character samples ---------------------------------------------------------------------------


class CharacterSample(BaseModel):
    """One training sample: a scene seen from one character.

    ``messages`` = system, then user/assistant strictly alternating from a user message;
    ``messages[target_index]`` is the character's last own turn (the last message).
    """

    character: str
    scene_id: str = Field(description="Scene.sample_id of the source scene")
    messages: list[ChatMessage]
    target_index: int

    @model_validator(mode="after")
    def _check_shape(self) -> CharacterSample:
        roles = [m.role for m in self.messages]
        if len(roles) < 3 or roles[0] != "system":
            raise ValueError(f"a sample needs system, user, assistant at least; got roles {roles}")
        for i, role in enumerate(roles[1:], start=1):
            expected = "user" if i % 2 == 1 else "assistant"
            if role != expected:
                raise ValueError(f"message {i} should be {expected!r} (strict alternation), got {role!r}")
        if not (0 < self.target_index < len(roles)) or roles[self.target_index] != "assistant":
            raise ValueError(f"target_index {self.target_index} does not point at an assistant message")
        return self

    @property
    def prompt_messages(self) -> list[ChatMessage]:
        """The conversation without the target reply: what the policy sees before answering."""
        return self.messages[: self.target_index]

    @property
    def target(self) -> str:
        """The reference reply (HER text)."""
        return self.messages[self.target_index].content


def build_character_samples(
    scene: Scene, *, final_system_thinking: Mapping[str, str] | None = None
) -> list[CharacterSample]:
    """One sample per perspective: every major or speaking character except Environment who has at
    least one line, in the order of ``Scene.cast()``.

    Dialogue messages in CoSER brackets are converted to HER tags; messages already in HER tags are
    kept. ``final_system_thinking`` maps a character to the plan placed as ``<system_thinking>`` on
    that character's target turn (replacing any plan the data carried); earlier own turns never keep a
    system_thinking. The sample's system prompt asks for system_thinking exactly when its target has one.
    A line with nothing observable (e.g. only a thought) is skipped for the others who would see it.

    Raises ValueError for a ``final_system_thinking`` key that names no perspective of the scene.
    """
    lines = [(line.character, as_her(line.message)) for line in scene.dialogues]
    perspectives = [
        name for name in scene.cast()
        if any(_same_name(speaker, name) and _has_reply(text) for speaker, text in lines)
    ]
    plans = dict(final_system_thinking or {})
    for name in plans:
        if not any(_same_name(name, p) for p in perspectives):
            raise ValueError(f"final_system_thinking names {name!r}, who has no perspective in "
                             f"{scene.sample_id}; perspectives are {perspectives}")
    samples = []
    for name in perspectives:
        plan = next((text for key, text in plans.items() if _same_name(key, name)), None)
        samples.append(_one_sample(scene, name, lines, plan))
    return samples


def _one_sample(
    scene: Scene, character: str, lines: list[tuple[str, str]], plan: str | None
) -> CharacterSample:
    last_own = max(i for i, (who, t) in enumerate(lines) if _same_name(who, character) and _has_reply(t))
    if plan is None:
        plan = parse_reply(lines[last_own][1])[0].system_thinking  # a plan the data already carries
    elif not plan.strip():
        raise ValueError(f"final_system_thinking for {character!r} is empty")
    turns = _turns(character, lines[: last_own + 1], "her")
    if plan and plan.strip():
        # Only the target keeps a plan, and it goes first even when the target merged several lines.
        turns[-1] = ("assistant", f"<system_thinking>{plan.strip()}</system_thinking>{turns[-1][1]}")
    system = build_actor_system_prompt(scene, character, with_system_thinking=bool(plan and plan.strip()))
    messages = [ChatMessage(role="system", content=system)]
    messages += [ChatMessage(role=role, content=content) for role, content in turns]
    return CharacterSample(character=character, scene_id=scene.sample_id, messages=messages,
                           target_index=len(messages) - 1)


def build_chat_prompt(
    scene: Scene,
    character: str,
    history: Sequence[tuple[str, str]],
    *,
    with_system_thinking: bool = True,
    reply_format: ReplyFormat = "her",
) -> list[ChatMessage]:
    """Chat messages asking ``character`` for its next turn, given ``history`` of (speaker, HER text).

    Same rules as the training samples: own past turns lose their system_thinking, others' turns show
    only their public view, the first user message opens with the conversation marker. The result
    ends with a user message (just the marker when the history is empty). ``reply_format`` sets the
    requested format and how the history is written: HER tags, CoSER brackets (own thoughts as
    ``[...]``, others' actions as ``(...)``) or plain text (others' actions as ``*...*``, own thoughts
    left out).

    Raises ValueError when the history ends with ``character``'s own turn: asking for another turn
    would put two assistant messages in a row; the caller should let someone else speak first.
    """
    _check_actor(scene, character)
    _check_format(reply_format)
    for i, (speaker, _text) in enumerate(history):
        if not speaker or not speaker.strip():
            raise ValueError(f"history item {i} has no speaker name")
    turns = _turns(character, history, reply_format)  # starts with the marker, so never empty
    if turns[-1][0] == "assistant":
        raise ValueError(
            f"the history ends with {character!r}'s own turn; another speaker must come before its next turn"
        )
    system = build_actor_system_prompt(
        scene, character, with_system_thinking=with_system_thinking, reply_format=reply_format
    )
    return [ChatMessage(role="system", content=system)] + [ChatMessage(role=r, content=c) for r, c in turns]


def _turns(
    character: str, lines: Iterable[tuple[str, str]], reply_format: ReplyFormat = "her"
) -> list[tuple[str, str]]:
    """Fold (speaker, HER text) lines into alternating (role, content) turns for ``character``.

    Own lines → assistant, without system_thinking; others' lines → user ``Name: public view``. The
    first turn is always a user turn opening with the conversation marker. Contents are written in
    ``reply_format``.
    """
    turns: list[tuple[str, list[str]]] = [("user", [CONVERSATION_START])]
    for speaker, text in lines:
        if _same_name(speaker, character):
            content = strip_system_thinking(text).strip()
            if reply_format == "plain" and not _plain(content):
                content = ""  # a plain actor never sees its own thoughts: nothing left of this line
            role = "assistant"
        else:
            seen = _written_as(public_view(text).strip(), reply_format)
            content = f"{speaker.strip()}: {seen}" if seen else ""
            role = "user"
        if not content:
            continue  # nothing the character could observe or learn from
        if turns[-1][0] == role:
            turns[-1][1].append(content)
        else:
            turns.append((role, [content]))
    return [
        (role, "\n\n".join(parts) if role == "user" else _written_as(_merge_own(parts), reply_format))
        for role, parts in turns
    ]


def _written_as(her_text: str, reply_format: ReplyFormat) -> str:
    """HER text in the actor's format: as is, in CoSER brackets, or plain (no thoughts)."""
    if reply_format == "her" or not her_text:
        return her_text
    if reply_format == "coser":
        return render_coser(parse_reply(her_text)[0]).strip()
    return _plain(her_text)


def _plain(her_text: str) -> str:
    return render_display(parse_reply(her_text)[0]).strip()


def _merge_own(parts: list[str]) -> str:
    """Consecutive own lines become one reply: their segments in order, rendered once."""
    if len(parts) == 1:
        return parts[0]
    segments = tuple(seg for part in parts for seg in parse_reply(part)[0].segments)
    return render_her(Reply(system_thinking=None, segments=segments))


def _has_reply(text: str) -> bool:
    """True when an own line says, does or thinks something beyond a hidden plan."""
    return bool(strip_system_thinking(text).strip())
