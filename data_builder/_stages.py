"""The resumable runner of the synthesis stages, and the files it writes.

An output folder holds:

- ``units.jsonl``: one line per finished teacher call ``{key, stage, id, text, prompt_tokens,
  completion_tokens, finish_reason, model}``, appended and flushed as each call returns. The key is a
  content hash (stage, unit input, teacher model, full request), so a rerun, even after a kill,
  answers every unit already on disk from this file and calls the teacher only for the rest. A torn
  last line (a kill mid-write) is cut off and redone. Engine errors are not stored: a rerun retries.
- ``scenes.jsonl``: the synthesized scenes, ``rejects.jsonl``: every rejected unit or setting
  addition with its findings, ``usage.json``: units and tokens per stage. These three are rebuilt
  from ``units.jsonl`` at the end of every run.

Chains (see :mod:`data_builder._synth`) run concurrently; a semaphore keeps at most ``concurrency``
requests inside the engine, which batches them by itself (vLLM, an OpenAI server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from her_engines import Engine, GenRequest

from ._synth import STAGES, Chain, SceneOutcome, SynthConfig, Unit, scene_chains, scene_record

__all__ = ["SynthSummary", "UnitStore", "add_synth_arguments", "dry_run", "run_synth", "synthesize"]

CHARS_PER_TOKEN = 4  # the stated estimate when no tokenizer is at hand


class UnitStore:
    """Finished teacher calls by key, backed by an append-only jsonl file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict] = {}
        self.torn_lines = 0
        if path.exists():
            self._load()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good_end = 0
        lines = raw.split(b"\n")
        for n, line in enumerate(lines):
            if not line.strip():
                good_end += len(line) + 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if n == len(lines) - 1:  # the last line, cut by a kill
                    self.torn_lines = 1
                    break
                raise ValueError(f"{self.path}: line {n + 1} is not JSON ({exc}); this file is written only "
                                 "by `her build synth`: remove the damaged line or start a new folder") from None
            self.records[record["key"]] = record
            good_end += len(line) + 1
        if self.torn_lines:
            with self.path.open("r+b") as f:
                f.truncate(min(good_end, len(raw)))

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, record: dict) -> None:
        if record["key"] in self.records:
            return
        self.records[record["key"]] = record
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()  # the OS keeps it if we are killed; that is all resuming needs

    def close(self) -> None:
        self._file.close()


@dataclass
class SynthSummary:
    """Counts of one run: units per stage (stored before, called now), tokens, outcomes."""

    units: Counter = field(default_factory=Counter)
    cached: Counter = field(default_factory=Counter)
    called: Counter = field(default_factory=Counter)
    prompt_tokens: Counter = field(default_factory=Counter)
    completion_tokens: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    additions_kept: int = 0
    scenes: int = 0
    scenes_without_source: int = 0

    def as_json(self) -> dict[str, Any]:
        stages = sorted(self.units)
        return {
            "scenes": self.scenes,
            "scenes_without_source_text": self.scenes_without_source,
            "setting_additions_kept": self.additions_kept,
            "stages": {s: {"units": self.units[s], "from_store": self.cached[s], "teacher_calls": self.called[s],
                           "accepted": self.accepted[s], "rejected": self.rejected[s],
                           "prompt_tokens_this_run": self.prompt_tokens[s],
                           "completion_tokens_this_run": self.completion_tokens[s]} for s in stages},
        }


async def _drive(make_chain: Callable[[], Chain], answer: Callable[[Unit], Any]) -> None:
    chain = make_chain()
    try:
        unit = next(chain)
        while True:
            unit = chain.send(await answer(unit))
    except StopIteration:
        pass


def _plan(scenes: Sequence, config: SynthConfig) -> tuple[list[SceneOutcome], list[tuple[int, Callable[[], Chain]]]]:
    outcomes, chains = [], []
    for scene in scenes:
        outcome, scene_chain_list = scene_chains(scene, config)
        outcomes.append(outcome)
        chains += scene_chain_list
    return outcomes, chains


async def synthesize(scenes: Sequence, engine: Engine, out_dir: Path, config: SynthConfig, *,
                     concurrency: int = 8, progress: bool = True) -> SynthSummary:
    """Run the stages over ``scenes`` with ``engine`` as teacher, resuming from ``out_dir``."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    out_dir.mkdir(parents=True, exist_ok=True)
    store = UnitStore(out_dir / "units.jsonl")
    summary = SynthSummary()
    gate = asyncio.Semaphore(concurrency)
    outcomes, chains = _plan(scenes, config)
    bar = _Bar(sum(n for n, _ in chains), enabled=progress)

    async def answer(unit: Unit) -> dict:
        key = unit.key(engine.model_id)
        summary.units[unit.stage] += 1
        record = store.get(key)
        if record is not None:
            summary.cached[unit.stage] += 1
        else:
            async with gate:
                result = (await engine.generate([unit.request]))[0]
            summary.called[unit.stage] += 1
            summary.prompt_tokens[unit.stage] += result.prompt_tokens
            summary.completion_tokens[unit.stage] += result.completion_tokens
            record = {"key": key, "stage": unit.stage, "id": unit.record_id, "text": result.text,
                      "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "finish_reason": result.finish_reason, "error": result.error, "model": engine.model_id}
            if result.finish_reason != "error":
                store.put(record)
        bar.advance()
        return record

    try:
        with bar:
            await asyncio.gather(*(_drive(make, answer) for _, make in chains))
    finally:
        store.close()
    _write_outputs(out_dir, outcomes, config, engine.model_id, summary)
    return summary


def _write_outputs(out_dir: Path, outcomes: list[SceneOutcome], config: SynthConfig, teacher: str,
                   summary: SynthSummary) -> None:
    scenes, rejects = [], []
    for outcome in outcomes:
        scenes.append(scene_record(outcome, config, teacher))
        # chains finish in any order: sort so reruns write identical files
        rejects += [r.as_json() for r in sorted(outcome.rejects, key=_reject_order)]
        for line in outcome.status.values():
            for stage, status in line.items():
                (summary.accepted if status == "accepted" else summary.rejected)[stage] += 1
        if "setting" in config.stages:
            if outcome.additions is None and not any(r.stage == "setting" and r.record_id == outcome.scene.sample_id
                                                     for r in outcome.rejects):
                summary.scenes_without_source += 1
            elif outcome.additions is not None:
                summary.accepted["setting"] += 1
                summary.additions_kept += len(outcome.additions)
            else:
                summary.rejected["setting"] += 1
    summary.scenes = len(scenes)
    _replace(out_dir / "scenes.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in scenes))
    _replace(out_dir / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    _replace(out_dir / "usage.json", json.dumps(summary.as_json(), indent=2) + "\n")


def _reject_order(reject: Any) -> tuple:
    natural = [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", reject.record_id)]
    return (natural, STAGES.index(reject.stage))


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def dry_run(scenes: Sequence, config: SynthConfig, *, model: str | None = None) -> dict[str, Any]:
    """Units per stage and estimated teacher tokens, without any engine.

    Prompt tokens are counted with the teacher's tokenizer when ``model`` names a local model whose HF
    folder already exists, else estimated as characters / 4; completion tokens are always a chars/4
    estimate of a typical answer (the per-stage ``max_tokens`` bound is given too). Prompts that depend
    on earlier answers are built as if every earlier answer had been rejected.
    """
    tokenizer = _local_tokenizer(model) if model else None
    _outcomes, chains = _plan(scenes, config)
    units: Counter = Counter()
    prompt: Counter = Counter()
    completion: Counter = Counter()

    async def answer(unit: Unit) -> None:
        units[unit.stage] += 1
        prompt[unit.stage] += _count_prompt(unit.request, tokenizer)
        completion[unit.stage] += unit.expected_output_chars // CHARS_PER_TOKEN

    async def run_all() -> None:
        for _, make in chains:
            await _drive(make, answer)

    asyncio.run(run_all())
    return {
        "scenes": len(scenes),
        "prompt_tokens_counted_with": "the teacher tokenizer" if tokenizer else f"characters / {CHARS_PER_TOKEN}",
        "completion_tokens_estimated_with": f"characters / {CHARS_PER_TOKEN} of a typical answer",
        "stages": {s: {"units": units[s], "prompt_tokens": prompt[s], "completion_tokens": completion[s],
                       "completion_tokens_max": units[s] * config.max_tokens[s]} for s in config.stages},
    }


def _count_prompt(request: GenRequest, tokenizer: Any) -> int:
    messages = [m.model_dump() for m in request.messages or []]
    if tokenizer is not None:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # newer releases return a dict
    return sum(len(m["content"]) for m in messages) // CHARS_PER_TOKEN


def _local_tokenizer(model: str) -> Any:
    """The tokenizer of a local model whose HF folder is already on disk, else None (no conversion)."""
    try:
        from her_engines import resolve_model

        folder = Path(model) if Path(model).is_dir() else resolve_model(model).hf_folder
        if not (folder / "tokenizer_config.json").exists():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # any failure just means "estimate from characters"
        return None


class _Bar:
    def __init__(self, total: int, enabled: bool) -> None:
        from rich.progress import Progress

        self._progress = Progress(disable=not enabled, transient=False)
        self._task = self._progress.add_task("teacher units", total=total)

    def __enter__(self) -> _Bar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def advance(self) -> None:
        self._progress.advance(self._task)


# --- `her build synth` -------------------------------------------------------------------------------

def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `her build synth`, teacher engine flags included (`--teacher-engine`, `--teacher-model`, ...)."""
    from her_cli._engine_args import add_engine_arguments

    parser.add_argument("--sources", nargs="+", required=True,
                        help="CoSER book-level files and/or test-set scene files (json or jsonl)")
    parser.add_argument("--out", required=True,
                        help="output folder (units.jsonl, scenes.jsonl, rejects.jsonl, usage.json)")
    parser.add_argument("--stages", type=_stage_list, default=STAGES, metavar="S1,S2",
                        help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    parser.add_argument("--limit-scenes", type=_positive, default=None, metavar="N", help="only the first N scenes")
    parser.add_argument("--max-lines", type=_positive, default=None, metavar="N",
                        help="keep only the first N dialogue lines of each scene (for trial runs)")
    parser.add_argument("--concurrency", type=_positive, default=8,
                        help="teacher requests in flight at once (default 8)")
    parser.add_argument("--dry-run", action="store_true",
                        help="count units and estimate teacher tokens per stage; loads no model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_arguments(parser.add_argument_group("teacher engine"), prefix="teacher-")


def _stage_list(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    try:
        SynthConfig(stages=stages)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return stages


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def run_synth(args: argparse.Namespace) -> int:
    from her_cli._engine_args import build_engine_or_exit, engine_settings_from_args
    from her_roleplay import SceneLoadError

    from ._books import LoadReport, load_sources

    report = LoadReport()
    try:
        scenes = load_sources(args.sources, report=report)
    except SceneLoadError as exc:
        print(f"her build synth: {exc}", file=sys.stderr)
        return 2
    scenes = scenes[: args.limit_scenes] if args.limit_scenes else scenes
    if args.max_lines:
        scenes = [s.model_copy(update={"dialogues": s.dialogues[: args.max_lines]}) for s in scenes]
    print(f"sources: {report}; synthesizing {len(scenes)} scenes", file=sys.stderr)
    config = SynthConfig(stages=args.stages)
    settings = engine_settings_from_args(args, prefix="teacher-")
    if args.dry_run:
        print(json.dumps(dry_run(scenes, config, model=settings.model), indent=2))
        return 0
    out = Path(args.out)

    async def main() -> SynthSummary:
        engine = build_engine_or_exit(settings, prefix="teacher-")
        try:
            return await synthesize(scenes, engine, out, config, concurrency=args.concurrency,
                                    progress=not args.no_progress)
        finally:
            await engine.aclose()

    summary = asyncio.run(main())
    for stage, row in summary.as_json()["stages"].items():
        print(f"  {stage}: {row['units']} units ({row['from_store']} from store), {row['accepted']} accepted, "
              f"{row['rejected']} rejected; tokens this run {row['prompt_tokens_this_run']} prompt + "
              f"{row['completion_tokens_this_run']} completion")
    print(f"-> {out} (scenes.jsonl, rejects.jsonl, usage.json)")
    return 0
