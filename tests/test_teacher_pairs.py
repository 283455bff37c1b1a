"""Teacher-labelled pairs with the real bundled model as both policy and teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_builder._books import load_book
from data_builder._teacher_pairs import MIN_TEACHER_COMPARISONS, teacher_pairs
from her_genrm import GenRM, GenRMConfig

COSER = Path(__file__).resolve().parent / "data" / "coser"

pytestmark = pytest.mark.model


async def test_policy_samples_judged_by_a_teacher_that_sees_the_library(engine):
    scene = load_book(COSER / "book_othello.json")[0]
    teacher = GenRM(engine, config=GenRMConfig(principle_detail="definition"))
    assert "mind_reading (neg, sentence):" in teacher.compact.system_text  # definitions in its prompt
    kept, dropped = await teacher_pairs([scene], engine, teacher, turns_per_scene=2, max_tokens=48, seed=3)
    # every sampled turn is accounted for: kept, or dropped with a reason
    assert len(kept) + sum(dropped.values()) == 2
    for pair in kept:
        assert pair.source == "teacher" and pair.scene_id == scene.sample_id
        assert pair.a != pair.b and pair.label in ("a", "b", "tie")
        assert len({c.principle for c in pair.comparisons}) >= MIN_TEACHER_COMPARISONS
        assert pair.pattern in ("all_a", "all_b", "mixed", "tie")
        assert pair.context.endswith(f"Next turn: {pair.character}")


@pytest.mark.own_engine
def test_teacher_pairs_command_writes_judged_and_mixed_files(tmp_path):
    """The README's command end to end (its own vLLM engine, one model for both roles)."""
    import json
    import subprocess
    import sys

    her = Path(sys.executable).with_name("her")
    out = tmp_path / "teacher"
    done = subprocess.run(
        [str(her), "build", "teacher-pairs", "--sources", str(COSER / "example_test_set.json"), "--books", "Othello",
         "--turns-per-scene", "1", "--max-tokens", "40",
         "--policy-kv-cache-gib", "0.5", "--out", str(out)],
        capture_output=True, text=True, timeout=850)  # hang guard only, inside the suite's 900 s per test
    assert (out / "summary.json").exists(), f"exit {done.returncode}: {done.stderr[-3000:]}"
    summary = json.loads((out / "summary.json").read_text())
    # the one Othello scene of the test file, one turn: kept, or dropped with a reason
    assert summary["kept"] + sum(summary["dropped"].values()) == 1, summary
    judged = (out / "judged.jsonl").read_text().splitlines()
    assert len(judged) == summary["kept"]
    assert done.returncode == (0 if summary["kept"] else 1), done.stderr[-2000:]
    assert (out / "pairs.jsonl").exists()
