"""Flaw-based scoring of a whole simulated conversation (CoSER-style), shared by eval and rm_server.

A judge reads one scene (plot summary, scenario, main characters' profiles, the book's version of
the conversation) and a re-enactment of it, and lists the re-enactment's flaws for one dimension per
call, as schema-constrained JSON::

    {"flaws": [{"instance": "<= 200 chars", "type": "<a flaw type of the dimension>", "severity": 1..5}]}

Per dimension: ``score = clip(100 - 5 * (sum(severity) - 0.3 * actor_rounds), 0, 100)``, where
``actor_rounds`` counts the re-enactment's lines spoken by characters (Environment excluded); the
sample's score is the mean of its dimensions. Unreadable judge output is retried (new seed, some
temperature) and then reported as that dimension's error: the transcript's ``average`` is then None
and its status ``"error"`` -- never a default score.

Two scoring protocols (:data:`ScoringProtocol`) share this formula and differ in what the judge is
asked for and how its answer is read:

- ``"coser"`` (the default, comparable with published CoSER numbers): the judge names flaw types with
  CoSER's own type names (``"Flow & Progression"``, ``"Self-identity"``, ...), and severities run
  1..5, except mechanical repetition (``flow_progression``, CoSER's "Flow & Progression") which may
  reach 10, as CoSER's criteria allow. A flaw without a severity counts 1, as in CoSER. Parsed flaws
  carry CoSER's names.
- ``"her"``: our snake_case type names and severities 1..5 for every type.

Either parser accepts both spellings of a type (case, spaces and punctuation ignored) and maps them to
the protocol's canonical name; severities are clamped to the type's range. Where CoSER's own scoring
is more permissive, we are stricter and say so: CoSER counts flaws of any type name, counts an
out-of-range severity as given and silently drops non-integer severities from the sum; here an unknown
type or a non-numeric severity makes the output unreadable (retried), and a whole-number float counts.
With schema-constrained decoding none of these cases can occur.

Identical flaws count once, in both protocols: within one dimension's list, flaws with the same type
and the same instance text (compared case-, space- and punctuation-insensitively) are one flaw, with
the highest severity given. (A small judge may list the same flaw many times; CoSER's judged examples
contain no such repeats, so this does not change any of its published scores.)

Both conversations reach the judge without inner thoughts (only what an audience could see or hear),
with every line labelled by its speaker.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from her_roleplay import ENVIRONMENT, DialogueLine

from ._templates import JudgeOutputError, _first_json_object

TranscriptDimension = Literal[
    "storyline_consistency", "anthropomorphism", "character_fidelity", "storyline_quality"
]
TRANSCRIPT_DIMENSIONS: tuple[TranscriptDimension, ...] = get_args(TranscriptDimension)
DIMENSION_TITLES: dict[str, str] = {
    "storyline_consistency": "Storyline Consistency",
    "anthropomorphism": "Anthropomorphism",
    "character_fidelity": "Character Fidelity",
    "storyline_quality": "Storyline Quality",
}

ScoringProtocol = Literal["coser", "her"]
SCORING_PROTOCOLS: tuple[ScoringProtocol, ...] = get_args(ScoringProtocol)

MAX_INSTANCE_CHARS = 200
SEVERITY_MIN, SEVERITY_MAX = 1, 5
COSER_SEVERITY_MAX = 10  # CoSER lets mechanical repetition (Flow & Progression) reach 10
POINTS_PER_SEVERITY = 5.0
ACTOR_ROUND_CREDIT = 0.3


@dataclass(frozen=True)
class FlawType:
    """One flaw type: what it means (our words), CoSER's name for it, and the highest severity
    CoSER's criteria allow for it (ours is always 5)."""

    meaning: str
    coser: str
    coser_max_severity: int = SEVERITY_MAX


# The flaw types of each dimension (the spec), keyed by our names; the definitions are ours.
FLAW_TYPES: dict[str, dict[str, FlawType]] = {
    "storyline_consistency": {
        "reaction_deviation": FlawType(
            "a character reacts differently from the book's version of the scene: another feeling, "
            "attitude, decision or action than the original shows at that point",
            coser="Storyline Consistency",
        ),
    },
    "anthropomorphism": {
        "self_identity": FlawType(
            "a character loses their own self: talks like a helpful assistant, serves others without "
            "motives of their own, or forgets who they are",
            coser="Self-identity",
        ),
        "emotional_depth": FlawType(
            "feelings are absent, flat or merely announced where the moment calls for genuine, layered "
            "emotion",
            coser="Emotional Depth",
        ),
        "persona_coherence": FlawType(
            "a character's manner, values or mood change within the scene without a reason",
            coser="Persona Coherence",
        ),
        "social_interaction": FlawType(
            "a character ignores or misreads what others just said or did, or talks past them instead "
            "of responding",
            coser="Social Interaction",
        ),
    },
    "character_fidelity": {
        "language_style": FlawType(
            "vocabulary, tone or way of speaking that does not fit the character or the book's time and "
            "setting",
            coser="Character Language",
        ),
        "knowledge": FlawType(
            "the character knows what they could not know at this point of the story, or forgets what "
            "they should know",
            coser="Knowledge & Background",
        ),
        "personality_behavior": FlawType(
            "feelings, habits or choices that contradict the character's personality as the book draws "
            "it",
            coser="Personality & Behavior",
        ),
        "relationships": FlawType(
            "the character treats another character in a way that does not match their relationship "
            "in the book",
            coser="Relationship & Social Status",
        ),
    },
    "storyline_quality": {
        "flow_progression": FlawType(
            "the conversation stalls, repeats itself, drags, or jumps without transition; the scene "
            "does not develop",
            coser="Flow & Progression",
            coser_max_severity=COSER_SEVERITY_MAX,
        ),
        "logical_consistency": FlawType(
            "facts, events or details contradict each other within the re-enactment, or contradict the "
            "scenario",
            coser="Logical Consistency",
        ),
    },
}

# --- flaw types per protocol ---------------------------------------------------------------------------


def flaw_type_name(dimension: str, our_name: str, protocol: ScoringProtocol = "coser") -> str:
    """The canonical name of one of our flaw types under ``protocol``."""
    _check_protocol(protocol)
    return FLAW_TYPES[dimension][our_name].coser if protocol == "coser" else our_name


def flaw_type_names(dimension: str, protocol: ScoringProtocol = "coser") -> list[str]:
    """The canonical flaw type names of ``dimension`` under ``protocol`` (the judge's choices)."""
    _check_dimension(dimension)
    return [flaw_type_name(dimension, name, protocol) for name in FLAW_TYPES[dimension]]


def max_severity(dimension: str, type_name: str, protocol: ScoringProtocol = "coser") -> int:
    """The highest severity a flaw of ``type_name`` (either spelling) may carry under ``protocol``."""
    ours = _lookup_type(dimension, type_name)
    if ours is None:
        raise ValueError(f"{dimension} has no flaw type {type_name!r}")
    return FLAW_TYPES[dimension][ours].coser_max_severity if protocol == "coser" else SEVERITY_MAX


def _type_key(name: str) -> str:
    """Case-, space- and punctuation-free form of a type name; "and" counts as "&"."""
    return re.sub(r"[\W_]+", "", re.sub(r"\band\b", "", str(name).casefold()))


_TYPE_INDEX: dict[str, dict[str, str]] = {
    dim: {key: ours for ours, ft in types.items() for key in (_type_key(ours), _type_key(ft.coser))}
    for dim, types in FLAW_TYPES.items()
}


def _lookup_type(dimension: str, name: object) -> str | None:
    """Our name for a type given in either spelling, or None."""
    return _TYPE_INDEX[dimension].get(_type_key(str(name)))


def _check_protocol(protocol: str) -> None:
    if protocol not in SCORING_PROTOCOLS:
        raise ValueError(f"unknown scoring protocol {protocol!r}; expected one of {', '.join(SCORING_PROTOCOLS)}")


# --- the formula -------------------------------------------------------------------------------------


def clamp_severity(value: int, maximum: int = SEVERITY_MAX) -> int:
    return max(SEVERITY_MIN, min(maximum, int(value)))


def transcript_score(
    severities: Sequence[int], actor_rounds: int, protocol: ScoringProtocol = "coser"
) -> float:
    """``clip(100 - 5 * (sum(clamped severities) - 0.3 * actor_rounds), 0, 100)``.

    Longer re-enactments earn a small allowance per character line, since they offer more room for
    flaws. Severities are clamped to 1..5 ("her") or 1..10 ("coser": the widest range CoSER allows;
    :func:`parse_flaws` applies each type's own limit). Example: severities [2, 3, 2, 3] with 11
    actor rounds give 66.5.
    """
    _check_protocol(protocol)
    if actor_rounds < 0:
        raise ValueError(f"actor_rounds must be >= 0, got {actor_rounds}")
    top = COSER_SEVERITY_MAX if protocol == "coser" else SEVERITY_MAX
    total = sum(clamp_severity(s, top) for s in severities)
    raw = 100.0 - POINTS_PER_SEVERITY * (total - ACTOR_ROUND_CREDIT * actor_rounds)
    return round(min(100.0, max(0.0, raw)), 6)  # round away float noise (66.49999999 -> 66.5)


def count_actor_rounds(transcript: Sequence[DialogueLine | Mapping[str, Any]]) -> int:
    """Lines spoken by characters, i.e. every line not narrated by Environment.

    Lines are :class:`DialogueLine` or CoSER records (``{"role", "content"}`` or
    ``{"character", "message"}``); CoSER's next-speaker records (role ``NSP``) are no lines at all.
    """
    count = 0
    for line in transcript:
        if isinstance(line, Mapping):
            speaker = str(line.get("character", line.get("role", "")))
            if "character" not in line and speaker == "NSP":
                continue
        else:
            speaker = line.character
        if speaker.strip().casefold() != ENVIRONMENT.casefold():
            count += 1
    return count


# --- judge output --------------------------------------------------------------------------------------


class Flaw(BaseModel):
    instance: str = Field(description=f"where the flaw shows, at most {MAX_INSTANCE_CHARS} characters")
    type: str = Field(description="the protocol's canonical name of the flaw type")
    severity: int = Field(ge=SEVERITY_MIN, le=COSER_SEVERITY_MAX)


def flaw_schema(
    dimension: str,
    max_flaws: int = 10,
    max_instance_chars: int = MAX_INSTANCE_CHARS,
    protocol: ScoringProtocol = "coser",
) -> dict[str, Any]:
    """The JSON schema the judge's output must follow for ``dimension`` under ``protocol``.

    The severity bound is the dimension's widest (10 for storyline quality under "coser"); a type
    with a lower limit is clamped to it when parsed.
    """
    _check_dimension(dimension)
    _check_protocol(protocol)
    top = max(max_severity(dimension, name, protocol) for name in FLAW_TYPES[dimension])
    item = {
        "type": "object",
        "properties": {
            "instance": {"type": "string", "maxLength": max_instance_chars},
            "type": {"enum": flaw_type_names(dimension, protocol)},
            "severity": {"type": "integer", "minimum": SEVERITY_MIN, "maximum": top},
        },
        "required": ["instance", "type", "severity"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"flaws": {"type": "array", "items": item, "maxItems": max_flaws}},
        "required": ["flaws"],
        "additionalProperties": False,
    }


def parse_flaws(text: str, dimension: str, protocol: ScoringProtocol = "coser") -> list[Flaw]:
    """Read the judge's flaw list. Raises :class:`JudgeOutputError` when it is not one.

    Lenient only where it cannot change the meaning: a fenced JSON block is accepted, and so is
    CoSER's own answer shape ``{"<Dimension Title>": {"flaws": [...]}}``; flaw type names in either
    spelling (ours or CoSER's) are matched ignoring case, spaces and punctuation and come back under
    the protocol's canonical name; severities are clamped to the type's range (a whole-number float
    is accepted; under "coser" a missing severity counts 1, as in CoSER); an over-long instance is
    cut. Identical flaws (same type, same instance text up to case, spacing and punctuation) are
    merged into one with the highest severity. A missing list, an unknown flaw type or a non-numeric
    severity is an error.
    """
    _check_dimension(dimension)
    _check_protocol(protocol)
    data = _first_json_object(text)
    flaws = data.get("flaws") if isinstance(data, dict) else None
    if flaws is None and isinstance(data, dict):  # CoSER's shape: the list under the dimension's title
        inner = next(
            (v for k, v in data.items() if _type_key(k) == _type_key(DIMENSION_TITLES[dimension])), None
        )
        flaws = inner.get("flaws") if isinstance(inner, dict) else None
    if not isinstance(flaws, list):
        raise JudgeOutputError("judge output has no `flaws` list")
    merged: dict[tuple[str, str], Flaw] = {}
    for i, item in enumerate(flaws):
        if not isinstance(item, dict):
            raise JudgeOutputError(f"flaw {i} is not an object: {item!r}")
        ours = _lookup_type(dimension, item.get("type", ""))
        if ours is None:
            raise JudgeOutputError(
                f"flaw {i} has type {item.get('type')!r}; "
                f"{dimension} allows {', '.join(flaw_type_names(dimension, protocol))}"
            )
        severity = item.get("severity")
        if severity is None and protocol == "coser":
            severity = SEVERITY_MIN  # CoSER counts a flaw without a severity as 1
        if isinstance(severity, bool) or not isinstance(severity, int | float) or not math.isfinite(severity):
            raise JudgeOutputError(f"flaw {i} has severity {severity!r}, not a number")
        if severity != int(severity):
            raise JudgeOutputError(f"flaw {i} has severity {severity!r}, not a whole number")
        instance = str(item.get("instance", "")).strip()
        flaw = Flaw(
            instance=instance[:MAX_INSTANCE_CHARS],
            type=flaw_type_name(dimension, ours, protocol),
            severity=clamp_severity(int(severity), max_severity(dimension, ours, protocol)),
        )
        key = (ours, _instance_key(instance))
        if key not in merged:
            merged[key] = flaw
        elif flaw.severity > merged[key].severity:  # a repeat: keep the first wording, the highest severity
            merged[key] = merged[key].model_copy(update={"severity": flaw.severity})
    return list(merged.values())


def _instance_key(instance: str) -> str:
    """An instance text compared ignoring case, spacing and punctuation."""
    return " ".join(re.sub(r"[\W_]+", " ", instance.casefold()).split())


class TranscriptInputError(ValueError):
    """The transcript or its options cannot be scored as given (the caller's to fix)."""


def _check_dimension(dimension: str) -> None:
    if dimension not in FLAW_TYPES:
        raise TranscriptInputError(
            f"unknown dimension {dimension!r}; expected one of {', '.join(TRANSCRIPT_DIMENSIONS)}"
        )
