"""HER reverse synthesis, steps 2–4: what each teacher stage asks, and how its answer is checked.

Three stages, each one schema-constrained teacher call per unit:

- ``role_thinking`` (per character line): the teacher returns the line as a list of segments with
  richer first-person thoughts; actions and speech must come back word for word (minimal edits).
  The prompt names the shapes and openings the character's previous turns already used.
- ``system_thinking`` (per character line): a third-person plan ("Portray X as ...") for the final
  reply (the augmented line when role_thinking was accepted, else the original).
- ``setting`` (per scene with plot source text): facts the dialogue needs that the scenario lacks,
  each with a supporting quote that must occur in the source text (whitespace-normalised).

A line's units run in order inside one *chain* per (scene, character), so each prompt can see that
character's earlier results; chains are generators driven by :mod:`data_builder._stages`, which sends
back the stored teacher record for each unit it yields (``None`` in a dry run).

Besides the reply validators' codes (:data:`her_roleplay.FINDING_CODES`), rejects carry these:
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from her_engines import ChatMessage, GenRequest
from her_roleplay import (
    ENVIRONMENT,
    REPLY_WORD_BUDGET,
    Finding,
    Reply,
    Scene,
    Segment,
    coser_to_her,
    find_repeated_patterns,
    parse_reply,
    public_view,
    render_her,
    validate_reply,
)

from ._books import turn_id

STAGES = ("role_thinking", "system_thinking", "setting")

SYNTH_FINDING_CODES: dict[str, str] = {
    "teacher_error": "the engine reported an error for this request (not stored; a rerun retries it)",
    "teacher_output_invalid": "the teacher's answer is not JSON of the requested shape (often: cut off)",
    "visible_text_changed": "role_thinking changed, dropped or added an action or spoken words",
    "missing_role_thinking": "the augmented line has no role_thinking at all",
    "thought_length": "the line's thoughts together are outside the allowed character range",
    "plan_not_about_speaker": "the system_thinking plan never names the character it plans for",
    "quote_not_in_source": "a setting addition's quote does not occur in the plot source text",
    "quote_too_short": "a setting addition's quote is too short to support anything",
    "empty_addition": "a setting addition has no text",
}
__doc__ = (__doc__ or "") + "\n".join(f"\n- ``{c}``: {d}" for c, d in SYNTH_FINDING_CODES.items())

_SEGMENT_TAGS = {"role_thinking": "thinking", "role_action": "action", "speech": "speech"}
_KIND_NAMES = {"thinking": "thought", "action": "action", "speech": "speech"}


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the synthesis; every default is what `her build synth` uses."""

    stages: tuple[str, ...] = STAGES
    """Stages to run, a subset of STAGES; system_thinking plans the augmented line when both run."""
    max_visible_words: int = 2 * REPLY_WORD_BUDGET
    """Upper bound of action + speech words of a produced line (validator `reply_too_long`)."""
    thought_chars: tuple[int, int] = (50, 200)
    """Allowed total length of a line's thoughts after augmentation, in characters."""
    context_lines: int = 6
    """Earlier lines of the scene shown to the teacher."""
    source_chars: int = 4000
    """Longest excerpt of the plot source text shown to the setting teacher."""
    max_additions: int = 3
    """Most setting additions asked for per scene."""
    min_quote_words: int = 4
    """Shortest supporting quote accepted, in words."""
    max_tokens: dict[str, int] = field(default_factory=lambda: {
        "role_thinking": 320, "system_thinking": 160, "setting": 400})
    """Teacher completion budget per stage."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ValueError(f"stages must be a non-empty subset of {', '.join(STAGES)}; got {list(self.stages)}")
        low, high = self.thought_chars
        if not 0 <= low < high:
            raise ValueError(f"thought_chars must be (low, high) with 0 <= low < high, got {self.thought_chars}")
        if self.max_visible_words < 1 or self.context_lines < 0 or self.source_chars < 200:
            raise ValueError("max_visible_words >= 1, context_lines >= 0 and source_chars >= 200 are required; "
                             f"got {self.max_visible_words}, {self.context_lines}, {self.source_chars}")


@dataclass(frozen=True)
class Unit:
    """One teacher call: which stage, which record, the request, and what the key hashes."""

    stage: str
    record_id: str
    request: GenRequest
    unit_input: str
    """The unit's own input (the original line, the scene id): part of the key."""
    expected_output_chars: int
    """A guess of the answer's size, for dry-run estimates."""

    def key(self, model_id: str) -> str:
        """Content hash of stage, input, teacher model and full prompt: equal key, equal request."""
        body = json.dumps([self.stage, self.record_id, self.unit_input, model_id,
                           self.request.model_dump(mode="json")], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()


@dataclass
class Reject:
    record_id: str
    stage: str
    findings: list[Finding]
    teacher_text: str

    def as_json(self) -> dict[str, Any]:
        return {"id": self.record_id, "stage": self.stage, "teacher_text": self.teacher_text,
                "findings": [{"code": f.code, "message": f.message} for f in self.findings]}


@dataclass
class SceneOutcome:
    """What the chains of one scene produced; turned into the output record by `scene_record`."""

    scene: Scene
    bodies: dict[int, str] = field(default_factory=dict)  # line index -> HER body (no plan)
    plans: dict[int, str] = field(default_factory=dict)
    status: dict[int, dict[str, str]] = field(default_factory=dict)  # line -> stage -> accepted|rejected
    additions: list[dict[str, str]] | None = None
    rejects: list[Reject] = field(default_factory=list)

    def mark(self, line: int, stage: str, accepted: bool) -> None:
        self.status.setdefault(line, {})[stage] = "accepted" if accepted else "rejected"


Chain = Generator[Unit, "dict | None", None]


# --- prompts (one builder per stage) -----------------------------------------------------------------

_JSON_ONLY = "Answer with the JSON object only."


def _context(scene: Scene, upto: int, lines: int) -> str:
    shown = []
    for line in scene.dialogues[max(0, upto - lines) : upto]:
        seen = public_view(coser_to_her(line.message)) if line.character != ENVIRONMENT else line.message
        if seen.strip():
            shown.append(f"{line.character}: {seen}")
    return "\n".join(shown) or "(the scene opens with this line)"


def describe_shape(body: str) -> str:
    """``thought -> action -> speech, opening "I must know"``: how a turn is built."""
    segments = parse_reply(body)[0].segments
    kinds = " -> ".join(_KIND_NAMES[s.kind] for s in segments) or "nothing"
    opening = " ".join(segments[0].text.split()[:3]) if segments else ""
    return f'{kinds}, opening "{opening}"'


def role_thinking_prompt(
    scene: Scene, index: int, earlier_bodies: Sequence[str], config: SynthConfig
) -> list[ChatMessage]:
    character = scene.dialogues[index].character
    low, high = config.thought_chars
    system = (
        "You edit lines of dialogue from a novel or play to build training data for role-play. Each line "
        "is a list of segments: role_thinking (a private thought), role_action (something visible the "
        "character does) and speech (words said aloud). Your job is to deepen the thoughts and touch "
        "nothing else.\n"
        "Rules:\n"
        "- Copy every role_action and speech segment exactly, same words, same order.\n"
        f"- Thoughts are {character}'s own voice, first person (I, me, my).\n"
        "- A thought may only guess at what others feel (\"he seems angry\", \"perhaps she lies\"); it never "
        "states their hidden feelings as fact.\n"
        f"- All thoughts together: {low}-{high} characters. Keep what the original thought says and "
        "add the motive or feeling behind the line.\n"
        "- You may move a thought before, between or after the other segments, and split or join "
        "thoughts, to vary how turns are built.\n" + _JSON_ONLY
    )
    parts = [f"Book: {scene.book}", f"Scene: {scene.scenario}"]
    motivation = scene.motivation_of(character)
    if motivation:
        parts.append(f"{character}'s state of mind in this scene: {motivation}")
    parts.append(f"Conversation so far:\n{_context(scene, index, config.context_lines)}")
    if earlier_bodies:
        shapes = "\n".join(f"- {describe_shape(b)}" for b in earlier_bodies[-3:])
        parts.append(f"{character}'s previous turns were built like this; use a different order of "
                     f"segments or different first words this time:\n{shapes}")
    segments = [{"kind": _tag_of(s.kind), "text": s.text} for s in parse_reply(coser_to_her(
        scene.dialogues[index].message))[0].segments]
    parts.append(f"The line by {character} to edit:\n{json.dumps({'segments': segments}, ensure_ascii=False)}")
    return [ChatMessage(role="system", content=system), ChatMessage(role="user", content="\n\n".join(parts))]


def system_thinking_prompt(scene: Scene, index: int, body: str, config: SynthConfig) -> list[ChatMessage]:
    character = scene.dialogues[index].character
    system = (
        "You write the hidden plan an actor makes before a line of a scene. Given the scene and the "
        f"line {character} finally delivers, write one to three sentences that explain it: what the "
        f"situation asks of {character}, what {character} wants at this moment, and how the thought, action "
        f"and words of the line carry that. Write about {character} in the third person and begin with "
        f"\"Portray {character} as\". Name other characters by name; the plan is about the story's "
        "characters only, never about a reader, player or user. Do not add events the line does not "
        "contain.\n" + _JSON_ONLY
    )
    parts = [f"Book: {scene.book}", f"Scene: {scene.scenario}",
             f"Conversation so far:\n{_context(scene, index, config.context_lines)}",
             f"{character}'s line (role_thinking is private, role_action is visible, plain text is spoken):\n{body}"]
    return [ChatMessage(role="system", content=system), ChatMessage(role="user", content="\n\n".join(parts))]


def setting_prompt(scene: Scene, excerpt: str, config: SynthConfig) -> list[ChatMessage]:
    system = (
        "You complete the setting of a scene for role-play training data. Read the scenario, the "
        "dialogue and an excerpt of the book. Find behaviour in the dialogue that the scenario does not "
        "explain (a reference to an earlier event, a relationship, an object, a reason for someone's "
        f"mood) and, for each, state the missing fact in one sentence. Give at most {config.max_additions} "
        "facts, only ones the excerpt supports, and for each copy a supporting passage from the excerpt "
        "word for word into `quote`. If the scenario already explains the dialogue, return an empty "
        "list.\n" + _JSON_ONLY
    )
    dialogue = "\n".join(f"{d.character}: {d.message}" for d in scene.dialogues)
    user = f"Scenario: {scene.scenario}\n\nDialogue:\n{dialogue}\n\nBook excerpt:\n{excerpt}"
    return [ChatMessage(role="system", content=system), ChatMessage(role="user", content=user)]


def _tag_of(kind: str) -> str:
    return {"thinking": "role_thinking", "action": "role_action", "speech": "speech"}[kind]


# --- answer schemas ------------------------------------------------------------------------------------

def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


_TEXT = {"type": "string", "minLength": 1, "maxLength": 600}
ROLE_THINKING_SCHEMA = _object({"segments": {"type": "array", "minItems": 1, "maxItems": 8, "items": _object(
    {"kind": {"enum": list(_SEGMENT_TAGS)}, "text": _TEXT})}})
SYSTEM_THINKING_SCHEMA = _object({"plan": _TEXT})


def setting_schema(config: SynthConfig) -> dict[str, Any]:
    return _object({"additions": {"type": "array", "maxItems": config.max_additions,
                                  "items": _object({"text": _TEXT, "quote": _TEXT})}})


# --- checks ----------------------------------------------------------------------------------------------

def _normalise(text: str) -> str:
    return " ".join(text.split())


def quote_in_source(quote: str, source: str) -> bool:
    """True when ``quote`` occurs in ``source`` word for word, whitespace runs counting as one space."""
    needle = _normalise(quote)
    return bool(needle) and needle in _normalise(source)


def check_addition(addition: dict[str, str], source: str, config: SynthConfig) -> list[Finding]:
    """Findings for one setting addition ``{"text", "quote"}``; empty when it is kept."""
    text, quote = addition.get("text", ""), addition.get("quote", "")
    findings = []
    if not text.strip():
        findings.append(Finding("empty_addition", (0, 0), "the addition has no text"))
    if len(quote.split()) < config.min_quote_words:
        findings.append(Finding("quote_too_short", (0, len(quote)),
                                f"the quote has {len(quote.split())} words; at least {config.min_quote_words} needed"))
    elif not quote_in_source(quote, source):
        findings.append(Finding("quote_not_in_source", (0, len(quote)),
                                f"the quote {_normalise(quote)[:80]!r} is not in the plot source text"))
    return findings


def source_excerpt(scene: Scene, limit: int) -> str:
    """The window of whole paragraphs of the plot text (at most ``limit`` chars) sharing the most words
    with the scenario and dialogue: long plots do not fit a prompt, and the scene is usually local."""
    source = plot_source(scene)
    if len(source) <= limit:
        return source
    wanted = _words(scene.scenario + " " + " ".join(d.message for d in scene.dialogues))
    paragraphs = [p for p in re.split(r"\n\s*\n", source) if p.strip()]
    scores = [len(_words(p) & wanted) for p in paragraphs]
    best, best_score = (0, 0), -1
    for start in range(len(paragraphs)):
        size, score, end = 0, 0, start
        while end < len(paragraphs) and size + len(paragraphs[end]) + 2 <= limit:
            size, score, end = size + len(paragraphs[end]) + 2, score + scores[end], end + 1
        if end > start and score > best_score:
            best, best_score = (start, end), score
    if best_score < 0:  # one paragraph longer than the limit
        return source[:limit]
    return "\n\n".join(paragraphs[best[0] : best[1]])


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z']{4,}", text.lower())}


def plot_source(scene: Scene) -> str:
    """The plot's source text (``plot.text``), or "" when the scene has none."""
    text = getattr(scene.plot, "text", None) if scene.plot is not None else None
    return text if isinstance(text, str) else ""


def _read_answer(record: dict, required: str) -> tuple[dict | None, list[Finding]]:
    """The teacher's JSON answer, or findings saying why there is none."""
    if record.get("finish_reason") == "error":
        return None, [Finding("teacher_error", (0, 0), f"engine error: {record.get('error')}")]
    try:
        answer = json.loads(record["text"])
    except json.JSONDecodeError as exc:
        cut = " (cut off at the token limit)" if record.get("finish_reason") == "length" else ""
        return None, [Finding("teacher_output_invalid", (0, 0), f"not JSON{cut}: {exc}")]
    if not isinstance(answer, dict) or required not in answer:
        return None, [Finding("teacher_output_invalid", (0, 0), f"the answer lacks {required!r}")]
    return answer, []


def check_augmented(
    original: str, answer: dict, character: str, config: SynthConfig
) -> tuple[str | None, list[Finding]]:
    """The augmented HER body from a role_thinking answer, or None with the synthesis findings."""
    try:
        segments = tuple(Segment(_SEGMENT_TAGS[s["kind"]], s["text"]) for s in answer["segments"])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as exc:
        return None, [Finding("teacher_output_invalid", (0, 0), f"bad segment: {exc}")]
    body = render_her(Reply(None, segments))
    findings = []
    before = _visible_parts(parse_reply(coser_to_her(original))[0])
    after = _visible_parts(Reply(None, segments))
    if before != after:
        findings.append(Finding("visible_text_changed", (0, len(body)),
                                f"actions and speech must stay as written: expected {before}, got {after}"))
    thought = sum(len(s.text) for s in segments if s.kind == "thinking")
    low, high = config.thought_chars
    if thought == 0:
        findings.append(Finding("missing_role_thinking", (0, 0), f"{character}'s line has no role_thinking"))
    elif not low <= thought <= high:
        findings.append(Finding("thought_length", (0, len(body)),
                                f"{thought} characters of thought; keep them within {low}-{high}"))
    return body, findings


def _visible_parts(reply: Reply) -> list[tuple[str, str]]:
    return [(s.kind, _normalise(s.text)) for s in reply.segments if s.kind != "thinking"]


def names_speaker(plan: str, character: str) -> bool:
    """True when the plan contains the character's name or one of its words (titles aside)."""
    words = [w for w in re.findall(r"[^\W\d_]+", character) if len(w) > 2 and w.lower() not in _TITLE_WORDS]
    return any(re.search(rf"\b{re.escape(w)}\b", plan) for w in words or [character])


_TITLE_WORDS = frozenset({"mr", "mrs", "miss", "lady", "lord", "sir", "king", "queen", "duke", "earl", "the",
                          "prince", "princess", "duchess", "count", "countess", "master", "captain"})


# --- chains ----------------------------------------------------------------------------------------------

def character_lines(scene: Scene) -> list[int]:
    return [i for i, d in enumerate(scene.dialogues) if d.character != ENVIRONMENT]


def line_chain(scene: Scene, character: str, outcome: SceneOutcome, config: SynthConfig) -> Chain:
    """role_thinking then system_thinking for each of ``character``'s lines, in order."""
    cast = scene.cast()
    others = [n for n in cast if n != character]
    earlier: list[str] = []
    for i in (i for i in character_lines(scene) if scene.dialogues[i].character == character):
        original = scene.dialogues[i].message
        rid = turn_id(scene, i)
        body = coser_to_her(original)
        if "role_thinking" in config.stages:
            messages = role_thinking_prompt(scene, i, earlier, config)
            request = GenRequest(messages=messages, json_schema=ROLE_THINKING_SCHEMA,
                                 max_tokens=config.max_tokens["role_thinking"])
            record = yield Unit("role_thinking", rid, request, original, len(original) + 200)
            if record is not None:
                augmented, findings = _augment(record, original, character, others, earlier, config)
                outcome.mark(i, "role_thinking", not findings)
                if findings:
                    outcome.rejects.append(Reject(rid, "role_thinking", findings, record.get("text", "")))
                else:
                    body = augmented  # type: ignore[assignment]
        if "system_thinking" in config.stages:
            request = GenRequest(messages=system_thinking_prompt(scene, i, body, config),
                                 json_schema=SYSTEM_THINKING_SCHEMA, max_tokens=config.max_tokens["system_thinking"])
            record = yield Unit("system_thinking", rid, request, original + "\n" + body, 300)
            if record is not None:
                plan, findings = _plan(record, body, character, others, config)
                outcome.mark(i, "system_thinking", not findings)
                if findings:
                    outcome.rejects.append(Reject(rid, "system_thinking", findings, record.get("text", "")))
                else:
                    outcome.plans[i] = plan  # type: ignore[assignment]
        outcome.bodies[i] = body
        earlier.append(body)


def _augment(record: dict, original: str, character: str, others: list[str], earlier: list[str],
             config: SynthConfig) -> tuple[str | None, list[Finding]]:
    answer, findings = _read_answer(record, "segments")
    if answer is None:
        return None, findings
    body, findings = check_augmented(original, answer, character, config)
    if body is None:
        return None, findings
    findings += validate_reply(body, speaker=character, others=others, max_visible_words=config.max_visible_words)
    if earlier:
        findings += [f for i, f in find_repeated_patterns([earlier[-1], body]) if i == 1]
    return body, findings


def _plan(record: dict, body: str, character: str, others: list[str], config: SynthConfig,
          ) -> tuple[str | None, list[Finding]]:
    answer, findings = _read_answer(record, "plan")
    if answer is None:
        return None, findings
    plan = str(answer["plan"]).strip()
    if not plan:
        return None, [Finding("teacher_output_invalid", (0, 0), "the plan is blank")]
    text = f"<system_thinking>{plan}</system_thinking>{body}"
    findings = validate_reply(text, speaker=character, others=others, require_system_thinking=True,
                              max_visible_words=config.max_visible_words)
    if not names_speaker(plan, character):
        findings.append(Finding("plan_not_about_speaker", (0, 0), f"the plan never names {character}"))
    return plan, findings


def setting_chain(scene: Scene, outcome: SceneOutcome, config: SynthConfig) -> Chain:
    """One setting unit for the scene; additions whose quote fails are rejected one by one."""
    excerpt = source_excerpt(scene, config.source_chars)
    request = GenRequest(messages=setting_prompt(scene, excerpt, config), json_schema=setting_schema(config),
                         max_tokens=config.max_tokens["setting"])
    record = yield Unit("setting", scene.sample_id, request, scene.scenario + "\n" + excerpt, 600)
    if record is None:
        return
    answer, findings = _read_answer(record, "additions")
    if answer is None:
        outcome.rejects.append(Reject(scene.sample_id, "setting", findings, record.get("text", "")))
        return
    outcome.additions = []
    for k, addition in enumerate(answer["additions"]):
        problems = check_addition(addition, plot_source(scene), config)
        if problems:
            outcome.rejects.append(Reject(f"{scene.sample_id}-setting-{k}", "setting", problems,
                                          json.dumps(addition, ensure_ascii=False)))
        else:
            outcome.additions.append({"text": addition["text"].strip(), "quote": addition["quote"].strip()})


def scene_chains(scene: Scene, config: SynthConfig) -> tuple[SceneOutcome, list[tuple[int, Callable[[], Chain]]]]:
    """The scene's outcome holder and its chains as (number of units, chain factory)."""
    outcome = SceneOutcome(scene)
    per_line = sum(s in config.stages for s in ("role_thinking", "system_thinking"))
    chains: list[tuple[int, Callable[[], Chain]]] = []
    if per_line:
        for character in dict.fromkeys(scene.dialogues[i].character for i in character_lines(scene)):
            count = sum(scene.dialogues[i].character == character for i in character_lines(scene))
            chains.append((count * per_line, functools.partial(line_chain, scene, character, outcome, config)))
    if "setting" in config.stages and plot_source(scene).strip():
        chains.append((1, lambda: setting_chain(scene, outcome, config)))
    return outcome, chains


def scene_record(outcome: SceneOutcome, config: SynthConfig, teacher: str) -> dict[str, Any]:
    """The synthesized scene: loadable by `load_scenes`; character lines carry plan + HER segments."""
    record = outcome.scene.model_dump(mode="json", by_alias=True, exclude_none=True)
    for i, line in enumerate(record["dialogues"]):
        if i not in outcome.bodies:
            continue
        plan = outcome.plans.get(i)
        message = outcome.bodies[i] if plan is None else f"<system_thinking>{plan}</system_thinking>{outcome.bodies[i]}"
        line.update(message=message, original=outcome.scene.dialogues[i].message, synth=outcome.status.get(i, {}))
    if outcome.additions is not None:
        record["setting_additions"] = outcome.additions
    record["synth"] = {"teacher": teacher, "stages": list(config.stages)}
    return record
