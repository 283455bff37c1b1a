"""Policy training data: every own turn of every character as a target, split by conversation.

A scene with a character who speaks in k turns gives k samples for that character, one per turn
prefix: the conversation up to that turn, the turn itself as the target. The rules are those of
``her_roleplay.build_character_samples`` applied to the scene cut after the target turn, so a
prefix sample is exactly what the policy would see at that point: others' lines in their public
view, earlier own turns without their plan, and a ``<system_thinking>`` plan only on the target
(when the data carries one; reverse-synthesised scenes do, plain CoSER scenes do not).

Splits are decided per conversation (book, i_p, i_c), never per sample, so no prefix of one
conversation can reach two splits. Evaluation scenes are removed by the same key before splitting.

Exports, per split (``train``, ``validation``, ``test``), in jsonl and parquet:

- ``sft/``: ``prompt`` (messages before the target), ``completion`` ([the target, plan kept]) —
  TRL's prompt-completion format, read as is by ``her train sft``;
- ``grpo/``: ``prompt``, ``reference`` (the target without its plan) — read by ``her train grpo``;
- ``verl/``: verl's RL rows (``data_source``, ``prompt``, ``ability``, ``reward_model``,
  ``extra_info``), with the prompt repeated in ``extra_info["prompt"]``, where
  ``policy_trainer/verl_reward.py`` reads it (verl hands the reward function only extra_info).

Every row also carries ``sample_id``, ``scene_id``, ``book``, ``character`` and ``line`` (the
index of the target's last dialogue line).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from her_roleplay import ENVIRONMENT, CharacterSample, Scene, build_character_samples, strip_system_thinking

from ._books import LoadReport, SceneKey, evaluation_keys, key_of, load_sources, scene_key, turn_id

__all__ = [
    "SPLITS",
    "VERL_DATA_SOURCE",
    "PolicyData",
    "SplitConfig",
    "TurnSample",
    "build_and_export",
    "build_policy_data",
    "evaluation_keys",
    "export_policy_data",
    "grpo_row",
    "parse_fractions",
    "scene_key",
    "sft_row",
    "turn_samples",
    "verl_row",
]

SPLITS = ("train", "validation", "test")
VERL_DATA_SOURCE = "her/roleplay"
"""``data_source`` of the verl rows: verl groups its metrics by it."""



# --- samples -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnSample:
    """One target: ``character``'s own turn whose last dialogue line is ``line`` in ``scene``."""

    sample_id: str
    scene: Scene
    line: int
    sample: CharacterSample

    @property
    def character(self) -> str:
        return self.sample.character

    def prompt(self) -> list[dict[str, str]]:
        return [m.model_dump() for m in self.sample.prompt_messages]

    def target(self) -> dict[str, str]:
        return self.sample.messages[self.sample.target_index].model_dump()

    def reference(self) -> str:
        """The target as the judge compares it: visible reply and role_thinking, no plan."""
        return strip_system_thinking(self.sample.target).strip()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _same_name(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def turn_samples(scene: Scene) -> list[TurnSample]:
    """One sample per own turn of every character of ``scene``, in dialogue order.

    Consecutive own lines form one turn (as in ``build_character_samples``), so the turn's target
    is the whole run and its id names the run's last line. A line that adds nothing the character
    says, does or thinks (e.g. a bare plan) makes no turn.
    """
    # (character, number of messages) → the latest prefix sample: a later line that extends the
    # same assistant message (a merged run) replaces the earlier, shorter target.
    by_turn: dict[tuple[str, int], tuple[int, CharacterSample]] = {}
    for line, dialogue in enumerate(scene.dialogues):
        if _same_name(dialogue.character, ENVIRONMENT):
            continue
        prefix = scene.model_copy(update={"dialogues": scene.dialogues[: line + 1]})
        sample = next(
            (s for s in build_character_samples(prefix) if _same_name(s.character, dialogue.character)), None
        )
        if sample is None:
            continue  # the speaker has said nothing yet (only a plan)
        key = (sample.character.strip().casefold(), len(sample.messages))
        previous = by_turn.get(key)
        if previous is not None and previous[1].messages == sample.messages:
            continue  # this line added nothing to the turn: keep the id of the line that did
        by_turn[key] = (line, sample)
    return [
        TurnSample(f"{turn_id(scene, line)}-{_slug(sample.character)}", scene, line, sample)
        for line, sample in sorted(by_turn.values(), key=lambda item: item[0])
    ]


# --- splits --------------------------------------------------------------------------------------


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` → (train, validation, test) fractions; raises ValueError on bad input."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--split {text!r}: expected three numbers like 0.8,0.1,0.1") from None
    if len(values) != 3:
        raise ValueError(f"--split {text!r}: expected three fractions (train,validation,test), got {len(values)}")
    return values[0], values[1], values[2]


@dataclass(frozen=True)
class SplitConfig:
    """How conversations are assigned to train / validation / test.

    Each conversation's (book, i_p, i_c) and ``seed`` are hashed to a number in [0, 1) that falls
    into one of the ``fractions`` (train, validation, test; they must sum to 1), so the assignment
    is the same in every run and does not depend on which other scenes are present. Books named in
    ``holdout_books`` go to test whole, whatever their hash says; the fractions apply to the rest.
    """

    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    holdout_books: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.fractions) != 3 or any(not 0 <= f <= 1 for f in self.fractions):
            raise ValueError(f"split fractions {self.fractions}: need three numbers between 0 and 1")
        if abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(f"split fractions {self.fractions} sum to {sum(self.fractions):g}; they must sum to 1")

    def split_of(self, key: SceneKey) -> str:
        """The split of the conversation with this :func:`scene_key`."""
        if key[0] in {b.strip().casefold() for b in self.holdout_books}:
            return "test"
        blob = json.dumps([self.seed, *key], ensure_ascii=False).encode("utf-8")
        point = int(hashlib.sha256(blob).hexdigest()[:15], 16) / 16**15
        edge = 0.0
        for name, fraction in zip(SPLITS, self.fractions, strict=True):
            edge += fraction
            if point < edge:
                return name
        # fractions may sum to a hair under 1: that remainder goes to the last non-empty split
        return [n for n, f in zip(SPLITS, self.fractions, strict=True) if f > 0][-1]


# --- the whole build -----------------------------------------------------------------------------


@dataclass
class PolicyData:
    """Samples per split and what was left out on the way."""

    splits: dict[str, list[TurnSample]]
    excluded: list[SceneKey] = field(default_factory=list)
    scenes_without_turns: list[str] = field(default_factory=list)
    scenes_per_split: Counter = field(default_factory=Counter)

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {"scenes": self.scenes_per_split[s], "samples": len(self.splits[s])} for s in SPLITS}


def build_policy_data(
    scenes: Sequence[Scene], split: SplitConfig, *, exclude: set[SceneKey] | frozenset = frozenset()
) -> PolicyData:
    """Turn samples of ``scenes`` minus the ``exclude`` keys, assigned to splits by conversation.

    Raises ValueError when a holdout book has no scene, so a misspelt title does not pass silently.
    """
    books = {s.book.strip().casefold(): s.book for s in scenes}
    missing = [b for b in split.holdout_books if b.strip().casefold() not in books]
    if missing:
        raise ValueError(f"holdout book(s) {missing} match no scene; the sources hold {sorted(books.values())}")
    data = PolicyData(splits={s: [] for s in SPLITS})
    for scene in scenes:
        key = key_of(scene)
        if key in exclude:
            data.excluded.append((scene.book, scene.i_p, scene.i_c))
            continue
        samples = turn_samples(scene)
        if not samples:
            data.scenes_without_turns.append(scene.sample_id)
            continue
        name = split.split_of(key)
        data.splits[name].extend(samples)
        data.scenes_per_split[name] += 1
    return data


# --- rows and export -----------------------------------------------------------------------------


def _ids(ts: TurnSample) -> dict[str, Any]:
    return {"sample_id": ts.sample_id, "scene_id": ts.scene.sample_id, "book": ts.scene.book,
            "character": ts.character, "line": ts.line}


def sft_row(ts: TurnSample) -> dict[str, Any]:
    return {**_ids(ts), "prompt": ts.prompt(), "completion": [ts.target()]}


def grpo_row(ts: TurnSample) -> dict[str, Any]:
    return {**_ids(ts), "prompt": ts.prompt(), "reference": ts.reference()}


def verl_row(ts: TurnSample, split: str, index: int) -> dict[str, Any]:
    prompt = ts.prompt()
    return {
        "data_source": VERL_DATA_SOURCE,
        "prompt": prompt,
        "ability": "roleplay",
        "reward_model": {"style": "model", "ground_truth": ts.reference()},
        "extra_info": {"split": split, "index": index, "prompt": prompt, **_ids(ts)},
    }


def export_policy_data(data: PolicyData, out: str | Path, *, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``sft/``, ``grpo/`` and ``verl/`` (``<split>.jsonl`` + ``<split>.parquet``) and
    ``summary.json`` under ``out``; return the summary (``report`` entries first).

    An empty split writes no files (``datasets`` cannot read an empty parquet back); the summary
    lists the files written.
    """
    import datasets

    out = Path(out)
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar per file would drown the counts the CLI prints
    try:
        files = _write_splits(data, out)
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    summary = {
        **(report or {}),
        "splits": data.counts(),
        "excluded": {"count": len(data.excluded), "scenes": [list(k) for k in data.excluded]},
        "scenes_without_turns": data.scenes_without_turns,
        "files": files,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def _write_splits(data: PolicyData, out: Path) -> list[str]:
    from datasets import Dataset

    files: list[str] = []
    for name, samples in data.splits.items():
        if not samples:
            continue
        shapes = {
            "sft": [sft_row(ts) for ts in samples],
            "grpo": [grpo_row(ts) for ts in samples],
            "verl": [verl_row(ts, name, i) for i, ts in enumerate(samples)],
        }
        for shape, rows in shapes.items():
            folder = out / shape
            folder.mkdir(parents=True, exist_ok=True)
            dataset = Dataset.from_list(rows)
            dataset.to_json(folder / f"{name}.jsonl", force_ascii=False)
            dataset.to_parquet(folder / f"{name}.parquet")
            files += [f"{shape}/{name}.jsonl", f"{shape}/{name}.parquet"]
    return files


def build_and_export(
    sources: Sequence[str | Path],
    out: str | Path,
    split: SplitConfig,
    *,
    exclude_files: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Load ``sources``, drop the scenes of ``exclude_files``, split, export; return the summary."""
    load = LoadReport()
    scenes = load_sources(sources, report=load)
    data = build_policy_data(scenes, split, exclude=evaluation_keys(exclude_files) if exclude_files else set())
    report = {
        "sources": [str(p) for p in sources],
        "exclude_files": [str(p) for p in exclude_files],
        "fractions": list(split.fractions),
        "holdout_books": list(split.holdout_books),
        "seed": split.seed,
        "scenes_loaded": len(scenes),
        "dropped_on_load": dict(load.dropped),
    }
    return export_policy_data(data, out, report=report)
