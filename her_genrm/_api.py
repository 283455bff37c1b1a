"""Convenience entry points: judge pairs in-process, or a jsonl file with a progress bar."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.progress import Progress

from her_engines import Engine, create_engine

from ._card import build_genrm
from ._judge import GenRM
from ._types import JudgeRequest, LabelledPair, Mode, TemplateName, Verdict

_PAIR_KEYS = {"context", "a", "b"}


def _to_request(pair: Mapping[str, Any] | JudgeRequest, **defaults: Any) -> JudgeRequest:
    if isinstance(pair, JudgeRequest):
        return pair
    missing = _PAIR_KEYS - set(pair)
    if missing:
        raise ValueError(f"a pair needs keys context, a, b; missing {sorted(missing)}")
    # A line may set its own mode/template/swap/seed, as a /v1/judge body does.
    fields = {k: pair[k] for k in ("context", "a", "b", "seed", "mode", "template", "swap") if k in pair}
    defaults = {k: v for k, v in defaults.items() if k not in fields}
    return JudgeRequest(**defaults, **fields, extra={k: v for k, v in pair.items() if k not in fields})


async def judge(
    pairs: Iterable[Mapping[str, Any] | JudgeRequest],
    *,
    mode: Mode = "cot",
    template: TemplateName = "compact",
    swap: bool = True,
    engine: Engine | None = None,
    genrm: GenRM | None = None,
    model: str | Path | None = None,
    batch_size: int = 16,
) -> list[Verdict]:
    """Judge pairs (`{"context", "a", "b"}` dicts or `JudgeRequest`s) in engine-sized batches.

    `model`: the folder whose judge card sets the prompt (`build_genrm`); default: the engine's model id."""
    genrm = genrm or build_genrm(engine or create_engine(), model)
    requests = [_to_request(p, mode=mode, template=template, swap=swap) for p in pairs]
    verdicts: list[Verdict] = []
    for start in range(0, len(requests), batch_size):
        verdicts.extend(await genrm.judge(requests[start : start + batch_size]))
    return verdicts


async def judge_file(
    in_path: str | Path,
    out_path: str | Path,
    genrm: GenRM,
    *,
    mode: Mode = "cot",
    template: TemplateName = "compact",
    swap: bool = True,
    batch_size: int = 16,
) -> dict[str, int]:
    """Read pairs from jsonl, write one verdict line per pair (input keys carried through)."""
    lines = [ln for ln in Path(in_path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{in_path}:{n}: not JSON ({exc.msg})") from None
    requests = [_to_request(r, mode=mode, template=template, swap=swap) for r in rows]
    counts = {"ok": 0, "error": 0}
    with Path(out_path).open("w", encoding="utf-8") as out, Progress() as progress:
        task = progress.add_task("judging", total=len(requests))
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            for row, verdict in zip(rows[start : start + batch_size], await genrm.judge(chunk), strict=True):
                record = {**row, **verdict.model_dump(exclude={"orders", "id"}, mode="json")}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts[verdict.status] += 1
            out.flush()
            progress.advance(task, len(chunk))
    return counts


API_KEY_ENV = "RM_API_KEY"


def api_key_from_env() -> str | None:
    """The Bearer key a client sends to rm_server: env RM_API_KEY (the server reads the same name), else the
    first of RM_API_KEYS, so one environment configures a server and its clients alike."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        key = os.environ.get(API_KEY_ENV + "S", "")
    return next((k.strip() for k in key.split(",") if k.strip()), None)


def read_labelled_pairs(path: str | Path, limit: int | None = None) -> list[LabelledPair]:
    """The first ``limit`` (all when None) LabelledPair records of a jsonl file (`her build negatives`,
    `her build teacher-pairs`). A missing file, a bad line (named by its number) or ``limit < 1`` is a
    ValueError."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"labelled pair file {path} does not exist")
    pairs: list[LabelledPair] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                pairs.append(LabelledPair.model_validate_json(line))
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ValueError(f"{path}:{n}: not a LabelledPair record: {first['msg']} at {first['loc']}") from None
            if limit is not None and len(pairs) >= limit:
                break
    return pairs
