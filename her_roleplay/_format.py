"""HER dual-layer reply format: parse, render and convert.

A HER reply is an optional ``<system_thinking>`` block (hidden plan, third person, once, first), then
freely interleaved segments::

    <system_thinking>Portray Elizabeth as ...</system_thinking><role_thinking>I feel dread.</role_thinking>
    <role_action>follows her father</role_action>What is it, Papa?

``<role_thinking>`` is the speaker's private first-person thought, ``<role_action>`` a visible action,
and text outside any tag is speech. CoSER writes the same layers with brackets:
``[I feel dread.] (follows her father) What is it, Papa?``.

Canonical form (what :class:`Reply` holds, what the renderers assume):

- segment texts are stripped and never empty; internal whitespace is kept as written;
- adjacent thinking or action segments stay separate (order and boundaries matter), but adjacent
  speech segments are joined with one space: no text format can keep two speeches apart;
- HER renders with no whitespace between tags; CoSER puts one space between segments.

Visibility: system_thinking is seen by nobody (dropped from history), role_thinking by the speaker
only, actions and speech by everyone (:func:`public_view`).

The parser never raises. A tag is only a ``<name>`` or ``</name>`` shape: ``a < b`` is text. Broken
input gives findings (see :data:`her_roleplay._validate.FINDING_CODES`) and a best-effort reply:

- an opening tag inside another is *nested* if the outer tag is closed later (the inner segment is
  cut out and the outer resumes after it), otherwise the outer tag is taken as *unclosed* and ends
  where the new tag starts;
- a stray closing tag is dropped; unknown tags and broken known tags (``<role_thin``) stay as text;
- a tag still open at the end runs to the end of the text;
- a second or misplaced system_thinking is still read; its text is appended to the first one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

SegmentKind = Literal["thinking", "action", "speech"]
_KINDS: frozenset[str] = frozenset(get_args(SegmentKind))

SYSTEM_TAG = "system_thinking"
THINKING_TAG = "role_thinking"
ACTION_TAG = "role_action"
# tag name -> what its content is; "system" is not a segment kind, it fills Reply.system_thinking
_TAG_KIND: dict[str, str] = {SYSTEM_TAG: "system", THINKING_TAG: "thinking", ACTION_TAG: "action"}
_KIND_TAG: dict[str, str] = {"thinking": THINKING_TAG, "action": ACTION_TAG}

# Any "<name" / "</name" start; the optional ">" decides between a tag and a broken one.
_TAG_SHAPE = re.compile(r"<(/?)([A-Za-z_][A-Za-z0-9_]*)(>?)")
_MIN_BROKEN_PREFIX = 4  # "<role" or "<syst" is a broken tag; "<rol" is too likely to be prose


@dataclass(frozen=True)
class Segment:
    """One piece of a reply. ``text`` is stored stripped; an empty text is an error."""

    kind: SegmentKind
    text: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"segment kind must be one of {sorted(_KINDS)}, got {self.kind!r}")
        if not isinstance(self.text, str):
            raise TypeError(f"segment text must be str, got {type(self.text).__name__}")
        stripped = self.text.strip()
        if not stripped:
            raise ValueError(f"a {self.kind} segment needs non-blank text (empty segments are dropped)")
        object.__setattr__(self, "text", stripped)


@dataclass(frozen=True)
class Reply:
    """A parsed reply: the hidden plan (or None) and the segments in order.

    Construction normalises: ``system_thinking`` is stripped (blank is an error: use None) and
    adjacent speech segments are joined with one space, so equal content compares equal.
    """

    system_thinking: str | None
    segments: tuple[Segment, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.system_thinking is not None:
            if not isinstance(self.system_thinking, str):
                kind = type(self.system_thinking).__name__
                raise TypeError(f"system_thinking must be str or None, got {kind}")
            if not self.system_thinking.strip():
                raise ValueError("system_thinking is blank: pass None for a reply without a plan")
            object.__setattr__(self, "system_thinking", self.system_thinking.strip())
        segments = tuple(self.segments)
        for seg in segments:
            if not isinstance(seg, Segment):
                raise TypeError(f"segments must be Segment objects, got {type(seg).__name__}")
        object.__setattr__(self, "segments", _join_speech(segments))

    def of_kind(self, kind: SegmentKind) -> list[str]:
        """Texts of the segments of one kind, in order."""
        return [seg.text for seg in self.segments if seg.kind == kind]


@dataclass(frozen=True)
class Finding:
    """A problem found in a reply: a stable ``code``, where (char offsets), and a human sentence."""

    code: str
    span: tuple[int, int]
    message: str


def _join_speech(segments: tuple[Segment, ...]) -> tuple[Segment, ...]:
    out: list[Segment] = []
    for seg in segments:
        if out and seg.kind == "speech" and out[-1].kind == "speech":
            out[-1] = Segment("speech", f"{out[-1].text} {seg.text}")
        else:
            out.append(seg)
    return tuple(out)


# --- the HER parser ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tag:
    start: int
    end: int
    name: str
    closing: bool


@dataclass
class _Frame:
    tag: _Tag
    pieces: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class LocatedSegment:
    """A parsed segment with where its text came from (``kind`` may be ``"system"``).

    ``pieces`` are the raw (start, end) ranges of the input it was read from; a dropped stray tag can
    split one segment into several pieces.
    """

    kind: str
    text: str
    pieces: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ParsedReply:
    """Everything the parser learns: the reply, findings, located segments, system block ranges."""

    reply: Reply
    findings: list[Finding]
    located: list[LocatedSegment]
    system_blocks: list[tuple[int, int]]


def _scan_tags(text: str) -> tuple[list[_Tag], list[Finding]]:
    """Known tags in order, plus findings for unknown and broken tag shapes (which stay text)."""
    tags: list[_Tag] = []
    findings: list[Finding] = []
    for m in _TAG_SHAPE.finditer(text):
        closing, name, gt = m.group(1) == "/", m.group(2), m.group(3)
        span = (m.start(), m.end())
        if gt and name in _TAG_KIND:
            tags.append(_Tag(m.start(), m.end(), name, closing))
        elif gt:
            hint = "; tag names are lowercase" if name.lower() in _TAG_KIND else ""
            findings.append(Finding("unknown_tag", span, f"unknown tag <{m.group(1)}{name}>{hint}; "
                                    f"known tags are {', '.join(_TAG_KIND)}"))
        elif _looks_like_known(name):
            findings.append(Finding("malformed_tag", span, f"broken tag {m.group(0)!r}: a known tag must "
                                    "end with '>' right after its name"))
    return tags, findings


def _looks_like_known(name: str) -> bool:
    low = name.lower()
    return any(
        low.startswith(known) or (len(low) >= _MIN_BROKEN_PREFIX and known.startswith(low))
        for known in _TAG_KIND
    )


def parse_reply_located(text: str) -> ParsedReply:
    """Parse HER-tagged ``text`` keeping source positions (used by the validators). Never raises."""
    if not isinstance(text, str):
        raise TypeError(f"reply text must be str, got {type(text).__name__}")
    tags, findings = _scan_tags(text)
    # next_open[i][name] / next_close[i][name]: index of the first such tag after tags[i] (len = none).
    n = len(tags)
    next_open: list[dict[str, int]] = [{}] * n
    next_close: list[dict[str, int]] = [{}] * n
    upcoming_open = dict.fromkeys(_TAG_KIND, n)
    upcoming_close = dict.fromkeys(_TAG_KIND, n)
    for i in range(n - 1, -1, -1):
        next_open[i], next_close[i] = dict(upcoming_open), dict(upcoming_close)
        (upcoming_close if tags[i].closing else upcoming_open)[tags[i].name] = i

    located: list[LocatedSegment] = []
    system_blocks: list[tuple[int, int]] = []
    stack: list[_Frame] = []
    speech: list[tuple[int, int]] = []  # pending top-level pieces
    seen_system = False

    def flush(kind: str, pieces: list[tuple[int, int]]) -> None:
        body = "".join(text[s:e] for s, e in pieces).strip()
        if body:
            located.append(LocatedSegment(kind, body, tuple(pieces)))
        pieces.clear()

    def close(frame: _Frame, end: int, *, unclosed: bool) -> None:
        if unclosed:
            findings.append(Finding("malformed_tag", (frame.tag.start, frame.tag.end),
                                    f"<{frame.tag.name}> is never closed"))
        flush(_TAG_KIND[frame.tag.name], frame.pieces)
        if frame.tag.name == SYSTEM_TAG:
            system_blocks.append((frame.tag.start, end))

    pos = 0
    for i, tag in enumerate(tags):
        if tag.start > pos:
            (stack[-1].pieces if stack else speech).append((pos, tag.start))
        pos = tag.end
        if tag.closing:
            depth = next((d for d in range(len(stack) - 1, -1, -1) if stack[d].tag.name == tag.name), None)
            if depth is None:
                findings.append(Finding("malformed_tag", (tag.start, tag.end),
                                        f"stray </{tag.name}> with no open <{tag.name}>"))
                continue
            while len(stack) > depth + 1:  # tags opened inside and never closed end here
                close(stack.pop(), tag.start, unclosed=True)
            close(stack.pop(), tag.end, unclosed=False)
            continue
        # An opening tag: decide whether the open one is really nesting it or was left unclosed.
        while stack and next_close[i][stack[-1].tag.name] >= next_open[i][stack[-1].tag.name]:
            close(stack.pop(), tag.start, unclosed=True)
        if stack:
            outer = stack[-1].tag.name
            findings.append(Finding("nested_tag", (tag.start, tag.end),
                                    f"<{tag.name}> is opened inside <{outer}>; tags must not nest"))
            flush(_TAG_KIND[outer], stack[-1].pieces)
        else:
            flush("speech", speech)
        if tag.name == SYSTEM_TAG:
            if seen_system:
                findings.append(Finding("duplicate_system_thinking", (tag.start, tag.end),
                                        "a second <system_thinking>; a reply has at most one"))
            elif located or stack:
                findings.append(Finding("misplaced_system_thinking", (tag.start, tag.end),
                                        "<system_thinking> must come first, before any other content"))
            seen_system = True
        stack.append(_Frame(tag))
    if pos < len(text):
        (stack[-1].pieces if stack else speech).append((pos, len(text)))
    while stack:
        close(stack.pop(), len(text), unclosed=True)
    flush("speech", speech)

    plans = [seg.text for seg in located if seg.kind == "system"]
    segments = tuple(Segment(seg.kind, seg.text) for seg in located if seg.kind != "system")  # type: ignore[arg-type]
    reply = Reply("\n".join(plans) if plans else None, segments)
    findings.sort(key=lambda f: (f.span, f.code))
    return ParsedReply(reply, findings, located, sorted(system_blocks))


def parse_reply(text: str) -> tuple[Reply, list[Finding]]:
    """Parse a HER-tagged reply. Never raises on any string; problems come back as findings.

    Findings use the parser codes ``malformed_tag``, ``nested_tag``, ``unknown_tag``,
    ``duplicate_system_thinking`` and ``misplaced_system_thinking``, sorted by span. The reply is a
    best-effort reading (rules in the module docstring).
    """
    parsed = parse_reply_located(text)
    return parsed.reply, parsed.findings


# --- CoSER brackets ----------------------------------------------------------------------------------

_BRACKETS = {"[": ("]", "thinking"), "(": (")", "action")}


def _bracket_pairs(text: str) -> dict[int, int]:
    """Opening index -> matching closing index, per bracket type, with nesting of the same type."""
    pairs: dict[int, int] = {}
    for opener, (closer, _kind) in _BRACKETS.items():
        stack: list[int] = []
        for i, ch in enumerate(text):
            if ch == opener:
                stack.append(i)
            elif ch == closer and stack:
                pairs[stack.pop()] = i
    return pairs


def parse_coser(text: str) -> Reply:
    """Parse CoSER bracket form: ``[thought]``, ``(action)``, anything else is speech.

    Brackets of the same type nest (``(smiles (slightly))`` is one action); an unmatched bracket is
    speech text; empty brackets are dropped. Never raises on a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"reply text must be str, got {type(text).__name__}")
    pairs = _bracket_pairs(text)
    segments: list[Segment] = []
    speech_start = i = 0

    def add(kind: str, body: str) -> None:
        if body.strip():
            segments.append(Segment(kind, body))  # type: ignore[arg-type]

    while i < len(text):
        end = pairs.get(i)
        if end is None:
            i += 1
            continue
        add("speech", text[speech_start:i])
        add(_BRACKETS[text[i]][1], text[i + 1 : end])
        i = speech_start = end + 1
    add("speech", text[speech_start:])
    return Reply(None, tuple(segments))


# --- renderers ---------------------------------------------------------------------------------------


def render_her(reply: Reply, *, include_system_thinking: bool = True) -> str:
    """HER tags, no whitespace between tags. ``parse_reply`` reads it back to an equal reply as long as
    no segment text contains a tag shape."""
    parts = []
    if include_system_thinking and reply.system_thinking is not None:
        parts.append(f"<{SYSTEM_TAG}>{reply.system_thinking}</{SYSTEM_TAG}>")
    for seg in reply.segments:
        if seg.kind == "speech":
            parts.append(seg.text)
        else:
            tag = _KIND_TAG[seg.kind]
            parts.append(f"<{tag}>{seg.text}</{tag}>")
    return "".join(parts)


def render_coser(reply: Reply) -> str:
    """CoSER brackets, one space between segments. system_thinking is dropped (CoSER has no such layer)."""
    marks = {"thinking": "[{}]", "action": "({})", "speech": "{}"}
    return " ".join(marks[seg.kind].format(seg.text) for seg in reply.segments)


def render_display(reply: Reply, *, show_thoughts: bool = False, show_system_thinking: bool = False) -> str:
    """Human-readable text for chat UIs.

    Actions in ``*asterisks*``, speech as is, thoughts in ``[brackets]`` only with ``show_thoughts``,
    one space between segments. With ``show_system_thinking`` the plan comes first as its own
    paragraph ``[system thinking: ...]``. Hidden layers leave no trace.
    """
    parts = []
    for seg in reply.segments:
        if seg.kind == "action":
            parts.append(f"*{seg.text}*")
        elif seg.kind == "speech":
            parts.append(seg.text)
        elif show_thoughts:
            parts.append(f"[{seg.text}]")
    body = " ".join(parts)
    if show_system_thinking and reply.system_thinking is not None:
        plan = f"[system thinking: {reply.system_thinking}]"
        return f"{plan}\n\n{body}" if body else plan
    return body


# --- text-level helpers ------------------------------------------------------------------------------


def strip_system_thinking(text: str) -> str:
    """Remove the system_thinking block(s); every other character is kept byte for byte.

    A block runs from ``<system_thinking>`` to its ``</system_thinking>``; an unclosed one ends where
    the parser closes it (the next tag it could not contain, or the end of the text). Whitespace right
    after a block that opens the text is removed too, since it only separated the plan from the
    reply. Text without a system_thinking comes back unchanged.
    """
    # Removing a block can join the text around it into a new tag ("<system_<system_thinking>..."),
    # so repeat until none is left; each pass removes at least one character.
    while blocks := parse_reply_located(text).system_blocks:
        out: list[str] = []
        pos = 0
        for start, end in blocks:
            if start < pos:  # a block inside a block: already removed
                continue
            out.append(text[pos:start])
            pos = end
            if not "".join(out).strip():
                while pos < len(text) and text[pos].isspace():
                    pos += 1
        out.append(text[pos:])
        text = "".join(out)
    return text


# The variants HER's RM data builders also remove from candidates: a short-named plan and over-long inner
# thoughts (a tag of HER's synthesis data). Neither is part of our format, so a plain pattern finds them.
_JUDGE_HIDDEN = re.compile(r"<(system_think|long_role_thinking)>.*?</\1>", re.DOTALL)


def for_judging(text: str) -> str:
    """A candidate as a judge gets it: every plan block HER strips (``system_thinking``, ``system_think``)
    and ``long_role_thinking`` removed, ends trimmed; role thinking, actions and speech kept."""
    return _JUDGE_HIDDEN.sub("", strip_system_thinking(text)).strip()


def _visible(reply: Reply) -> Reply:
    return Reply(None, tuple(seg for seg in reply.segments if seg.kind != "thinking"))


def public_view(text: str) -> str:
    """What other characters perceive of a HER reply: actions and speech, in HER tags.

    system_thinking and role_thinking are removed (speech around a removed thought joins with one
    space). Malformed input is read best-effort; the result is always well-formed. Empty when nothing
    is visible.
    """
    return render_her(_visible(parse_reply(text)[0]))


def coser_to_her(text: str) -> str:
    """CoSER brackets -> HER tags (no system_thinking)."""
    return render_her(parse_coser(text))


_HER_TAG = re.compile(r"</?(?:system_thinking|role_thinking|role_action)>")


def as_her(message: str) -> str:
    """A dialogue message in HER tags: CoSER brackets are converted, HER text passes through."""
    return message if _HER_TAG.search(message) else coser_to_her(message)


def her_to_coser(text: str) -> str:
    """HER tags -> CoSER brackets; system_thinking is dropped, malformed input read best-effort."""
    return render_coser(parse_reply(text)[0])


# --- speaker-name prefixes ---------------------------------------------------------------------------

_MARK = r"(?:\*{1,2}|_{1,2})?"  # markdown emphasis around a name: **Name**: or *Name:*


def _prefix_pattern(name: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in name.split()]
    spelled = r"\s+".join(words)
    # at the start of the text, of a line, or right after the hidden plan; the name (maybe in
    # markdown emphasis), a colon (ASCII or full-width), and the blanks after it
    return re.compile(
        rf"(^|\n|</{SYSTEM_TAG}>)([ \t]*\n?[ \t]*){_MARK}{spelled}{_MARK}[ \t]*[:：]{_MARK}[ \t]*",
        re.IGNORECASE,
    )


def strip_speaker_prefix(text: str, name: str) -> str:
    """Remove ``name``'s own speaker label from a reply: ``Name: ...`` (also ``**Name**:``,
    ``**Name:**``, a full-width colon, any letter case) at the start of the text, at the start of a
    line, or right after a ``</system_thinking>``. Models trained on transcripts write it; in a
    conversation the speaker is already known, so it is noise. Other names are left alone.
    """
    if not name.strip() or not text:
        return text
    return _prefix_pattern(name).sub(lambda m: m.group(1) + _keep_newlines(m.group(2)), text)


def _keep_newlines(blanks: str) -> str:
    return "\n" if "\n" in blanks else ""
