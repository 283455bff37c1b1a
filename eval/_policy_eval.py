"""`her eval policy`: policies' replies on held-out prompts, judged by a served GenRM the way RL rewards them.

Each ``--policy NAME=MODEL`` answers every prompt of a GRPO row file (`her build policy`'s grpo/test.jsonl:
``prompt``, ``reference``, ``character``), one model loaded at a time, seeded so reruns write the same
samples. The served judge then scores each sample against the book's line with the reward client RL uses
(reference strategy, both orders, discrete: win 1, tie 0.5, loss 0): the mean is the policy's **win rate
against the book**. With two or more policies, the first is also judged head to head against each other
(its sample as the rollout, the other's as the reference). Beside the judge's view: the share of samples
that pass the dual-layer validator (`her_roleplay.validate_reply`), mean visible words, and distinct-1/2.

A sample the judge could not score counts as an error, never as a loss. CIs are 95% t-intervals of the
mean (per-prompt rewards).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._report import mean_ci

WIN_AGAINST_BOOK = "win_rate_vs_book"


@dataclass(frozen=True)
class PolicySpec:
    name: str
    model: str

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        name, sep, model = text.partition("=")
        if not sep or not name.strip() or not model.strip():
            raise ValueError(f"--policy {text!r}: expected NAME=MODEL, e.g. sft=runs/sft")
        return cls(name.strip(), model.strip())


def read_prompt_rows(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """GRPO rows (``prompt`` messages, ``reference`` text, optional ``character``)."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("prompt"), list) or not isinstance(row.get("reference"), str):
            raise ValueError(f"{path}:{number}: a row needs `prompt` (messages) and `reference` (text)")
        rows.append(row)
    return rows[:limit] if limit is not None else rows


def _seed(row: dict[str, Any], index: int, seed: int) -> int:
    key = f"{seed}:{row.get('scene_id', '')}:{row.get('character', '')}:{index}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


async def sample_policy(engine: Any, rows: Sequence[dict[str, Any]], *, max_tokens: int, temperature: float,
                        seed: int, batch_size: int = 8) -> list[str | None]:
    """One reply per row (None where the engine failed)."""
    from her_engines import ChatMessage, GenRequest

    out: list[str | None] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        results = await engine.generate([
            GenRequest(messages=[ChatMessage(**m) for m in row["prompt"]], max_tokens=max_tokens,
                       temperature=temperature, seed=_seed(row, start + i, seed))
            for i, row in enumerate(chunk)])
        out += [r.text if r.finish_reason != "error" else None for r in results]
    return out


def text_stats(rows: Sequence[dict[str, Any]], samples: Sequence[str | None]) -> dict[str, Any]:
    """Validator pass rate, mean visible words and distinct-1/2 of a policy's samples."""
    from her_roleplay import for_judging, validate_reply

    written = [(row, s) for row, s in zip(rows, samples, strict=True) if s is not None]
    passed = [not validate_reply(s, speaker=row.get("character"), require_system_thinking=True)
              for row, s in written]
    words = [for_judging(s).split() for _, s in written]
    unigrams = [w for ws in words for w in ws]
    bigrams = [tuple(ws[i:i + 2]) for ws in words for i in range(len(ws) - 1)]
    return {
        "samples": len(written),
        "generation_errors": len(samples) - len(written),
        "format_pass_rate": statistics.fmean(passed) if passed else None,
        "mean_words": statistics.fmean(len(ws) for ws in words) if words else None,
        "distinct_1": len(set(unigrams)) / len(unigrams) if unigrams else None,
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else None,
    }


def judged_rate(client: Any, rows: Sequence[dict[str, Any]], samples: Sequence[str | None],
                references: Sequence[str | None]) -> dict[str, Any]:
    """Mean reward of ``samples`` against ``references`` under the served judge, with its 95% CI."""
    keep = [i for i, (s, r) in enumerate(zip(samples, references, strict=True)) if s is not None and r is not None]
    rewards = client.score_sync([rows[i]["prompt"] for i in keep],
                                [[{"role": "assistant", "content": samples[i]}] for i in keep],
                                reference=[references[i] for i in keep]) if keep else []
    scored = [float(r) for r in rewards if r is not None and not math.isnan(r)]
    mean, half = mean_ci(scored)
    return {"rate": mean, "ci95": None if half is None or mean is None else [mean - half, mean + half],
            "judged": len(scored), "errors": len(rewards) - len(scored), "rewards": rewards}


@dataclass
class PolicyEvalConfig:
    prompts: Path
    policies: list[PolicySpec]
    judge_url: str
    out_dir: Path
    judge_mode: str = "fast"
    limit: int | None = None
    max_tokens: int = 160
    temperature: float = 0.7
    seed: int = 0


def evaluate_policies(config: PolicyEvalConfig, build_engine: Any) -> dict[str, Any]:
    """Sample every policy, judge the samples on the served judge, write samples_NAME.jsonl and metrics.json."""
    from policy_trainer import RewardClient

    rows = read_prompt_rows(config.prompts, config.limit)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    samples: dict[str, list[str | None]] = {}

    async def sample_with(model: str) -> list[str | None]:
        engine = build_engine(model)
        try:
            return await sample_policy(engine, rows, max_tokens=config.max_tokens, temperature=config.temperature,
                                       seed=config.seed)
        finally:
            await engine.aclose()

    for spec in config.policies:
        samples[spec.name] = asyncio.run(sample_with(spec.model))
    client = RewardClient(url=config.judge_url, strategy="reference", judge_mode=config.judge_mode,
                          reward_kind="discrete")
    results: dict[str, Any] = {"prompts": len(rows), "judge_url": config.judge_url, "judge_mode": config.judge_mode,
                               "policies": {}, "head_to_head": {}}
    try:
        references = [row["reference"] for row in rows]
        for spec in config.policies:
            vs_book = judged_rate(client, rows, samples[spec.name], references)
            with (config.out_dir / f"samples_{spec.name}.jsonl").open("w") as f:
                for row, written, reward in zip(rows, samples[spec.name], _spread(vs_book["rewards"],
                                                samples[spec.name]), strict=True):
                    f.write(json.dumps({"prompt": row["prompt"], "reference": row["reference"], "sample": written,
                                        "reward_vs_book": reward}) + "\n")
            vs_book.pop("rewards")
            results["policies"][spec.name] = {"model": spec.model, WIN_AGAINST_BOOK: vs_book,
                                              **text_stats(rows, samples[spec.name])}
        first, *others = config.policies
        for other in others:
            duel = judged_rate(client, rows, samples[first.name], samples[other.name])
            duel.pop("rewards")
            results["head_to_head"][f"{first.name}_vs_{other.name}"] = duel
    finally:
        client.close()
    (config.out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _spread(rewards: Sequence[float | None], samples: Sequence[str | None]) -> list[float | None]:
    """Rewards (one per written sample) back in the positions of all samples."""
    it = iter(rewards)
    return [next(it) if s is not None else None for s in samples]
