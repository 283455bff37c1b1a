"""Run a CoSER evaluation: simulate and score every (run, sample), in parallel, resumable.

Layout of the output folder::

    DIR/manifest.json                            what produced the results (a resume must match it)
    DIR/samples/run{k}/{sample_id}.json          one finished sample: simulation, judgment, metrics, cost
    DIR/samples/run{k}/{sample_id}.partial.jsonl a sample in progress: one record per line and per
                                                 next-speaker decision, appended and flushed as it goes
    DIR/results.json, DIR/report.md, DIR/scores.png   written by :mod:`eval._report`

A sample file is written atomically as soon as the sample is done (its partial file is then removed),
and a rerun skips every sample whose file exists. A killed run resumes a sample in progress from its
partial file: the saved lines and decisions are replayed, not generated again. A sample whose judge
output stayed unreadable is finished with status ``"error"`` (kept and counted, excluded from means).
A sample that could not be finished at all (engine down, server unreachable) gets no file, so the
next run retries it (from its saved turns); it is counted as ``failed``.

Samples run concurrently (``concurrency``): with an engine that batches continuously (vLLM, an
OpenAI-compatible server) several samples' requests are decoded together; a transcript's four judge
dimensions go to the engine in one call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from her_engines import Engine, EngineError, GenRequest, GenResult
from her_genrm import TRANSCRIPT_DIMENSIONS, TranscriptScore, Usage, public_text
from her_roleplay import DialogueLine, Scene

from ._remote import RemoteScoringError
from ._simulate import ResumeMismatch, SimulationConfig, Step, derive_seed, simulate
from ._textmetrics import bleu, coser_bleu, coser_dialogue_text, coser_rouge_l, rouge_l

log = logging.getLogger("eval")
SAMPLE_SCHEMA_VERSION = 1
AGENT_ROLES = ("actor", "environment", "predictor")


class TranscriptJudge(Protocol):
    """Anything that scores a re-enactment: the local TranscriptScorer or the remote client."""

    @property
    def model_id(self) -> str: ...

    async def score(
        self,
        scene: Scene,
        transcript: Sequence[DialogueLine],
        *,
        dimensions: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> TranscriptScore: ...


class MeteredEngine(Engine):
    """Wraps an engine and counts requests and tokens (the cost summary reads these)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.kind = engine.kind
        self.model_id = engine.model_id
        self.continuous_batching = engine.continuous_batching
        self.continues_turns = engine.continues_turns
        self.usage = Usage()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def alive(self) -> bool:
        return self.engine.alive

    async def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        results = await self.engine.generate(requests)
        for r in results:
            self.usage = self.usage + Usage(
                prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, calls=1
            )
        return results

    async def aclose(self) -> None:
        await self.engine.aclose()


@dataclass
class EvalConfig:
    """One evaluation. ``identity`` names the actor and judge; it goes into the manifest."""

    out_dir: Path
    runs: int = 1
    concurrency: int = 4
    """Samples simulated and scored at the same time."""
    judge_concurrency: int = 2
    """Transcripts being judged at the same time (each sends its dimensions together)."""
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    identity: dict[str, Any] = field(default_factory=dict)
    """Names of the actor, judge, Environment and predictor models (``actor``, ``judge``,
    ``environment``, ``predictor``); they go into the manifest."""
    progress: bool = True
    env_engine: Engine | None = field(default=None, repr=False, compare=False)
    """Plays Environment; None: the actor's engine."""
    nsp_engine: Engine | None = field(default=None, repr=False, compare=False)
    """Plays the next-speaker predictor; None: the actor's engine."""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.runs < 1:
            raise ValueError(f"runs must be >= 1, got {self.runs}")
        if self.concurrency < 1 or self.judge_concurrency < 1:
            raise ValueError("concurrency and judge_concurrency must be >= 1")

    def manifest(self) -> dict[str, Any]:
        agents = {
            "environment": _engine_name(self.env_engine) or "the actor's engine",
            "predictor": _engine_name(self.nsp_engine) or "the actor's engine",
        }
        return {"schema": SAMPLE_SCHEMA_VERSION, "simulation": self.simulation.fingerprint(), **agents,
                **self.identity}


def _engine_name(engine: Engine | None) -> str | None:
    return None if engine is None else f"{engine.kind}:{engine.model_id}"


@dataclass
class RunOutcome:
    """What one invocation did (the report adds what earlier invocations left on disk)."""

    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def sample_path(out_dir: Path, run: int, sample_id: str) -> Path:
    return Path(out_dir) / "samples" / f"run{run}" / f"{sample_id}.json"


def partial_path(out_dir: Path, run: int, sample_id: str) -> Path:
    """The per-turn progress of a sample not finished yet."""
    return Path(out_dir) / "samples" / f"run{run}" / f"{sample_id}.partial.jsonl"


class TurnJournal:
    """A sample's progress on disk: a header naming the evaluation, then one :class:`Step` per line,
    each appended and flushed (fsync'd) as soon as it is taken."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.header = {"kind": "start", **header}

    def load(self) -> list[Step]:
        """The saved steps; an unreadable tail (a line cut by a kill) is dropped, and a file written
        for another evaluation is discarded. The file is rewritten to exactly what is returned."""
        try:
            raw = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            raw = []
        steps: list[Step] = []
        try:
            if not raw or json.loads(raw[0]) != self.header:
                raw = []
        except ValueError:
            raw = []
        for line in raw[1:]:
            try:
                steps.append(Step.model_validate_json(line))
            except ValueError:
                break  # a kill mid-write leaves at most one broken line, the last
        self.reset(steps)
        return steps

    def reset(self, steps: Sequence[Step] = ()) -> None:
        lines = [json.dumps(self.header, ensure_ascii=False)]
        lines += [s.model_dump_json() for s in steps]
        write_text_atomic(self.path, "\n".join(lines) + "\n")

    def append(self, step: Step) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(step.model_dump_json() + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file behind."""
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=1))


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_manifest(config: EvalConfig) -> None:
    """Write the manifest, or make sure an existing one describes the same evaluation."""
    path = config.out_dir / "manifest.json"
    wanted = config.manifest()
    if path.exists():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != wanted:
            diff = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise ValueError(
                f"{config.out_dir} holds results of a different evaluation (differs in: "
                f"{', '.join(diff)}); use another --out folder or delete it"
            )
        return
    write_json_atomic(path, wanted)


def load_sample(path: Path) -> dict[str, Any] | None:
    """A finished sample's record, or None when the file is missing or unreadable (then redone)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == SAMPLE_SCHEMA_VERSION else None


async def evaluate_sample(
    scene: Scene,
    run: int,
    *,
    actor: Engine,
    judge: TranscriptJudge,
    config: SimulationConfig,
    judge_gate: asyncio.Semaphore | None = None,
    env: Engine | None = None,
    nsp: Engine | None = None,
    journal: TurnJournal | None = None,
    on_step: Callable[[Step], None] | None = None,
    on_judging: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Simulate and score one sample; the record that goes to its file.

    With a ``journal`` the simulation continues from the steps saved there and saves each new one.
    ``on_step`` sees every new step, ``on_judging`` is called when the simulation is done."""
    started = time.perf_counter()
    saved = journal.load() if journal is not None else []

    def step_taken(step: Step) -> None:
        if journal is not None:
            journal.append(step)
        if on_step is not None:
            on_step(step)

    try:
        sim = await simulate(actor, scene, env=env, nsp=nsp, run=run, config=config, resume=saved,
                             on_step=step_taken)
    except ResumeMismatch as exc:  # saved by other code or settings: start the sample over
        log.warning("discarding the saved turns of %s/run%d: %s", scene.sample_id, run, exc)
        assert journal is not None
        journal.reset()
        sim = await simulate(actor, scene, env=env, nsp=nsp, run=run, config=config, on_step=step_taken)
    if on_judging is not None:
        on_judging()
    transcript = sim.dialogue()
    gate = judge_gate or asyncio.Semaphore(1)
    async with gate:
        judged = await judge.score(scene, transcript, seed=derive_seed(scene.seed, run, "judge"))
    simulated_text, original_text = _visible_text(transcript), _visible_text(scene.dialogues)
    return {
        "schema": SAMPLE_SCHEMA_VERSION,
        "sample_id": scene.sample_id,
        "run": run,
        "book": scene.book,
        "i_p": scene.i_p,
        "i_c": scene.i_c,
        "seed": scene.seed,
        "status": judged.status,
        "error": judged.error,
        "scores": {d: judged.scores.get(d) for d in TRANSCRIPT_DIMENSIONS},
        "average": judged.average,
        "bleu": bleu(simulated_text, original_text),
        "rouge_l": rouge_l(simulated_text, original_text),
        **coser_overlap(transcript, scene.dialogues),
        "actor_rounds": sim.actor_rounds,
        "simulation": sim.model_dump(mode="json"),
        "judgment": judged.model_dump(mode="json"),
        "usage": {
            **{role: sim.usage[role] for role in AGENT_ROLES},
            "judge": judged.usage.model_dump(),
            "seconds": round(time.perf_counter() - started, 3),
            "resumed_steps": sim.resumed_steps,
        },
    }


def coser_overlap(simulated: Sequence[DialogueLine], original: Sequence[DialogueLine]) -> dict[str, float | None]:
    """CoSER's own BLEU and ROUGE-L (0-1, over its ``Name: message`` text), beside ours."""
    hyp, ref = coser_dialogue_text(simulated), coser_dialogue_text(original)
    return {"coser_bleu": coser_bleu(hyp, ref), "coser_rouge_l": coser_rouge_l(hyp, ref)}


def _visible_text(lines: Sequence[DialogueLine]) -> str:
    """The dialogue as an audience saw it (no thoughts, no speaker names), one line per message."""
    return "\n".join(t for t in (public_text(line.message) for line in lines) if t)


async def run_eval(
    scenes: Sequence[Scene],
    *,
    actor: Engine,
    judge: TranscriptJudge,
    config: EvalConfig,
    on_sample_done: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None,
) -> RunOutcome:
    """Evaluate every (run, scene) not already on disk; at most ``config.concurrency`` at once.
    Environment and the predictor are ``config.env_engine`` / ``config.nsp_engine`` (default: ``actor``).

    ``on_sample_done`` is called with each new record after its file is written (an exception it
    raises stops the whole run: tests use it to simulate a crash). Raises ValueError for duplicate
    sample ids or a folder holding a different evaluation.
    """
    ids = [s.sample_id for s in scenes]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"the test file repeats samples (same book, i_p, i_c): {', '.join(dupes)}")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    check_manifest(config)
    manifest = config.manifest()
    outcome = RunOutcome()
    started = time.perf_counter()
    todo: list[tuple[int, Scene]] = []
    for run in range(config.runs):
        for scene in scenes:
            key = f"run{run}/{scene.sample_id}"
            if load_sample(sample_path(config.out_dir, run, scene.sample_id)) is not None:
                outcome.skipped.append(key)
            else:
                todo.append((run, scene))
    gate = asyncio.Semaphore(config.concurrency)
    judge_gate = asyncio.Semaphore(config.judge_concurrency)
    max_rounds = config.simulation.max_rounds
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[phase]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=not config.progress, transient=False) as progress:
        task = progress.add_task(
            "CoSER samples", total=len(todo) + len(outcome.skipped), completed=len(outcome.skipped), phase=""
        )

        async def one(run: int, scene: Scene) -> None:
            key = f"run{run}/{scene.sample_id}"
            async with gate:
                journal = TurnJournal(
                    partial_path(config.out_dir, run, scene.sample_id),
                    {"sample_id": scene.sample_id, "run": run, "manifest": manifest},
                )
                rounds = progress.add_task(f"  {key}", total=max_rounds, phase="re-enacting")

                def on_step(step: Step) -> None:
                    if step.kind == "line":
                        progress.update(rounds, completed=step.round + 1)

                def on_judging() -> None:
                    progress.update(rounds, phase="judging")

                try:
                    record = await evaluate_sample(
                        scene, run, actor=actor, judge=judge, config=config.simulation, judge_gate=judge_gate,
                        env=config.env_engine, nsp=config.nsp_engine, journal=journal, on_step=on_step,
                        on_judging=on_judging,
                    )
                except (EngineError, RemoteScoringError) as exc:
                    # No sample file: the next run retries this sample, from its saved turns.
                    log.warning("sample %s failed: %s", key, exc)
                    outcome.failed[key] = f"{type(exc).__name__}: {exc}"
                    progress.advance(task)
                    return
                finally:
                    progress.remove_task(rounds)
                write_json_atomic(sample_path(config.out_dir, run, scene.sample_id), record)
                journal.remove()
                outcome.computed.append(key)
                progress.advance(task)
                if on_sample_done is not None:  # inside the gate: nothing new starts before it returns
                    maybe = on_sample_done(record)
                    if maybe is not None:
                        await maybe

        try:
            async with asyncio.TaskGroup() as group:
                for run, scene in todo:
                    group.create_task(one(run, scene))
        except BaseExceptionGroup as eg:  # surface the one real error, not the group wrapper
            if len(eg.exceptions) == 1:
                raise eg.exceptions[0] from None
            raise
    outcome.seconds = round(time.perf_counter() - started, 3)
    return outcome
