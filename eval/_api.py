"""One call for a whole CoSER evaluation: load the test file, run what is missing, write the report."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from her_engines import Engine
from her_roleplay import Scene, load_scenes

from ._report import write_report
from ._runner import EvalConfig, RunOutcome, TranscriptJudge, run_eval


async def evaluate_coser(
    test_file: str | Path | Sequence[Scene],
    *,
    actor: Engine,
    judge: TranscriptJudge,
    config: EvalConfig,
    limit: int | None = None,
    on_sample_done: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None,
) -> tuple[dict[str, Any], RunOutcome]:
    """Evaluate the scenes of ``test_file`` (a path, or scenes already loaded; the first ``limit`` of
    them when given).

    Writes ``config.out_dir``/results.json, report.md and scores.png, and returns (results, outcome).
    Raises SceneLoadError for a bad test file, ValueError for a bad configuration.
    """
    scenes = load_scenes(test_file) if isinstance(test_file, str | Path) else list(test_file)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        scenes = scenes[:limit]
    outcome = await run_eval(scenes, actor=actor, judge=judge, config=config, on_sample_done=on_sample_done)
    results = write_report(
        config.out_dir, [s.sample_id for s in scenes], config.runs, outcome, config.manifest()
    )
    return results, outcome
