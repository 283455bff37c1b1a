"""data_builder: SFT samples from the fixture scene, and pattern balancing of judged pairs."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from data_builder import DEFAULT_MIX, MixConfig, balance, flip, sft_records
from her_cli import main


def test_sft_records_one_per_character_ending_on_their_turn(scene):
    rows = sft_records([scene])
    characters = {r["character"] for r in rows}
    assert characters == {"Mr Bennet", "Elizabeth Bennet"}
    for r in rows:
        assert r["messages"][0]["role"] == "system"
        assert r["messages"][1]["content"].startswith("===Conversation Start===")
        assert r["messages"][-1]["role"] == "assistant"


def test_build_sft_cli_writes_jsonl(tmp_path, scene_file):
    out = tmp_path / "sft.jsonl"
    assert main(["build", "sft", "--scenes", str(scene_file), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2


def _records(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    patterns = rng.choices(list(DEFAULT_MIX), weights=[0.3, 0.4, 0.2, 0.1], k=n)  # skewed, like a real judge
    return [{"a": f"a{i}", "b": f"b{i}", "status": "ok", "pattern": p, "verdict": "a" if p == "all_a" else "b",
             "p_a": 0.9, "comparisons": [{"principle": "x", "winner": "a"}]} for i, p in enumerate(patterns)]


def test_balance_hits_the_target_mix_and_flips_a_few():
    picked = balance(_records(2000), MixConfig(total=400, flip_fraction=0.05, seed=3))
    assert len(picked) == 400
    counts = Counter(r["pattern"] for r in picked)
    flipped = [r for r in picked if r.get("flipped")]
    assert len(flipped) == 20
    # flips move all_a ↔ all_b, so compare the mix before flipping
    unflipped = Counter(flip(r)["pattern"] if r.get("flipped") else r["pattern"] for r in picked)
    assert unflipped == {"mixed": 240, "all_a": 60, "all_b": 60, "tie": 40}
    assert sum(counts.values()) == 400


def test_balance_refuses_an_impossible_mix_and_skips_errors():
    records = _records(50) + [{"a": "x", "b": "y", "status": "error", "pattern": None}]
    with pytest.raises(ValueError, match="bucket"):
        balance(records, MixConfig(total=1000))
    auto = balance(records, MixConfig(flip_fraction=0.0))
    assert all(r["status"] == "ok" for r in auto) and auto


def test_flip_mirrors_every_label():
    r = {"a": "1", "b": "2", "verdict": "a", "pattern": "all_a", "p_a": 0.8,
         "comparisons": [{"principle": "p", "winner": "a"}]}
    f = flip(r)
    assert (f["a"], f["b"], f["verdict"], f["pattern"], f["comparisons"][0]["winner"]) == ("2", "1", "b", "all_b", "b")
    assert f["p_a"] == pytest.approx(0.2) and flip(f)["flipped"] is False


def test_build_pairs_cli_exports_a_dataset(tmp_path):
    src = tmp_path / "verdicts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _records(300)))
    assert main(["build", "pairs", "--verdicts", str(src), "--out", str(tmp_path / "out"), "--total", "100"]) == 0
    from datasets import load_from_disk

    ds = load_from_disk(str(tmp_path / "out" / "dataset"))
    assert len(ds) == 100 and {"a", "b", "pattern"} <= set(ds.column_names)
