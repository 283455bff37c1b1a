"""HER stage 6: balance judged preference pairs by judgment pattern.

A collapsed judge (or a collapsed training set) prefers one pattern; HER keeps the GenRM's
training mix at Mixed 60% / All-A 15% / All-B 15% / Tie 10%, with a few flipped hard negatives
(pairs whose candidates are swapped so the label flips) to keep position bias out.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_MIX = {"mixed": 0.60, "all_a": 0.15, "all_b": 0.15, "tie": 0.10}
_FLIP_PATTERN = {"all_a": "all_b", "all_b": "all_a", "mixed": "mixed", "tie": "tie"}
_FLIP_WINNER = {"a": "b", "b": "a", "tie": "tie"}


@dataclass
class MixConfig:
    total: int | None = None
    """Pairs to keep; None: as many as the scarcest bucket allows at the target mix."""
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    flip_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if abs(sum(self.mix.values()) - 1.0) > 1e-6:
            raise ValueError(f"mix shares must sum to 1, got {sum(self.mix.values()):.3f} from {self.mix}")
        unknown = set(self.mix) - set(DEFAULT_MIX)
        if unknown:
            raise ValueError(f"unknown patterns in mix: {sorted(unknown)}; expected {sorted(DEFAULT_MIX)}")
        if not 0.0 <= self.flip_fraction <= 1.0:
            raise ValueError(f"flip_fraction must be within [0, 1], got {self.flip_fraction}")


def flip(record: dict) -> dict:
    """The same pair with the candidates swapped, and every label mirrored."""
    out = {**record, "a": record["b"], "b": record["a"], "flipped": not record.get("flipped", False)}
    if record.get("verdict") is not None:
        out["verdict"] = _FLIP_WINNER[record["verdict"]]
    if record.get("pattern") is not None:
        out["pattern"] = _FLIP_PATTERN[record["pattern"]]
    if record.get("p_a") is not None:
        out["p_a"] = 1.0 - record["p_a"]
    out["comparisons"] = [{**c, "winner": _FLIP_WINNER[c["winner"]]} for c in record.get("comparisons", [])]
    return out


def balance(records: Sequence[dict], config: MixConfig | None = None) -> list[dict]:
    """Sample judged pairs (status ok, with a pattern) to the target pattern mix."""
    config = config or MixConfig()
    rng = random.Random(config.seed)
    buckets: dict[str, list[dict]] = {p: [] for p in DEFAULT_MIX}
    for r in records:
        if r.get("status") == "ok" and r.get("pattern") in buckets:
            buckets[r["pattern"]].append(r)
    wanted = {p: share for p, share in config.mix.items() if share > 0}
    if config.total is None:
        total = min(int(len(buckets[p]) / share) for p, share in wanted.items()) if wanted else 0
    else:
        total = config.total
    picked: list[dict] = []
    for pattern, share in wanted.items():
        need = round(total * share)
        if need > len(buckets[pattern]):
            raise ValueError(f"bucket {pattern!r} has {len(buckets[pattern])} pairs but the mix needs {need}; "
                             f"lower --total or judge more pairs")
        picked += rng.sample(buckets[pattern], need)
    rng.shuffle(picked)
    n_flip = round(len(picked) * config.flip_fraction)
    for i in rng.sample(range(len(picked)), n_flip):
        picked[i] = flip(picked[i])
    return picked
