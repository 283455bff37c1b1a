"""verl rows: what verl (0.9.1) reads from a dataset row, a check of it, and a converter.

Per row, verl's ``RLHFDataset`` and reward loop read:

- ``prompt``: the chat messages the policy answers (``data.prompt_key``); verl hands them to the
  rollout, and to the reward function's ``extra_info`` as ``raw_prompt`` on its rollout-time path;
- ``data_source``: passed to the reward function; verl's metrics are grouped by it;
- ``reward_model["ground_truth"]``: looked up by verl's reward manager itself, so a row without it
  fails with ``KeyError: 'ground_truth'`` before any reward function runs;
- ``extra_info``: passed to the reward function as is (``index`` identifies the prompt).

``ability`` is carried along. The HER reward function (``policy_trainer/verl_reward.py``) also
wants the conversation in ``extra_info["prompt"]``, the one place that reaches it on every verl
path. ``her build policy`` writes rows this way (``verl/``); :func:`to_verl_row` and
``her build verl`` bring rows of other layouts to it: our GRPO rows (``prompt`` + ``reference``),
rows with the reference under ``reward_model["answer"]``, and verl rows without
``extra_info["prompt"]`` (e.g. from verl's own preprocessing scripts).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._policy import SPLITS, VERL_DATA_SOURCE

__all__ = ["VERL_ABILITY", "convert_files", "read_rows", "to_verl_row", "verl_problems", "write_verl_rows"]

VERL_ABILITY = "roleplay"
_REFERENCE_KEYS = ("ground_truth", "answer", "reference")  # where a reference may sit, in this order


def _plain(value: Any) -> Any:
    """numpy arrays (pandas-read parquet) → lists, recursively; everything else unchanged."""
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _is_chat(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, Mapping) and isinstance(m.get("role"), str) and "content" in m for m in value)
    )


def verl_problems(row: Mapping[str, Any]) -> list[str]:
    """What keeps ``row`` from working with verl and the HER reward function (empty: nothing)."""
    row = _plain(row)
    problems = []
    if not isinstance(row.get("data_source"), str) or not row.get("data_source"):
        problems.append("data_source must be a non-empty string")
    if not _is_chat(row.get("prompt")):
        problems.append("prompt must be a non-empty list of {role, content} chat messages")
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, Mapping) or "ground_truth" not in reward_model:
        problems.append("reward_model.ground_truth is missing (verl reads it before any reward function)")
    elif not isinstance(reward_model["ground_truth"], str) or not reward_model["ground_truth"].strip():
        problems.append("reward_model.ground_truth must be the reference reply (non-empty text)")
    extra = row.get("extra_info")
    if not isinstance(extra, Mapping) or not (_is_chat(extra.get("prompt")) or isinstance(extra.get("prompt"), str)):
        problems.append("extra_info.prompt is missing: the HER reward function reads the conversation there")
    elif extra["prompt"] != row.get("prompt"):
        problems.append("extra_info.prompt differs from prompt: the judge would see another conversation")
    return problems


def to_verl_row(
    row: Mapping[str, Any],
    *,
    index: int,
    split: str | None = None,
    data_source: str = VERL_DATA_SOURCE,
) -> dict[str, Any]:
    """``row`` in verl's layout, with ``extra_info["prompt"]``. Raises ValueError when it has no chat
    prompt or no reference reply (under ``reward_model.ground_truth``/``answer`` or ``reference``).

    Keys that are neither verl's nor the reference move into ``extra_info`` (ids stay with the row);
    ``extra_info.index`` / ``split`` are filled in when absent.
    """
    row = _plain(row)
    prompt = row.get("prompt")
    if not _is_chat(prompt):
        raise ValueError(f"row {index}: prompt must be a list of chat messages, got {str(prompt)[:80]!r}")
    reward_model = dict(row.get("reward_model") or {})
    reference = next((reward_model.pop(k) for k in _REFERENCE_KEYS if reward_model.get(k) is not None), None)
    if reference is None:
        reference = row.get("reference")
    if not isinstance(reference, str) or not reference.strip():
        raise ValueError(
            f"row {index}: no reference reply (reward_model.ground_truth, reward_model.answer or reference)"
        )
    extra = dict(row.get("extra_info") or {})
    for key, value in row.items():
        if key not in ("data_source", "prompt", "ability", "reward_model", "extra_info", "reference"):
            extra.setdefault(key, value)
    extra.setdefault("index", index)
    if split is not None:
        extra.setdefault("split", split)
    extra["prompt"] = prompt
    return {
        "data_source": row.get("data_source") or data_source,
        "prompt": prompt,
        "ability": row.get("ability") or VERL_ABILITY,
        "reward_model": {**reward_model, "style": reward_model.get("style") or "model", "ground_truth": reference},
        "extra_info": extra,
    }


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` / ``.json`` (a list) / ``.parquet`` file, as plain Python values."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows")
        return data
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_verl_rows(rows: Sequence[Mapping[str, Any]], out: Path, name: str) -> list[str]:
    """``<out>/<name>.jsonl`` and ``.parquet`` (what verl's ``data.train_files`` take); file names back."""
    from datasets import Dataset

    out.mkdir(parents=True, exist_ok=True)
    dataset = Dataset.from_list([dict(r) for r in rows])
    dataset.to_json(out / f"{name}.jsonl", force_ascii=False)
    dataset.to_parquet(out / f"{name}.parquet")
    return [f"{name}.jsonl", f"{name}.parquet"]


def convert_files(
    inputs: Sequence[str | Path], out: str | Path, *, data_source: str = VERL_DATA_SOURCE
) -> dict[str, Any]:
    """Convert each input file into ``<out>/<stem>.jsonl`` + ``.parquet`` in verl's layout.

    A file named after a split (``train``, ``validation``, ``test``) gives its rows that
    ``extra_info.split``. Raises ValueError on the first row that cannot be converted.
    """
    out = Path(out)
    stems = [Path(p).stem for p in inputs]
    if len(set(stems)) != len(stems):
        raise ValueError(f"input files share a name ({stems}); each becomes <out>/<name>.parquet")
    summary: dict[str, Any] = {"files": [], "rows": {}}
    for path, stem in zip(inputs, stems, strict=True):
        split = stem if stem in SPLITS else None
        try:
            rows = [to_verl_row(r, index=i, split=split, data_source=data_source)
                    for i, r in enumerate(read_rows(path))]
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if not rows:
            raise ValueError(f"{path}: no rows")
        summary["files"] += write_verl_rows(rows, out, stem)
        summary["rows"][stem] = len(rows)
    return summary
