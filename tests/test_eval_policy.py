"""`her eval policy`: policies sampled on held-out prompts and judged by the served judge as RL rewards them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _pairs import short_rows

HER = str(Path(sys.executable).with_name("her"))


def test_text_stats_count_format_passes_length_and_distinct_n():
    from eval._policy_eval import text_stats

    rows = [{"character": "Elizabeth"}] * 3
    good = "<system_thinking>Plan: stay calm.</system_thinking><role_action>smiles</role_action> Good day to you."
    broken = "<role_action>smiles Good day"  # an unclosed tag
    stats = text_stats(rows, [good, broken, None])
    assert stats["samples"] == 2 and stats["generation_errors"] == 1
    assert stats["format_pass_rate"] == 0.5
    assert 0 < stats["distinct_1"] <= 1 and 0 < stats["distinct_2"] <= 1 and stats["mean_words"] > 0


@pytest.mark.model
def test_two_policies_on_held_out_prompts_under_the_served_judge(rm_server, scene, tmp_path):
    """The same model twice, same seeds: the same samples (sampling is seeded per prompt); each policy is judged
    against the book on every prompt and head to head, with nothing lost. (Identical candidates do not make an
    exact tie: the two orders' probabilities differ in the last digits between engine batches.)"""
    prompts = short_rows(scene, tmp_path / "test.jsonl")  # short contexts: a CPU forward costs about its length
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    out = tmp_path / "eval"
    proc = subprocess.run(
        [HER, "eval", "policy", "--prompts", str(prompts), "--policy", "a=smollm2-135m-instruct",
         "--policy", "b=smollm2-135m-instruct", "--engine", "transformers", "--max-tokens", "48",
         "--judge-url", rm_server.base_url, "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == len(rows) == 2
    for name in ("a", "b"):
        m = metrics["policies"][name]
        win = m["win_rate_vs_book"]
        assert win["judged"] == len(rows) and win["errors"] == 0 and 0.0 <= win["rate"] <= 1.0
        assert 0.0 <= m["format_pass_rate"] <= 1.0 and m["mean_words"] > 0
        samples = [json.loads(line) for line in (out / f"samples_{name}.jsonl").read_text().splitlines()]
        assert [s["reference"] for s in samples] == [r["reference"] for r in rows]
        assert all(s["sample"] and s["reward_vs_book"] in (0.0, 0.5, 1.0) for s in samples)
    written = {name: [json.loads(line)["sample"] for line in (out / f"samples_{name}.jsonl").read_text().splitlines()]
               for name in ("a", "b")}
    assert written["a"] == written["b"]
    a, b = metrics["policies"]["a"], metrics["policies"]["b"]
    assert {k: v for k, v in a.items() if k != "win_rate_vs_book"} == {k: v for k, v in b.items()
                                                                        if k != "win_rate_vs_book"}
    duel = metrics["head_to_head"]["a_vs_b"]
    assert duel["judged"] == len(rows) and duel["errors"] == 0 and 0.0 <= duel["rate"] <= 1.0
    assert "a: win rate vs the book" in proc.stdout
