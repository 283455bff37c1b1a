"""Training datasets from CoSER scenes or jsonl files, in TRL's conversational formats.

Every scene gives one sample per speaking character (``her_roleplay.build_character_samples``): a
system prompt casting the character, then the conversation up to that character's last own turn
(the target).

- GRPO rows: ``prompt`` = the messages before the target (the policy writes the target turn), and
  ``reference`` = the target's HER text without its system_thinking (the judge compares visible
  replies; the plan is the policy's private scaffolding). Also ``character`` and ``scene_id``.
- SFT rows (prompt-completion format): ``prompt`` = the messages before the target, ``completion`` =
  ``[the target assistant message]``, system_thinking kept (the cold start teaches the dual-layer
  format). With ``completion_only_loss`` TRL puts the loss on the completion only: the final turn.

jsonl files (one JSON object per line) hold either ``{"messages": [...]}`` (a whole sample; its last
message must be the assistant target, e.g. the data builder's SFT output) or the row format itself:
``{"prompt": [...], "reference": "..."}`` for GRPO, ``{"prompt": [...], "completion": [...]}`` for SFT.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._setup import ConfigError, resolve_path

__all__ = ["DataSpec", "grpo_rows_from_scene", "load_grpo_dataset", "load_sft_dataset", "sft_rows_from_scene"]

_ROLES = ("system", "user", "assistant")


@dataclass
class DataSpec:
    """Where the training samples come from (at least one file in all)."""

    scene_files: list[str] = field(default_factory=list)
    """CoSER scene files (JSON object, JSON list or JSONL); relative paths count from the YAML file's
    folder."""
    jsonl: list[str] = field(default_factory=list)
    """Sample files in the row formats of this module."""
    max_samples: int | None = None
    """Keep only the first N samples (after reading every file, in order); None: all."""

    def __post_init__(self) -> None:
        if isinstance(self.scene_files, str):
            self.scene_files = [self.scene_files]
        if isinstance(self.jsonl, str):
            self.jsonl = [self.jsonl]
        if not self.scene_files and not self.jsonl:
            raise ConfigError("data: give `scene_files` and/or `jsonl` (no training samples otherwise)")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"data.max_samples={self.max_samples}; expected a positive number or null")


# --- rows from scenes ----------------------------------------------------------------------------


def _scene_samples(scene: Any) -> list[Any]:
    from her_roleplay import build_character_samples

    return build_character_samples(scene)


def grpo_rows_from_scene(scene: Any) -> list[dict[str, Any]]:
    """GRPO rows (prompt, reference, character, scene_id) of a ``her_roleplay.Scene``, one per perspective."""
    from her_roleplay import strip_system_thinking

    rows = []
    for sample in _scene_samples(scene):
        rows.append({
            "prompt": [m.model_dump() for m in sample.prompt_messages],
            "reference": strip_system_thinking(sample.target).strip(),
            "character": sample.character,
            "scene_id": sample.scene_id,
        })
    return rows


def sft_rows_from_scene(scene: Any) -> list[dict[str, Any]]:
    """SFT rows (prompt, completion = [final assistant turn]) of a ``her_roleplay.Scene``."""
    rows = []
    for sample in _scene_samples(scene):
        messages = [m.model_dump() for m in sample.messages]
        rows.append({"prompt": messages[: sample.target_index], "completion": [messages[sample.target_index]],
                     "character": sample.character, "scene_id": sample.scene_id})
    return rows


# --- jsonl ---------------------------------------------------------------------------------------------


def _check_messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of {{role, content}} messages")
    out = []
    for k, message in enumerate(value):
        if not isinstance(message, Mapping) or message.get("role") not in _ROLES or not isinstance(
            message.get("content"), str
        ):
            raise ConfigError(f"{where}[{k}]: expected {{'role': one of {list(_ROLES)}, 'content': str}}, "
                              f"got {message!r:.120}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _split_target(messages: list[dict[str, str]], where: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: `messages` must end with the assistant target turn after at least one "
                          f"other message; roles are {[m['role'] for m in messages]}")
    return messages[:-1], messages[-1]


def _read_jsonl(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read data file {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _grpo_row_from_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    from her_roleplay import strip_system_thinking

    if "messages" in record:
        prompt, target = _split_target(_check_messages(record["messages"], f"{where} messages"), where)
        reference = strip_system_thinking(target["content"]).strip()
    elif "prompt" in record and "reference" in record:
        prompt = _check_messages(record["prompt"], f"{where} prompt")
        reference = record["reference"]
        if not isinstance(reference, str) or not reference.strip():
            raise ConfigError(f"{where}: `reference` must be a non-empty string")
    else:
        raise ConfigError(f"{where}: a GRPO row needs `messages`, or `prompt` and `reference`; keys are "
                          f"{sorted(record)}")
    if prompt[-1]["role"] == "assistant":
        raise ConfigError(f"{where}: the prompt ends with an assistant turn; the policy would answer itself")
    return {"prompt": prompt, "reference": reference, "character": str(record.get("character", "")),
            "scene_id": str(record.get("scene_id", ""))}


def _sft_row_from_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    if "messages" in record:
        messages = _check_messages(record["messages"], f"{where} messages")
        target_index = record.get("target_index", len(messages) - 1)
        if target_index != len(messages) - 1:
            raise ConfigError(f"{where}: target_index={target_index} but only the last message can be the "
                              f"trained turn ({len(messages) - 1}); cut the messages after the target")
        prompt, target = _split_target(messages, where)
        completion = [target]
    elif "prompt" in record and "completion" in record:
        prompt = _check_messages(record["prompt"], f"{where} prompt")
        completion = _check_messages(record["completion"], f"{where} completion")
        if [m["role"] for m in completion] != ["assistant"]:
            raise ConfigError(f"{where}: `completion` must be exactly one assistant message")
    else:
        raise ConfigError(f"{where}: an SFT row needs `messages`, or `prompt` and `completion`; keys are "
                          f"{sorted(record)}")
    return {"prompt": prompt, "completion": completion, "character": str(record.get("character", "")),
            "scene_id": str(record.get("scene_id", ""))}


# --- datasets ------------------------------------------------------------------------------------------


def _collect(spec: DataSpec, base: Path | None, from_scene: Any, from_record: Any) -> list[dict[str, Any]]:
    from her_roleplay import SceneLoadError, load_scenes

    rows: list[dict[str, Any]] = []
    for name in spec.scene_files:
        path = resolve_path(name, base)
        try:
            scenes = load_scenes(path)
        except SceneLoadError as exc:
            raise ConfigError(str(exc)) from exc
        for scene in scenes:
            rows.extend(from_scene(scene))
    for name in spec.jsonl:
        path = resolve_path(name, base)
        rows.extend(from_record(record, where) for where, record in _read_jsonl(path))
    if spec.max_samples is not None:
        rows = rows[: spec.max_samples]
    if not rows:
        raise ConfigError(f"data: the files {spec.scene_files + spec.jsonl} gave no training samples")
    return rows


def load_grpo_dataset(spec: DataSpec, base: Path | None = None) -> Any:
    """A ``datasets.Dataset`` with columns prompt, reference, character, scene_id."""
    from datasets import Dataset

    return Dataset.from_list(_collect(spec, base, grpo_rows_from_scene, _grpo_row_from_record))


def load_sft_dataset(spec: DataSpec, base: Path | None = None) -> Any:
    """A ``datasets.Dataset`` with columns prompt, completion (one assistant message), character, scene_id."""
    from datasets import Dataset

    return Dataset.from_list(_collect(spec, base, sft_rows_from_scene, _sft_row_from_record))
