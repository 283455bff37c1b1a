"""Rollout-shaped labelled pairs: the book's line against a policy sample (the real bundled model) or against the
same character's line from another moment of the scene."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from data_builder import policy_sample_pairs, wrong_moment_pairs
from data_builder._books import load_book
from data_builder._rollout_pairs import MIN_DISTANCE
from her_cli.main import main
from her_genrm import LabelledPair
from her_roleplay import as_her, for_judging, parse_reply, render_her, strip_system_thinking

COSER = Path(__file__).resolve().parent / "data" / "coser"


def _book_line(scene, index: int) -> str:
    reply, _ = parse_reply(strip_system_thinking(as_her(scene.dialogues[index].message)))
    return for_judging(render_her(reply))


def _sides(pair: LabelledPair) -> tuple[str, str]:
    """(the book's line at the pair's turn, the other reply)."""
    return (pair.a, pair.b) if pair.label == "a" else (pair.b, pair.a)


def test_wrong_moment_pairs_hold_the_same_characters_line_from_elsewhere():
    scenes = load_book(COSER / "book_king_lear.json")
    pairs = wrong_moment_pairs(scenes, per_turn=2, seed=5)
    assert pairs and len({p.id for p in pairs}) == len(pairs)
    by_scene = {s.sample_id: s for s in scenes}
    for pair in pairs:
        scene = by_scene[pair.scene_id]
        real, other = _sides(pair)
        assert pair.source == "wrong_moment" and pair.label in ("a", "b")
        assert real == _book_line(scene, pair.turn) and other != real
        moments = [i for i, line in enumerate(scene.dialogues)
                   if line.character == pair.character and _book_line(scene, i) == other]
        assert moments and all(abs(i - pair.turn) >= MIN_DISTANCE for i in moments)  # the same voice, elsewhere
        assert pair.context.endswith(f"Next turn: {pair.character}")
        outcomes = {c.principle: c.winner for c in pair.comparisons}
        assert outcomes["responds_to_last_turn"] == pair.label and list(outcomes.values()).count("tie") == 2
    labels = Counter(p.label for p in pairs)
    assert min(labels["a"], labels["b"]) > 0.35 * len(pairs)  # the book's line in either slot
    assert wrong_moment_pairs(scenes, per_turn=2, seed=5) == pairs  # deterministic per seed
    assert wrong_moment_pairs(scenes, per_turn=2, seed=6) != pairs


def test_rollout_pairs_command_refuses_an_unknown_family_and_writes_wrong_moments(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    common = ["build", "rollout-pairs", "--sources", str(COSER / "book_othello.json"), "--out", str(out)]
    assert main([*common, "--families", "wrong_moment,paraphrase"]) == 2
    assert "unknown families ['paraphrase']" in capsys.readouterr().err
    assert main([*common, "--families", "wrong_moment", "--exclude", str(COSER / "example_test_set.json")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = [LabelledPair.model_validate_json(line) for line in out.read_text().splitlines()]
    assert summary["by_family"] == {"wrong_moment": len(written)} and written


@pytest.mark.model
async def test_policy_sample_pairs_put_the_book_against_the_real_models_reply(engine):
    scene = load_book(COSER / "book_othello.json")[0]
    pairs, dropped = await policy_sample_pairs([scene], engine, turns_per_scene=3, max_tokens=40, seed=2)
    assert len(pairs) + sum(dropped.values()) == 3  # every sampled turn is a pair or a counted drop
    assert pairs
    for pair in pairs:
        real, sample = _sides(pair)
        assert pair.source == "policy_sample" and pair.comparisons == [] and pair.pattern is None
        assert real == _book_line(scene, pair.turn) and sample.strip() and sample != real
        assert "<system_thinking>" not in sample  # the judge sees what an audience and the speaker's mind see
