"""Given-Circumstance Acting: re-enact a CoSER scene with the model under test playing every character.

Agents: one actor per speaking character (all played by the same engine, each with its own prompt
and view of the conversation), an Environment narrator, and a next-speaker predictor.

- The first speaker is the first of ``speaking_characters_w_env``; a round is one line.
- After each line the predictor names the next speaker, constrained to the candidates (everyone
  in the scene but the current speaker, plus ``<END CHAT>`` once ending is allowed). An answer
  that is unknown, repeats the current speaker, or ends too early is replaced by a seeded random
  choice among the major characters and Environment (minus the current speaker), so the same sample
  always takes the same turns whatever else runs alongside it.
- Visibility (via :func:`her_roleplay.build_chat_prompt`): an actor sees its own past lines without
  their system_thinking, and others' lines as actions and speech only (no thoughts).
- Actors answer in HER's dual-layer format: every actor request is prefilled with ``<system_thinking>``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, Field

from her_engines import ChatMessage, Engine, EngineError, GenRequest, GenResult
from her_roleplay import ENVIRONMENT, Scene, build_chat_prompt, public_view, strip_system_thinking
from her_roleplay import DialogueLine as _Line

END_CHAT = "<END CHAT>"
SYSTEM_PREFILL = "<system_thinking>"

__all__ = [
    "END_CHAT",
    "Fallback",
    "SimLine",
    "Simulation",
    "SimulationConfig",
    "resolve_next_speaker",
    "simulate",
]


@dataclass
class SimulationConfig:
    """How a scene is re-enacted. Defaults follow CoSER: at most 20 rounds, ending allowed from round 5."""

    max_rounds: int = 20
    """Lines at most (Environment's included)."""
    min_end_round: int = 5
    """The predictor may end the scene once this many lines are written."""
    actor_max_tokens: int = 512
    """Token limit of one actor reply (system_thinking included)."""
    env_max_tokens: int = 160
    """Token limit of one Environment line."""
    temperature: float = 0.7
    """Sampling temperature of actors and Environment (seeded per sample, run and round)."""
    top_p: float = 0.95

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if not 1 <= self.min_end_round:
            raise ValueError(f"min_end_round must be >= 1, got {self.min_end_round}")
        if self.actor_max_tokens < 1 or self.env_max_tokens < 1:
            raise ValueError("actor_max_tokens and env_max_tokens must be >= 1")

    def fingerprint(self) -> dict[str, object]:
        return asdict(self)


class Fallback(BaseModel):
    """A predictor answer that was replaced by the seeded random choice."""

    round: int
    predicted: str
    chosen: str
    reason: Literal["unknown_speaker", "repeated_speaker", "end_too_early"]


class SimLine(BaseModel):
    """One line of the re-enactment: the speaker's full text (HER tags, plan included) and what
    the others saw of it."""

    character: str
    message: str
    public: str


class Simulation(BaseModel):
    sample_id: str
    run: int
    seed: int
    transcript: list[SimLine]
    ended_by: Literal["end_chat", "max_rounds"]
    fallbacks: list[Fallback] = Field(default_factory=list)
    calls: dict[str, int] = Field(default_factory=dict, description="engine requests by agent kind")

    @property
    def actor_rounds(self) -> int:
        return sum(1 for line in self.transcript if not _is_env(line.character))

    def dialogue(self) -> list[_Line]:
        """The transcript as CoSER dialogue lines (full HER text; scorers drop the thoughts)."""
        return [_Line(character=line.character, message=line.message) for line in self.transcript]


# --- the next-speaker rule ---------------------------------------------------------------------------


def resolve_next_speaker(
    predicted: str,
    *,
    current: str,
    candidates: Sequence[str],
    fallback_pool: Sequence[str],
    end_allowed: bool,
    rng: random.Random,
    blocked: Collection[str] = (),
) -> tuple[str | None, str | None]:
    """Apply CoSER's rule to a predictor answer: ``(next speaker or None to end, fallback reason)``.

    Valid: a name in ``candidates`` other than ``current`` (and not ``blocked``: actors whose last
    visible turn is their own), or ``<END CHAT>`` when ``end_allowed``. Anything else becomes
    ``rng.choice`` over ``fallback_pool`` without ``current`` and ``blocked`` (if that leaves nobody:
    over the unblocked candidates, then Environment). The reason says why the answer was replaced.
    """
    text = _clean_prediction(predicted)
    excluded = [current, *blocked]
    reason: str | None
    if text.casefold() == END_CHAT.casefold():
        if end_allowed:
            return None, None
        reason = "end_too_early"
    else:
        match = next((c for c in candidates if _same(c, text)), None)
        if match is not None and not any(_same(match, x) for x in excluded):
            return match, None
        reason = "unknown_speaker" if match is None else "repeated_speaker"
    for group in (fallback_pool, candidates):
        # sorted: the pool must not depend on set or input order, only on the sample's seed
        pool = sorted({p for p in group if not any(_same(p, x) for x in excluded)})
        if pool:
            return rng.choice(pool), reason
    return ENVIRONMENT, reason  # the narrator may always add a line


def _clean_prediction(text: str) -> str:
    text = text.strip().strip("`*\"' ")
    text = re.sub(r"^(?:next\s+speaker\s*:\s*)", "", text, flags=re.IGNORECASE).strip()
    return text.splitlines()[0].strip() if text else ""


def _same(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def _is_env(name: str) -> bool:
    return _same(name, ENVIRONMENT)


def derive_seed(seed: int, *parts: object) -> int:
    """A seed for one decision, from the sample's seed and what the decision is (run, round, agent)."""
    key = json.dumps([seed, *[str(p) for p in parts]])
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


# --- prompts of the Environment and the predictor ----------------------------------------------------


def _visible_history(history: Sequence[tuple[str, str]]) -> str:
    lines = []
    for speaker, text in history:
        seen = public_view(text).strip()
        if seen:
            lines.append(f"{speaker}: {seen}")
    return "\n\n".join(lines) or "(nothing has happened yet)"


def _people(scene: Scene) -> str:
    out = []
    for name in scene.cast():
        brief = scene.description_of(name)
        out.append(f"- {name}: {brief}" if brief else f"- {name}")
    return "\n".join(out)


def environment_prompt(scene: Scene, history: Sequence[tuple[str, str]]) -> list[ChatMessage]:
    """The narrator: describes what changes around the characters, never speaks or acts for them."""
    system = (
        f"You are the narrator of a scene from {scene.book}. You describe the surroundings only: light, "
        "sounds, objects, weather, people arriving or leaving, anything physical that changes. Write one to "
        "three sentences in plain prose. Never speak, think or decide for any of the characters, and never "
        "repeat what they said."
        f"\n\n## The scene\n{scene.scenario.strip()}\n\n## Characters present\n{_people(scene)}"
    )
    user = (
        f"The conversation so far:\n\n{_visible_history(history)}\n\n"
        "Describe what changes in the surroundings now."
    )
    return [ChatMessage(role="system", content=system), ChatMessage(role="user", content=user)]


def predictor_prompt(
    scene: Scene, history: Sequence[tuple[str, str]], options: Sequence[str]
) -> list[ChatMessage]:
    """The director: who acts next, or the end of the scene."""
    system = (
        f"You direct a scene from {scene.book} and decide who acts next so that the scene moves on "
        f"naturally. {ENVIRONMENT} stands for the surroundings (it describes physical changes)."
        f"\n\n## The scene\n{scene.scenario.strip()}\n\n## Characters present\n{_people(scene)}"
    )
    ending = f" Answer {END_CHAT} if the scene has come to its natural end." if END_CHAT in options else ""
    user = (
        f"The conversation so far:\n\n{_visible_history(history)}\n\n"
        f"Who acts next? Answer with exactly one of: {', '.join(options)}.{ending}"
    )
    return [ChatMessage(role="system", content=system), ChatMessage(role="user", content=user)]


# --- the loop -----------------------------------------------------------------------------------------


def _speaking_order(scene: Scene) -> list[str]:
    names = list(dict.fromkeys(scene.speaking_characters_w_env)) or [*scene.cast(), ENVIRONMENT]
    if not any(_is_env(n) for n in names):
        names.append(ENVIRONMENT)
    return names


def can_take_turn(history: Sequence[tuple[str, str]], name: str) -> bool:
    """False when ``name``'s last turn, as ``name`` sees the conversation, is its own: someone must
    visibly act first (lines that show nothing, e.g. only a thought, do not count)."""
    if _is_env(name):
        return True
    for who, text in reversed(history):
        if _same(who, name):
            if strip_system_thinking(text).strip():
                return False
        elif public_view(text).strip():
            return True
    return True


def _cut_at_other_speaker(text: str, speaker: str, names: Sequence[str]) -> str:
    """Drop whatever the model wrote for another character (``\\nName: ...``) after its own turn."""
    others = [re.escape(n) for n in names if not _same(n, speaker)]
    if not others:
        return text
    match = re.search(rf"\n\s*(?:{'|'.join(others)})\s*:", text)
    return text[: match.start()] if match else text


async def _one(engine: Engine, request: GenRequest) -> GenResult:
    [result] = await engine.generate([request])
    if result.finish_reason == "error":
        raise EngineError(result.error or "engine error")
    return result


async def simulate(
    engine: Engine, scene: Scene, *, run: int = 0, config: SimulationConfig | None = None
) -> Simulation:
    """Re-enact ``scene`` with ``engine`` playing every agent. Deterministic for (scene, run, config)
    on a deterministic engine. Raises EngineError when the engine fails."""
    cfg = config or SimulationConfig()
    names = _speaking_order(scene)
    majors = [n for n in scene.major_characters if scene.has_character(n)] or [
        n for n in names if not _is_env(n)
    ]
    pool = [*majors, ENVIRONMENT]
    history: list[tuple[str, str]] = []
    fallbacks: list[Fallback] = []
    calls = {"actor": 0, "environment": 0, "predictor": 0}
    speaker = names[0]
    ended_by: Literal["end_chat", "max_rounds"] = "max_rounds"
    for rnd in range(cfg.max_rounds):
        if _is_env(speaker):
            res = await _one(
                engine,
                GenRequest(
                    messages=environment_prompt(scene, history),
                    max_tokens=cfg.env_max_tokens,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    seed=derive_seed(scene.seed, run, rnd, "env"),
                ),
            )
            calls["environment"] += 1
            text = _cut_at_other_speaker(res.text, speaker, names).strip()
        else:
            res = await _one(
                engine,
                GenRequest(
                    messages=build_chat_prompt(scene, speaker, history),
                    prefill=SYSTEM_PREFILL,
                    max_tokens=cfg.actor_max_tokens,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    seed=derive_seed(scene.seed, run, rnd, "actor"),
                ),
            )
            calls["actor"] += 1
            text = (SYSTEM_PREFILL + _cut_at_other_speaker(res.text, speaker, names)).strip()
        history.append((speaker, text))
        if rnd + 1 >= cfg.max_rounds:
            break
        end_allowed = rnd + 1 >= cfg.min_end_round
        blocked = [n for n in names if not can_take_turn(history, n)]
        options = [n for n in names if not _same(n, speaker) and n not in blocked]
        options += [END_CHAT] if end_allowed else []
        rng = random.Random(derive_seed(scene.seed, run, rnd, "next"))
        if len(options) >= 2:
            res = await _one(
                engine,
                GenRequest(
                    messages=predictor_prompt(scene, history, options),
                    choices=options,
                    max_tokens=16,
                    seed=derive_seed(scene.seed, run, rnd, "predictor"),
                ),
            )
            calls["predictor"] += 1
            predicted = res.text
        else:
            predicted = options[0] if options else ""
        nxt, reason = resolve_next_speaker(
            predicted,
            current=speaker,
            candidates=names,
            fallback_pool=pool,
            end_allowed=end_allowed,
            rng=rng,
            blocked=blocked,
        )
        if reason is not None:
            fallbacks.append(
                Fallback(round=rnd + 1, predicted=predicted[:200], chosen=nxt or "", reason=reason)
            )
        if nxt is None:
            ended_by = "end_chat"
            break
        speaker = nxt
    transcript = [SimLine(character=who, message=text, public=public_view(text)) for who, text in history]
    return Simulation(
        sample_id=scene.sample_id,
        run=run,
        seed=scene.seed,
        transcript=transcript,
        ended_by=ended_by,
        fallbacks=fallbacks,
        calls=calls,
    )
