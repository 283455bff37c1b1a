"""`her eval judge`: several judges on the same labelled pairs, one after another, compared in one report.

Each judge's engine is built, used for every pair and closed before the next one is built (a CPU box
holds one model at a time). Output folder::

    DIR/verdicts_{name}.jsonl   one line per pair: the LabelledPair's fields plus "verdict" (with orders)
    DIR/metrics.json            settings and every judge's metrics (see eval._agreement)
    DIR/report.md, DIR/*.png    written by eval._judge_report

A batch the engine cannot answer at all becomes error verdicts for its pairs: counted as errors,
never as right or wrong answers.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from her_engines import Engine, EngineError, EngineSettings, build_engine
from her_genrm import GenRM, JudgeRequest, LabelledPair, Mode, Usage, Verdict, build_genrm, read_labelled_pairs

from ._agreement import agreement_metrics
from ._judge_report import write_judge_report
from ._runner import write_json_atomic

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class JudgeSpec:
    """One judge to evaluate: a short name (used in file names and tables) and its model."""

    name: str
    model: str

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"judge name {self.name!r}: use letters, digits, '_', '-', '.' (it names files)")
        if not self.model:
            raise ValueError(f"judge {self.name!r} has no model")

    @classmethod
    def parse(cls, text: str) -> JudgeSpec:
        """``NAME=MODEL``, e.g. ``base=smollm2-135m-instruct`` or ``trained=runs/genrm/final``."""
        name, sep, model = text.partition("=")
        if not sep:
            raise ValueError(f"--judge {text!r}: expected NAME=MODEL, e.g. base=smollm2-135m-instruct")
        return cls(name.strip(), model.strip())


@dataclass
class JudgeEvalConfig:
    """One evaluation run. `engine_settings` apply to every judge; each judge's model replaces `model`."""

    out_dir: Path
    modes: tuple[Mode, ...] = ("fast",)
    """Each judge is evaluated in every mode while it is loaded."""
    swap: bool = True
    batch_size: int = 16
    """Pairs per `GenRM.judge` call (each is one or two engine requests)."""
    progress: bool = True
    engine_settings: EngineSettings = field(default_factory=EngineSettings)
    pairs_file: str | None = None
    """Only recorded in metrics.json."""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be distinct and at least one, got {self.modes}")


def load_labelled_pairs(path: str | Path, limit: int | None = None) -> list[LabelledPair]:
    """:func:`her_genrm.read_labelled_pairs`, with every id required to be unique (verdicts are keyed by it)."""
    pairs = read_labelled_pairs(path, limit)
    check_unique_ids(pairs)
    return pairs


def check_unique_ids(pairs: Sequence[LabelledPair]) -> None:
    seen: set[str] = set()
    dupes = sorted({p.id for p in pairs if p.id in seen or seen.add(p.id)})  # type: ignore[func-returns-value]
    if dupes:
        raise ValueError(f"pair ids must be unique; repeated: {dupes[:5]}")


def read_verdict_records(path: str | Path) -> tuple[list[LabelledPair], list[Verdict]]:
    """The pairs and verdicts of a ``verdicts_{name}.jsonl`` file, in file order."""
    pairs, verdicts = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            verdicts.append(Verdict.model_validate(record.pop("verdict")))
            pairs.append(LabelledPair.model_validate(record))
    return pairs, verdicts


def _batch_error(mode: Mode, model: str, exc: Exception) -> Verdict:
    return Verdict(status="error", error=f"engine failed on the batch: {type(exc).__name__}: {exc}",
                   mode=mode, model=model)


async def judge_labelled_pairs(genrm: GenRM, pairs: Sequence[LabelledPair], *, mode: Mode, swap: bool,
                               batch_size: int, out_path: Path,
                               on_batch: Callable[[int], None] | None = None) -> list[Verdict]:
    """Judge `pairs` in batches, appending one record per pair to `out_path` as each batch finishes."""
    verdicts: list[Verdict] = []
    with out_path.open("w", encoding="utf-8") as out:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            requests = [JudgeRequest(context=p.context, a=p.a, b=p.b, mode=mode, swap=swap) for p in chunk]
            try:
                got = await genrm.judge(requests)
            except (EngineError, RuntimeError) as exc:  # the whole batch failed: its pairs are errors
                got = [_batch_error(mode, genrm.model_id, exc) for _ in chunk]
            for pair, verdict in zip(chunk, got, strict=True):
                record = {**pair.model_dump(mode="json"), "verdict": verdict.model_dump(mode="json")}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            verdicts.extend(got)
            if on_batch:
                on_batch(len(chunk))
    return verdicts


async def evaluate_judges(
    pairs: Sequence[LabelledPair],
    judges: Sequence[JudgeSpec],
    config: JudgeEvalConfig,
    *,
    engines: Mapping[str, Engine] | None = None,
    build: Callable[[EngineSettings], Engine] = build_engine,
) -> dict[str, Any]:
    """Judge `pairs` with every judge in turn and write verdicts, metrics.json, report.md and charts.

    `engines` maps a judge name to an engine that is already built (e.g. a test's session engine): it
    is used as is and not closed. Other judges get ``build(engine_settings with their model)``, closed
    after their last pair. Returns the contents of metrics.json.
    """
    if not pairs:
        raise ValueError("no pairs to judge")
    if not judges:
        raise ValueError("no judges given")
    names = [j.name for j in judges]
    if len(set(names)) != len(names):
        raise ValueError(f"judge names must be unique, got {names}")
    unknown = set(engines or {}) - set(names)
    if unknown:
        raise ValueError(f"engines given for unknown judges {sorted(unknown)}; judges are {names}")
    check_unique_ids(pairs)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not config.progress) as progress:
        for spec in judges:
            tasks = {mode: progress.add_task(f"{_entry_name(spec, mode, config)}: loading", total=len(pairs))
                     for mode in config.modes}
            results += await _evaluate_one(
                spec, pairs, config, (engines or {}).get(spec.name), build,
                on_start=functools.partial(_show_started, progress, tasks, spec, config),
                on_batch=functools.partial(_show_batch, progress, tasks))
    summary = {
        "pairs_file": config.pairs_file,
        "pairs": len(pairs),
        "modes": list(config.modes),
        "swap": config.swap,
        "engine": config.engine_settings.engine,
        "judges": results,
    }
    write_json_atomic(config.out_dir / "metrics.json", summary)
    write_judge_report(config.out_dir, summary)
    return summary


def _entry_name(spec: JudgeSpec, mode: Mode, config: JudgeEvalConfig) -> str:
    """A judge's row name: its own name, with the mode when several modes are evaluated."""
    return spec.name if len(config.modes) == 1 else f"{spec.name}-{mode}"


def _show_started(progress: Progress, tasks: dict[Mode, TaskID], spec: JudgeSpec, config: JudgeEvalConfig,
                  mode: Mode) -> None:
    progress.update(tasks[mode], description=_entry_name(spec, mode, config))


def _show_batch(progress: Progress, tasks: dict[Mode, TaskID], mode: Mode, done: int) -> None:
    progress.advance(tasks[mode], done)


async def _evaluate_one(spec: JudgeSpec, pairs: Sequence[LabelledPair], config: JudgeEvalConfig,
                        engine: Engine | None, build: Callable[[EngineSettings], Engine], *,
                        on_start: Callable[[Mode], None], on_batch: Callable[[Mode, int], None],
                        ) -> list[dict[str, Any]]:
    """One judge in every mode of `config`: one row of results per mode, the model loaded once."""
    owned = engine is None
    if engine is None:
        engine = build(config.engine_settings.model_copy(update={"model": spec.model}))
    rows = []
    try:
        genrm = build_genrm(engine, spec.model)
        for mode in config.modes:
            name = _entry_name(spec, mode, config)
            started = time.perf_counter()
            on_start(mode)
            verdicts = await judge_labelled_pairs(
                genrm, pairs, mode=mode, swap=config.swap, batch_size=config.batch_size,
                out_path=config.out_dir / f"verdicts_{name}.jsonl", on_batch=functools.partial(on_batch, mode))
            usage = sum((v.usage for v in verdicts), Usage())
            rows.append({
                "name": name,
                "judge": spec.name,
                "mode": mode,
                "model": spec.model,
                "engine": engine.kind,
                "model_id": engine.model_id,
                "principle_detail": genrm.config.principle_detail,
                "verdicts_file": f"verdicts_{name}.jsonl",
                "seconds": round(time.perf_counter() - started, 3),
                "usage": usage.model_dump(),
                "metrics": agreement_metrics(pairs, verdicts),
            })
    finally:
        if owned:
            await engine.aclose()
    return rows
