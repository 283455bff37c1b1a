"""`her eval judge`: the agreement metrics on hand-made verdicts (exact numbers), then real runs with the
bundled model: through the library on the session vLLM engine, and as a command on the transformers engine.

The labelled pairs are built here from the fixture scene: a character's real line from the book against
the same line corrupted with a known flaw, so the label is known by construction.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval import (
    JudgeEvalConfig,
    JudgeSpec,
    Rate,
    agreement_metrics,
    calibration,
    evaluate_judges,
    first_slot_win_rate,
    load_labelled_pairs,
    prefer_longer_rate,
    read_verdict_records,
    wilson_interval,
)
from her_engines import ChatMessage
from her_genrm import GenRM, JudgeRequest, LabelledPair, OrderResult, Verdict
from her_roleplay import Scene, coser_to_her, public_view

ASSISTANT_VOICE = "As an AI language model, I am happy to help you with this role-play request. "


# ---------------------------------------------------------------- metrics on hand-made verdicts


def _pair(pid: str, label: str, flaw: str | None, len_a: int, len_b: int, pattern: str | None) -> LabelledPair:
    return LabelledPair(id=pid, context="User: hi", a="x" * len_a, b="y" * len_b, label=label, pattern=pattern,
                        source="hard_negative" if flaw else "teacher", flaw_kind=flaw)


def _orders(*answers: tuple[bool, str | None]) -> list[OrderResult]:
    """(a_first, winner) per order; winner None is a failed order."""
    return [OrderResult(a_first=f, status="ok", winner=w) if w else OrderResult(a_first=f, status="error", error="x")
            for f, w in answers]


def _verdict(winner: str | None, orders: list[OrderResult]) -> Verdict:
    consistent = len({o.winner for o in orders}) == 1 if len(orders) == 2 else None
    if winner is None:
        return Verdict(status="error", error="bad output", orders=orders)
    return Verdict(verdict=winner, consistent=consistent, orders=orders)


@pytest.fixture
def hand_made() -> tuple[list[LabelledPair], list[Verdict]]:
    pairs = [
        _pair("p1", "a", "assistant_voice", 10, 20, "all_a"),
        _pair("p2", "a", "assistant_voice", 10, 5, "all_a"),
        _pair("p3", "b", "mind_reading", 8, 8, "all_b"),
        _pair("p4", "b", "mind_reading", 4, 12, "all_b"),
        _pair("p5", "tie", None, 6, 7, "tie"),
        _pair("p6", "a", "broken_format", 30, 3, None),
    ]
    verdicts = [
        _verdict("a", _orders((True, "a"), (False, "a"))),  # right, consistent, picked the shorter
        _verdict("b", _orders((True, "b"), (False, "b"))),  # wrong, consistent, picked the shorter
        _verdict("tie", _orders((True, "a"), (False, "b"))),  # orders disagree: both times the first slot won
        _verdict(None, _orders((True, "a"), (False, None))),  # an error; its ok order still shows slot bias
        _verdict("tie", _orders((True, "tie"), (False, "tie"))),  # right (a tie label)
        _verdict("a", _orders((True, "a"))),  # judged without swap: right, picked the longer
    ]
    return pairs, verdicts


def _value(metric: dict) -> tuple[int, int]:
    return metric["hits"], metric["n"]


def test_agreement_metrics_on_hand_made_verdicts(hand_made):
    m = agreement_metrics(*hand_made)
    assert (m["pairs"], m["judged_ok"]) == (6, 5)
    assert _value(m["accuracy"]) == (3, 5)  # p1, p5, p6 right; the error p4 is not counted
    assert m["accuracy"]["value"] == pytest.approx(0.6)
    assert _value(m["accuracy_errors_as_wrong"]) == (3, 6)
    assert _value(m["errors"]) == (1, 6)
    assert _value(m["swap_consistency"]) == (3, 4)  # p6 had one order only
    assert _value(m["first_slot_win_rate"]) == (6, 8)  # p1 1/2, p2 1/2, p3 2/2, p4 1/1 (ok order), p6 1/1
    assert _value(m["prefer_longer_rate"]) == (1, 3)  # p1, p2 picked the shorter, p6 the longer
    assert _value(m["tie_rate"]) == (2, 5)
    assert {k: _value(v) for k, v in m["by_flaw_kind"].items()} == {
        "assistant_voice": (1, 2), "broken_format": (1, 1), "mind_reading": (0, 1), "none": (1, 1)}
    assert {k: _value(v) for k, v in m["by_pattern"].items()} == {
        "all_a": (1, 2), "all_b": (0, 1), "none": (1, 1), "tie": (1, 1)}
    families = {k: {metric: _value(r) for metric, r in v.items()} for k, v in m["by_family"].items()}
    assert families == {  # p5 is the one teacher pair; its tie orders name no slot
        "hard_negative": {"accuracy": (2, 4), "swap_consistency": (2, 3), "first_slot_win_rate": (6, 8)},
        "teacher": {"accuracy": (1, 1), "swap_consistency": (1, 1), "first_slot_win_rate": (0, 0)},
    }
    assert m["worst_family"]["family"] == "hard_negative" and _value(m["worst_family"]) == (2, 4)
    lo, hi = m["accuracy"]["ci95"]
    assert (lo, hi) == pytest.approx(wilson_interval(3, 5))
    json.dumps(m)  # metrics.json material


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 4) == pytest.approx((0.0, 0.4899), abs=1e-4)
    assert wilson_interval(0, 0) is None
    for n in range(1, 60):  # the estimate lies inside its interval exactly, even at 0 and 1 (chart whiskers)
        for hits in range(n + 1):
            lo, hi = wilson_interval(hits, n)
            assert 0.0 <= lo <= hits / n <= hi <= 1.0
    with pytest.raises(ValueError, match="hits"):
        wilson_interval(3, 2)


def test_a_rate_without_data_is_no_data_not_zero():
    assert Rate(0, 0).to_dict() == {"value": None, "hits": 0, "n": 0, "ci95": None}
    all_ties = [_verdict("tie", _orders((True, "tie"), (False, "tie")))]
    assert first_slot_win_rate(all_ties).value is None
    same_length = [_pair("p", "a", "x", 5, 5, None)]
    assert prefer_longer_rate(same_length, [_verdict("a", _orders((True, "a"), (False, "a")))]).n == 0


def test_metrics_need_one_verdict_per_pair(hand_made):
    pairs, verdicts = hand_made
    with pytest.raises(ValueError, match="6 pairs but 5 verdicts"):
        agreement_metrics(pairs, verdicts[:5])


def test_judge_spec_and_pair_file_errors(tmp_path):
    assert JudgeSpec.parse("trained=runs/genrm/final") == JudgeSpec("trained", "runs/genrm/final")
    with pytest.raises(ValueError, match="NAME=MODEL"):
        JudgeSpec.parse("smollm2-135m-instruct")
    with pytest.raises(ValueError, match="judge name"):
        JudgeSpec.parse("a/b=model")
    bad = tmp_path / "pairs.jsonl"
    good = _pair("p1", "a", "assistant_voice", 3, 4, "all_a").model_dump_json()
    bad.write_text(good + "\n" + '{"id": "p2", "a": "x"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: not a LabelledPair"):
        load_labelled_pairs(bad)
    assert [p.id for p in load_labelled_pairs(bad, limit=1)] == ["p1"]
    bad.write_text(good + "\n" + good + "\n")
    with pytest.raises(ValueError, match=r"repeated: \['p1'\]"):
        load_labelled_pairs(bad)


# ---------------------------------------------------------------- real runs with the bundled model


def labelled_pairs_from_scene(scene: Scene, n: int) -> list[LabelledPair]:
    """`n` hard negatives: a real line vs the same line in an assistant's voice or with its tags broken;
    the real line alternates between slots a and b."""
    lines = [(d.character, coser_to_her(d.message)) for d in scene.dialogues]
    pairs = []
    for k in range(n):
        turn = 1 + k % (len(lines) - 1)
        speaker, real = lines[turn]
        context = [ChatMessage(role="user", content=f"{who}: {public_view(text)}")
                   for who, text in lines[max(0, turn - 2) : turn]]
        if k % 2 == 0:
            flaw, bad = "assistant_voice", ASSISTANT_VOICE + real
        else:
            flaw, bad = "broken_format", real.replace("</role_action>", "").replace("</role_thinking>", "") + " </"
        a, b, label = (real, bad, "a") if k % 3 else (bad, real, "b")
        pairs.append(LabelledPair(id=f"pp-{k}", context=context, a=a, b=b, label=label, pattern=f"all_{label}",
                                  source="hard_negative", flaw_kind=flaw, book="Pride and Prejudice",
                                  turn=turn, character=speaker))
    return pairs


def _check_outputs(out: Path, names: list[str], pairs: int) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert [j["name"] for j in metrics["judges"]] == names
    assert metrics["pairs"] == pairs
    report = (out / "report.md").read_text()
    for title in ("Accuracy", "Swap consistency", "First-slot win rate", "Prefer-longer rate", "Tie rate",
                  "Parse failures / errors", "Accuracy by flaw kind"):
        assert f"## {title}" in report
    for png in ("judge_accuracy.png", "judge_accuracy_by_flaw_kind.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert f"]({png})" in report
    return metrics


@pytest.mark.model
async def test_two_judges_side_by_side_on_the_session_engine(engine, scene, tmp_path):
    pairs = labelled_pairs_from_scene(scene, 6)
    out = tmp_path / "judge-eval"
    judges = [JudgeSpec("base", "smollm2-135m-instruct"), JudgeSpec("again", "smollm2-135m-instruct")]
    config = JudgeEvalConfig(out_dir=out, modes=("fast",), batch_size=4, progress=False)
    summary = await evaluate_judges(pairs, judges, config, engines={"base": engine, "again": engine})

    metrics = _check_outputs(out, ["base", "again"], 6)
    assert metrics == json.loads(json.dumps(summary))
    for judge in metrics["judges"]:
        saved_pairs, verdicts = read_verdict_records(out / judge["verdicts_file"])
        assert [p.id for p in saved_pairs] == [p.id for p in pairs]
        assert saved_pairs == pairs  # the whole record survives the round trip
        # the reported numbers are exactly what the saved per-pair records give
        assert agreement_metrics(saved_pairs, verdicts) == judge["metrics"]
        m = judge["metrics"]
        assert m["accuracy"]["n"] + m["errors"]["hits"] == 6
        assert m["accuracy"]["hits"] == sum(v.status == "ok" and v.verdict == p.label
                                            for p, v in zip(saved_pairs, verdicts, strict=True))
        assert all(len(v.orders) == 2 and {o.a_first for o in v.orders} == {True, False} for v in verdicts)
        assert m["first_slot_win_rate"]["n"] == sum(o.status == "ok" and o.winner != "tie"
                                                    for v in verdicts for o in v.orders)
        assert set(m["by_flaw_kind"]) == {"assistant_voice", "broken_format"}
        assert judge["engine"] == "vllm" and judge["principle_detail"] == "id"
        assert judge["usage"]["calls"] == 12
    # fast mode is deterministic: the same model judged twice gives the same numbers (probabilities up to
    # the float noise of a different batch composition)
    first, again = (dict(j["metrics"]) for j in metrics["judges"])
    first_cal, again_cal = first.pop("calibration"), again.pop("calibration")
    assert first == again
    assert (first_cal["ece"], first_cal["brier"]) == pytest.approx((again_cal["ece"], again_cal["brier"]), abs=1e-4)
    report = (out / "report.md").read_text()
    assert "| base |" in report and "| again |" in report and "| Group | base | again |" in report
    # a given engine belongs to the caller: still open after the run
    [verdict] = await GenRM(engine).judge([JudgeRequest(context="User: hi", a="Hello!", b="...", mode="fast")])
    assert verdict.status == "ok"


@pytest.mark.model
async def test_both_modes_of_one_loaded_judge_report_calibration(engine, scene, tmp_path):
    pairs = labelled_pairs_from_scene(scene, 3)
    out = tmp_path / "modes"
    config = JudgeEvalConfig(out_dir=out, modes=("fast", "cot"), batch_size=4, progress=False)
    await evaluate_judges(pairs, [JudgeSpec("base", "smollm2-135m-instruct")], config, engines={"base": engine})
    metrics = _check_outputs(out, ["base-fast", "base-cot"], 3)
    assert [j["mode"] for j in metrics["judges"]] == ["fast", "cot"]
    for judge in metrics["judges"]:
        saved_pairs, verdicts = read_verdict_records(out / judge["verdicts_file"])
        assert {v.mode for v in verdicts} == {judge["mode"]}
        cal = judge["metrics"]["calibration"]
        assert cal == calibration(saved_pairs, verdicts) and cal["n"] == sum(v.status == "ok" for v in verdicts)
        if cal["n"]:
            assert 0.0 <= cal["ece"] <= 1.0 and sum(b["n"] for b in cal["bins"]) == cal["n"]
    report = (out / "report.md").read_text()
    assert "## Calibration of P(a≻b)" in report and "](judge_reliability.png)" in report
    assert (out / "judge_reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_calibration_bins_ece_and_brier_by_hand():
    pairs = [_pair(f"p{i}", label, "assistant_voice", 3, 4, f"all_{label}") for i, label in enumerate("aaab")]
    verdicts = [Verdict(verdict="a", p_a=p) for p in (0.95, 0.92, 0.15, 0.12)]
    cal = calibration(pairs, verdicts)
    # bin [0.9, 1.0]: two pairs, mean p 0.935, both labelled a; bin [0.1, 0.2): mean p 0.135, one of two is a
    assert [(b["lo"], b["n"]) for b in cal["bins"]] == [(0.1, 2), (0.9, 2)]
    assert cal["ece"] == pytest.approx((2 * abs(0.5 - 0.135) + 2 * abs(1.0 - 0.935)) / 4)
    assert cal["brier"] == pytest.approx((0.05**2 + 0.08**2 + 0.85**2 + 0.12**2) / 4)
    assert calibration(pairs, [Verdict(status="error", error="x")] * 4) == {"n": 0, "ece": None, "brier": None,
                                                                             "bins": []}


@pytest.mark.model
def test_eval_judge_command_on_the_transformers_engine(scene, tmp_path):
    src, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    src.write_text("".join(p.model_dump_json() + "\n" for p in labelled_pairs_from_scene(scene, 6)))
    her = Path(sys.executable).with_name("her")
    done = subprocess.run([str(her), "eval", "judge", "--pairs", str(src), "--judge", "base=smollm2-135m-instruct",
                           "--engine", "transformers", "--threads", "1", "--limit", "4", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=600)  # hang guard only
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = _check_outputs(out, ["base"], 4)
    assert metrics["judges"][0]["engine"] == "transformers"
    assert len((out / "verdicts_base.jsonl").read_text().splitlines()) == 4
    assert "base: accuracy" in done.stdout and "report.md" in done.stdout


def test_eval_judge_command_rejects_a_bad_judge_before_loading(tmp_path):
    src = tmp_path / "pairs.jsonl"
    src.write_text(_pair("p1", "a", "assistant_voice", 3, 4, "all_a").model_dump_json() + "\n")
    her = Path(sys.executable).with_name("her")
    done = subprocess.run([str(her), "eval", "judge", "--pairs", str(src), "--judge", "smollm2-135m-instruct",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "NAME=MODEL" in done.stderr
    assert not (tmp_path / "out").exists()


def test_demo_matrix_marks_unseen_families_and_heads_with_the_worst(hand_made):
    """bench/genrm_demo.py's train-set x family matrix, from `her eval judge` metrics."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("genrm_demo", Path(__file__).parents[1] / "bench" / "genrm_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    m = agreement_metrics(*hand_made)
    metrics = {"judges": [{"name": "base", "mode": "fast", "metrics": m},
                          {"name": "hn", "mode": "fast", "metrics": m}]}
    table = demo.matrix(metrics, {"hn": ["hard_negative"]})
    base, trained = table["rows"]
    assert base["trained_on"] == [] and not any(c["seen"] for c in base["cells"].values())
    assert set(trained["cells"]) == {"hard_negative"} and trained["cells"]["hard_negative"]["seen"]  # demo families
    # the base model saw no family: its worst is hard_negative (2/4); the trained judge saw that one, and the
    # families of the demo it did not see are absent from these pairs: no unseen cell, no headline
    assert base["worst_unseen"] == {"family": "hard_negative", "accuracy": 0.5}
    assert trained["worst_unseen"] is None
    text = demo.render_matrix(table)
    assert "**0.500**" in text and "| hn | fast | hard_negative | 0.500" in text
    assert demo.parse_train_set("all=hard_negative+wrong_moment") == ("all", ["hard_negative", "wrong_moment"], set())
    assert demo.parse_train_set("c=policy_sample:consistency:rl") == ("c", ["policy_sample"], {"consistency", "rl"})
    for bad in ("x=paraphrase", "x=hard_negative:dpo", "a-rl=hard_negative"):  # NAME-rl names the rl stage's judge
        with pytest.raises(SystemExit, match="NAME=FAMILY"):
            demo.parse_train_set(bad)
