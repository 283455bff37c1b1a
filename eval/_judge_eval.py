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

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from her_engines import Engine, EngineError, EngineSettings, build_engine
from her_genrm import GenRM, JudgeRequest, LabelledPair, Mode, Usage, Verdict, genrm_config_for

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

    @property
    def verdicts_file(self) -> str:
        return f"verdicts_{self.name}.jsonl"


@dataclass
class JudgeEvalConfig:
    """One evaluation run. `engine_settings` apply to every judge; each judge's model replaces `model`."""

    out_dir: Path
    mode: Mode = "fast"
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


def load_labelled_pairs(path: str | Path, limit: int | None = None) -> list[LabelledPair]:
    """The first `limit` (all when None) LabelledPair records of a jsonl file; a bad line names its number."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    pairs: list[LabelledPair] = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                pairs.append(LabelledPair.model_validate_json(line))
            except ValidationError as exc:
                raise ValueError(f"{path}:{n}: not a LabelledPair record: {exc}") from None
            if limit is not None and len(pairs) >= limit:
                break
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
            task = progress.add_task(f"judge {spec.name}: loading", total=len(pairs))
            results.append(await _evaluate_one(spec, pairs, config, (engines or {}).get(spec.name), build,
                                               on_start=lambda t=task, s=spec: progress.update(
                                                   t, description=f"judge {s.name}"),
                                               on_batch=lambda k, t=task: progress.advance(t, k)))
    summary = {
        "pairs_file": config.pairs_file,
        "pairs": len(pairs),
        "mode": config.mode,
        "swap": config.swap,
        "engine": config.engine_settings.engine,
        "judges": results,
    }
    write_json_atomic(config.out_dir / "metrics.json", summary)
    write_judge_report(config.out_dir, summary)
    return summary


async def _evaluate_one(spec: JudgeSpec, pairs: Sequence[LabelledPair], config: JudgeEvalConfig,
                        engine: Engine | None, build: Callable[[EngineSettings], Engine], *,
                        on_start: Callable[[], None], on_batch: Callable[[int], None]) -> dict[str, Any]:
    owned = engine is None
    if engine is None:
        engine = build(config.engine_settings.model_copy(update={"model": spec.model}))
    judge_config = genrm_config_for(spec.model)
    started = time.perf_counter()
    try:
        on_start()
        genrm = GenRM(engine, config=judge_config)
        verdicts = await judge_labelled_pairs(genrm, pairs, mode=config.mode, swap=config.swap,
                                              batch_size=config.batch_size,
                                              out_path=config.out_dir / spec.verdicts_file, on_batch=on_batch)
    finally:
        if owned:
            await engine.aclose()
    usage = sum((v.usage for v in verdicts), Usage())
    return {
        "name": spec.name,
        "model": spec.model,
        "engine": getattr(engine, "kind", "engine"),
        "model_id": engine.model_id,
        "principle_detail": judge_config.principle_detail,
        "verdicts_file": spec.verdicts_file,
        "seconds": round(time.perf_counter() - started, 3),
        "usage": usage.model_dump(),
        "metrics": agreement_metrics(pairs, verdicts),
    }
