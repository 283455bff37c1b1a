"""Given-Circumstance Acting: re-enact a CoSER scene with the model under test playing every character.

Agents: one actor per speaking character (all played by the model under test, each with its own
prompt and view of the conversation), an Environment narrator and a next-speaker predictor. CoSER
plays Environment and the predictor with fixed models (GPT-4o and GPT-4o-mini), so scores compare
across actors only when those two stay the same: :func:`simulate` takes their engines separately
(by default the actor's engine).

- The first speaker is the first of ``speaking_characters_w_env``; a round is one line.
- After each line the predictor names the next speaker, constrained to the candidates (everyone
  in the scene but the current speaker, plus ``<END CHAT>`` once ending is allowed). An answer
  that is unknown, repeats the current speaker, or ends too early is replaced by a seeded random
  choice among the major characters and Environment (minus the current speaker), so the same sample
  always takes the same turns whatever else runs alongside it.
- Ending: the ``coser`` protocol accepts ``<END CHAT>`` once six lines are written (CoSER checks
  round index >= 5), the ``her`` protocol once five are.
- Visibility (via :func:`her_roleplay.build_chat_prompt`): an actor sees its own past lines without
  their system_thinking, and others' lines as actions and speech only (no thoughts).
- Actor formats: ``her`` (HER tags; every request is prefilled with ``<system_thinking>``),
  ``coser`` (``[thought] (action) speech``) or ``plain`` (speech). Lines are stored in HER tags
  whatever the format, and lose any leading ``Name:`` label of their own speaker.
- Progress: every line and every next-speaker decision can be reported as a :class:`Step`
  (``on_step``); giving the saved steps back (``resume``) continues the scene where it stopped
  without asking the engines again for what is saved. Seeds depend only on (sample, run, round,
  agent), so a resumed scene goes on as the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from her_engines import Engine, EngineError, GenRequest, GenResult
from her_genrm import SCORING_PROTOCOLS, ScoringProtocol
from her_roleplay import (
    ENVIRONMENT,
    REPLY_FORMATS,
    ReplyFormat,
    Scene,
    actor_reply_to_her,
    build_chat_prompt,
    public_view,
)
from her_roleplay import DialogueLine as _Line

from ._agent_prompts import environment_prompt, predictor_prompt
from ._turns import (
    END_CHAT,
    _clean,
    _cut_at_other_speaker,
    _is_env,
    _same,
    _speaking_order,
    _stops,
    can_take_turn,
    cut_repetition,
    resolve_next_speaker,
)

SYSTEM_PREFILL = "<system_thinking>"
# One protocol governs a whole evaluation: how scenes are re-enacted here and how the judge scores them.
Protocol = ScoringProtocol
PROTOCOLS: tuple[str, ...] = SCORING_PROTOCOLS
AgentKind = Literal["actor", "environment", "predictor"]
AGENTS: tuple[str, ...] = get_args(AgentKind)

PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    # CoSER (gca_evaluation/main.py, utils.py): <END CHAT> from round index 5, i.e. once six lines
    # are written; every agent decodes greedily (temperature 0 on the first try); 512 actor tokens.
    "coser": {"min_end_round": 6, "temperature": 0.0, "top_p": 1.0, "actor_max_tokens": 512,
              "env_max_tokens": 160},
    # This project's earlier protocol: ending from the fifth line, sampled replies.
    "her": {"min_end_round": 5, "temperature": 0.7, "top_p": 0.95, "actor_max_tokens": 512,
            "env_max_tokens": 160},
}

__all__ = [
    "END_CHAT",
    "PROTOCOLS",
    "PROTOCOL_DEFAULTS",
    "Fallback",
    "SimLine",
    "Simulation",
    "SimulationConfig",
    "Step",
    "resolve_next_speaker",
    "simulate",
]


@dataclass
class SimulationConfig:
    """How a scene is re-enacted. Settings left None take the protocol's default
    (:data:`PROTOCOL_DEFAULTS`); explicit values win."""

    max_rounds: int = 20
    """Lines at most (Environment's included)."""
    min_end_round: int | None = None
    """The predictor may end the scene once this many lines are written (coser 6, her 5)."""
    actor_max_tokens: int | None = None
    """Token limit of one actor reply (system_thinking included)."""
    env_max_tokens: int | None = None
    """Token limit of one Environment line."""
    temperature: float | None = None
    """Sampling temperature of actors and Environment (seeded per sample, run and round); coser 0."""
    top_p: float | None = None
    protocol: Protocol = "coser"
    """``coser``: CoSER's ending rule and decoding; ``her``: this project's earlier defaults."""
    actor_format: ReplyFormat = "her"
    """How actors are asked to write: ``her`` tags, ``coser`` brackets or ``plain`` speech."""
    chunk_tokens: int = 64
    """Generate lines in pieces of this many tokens and stop once the text repeats itself or
    another character's line starts (what CoSER cuts afterwards anyway); 0: in one request."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.actor_format not in REPLY_FORMATS:
            raise ValueError(f"actor_format must be one of {', '.join(REPLY_FORMATS)}, got {self.actor_format!r}")
        for key, value in PROTOCOL_DEFAULTS[self.protocol].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        # every setting left None has its protocol's value now
        assert self.min_end_round is not None and self.actor_max_tokens is not None
        assert self.env_max_tokens is not None and self.temperature is not None and self.top_p is not None
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if not 1 <= self.min_end_round:
            raise ValueError(f"min_end_round must be >= 1, got {self.min_end_round}")
        if self.chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0, got {self.chunk_tokens}")
        if self.actor_max_tokens < 1 or self.env_max_tokens < 1:
            raise ValueError("actor_max_tokens and env_max_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")

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


class Step(BaseModel):
    """One unit of progress, as saved per turn: a line (``kind="line"``) or the decision after it
    (``kind="next"``: the next speaker, or None for the end)."""

    kind: Literal["line", "next"]
    round: int = Field(description="index of the line (0-based); a decision follows its line")
    speaker: str | None = None
    text: str | None = None
    predicted: str | None = None
    next: str | None = None
    fallback: Fallback | None = None
    agent: AgentKind | None = Field(None, description="who was asked; None when nothing was asked")
    requests: int = Field(0, description="engine requests it took (a line generated in pieces takes several)")
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Simulation(BaseModel):
    sample_id: str
    run: int
    seed: int
    transcript: list[SimLine]
    ended_by: Literal["end_chat", "max_rounds"]
    fallbacks: list[Fallback] = Field(default_factory=list)
    calls: dict[str, int] = Field(default_factory=dict, description="turns that asked an agent, by agent kind")
    usage: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="per agent kind: engine requests (calls), prompt and completion tokens"
    )
    resumed_steps: int = Field(0, description="steps taken from saved progress instead of the engines")

    @property
    def actor_rounds(self) -> int:
        return sum(1 for line in self.transcript if not _is_env(line.character))

    def dialogue(self) -> list[_Line]:
        """The transcript as CoSER dialogue lines (full HER text; scorers drop the thoughts)."""
        return [_Line(character=line.character, message=line.message) for line in self.transcript]


class ResumeMismatch(ValueError):
    """Saved progress does not fit this scene and configuration (it must be discarded)."""


def derive_seed(seed: int, *parts: object) -> int:
    """A seed for one decision, from the sample's seed and what the decision is (run, round, agent)."""
    key = json.dumps([seed, *[str(p) for p in parts]])
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


# --- the loop -----------------------------------------------------------------------------------------


async def _one(engine: Engine, request: GenRequest) -> GenResult:
    [result] = await engine.generate([request])
    if result.finish_reason == "error":
        raise EngineError(result.error or "engine error")
    return result


StepCallback = Callable[[Step], "Awaitable[None] | None"]


async def simulate(
    actor: Engine,
    scene: Scene,
    *,
    env: Engine | None = None,
    nsp: Engine | None = None,
    run: int = 0,
    config: SimulationConfig | None = None,
    resume: Sequence[Step] = (),
    on_step: StepCallback | None = None,
) -> Simulation:
    """Re-enact ``scene``: ``actor`` plays every character, ``env`` the Environment and ``nsp`` the
    next-speaker predictor (both default to ``actor``).

    ``on_step`` is called with every new :class:`Step` as soon as it is taken (a line, then the
    decision after it); ``resume`` replays steps saved earlier instead of asking the engines again.
    Deterministic for (scene, run, config) on deterministic engines. Raises EngineError when an
    engine fails and :class:`ResumeMismatch` when ``resume`` does not fit this scene.
    """
    cfg = config or SimulationConfig()
    env = env or actor
    nsp = nsp or actor
    names = _speaking_order(scene)
    majors = [n for n in scene.major_characters if scene.has_character(n)] or [
        n for n in names if not _is_env(n)
    ]
    pool = [*majors, ENVIRONMENT]
    history: list[tuple[str, str]] = []
    fallbacks: list[Fallback] = []
    usage = {a: {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0} for a in AGENTS}
    turns = dict.fromkeys(AGENTS, 0)
    saved = list(resume)
    replayed = 0

    def take_saved(kind: str, rnd: int) -> Step | None:
        nonlocal replayed
        if replayed >= len(saved):
            return None
        step = saved[replayed]
        if step.kind != kind or step.round != rnd:
            raise ResumeMismatch(f"saved step {replayed} is a {step.kind!r} of round {step.round}, "
                                 f"expected a {kind!r} of round {rnd}")
        replayed += 1
        return step

    async def record(step: Step, *, fresh: bool) -> None:
        if step.agent is not None:
            turns[step.agent] += 1
            u = usage[step.agent]
            u["calls"] += step.requests
            u["prompt_tokens"] += step.prompt_tokens
            u["completion_tokens"] += step.completion_tokens
        if fresh and on_step is not None:
            maybe = on_step(step)
            if inspect.isawaitable(maybe):
                await maybe

    speaker = names[0]
    ended_by: Literal["end_chat", "max_rounds"] = "max_rounds"
    for rnd in range(cfg.max_rounds):
        step = take_saved("line", rnd)
        fresh = step is None
        if step is None:
            step = await _line(actor, env, scene, speaker, history, names, rnd, run, cfg)
        elif not step.speaker or not _same(step.speaker, speaker) or step.text is None:
            raise ResumeMismatch(f"saved line {rnd} is by {step.speaker!r}, expected {speaker!r}")
        await record(step, fresh=fresh)
        history.append((speaker, step.text or ""))
        if rnd + 1 >= cfg.max_rounds:
            break
        decision = take_saved("next", rnd)
        fresh = decision is None
        if decision is None:
            decision = await _decide(nsp, scene, speaker, history, names, pool, rnd, run, cfg)
        elif decision.next is not None and not any(_same(decision.next, n) for n in names):
            raise ResumeMismatch(f"saved decision {rnd} names {decision.next!r}, not in the scene")
        await record(decision, fresh=fresh)
        if decision.fallback is not None:
            fallbacks.append(decision.fallback)
        if decision.next is None:
            ended_by = "end_chat"
            break
        speaker = decision.next
    if replayed < len(saved):
        raise ResumeMismatch(f"{len(saved) - replayed} saved steps go beyond the end of the scene")
    transcript = [SimLine(character=who, message=text, public=public_view(text)) for who, text in history]
    return Simulation(
        sample_id=scene.sample_id,
        run=run,
        seed=scene.seed,
        transcript=transcript,
        ended_by=ended_by,
        fallbacks=fallbacks,
        calls=turns,
        usage=usage,
        resumed_steps=replayed,
    )


async def _line(
    actor: Engine,
    env: Engine,
    scene: Scene,
    speaker: str,
    history: Sequence[tuple[str, str]],
    names: Sequence[str],
    rnd: int,
    run: int,
    cfg: SimulationConfig,
) -> Step:
    """Ask the speaker's agent for its line; the line in HER tags, without its own name label."""
    if _is_env(speaker):
        engine, agent, prefill = env, "environment", ""
        messages = environment_prompt(scene, history)
        max_tokens, seed = cfg.env_max_tokens, derive_seed(scene.seed, run, rnd, "env")
    else:
        engine, agent = actor, "actor"
        prefill = SYSTEM_PREFILL if cfg.actor_format == "her" else ""
        messages = build_chat_prompt(scene, speaker, history, reply_format=cfg.actor_format)
        max_tokens, seed = cfg.actor_max_tokens, derive_seed(scene.seed, run, rnd, "actor")
    request = GenRequest(
        messages=messages,
        prefill=prefill,
        max_tokens=max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=seed,
        stop=_stops(speaker, names),
    )
    generated, requests, prompt_tokens, completion_tokens = await _generate_line(
        engine, request, speaker, names, cfg
    )
    text = _clean(generated, speaker, names, prefill)
    if agent == "actor":
        text = actor_reply_to_her(text, cfg.actor_format).strip()
    return Step(kind="line", round=rnd, speaker=speaker, text=text, agent=agent,
                requests=requests, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def _can_continue(engine: Engine, request: GenRequest) -> bool:
    """Whether a reply can be generated in pieces: the engine continues an assistant turn (a request
    that is prefilled already proves it)."""
    return bool(request.prefill) or engine.continues_turns


async def _generate_line(
    engine: Engine, request: GenRequest, speaker: str, names: Sequence[str], cfg: SimulationConfig
) -> tuple[str, int, int, int]:
    """The generated text (without the prefill), engine requests, prompt and completion tokens.

    With ``cfg.chunk_tokens`` and an engine that continues a turn, the reply is generated in pieces
    of that many tokens, each continuing the previous ones (prefix caching makes the repeated prompt
    cheap), and generation stops as soon as what is written so far would be cut anyway: another
    character's line started, or the text began repeating itself (:func:`cut_repetition`). A model
    stuck in a loop then costs a piece instead of the whole token limit."""
    if not cfg.chunk_tokens or not _can_continue(engine, request):
        res = await _one(engine, request)
        return res.text, 1, res.prompt_tokens, res.completion_tokens
    text, requests, prompt_tokens, completion_tokens = "", 0, 0, 0
    while True:
        left = request.max_tokens - completion_tokens
        piece = request.model_copy(
            update={"prefill": request.prefill + text, "max_tokens": min(cfg.chunk_tokens, left)}
        )
        res = await _one(engine, piece)
        requests += 1
        text += res.text
        prompt_tokens += res.prompt_tokens
        completion_tokens += res.completion_tokens
        if res.finish_reason != "length" or completion_tokens >= request.max_tokens or not res.text:
            return text, requests, prompt_tokens, completion_tokens
        kept = _cut_at_other_speaker(text, speaker, names)
        if kept != text or cut_repetition(kept) != kept:
            return text, requests, prompt_tokens, completion_tokens


async def _decide(
    nsp: Engine,
    scene: Scene,
    speaker: str,
    history: Sequence[tuple[str, str]],
    names: Sequence[str],
    pool: Sequence[str],
    rnd: int,
    run: int,
    cfg: SimulationConfig,
) -> Step:
    """Who speaks after line ``rnd`` (None: the scene ends), by the predictor and CoSER's rule."""
    assert cfg.min_end_round is not None  # set by the protocol
    end_allowed = rnd + 1 >= cfg.min_end_round
    blocked = [n for n in names if not can_take_turn(history, n)]
    options = [n for n in names if not _same(n, speaker) and n not in blocked]
    options += [END_CHAT] if end_allowed else []
    rng = random.Random(derive_seed(scene.seed, run, rnd, "next"))
    step = Step(kind="next", round=rnd)
    if len(options) >= 2:
        res = await _one(
            nsp,
            GenRequest(
                messages=predictor_prompt(scene, history, options),
                choices=options,
                max_tokens=16,
                seed=derive_seed(scene.seed, run, rnd, "predictor"),
            ),
        )
        predicted = res.text
        step.agent, step.requests = "predictor", 1
        step.prompt_tokens, step.completion_tokens = res.prompt_tokens, res.completion_tokens
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
    step.predicted = predicted[:200]
    step.next = nxt
    if reason is not None:
        step.fallback = Fallback(round=rnd + 1, predicted=predicted[:200], chosen=nxt or "", reason=reason)
    return step
