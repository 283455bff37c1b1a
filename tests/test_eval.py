"""`her eval coser`: the next-speaker rule, who sees what during a re-enactment, the report maths, and
end-to-end runs with the bundled model (locally, resumed after a crash, and judged by a real rm_server).

Scripted engines appear only to unit-test a mechanism (turn order, visibility); every end-to-end run
uses the real model. Real runs use few rounds and short replies to stay cheap on CPU.
"""

from __future__ import annotations

import copy
import json
import random
import re

import httpx
import pytest
import torch
from _servers import serve_app

from eval._api import evaluate_coser
from eval._report import mean_ci, t_quantile_975, write_report
from eval._runner import (
    EvalConfig,
    MeteredEngine,
    RunOutcome,
    TurnJournal,
    load_sample,
    partial_path,
    sample_path,
    write_json_atomic,
)
from eval._simulate import SimulationConfig, Step, simulate
from eval._turns import END_CHAT, resolve_next_speaker
from her_engines import Engine, EngineError, GenRequest, GenResult
from her_genrm import (
    TRANSCRIPT_DIMENSIONS,
    TranscriptScorer,
    TranscriptScorerConfig,
    flaw_type_names,
    transcript_score,
)
from her_genrm._flaws import max_severity
from her_roleplay import Scene, parse_reply, public_view, strip_speaker_prefix
from rm_server import ServerSettings, build_app

SIM = SimulationConfig(max_rounds=2, actor_max_tokens=32, env_max_tokens=24)
JUDGE = TranscriptScorerConfig(max_tokens=80, max_flaws=1, max_instance_chars=24)
ROW_KEYS = {*TRANSCRIPT_DIMENSIONS, "average", "bleu", "rouge_l", "coser_bleu", "coser_rouge_l", "status",
            "sample_id", "run"}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # On a shared 2-core machine one intra-op thread is several times faster than two (measured).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _compact(scene_dict: dict, **changes) -> dict:
    """The fixture with shorter texts (same cast and structure) so CPU runs stay cheap."""
    d = copy.deepcopy(scene_dict)
    d["character_profiles"] = {k: v[:150] for k, v in d["character_profiles"].items()}
    d["plot"]["summary"] = d["plot"]["summary"][:150]
    d["scenario"] = d["scenario"][:150]
    d["dialogues"] = d["dialogues"][:3]
    return {**d, **changes}


def _config(out, **kw) -> EvalConfig:
    base = {
        "out_dir": out,
        "simulation": SIM,
        "progress": False,
        "concurrency": 1,
        "identity": {"actor": "smollm2", "judge": "smollm2-local"},
    }
    return EvalConfig(**{**base, **kw})


# ---------------------------------------------------------------- the next-speaker rule


def test_valid_predictions_pass_and_bad_ones_fall_back_deterministically():
    names = ["Mr Bennet", "Elizabeth Bennet", "Environment"]
    pool = ["Mr Bennet", "Elizabeth Bennet", "Environment"]
    kw = {"current": "Mr Bennet", "candidates": names, "fallback_pool": pool}
    assert resolve_next_speaker("Elizabeth Bennet", end_allowed=False, rng=random.Random(1), **kw) == (
        "Elizabeth Bennet",
        None,
    )
    assert resolve_next_speaker(
        "Next Speaker: elizabeth bennet", end_allowed=False, rng=random.Random(1), **kw
    ) == ("Elizabeth Bennet", None)
    assert resolve_next_speaker(END_CHAT, end_allowed=True, rng=random.Random(1), **kw) == (None, None)
    for predicted, reason in [
        ("Mr Darcy", "unknown_speaker"),
        ("Mr Bennet", "repeated_speaker"),
        (END_CHAT, "end_too_early"),
    ]:
        picks = set()
        for seed in range(40):
            chosen, why = resolve_next_speaker(predicted, end_allowed=False, rng=random.Random(seed), **kw)
            assert why == reason and chosen in ("Elizabeth Bennet", "Environment")  # never the current one
            again, _ = resolve_next_speaker(predicted, end_allowed=False, rng=random.Random(seed), **kw)
            assert again == chosen  # same seed, same choice
            picks.add(chosen)
        assert picks == {"Elizabeth Bennet", "Environment"}  # the choice is random across seeds
    # pool order does not matter, only the seed
    a = resolve_next_speaker("?", end_allowed=False, rng=random.Random(5), **kw)
    b = resolve_next_speaker(
        "?", end_allowed=False, rng=random.Random(5), **{**kw, "fallback_pool": pool[::-1]}
    )
    assert a == b
    # someone whose last visible turn is their own cannot be picked
    blocked = resolve_next_speaker(
        "Elizabeth Bennet", end_allowed=False, rng=random.Random(3), blocked=["Elizabeth Bennet"], **kw
    )
    assert blocked == ("Environment", "repeated_speaker")


# ---------------------------------------------------------------- the re-enactment mechanism


class ScriptedActors(Engine):
    """Unit-test engine: every actor answers with a plan, a thought, an action and speech tagged with
    its own name; the predictor always asks to end; Environment describes rain."""

    kind, model_id = "scripted", "scripted"

    def __init__(self, prediction: str = END_CHAT) -> None:
        self.prediction = prediction
        self.requests: list[GenRequest] = []

    async def generate(self, requests):
        out = []
        for req in requests:
            self.requests.append(req)
            if req.choices is not None:
                out.append(GenResult(text=self.prediction))
            elif req.prefill == "<system_thinking>":
                who = re.match(r"You are (.+?) from the book", req.messages[0].content).group(1)
                out.append(
                    GenResult(
                        text=f"PLAN-{who}</system_thinking><role_thinking>SECRET-{who}"
                        f"</role_thinking><role_action>nods</role_action>Words of {who}.",
                        prompt_tokens=3,
                        completion_tokens=2,
                    )
                )
            else:
                out.append(GenResult(text="Rain taps on the window."))
        return out

    async def aclose(self):
        pass


async def test_turns_visibility_and_seeded_fallbacks(scene):
    engine = ScriptedActors()
    sim = await simulate(engine, scene, run=0, config=SimulationConfig(max_rounds=8, min_end_round=5))
    # "<END CHAT>" before round 5 is replaced by a seeded choice; from round 5 it ends the scene
    assert sim.ended_by == "end_chat" and len(sim.transcript) == 5
    assert [f.reason for f in sim.fallbacks] == ["end_too_early"] * 4
    assert sim.transcript[0].character == scene.speaking_characters_w_env[0] == "Mr Bennet"
    for prev, line in zip(sim.transcript, sim.transcript[1:], strict=False):
        assert line.character != prev.character  # never the same speaker twice in a row
    for f, line in zip(sim.fallbacks, sim.transcript[1:], strict=True):  # chosen among the major characters
        pool = {"Mr Bennet", "Elizabeth Bennet", "Environment"} - {sim.transcript[f.round - 1].character}
        assert f.chosen == line.character and f.chosen in pool
    # the transcript keeps speaker names and full text; others saw no thoughts
    actor_lines = [x for x in sim.transcript if x.character != "Environment"]
    assert actor_lines and all(f"SECRET-{x.character}" in x.message for x in actor_lines)
    assert all("SECRET" not in x.public and "PLAN" not in x.public for x in sim.transcript)
    # each actor's prompt: own thoughts kept, own plans dropped, nobody else's thoughts
    actor_requests = [r for r in engine.requests if r.prefill]
    assert len(actor_requests) == sim.calls["actor"] == len(actor_lines)
    for req in actor_requests:
        who = re.match(r"You are (.+?) from the book", req.messages[0].content).group(1)
        history = "\n".join(m.content for m in req.messages[1:])
        assert "PLAN-" not in history
        for other in {"Mr Bennet", "Elizabeth Bennet"} - {who}:
            assert f"SECRET-{other}" not in history
        earlier_own = sum(1 for x in actor_lines[: actor_requests.index(req)] if x.character == who)
        assert history.count(f"SECRET-{who}") == earlier_own
        if who == "Elizabeth Bennet":  # her inner state comes from the test set's `thought` key
            assert scene_dict_thought(scene, who)[:60] in req.messages[0].content
    # same sample, same run: same re-enactment; another run draws other seeds
    again = await simulate(
        ScriptedActors(), scene, run=0, config=SimulationConfig(max_rounds=8, min_end_round=5)
    )
    assert again.model_dump() == sim.model_dump()
    other = ScriptedActors()
    await simulate(other, scene, run=1, config=SimulationConfig(max_rounds=8, min_end_round=5))
    assert [r.seed for r in other.requests] != [r.seed for r in engine.requests]


async def test_old_motivation_key_and_invalid_predictions(scene_dict):
    d = copy.deepcopy(scene_dict)
    for kc in d["key_characters"]:
        kc["motivation"] = kc.pop("thought")
    scene = Scene.model_validate(d)
    engine = ScriptedActors(prediction="Mr Darcy")  # an engine that ignores the choices constraint
    sim = await simulate(engine, scene, config=SimulationConfig(max_rounds=4, min_end_round=1))
    assert sim.ended_by == "max_rounds" and len(sim.transcript) == 4
    assert [f.reason for f in sim.fallbacks] == ["unknown_speaker"] * 3
    eliza = next(
        r for r in engine.requests if r.prefill and "You are Elizabeth Bennet" in r.messages[0].content
    )
    assert scene.motivation_of("Elizabeth Bennet")[:60] in eliza.messages[0].content
    predictor = next(r for r in engine.requests if r.choices)
    assert END_CHAT in predictor.choices and "Mr Bennet" not in predictor.choices  # current speaker excluded


def test_speaker_prefixes_are_stripped():
    plan = "<system_thinking>plan</system_thinking>"
    for text, kept in [
        ("King Lear: Hello", "Hello"),
        ("**King Lear**: Hello", "Hello"),
        ("**king lear:** Hello", "Hello"),
        (f"{plan}King Lear: <role_action>bows</role_action>Hi", f"{plan}<role_action>bows</role_action>Hi"),
        (f"{plan}\nKing Lear：Hi", f"{plan}\nHi"),
        ("Hi.\nKing Lear: more", "Hi.\nmore"),
        ("Fool: not his", "Fool: not his"),  # another speaker's label stays (the line is cut there)
        ("King Learned: x", "King Learned: x"),
    ]:
        assert strip_speaker_prefix(text, "King Lear") == kept, text


class Labelled(ScriptedActors):
    """Actors and Environment that label their lines with their own name, as HER-trained models do."""

    async def generate(self, requests):
        out = await super().generate(requests)
        for req, res in zip(requests, out, strict=True):
            if req.choices is None and req.prefill:
                who = re.match(r"You are (.+?) from the book", req.messages[0].content).group(1)
                res.text = res.text.replace("</system_thinking>", f"</system_thinking>**{who}**: ")
            elif req.choices is None:
                res.text = "Environment: " + res.text
        return out


@pytest.mark.parametrize(
    ("config", "lines"),
    [
        (SimulationConfig(max_rounds=9), 6),  # CoSER: <END CHAT> from round index 5, the 6th line
        (SimulationConfig(max_rounds=9, protocol="her"), 5),
        (SimulationConfig(max_rounds=9, protocol="her", min_end_round=7), 7),  # a flag beats the protocol
    ],
)
async def test_ending_rule_and_own_labels_dropped(scene, config, lines):
    sim = await simulate(Labelled(), scene, config=config)
    assert sim.ended_by == "end_chat" and len(sim.transcript) == lines
    assert [f.reason for f in sim.fallbacks] == ["end_too_early"] * (lines - 1)
    for line in sim.transcript:
        assert f"{line.character}:" not in line.message and "**" not in line.message
    assert config.temperature == (0.0 if config.protocol == "coser" else 0.7)


def test_turn_journal_keeps_whole_steps_of_the_same_evaluation(tmp_path):
    path = tmp_path / "samples" / "run0" / "s.partial.jsonl"
    journal = TurnJournal(path, {"sample_id": "s", "manifest": {"a": 1}})
    assert journal.load() == [] and path.exists()  # a fresh file starts with its header
    steps = [Step(kind="line", round=0, speaker="A", text="Hi."), Step(kind="next", round=0, next="B")]
    for step in steps:
        journal.append(step)
    with path.open("a") as f:
        f.write('{"kind": "line", "rou')  # killed in the middle of a write
    assert journal.load() == steps and len(path.read_text().splitlines()) == 3  # the torn line is gone
    assert TurnJournal(path, {"sample_id": "s", "manifest": {"a": 2}}).load() == []  # other settings


def scene_dict_thought(scene: Scene, name: str) -> str:
    [kc] = [k for k in scene.model_dump(by_alias=True)["key_characters"] if k["name"] == name]
    return kc["thought"]


# ---------------------------------------------------------------- report maths


def _record(sample_id: str, run: int, avg: float | None, status: str = "ok") -> dict:
    scores = {d: avg for d in TRANSCRIPT_DIMENSIONS}
    if status == "error":
        scores["anthropomorphism"] = None
    usage = {"calls": 2, "prompt_tokens": 10, "completion_tokens": 4}
    return {
        "schema": 1,
        "sample_id": sample_id,
        "run": run,
        "book": "B",
        "i_p": 0,
        "i_c": 0,
        "seed": 1,
        "status": status,
        "error": None if status == "ok" else "x",
        "scores": scores,
        "average": avg if status == "ok" else None,
        "bleu": 1.0,
        "rouge_l": 2.0,
        "actor_rounds": 3,
        "usage": {"actor": usage, "judge": usage, "seconds": 1.5},
    }


def test_three_runs_give_a_t_interval_and_errors_are_excluded(tmp_path):
    for run, (a, b) in enumerate([(78, 82), (82, 86), (86, 90)]):  # run means 80, 84, 88
        write_json_atomic(sample_path(tmp_path, run, "s1"), _record("s1", run, a))
        write_json_atomic(sample_path(tmp_path, run, "s2"), _record("s2", run, b))
    write_json_atomic(sample_path(tmp_path, 0, "s3"), _record("s3", 0, 0.0, status="error"))
    manifest = {"simulation": SIM.fingerprint(), "actor": "a", "judge": "j"}
    results = write_report(tmp_path, ["s1", "s2", "s3"], 3, RunOutcome(), manifest)
    avg = results["summary"]["average"]
    assert avg["run_means"] == [80.0, 84.0, 88.0] and avg["mean"] == 84.0 and avg["n"] == 6
    assert avg["ci95"] == pytest.approx(t_quantile_975(2) * 4.0 / 3**0.5, abs=1e-3)
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert results["samples_error"] == 1 and results["samples_ok"] == 6
    assert results["cost"]["actor"]["calls"] == 14
    report = (tmp_path / "report.md").read_text()
    assert "| Average | 84.00 | 9.94 | 6 |" in report and "scores.png" in report
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mean_ci([70.0, 80.0]) == (75.0, None)  # below three runs: no interval
    assert mean_ci([]) == (None, None)


# ---------------------------------------------------------------- end to end with the real model


@pytest.mark.model
async def test_local_end_to_end_on_the_fixture(engine, scene_file, tmp_path):
    metered = MeteredEngine(engine)
    results, outcome = await evaluate_coser(
        scene_file, actor=metered, judge=TranscriptScorer(metered, JUDGE), config=_config(tmp_path)
    )
    assert len(outcome.computed) == 1 and not outcome.failed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == results["summary"]
    [row] = saved["samples"]
    assert ROW_KEYS <= set(row)
    assert row["status"] == "ok", row  # the grammar bounds the judge's output: it must parse
    assert row["average"] == pytest.approx(sum(row[d] for d in TRANSCRIPT_DIMENSIONS) / 4, abs=1e-4)
    judgment = load_sample(sample_path(tmp_path, 0, row["sample_id"]))["judgment"]
    rounds = row["actor_rounds"]
    for dim in judgment["dimensions"]:  # real constrained output: valid types, clamped severities, formula
        assert len(dim["flaws"]) <= 1
        assert all(  # the coser protocol (default): CoSER's type names and severity ranges
            f["type"] in flaw_type_names(dim["dimension"], "coser")
            and 1 <= f["severity"] <= max_severity(dim["dimension"], f["type"], "coser")
            for f in dim["flaws"]
        )
        assert (
            dim["score"]
            == row[dim["dimension"]]
            == transcript_score([f["severity"] for f in dim["flaws"]], rounds)
        )
    assert row["bleu"] is not None and 0 <= row["rouge_l"] <= 100
    record = load_sample(sample_path(tmp_path, 0, row["sample_id"]))
    lines = record["simulation"]["transcript"]
    assert [x["character"] for x in lines][0] == "Mr Bennet" and len(lines) == 2
    usage = record["usage"]
    assert usage["predictor"]["calls"] == 1 and usage["judge"]["calls"] == 4  # one decision, four dimensions
    assert usage["actor"]["calls"] + usage["environment"]["calls"] == 2
    assert 0 <= row["coser_rouge_l"] <= 1 and not partial_path(tmp_path, 0, row["sample_id"]).exists()
    report = (tmp_path / "report.md").read_text()
    for title in ("Storyline Consistency", "Anthropomorphism", "Character Fidelity", "Storyline Quality"):
        assert f"| {title} |" in report
    assert "## Cost" in report
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Crash(Exception):
    pass


class Counting:
    """The real engine, counting requests; with ``fail_after`` set it raises EngineError once that many
    more requests went through (a fault injected to kill a sample mid-way)."""

    def __init__(self, engine) -> None:
        self.engine, self.model_id = engine, engine.model_id
        self.requests: list[GenRequest] = []
        self.fail_after: int | None = None

    def __getattr__(self, name: str):  # the rest of the Engine interface: the real engine's
        return getattr(self.engine, name)

    async def generate(self, requests):
        if self.fail_after is not None:
            if self.fail_after <= 0:
                raise EngineError("injected: the engine went away")
            self.fail_after -= len(requests)
        self.requests += requests
        return await self.engine.generate(requests)

    async def aclose(self):
        pass


@pytest.mark.model
async def test_kill_mid_sample_resumes_from_saved_turns(engine, scene_dict, tmp_path):
    test_file = tmp_path / "two.jsonl"
    test_file.write_text("\n".join(json.dumps(_compact(scene_dict, i_c=i)) for i in (0, 1)))
    out = tmp_path / "out"
    sim = SimulationConfig(max_rounds=4, actor_max_tokens=24, env_max_tokens=16)
    first = Counting(engine)

    armed_at: list[int] = []

    def arm(record):  # the first sample is finished: the second one dies after three requests
        first.fail_after = 3
        armed_at.append(len(first.requests))  # concurrency 1: every later request is the second sample's

    _, outcome = await evaluate_coser(test_file, actor=first, judge=TranscriptScorer(engine, JUDGE),
                                      config=_config(out, simulation=sim), on_sample_done=arm)
    [done_key], [failed_key] = outcome.computed, list(outcome.failed)
    done = sample_path(out, 0, done_key.split("/")[1])
    content = done.read_bytes()
    failed_id = failed_key.split("/")[1]
    assert not sample_path(out, 0, failed_id).exists()
    saved = TurnJournal(partial_path(out, 0, failed_id), {}).path.read_text().splitlines()[1:]
    saved = [json.loads(x) for x in saved]
    assert saved and saved[0]["kind"] == "line"  # the turns taken before the failure are on disk
    # the seeds of the requests that produced the saved turns, as the engine saw them
    saved_seeds = {r.seed for r in first.requests[armed_at[0]:][: sum(x["requests"] for x in saved)]}
    assert len(saved_seeds) == sum(x["requests"] for x in saved)

    second = Counting(engine)
    results, outcome = await evaluate_coser(test_file, actor=second, judge=TranscriptScorer(engine, JUDGE),
                                            config=_config(out, simulation=sim))
    assert outcome.skipped == [done_key] and outcome.computed == [failed_key] and not outcome.failed
    assert done.read_bytes() == content  # the finished sample was not redone
    record = load_sample(sample_path(out, 0, failed_id))
    assert record["usage"]["resumed_steps"] == len(saved)
    assert second.requests and not saved_seeds & {r.seed for r in second.requests}  # nothing regenerated
    lines = [x for x in saved if x["kind"] == "line"]
    transcript = record["simulation"]["transcript"]
    assert [(t["character"], t["message"]) for t in transcript[: len(lines)]] == [
        (x["speaker"], x["text"]) for x in lines
    ]
    assert len(transcript) == 4 and not partial_path(out, 0, failed_id).exists()
    assert {r["sample_id"] for r in results["samples"]} == {done.stem, failed_id}
    # a rerun with other settings must not mix into these results
    with pytest.raises(ValueError, match="different evaluation"):
        await evaluate_coser(test_file, actor=second, judge=TranscriptScorer(engine, JUDGE),
                             config=_config(out, simulation=SimulationConfig(max_rounds=3)))


@pytest.mark.model
@pytest.mark.parametrize("actor_format", ["plain", "coser"])
async def test_actor_formats_with_separate_env_and_predictor(engine, scene_dict, actor_format):
    # Environment speaks first, so all three agents are asked within three rounds
    scene = Scene.model_validate(_compact(
        scene_dict, speaking_characters_w_env=["Environment", "Mr Bennet", "Elizabeth Bennet"]))
    actor, env, nsp = Counting(engine), Counting(engine), Counting(engine)
    config = SimulationConfig(max_rounds=3, actor_max_tokens=32, env_max_tokens=16, actor_format=actor_format)
    sim = await simulate(actor, scene, env=env, nsp=nsp, config=config)
    assert sim.transcript[0].character == "Environment" and len(sim.transcript) == 3
    assert len(env.requests) >= sim.calls["environment"] >= 1 and len(nsp.requests) == sim.calls["predictor"] == 2
    assert len(actor.requests) >= sim.calls["actor"] >= 1
    assert all(r.choices for r in nsp.requests) and not any(r.choices for r in actor.requests + env.requests)
    rule = "[square brackets]" if actor_format == "coser" else "as plain text"
    for req in actor.requests:
        assert rule in req.messages[0].content and not req.prefill.startswith("<system_thinking>")
        history = "\n".join(m.content for m in req.messages[1:])
        assert "<role_" not in history  # others' lines come in the actor's own format
    for line in sim.transcript:
        assert line.public == public_view(line.message)
        if line.character != "Environment" and actor_format == "plain":
            assert all(seg.kind == "speech" for seg in parse_reply(line.message)[0].segments)
        if line.character != "Environment" and actor_format == "coser":
            assert not re.search(r"\[[^\]]*\]|\([^)]*\)", line.message)  # brackets became HER tags


@pytest.mark.model
def test_cli_scores_through_a_real_rm_server(engine, scene_dict, tmp_path):
    from her_cli.main import main

    test_file = tmp_path / "one.json"
    test_file.write_text(json.dumps(_compact(scene_dict)))
    out = tmp_path / "out"
    app = build_app(ServerSettings.load(api_keys="eval-key"), engine=engine)  # the session's model judges
    with serve_app(app) as base:
        code = main(
            [
                "eval",
                "coser",
                "--test-file",
                str(test_file),
                "--out",
                str(out),
                "--max-rounds",
                "2",
                "--actor-max-tokens",
                "32",
                "--env-max-tokens",
                "24",
                "--engine",  # the CLI's plumbing on the quick-loading fallback engine
                "transformers",
                "--threads",
                "1",
                "--no-progress",
                "--judge-url",
                base,
                "--judge-key",
                "eval-key",
                "--judge-max-tokens",
                "80",
                "--max-flaws",
                "1",
                "--max-instance-chars",
                "24",
            ]
        )
        metrics = httpx.get(base + "/metrics", timeout=30).text
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["manifest"]["judge"] == "rm_server"
    [row] = results["samples"]
    assert ROW_KEYS <= set(row) and row["status"] == "ok", row
    record = load_sample(sample_path(out, 0, row["sample_id"]))
    assert record["judgment"]["usage"]["calls"] == 4  # scored by the server's engine, four dimensions
    served = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith("rm_requests_total{") and 'route="/v1/score/transcript"' in ln and 'code="200"' in ln
    ]
    assert served and served[0].endswith(" 1.0")
    assert (out / "report.md").exists() and (out / "scores.png").exists()
