"""Flaw-based transcript scoring (her_genrm._transcript), CoSER-comparable text metrics
(eval._textmetrics) and the rm_server route.

The formula and the parser are checked on hand-built flaw lists and, as a golden test, on CoSER's own
judged example (tests/data/coser/example_evaluation_gpt-4o.json: every critique goes through our parser
and formula and must give CoSER's published scores); prompts are rendered for the real fixture; retries
and errors use a scripted engine (fault injection). Real-model scoring (constrained output parsing, the
formula on real flaws, the route serving it) runs end to end in tests/test_eval.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from _servers import serve_app

from eval._textmetrics import coser_bleu, coser_dialogue_text, coser_rouge_l
from her_engines import Engine, GenRequest, GenResult
from her_genrm import (
    DIMENSION_TITLES,
    FLAW_TYPES,
    SCORING_PROTOCOLS,
    TRANSCRIPT_DIMENSIONS,
    TranscriptScorer,
    TranscriptScorerConfig,
    build_transcript_judge_prompt,
    count_actor_rounds,
    flaw_schema,
    flaw_type_names,
    parse_flaws,
    render_transcript,
    transcript_score,
)
from her_genrm._templates import JudgeOutputError
from her_roleplay import DialogueLine
from rm_server import ServerSettings, build_app

PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
COSER_DATA = Path(__file__).parent / "data" / "coser"


SIMULATED = [
    DialogueLine(
        character="Mr Bennet",
        message="<system_thinking>Portray him as amused.</system_thinking><role_thinking>This is "
        "rich.</role_thinking><role_action>waves a letter</role_action>Lizzy, come here.",
    ),
    DialogueLine(character="Environment", message="The afternoon light fades across the study floor."),
    DialogueLine(character="Elizabeth Bennet", message="[I dread this.] (sits down) What is it, Papa?"),
]

# ---------------------------------------------------------------- the formula


def test_formula_on_the_reference_example():
    # CoSER's shipped example: severities [2, 3, 2, 3] with 11 actor messages -> 66.5
    assert transcript_score([2, 3, 2, 3], 11) == 66.5
    assert transcript_score([], 0) == 100.0
    assert transcript_score([1], 0) == 95.0


def test_formula_clips_at_both_ends_and_clamps_severities():
    assert transcript_score([], 11) == 100.0  # the round allowance never lifts a score above 100
    assert transcript_score([5] * 10, 0) == 0.0  # 100 - 250 -> 0
    assert transcript_score([5] * 4, 20) == 30.0  # 100 - 5 * (20 - 6)
    # "her": out-of-range severities count as 5 and 1: sum 5 + 1 + 1 = 7 -> 65
    assert transcript_score([9, 0, -3], 0, "her") == 65.0
    # "coser": up to 10 (repetition in Storyline Quality): 9 + 1 + 1 = 11 -> 45; 12 counts 10
    assert transcript_score([9, 0, -3], 0) == 45.0
    assert transcript_score([12], 0, "coser") == 50.0
    with pytest.raises(ValueError, match="actor_rounds"):
        transcript_score([1], -1)
    with pytest.raises(ValueError, match="protocol"):
        transcript_score([1], 0, "cosr")  # type: ignore[arg-type]


def test_actor_rounds_exclude_environment():
    assert count_actor_rounds(SIMULATED) == 2
    assert count_actor_rounds([DialogueLine(character=" environment ", message="Rain.")]) == 0
    # CoSER's own records: {role, content}, with next-speaker (NSP) records in a raw simulation
    raw = [
        {"role": "Iago", "content": "Iago: My lord."},
        {"role": "NSP", "content": "Othello"},
        {"role": "Environment", "content": "Environment: Torches flicker."},
        {"role": "Othello", "content": "Othello: Speak."},
    ]
    assert count_actor_rounds(raw) == 2


# ---------------------------------------------------------------- parsing judge output


@pytest.mark.parametrize(
    "protocol, names",
    [
        ("her", ["language_style", "knowledge", "relationships"]),
        ("coser", ["Character Language", "Knowledge & Background", "Relationship & Social Status"]),
    ],
)
def test_parse_flaws_clamps_and_normalises(protocol, names):
    text = json.dumps(
        {
            "flaws": [
                {"instance": "x" * 500, "type": "Language Style", "severity": 7},
                {"instance": "b", "type": "knowledge", "severity": 0},
                {"instance": "c", "type": "relationships", "severity": 3.0},
            ]
        }
    )
    flaws = parse_flaws(text, "character_fidelity", protocol)
    assert [f.severity for f in flaws] == [5, 1, 3]  # Character Fidelity tops at 5 in both protocols
    assert [f.type for f in flaws] == names
    assert len(flaws[0].instance) == 200
    fenced = '```json\n{"flaws": []}\n```'
    assert parse_flaws(fenced, "storyline_quality", protocol) == []


@pytest.mark.parametrize("protocol", SCORING_PROTOCOLS)
def test_both_spellings_of_every_type_map_to_the_protocol_name(protocol):
    for dim, types in FLAW_TYPES.items():
        for ours, flaw_type in types.items():
            canonical = flaw_type.coser if protocol == "coser" else ours
            for spelling in (ours, flaw_type.coser, flaw_type.coser.upper(), f" {ours.replace('_', '-')} "):
                text = json.dumps({"flaws": [{"instance": "i", "type": spelling, "severity": 1}]})
                assert parse_flaws(text, dim, protocol)[0].type == canonical, (dim, spelling)
    and_spelling = '{"flaws": [{"instance": "i", "type": "flow and progression", "severity": 1}]}'
    assert parse_flaws(and_spelling, "storyline_quality", protocol)[0].type == flaw_type_names(
        "storyline_quality", protocol
    )[0]


def test_severity_ranges_follow_the_protocol():
    def severity(dim, kind, value, protocol):
        text = json.dumps({"flaws": [{"instance": "i", "type": kind, "severity": value}]})
        return parse_flaws(text, dim, protocol)[0].severity

    # CoSER lets mechanical repetition (Flow & Progression) reach 10; every other type stops at 5
    assert severity("storyline_quality", "Flow & Progression", 10, "coser") == 10
    assert severity("storyline_quality", "flow_progression", 12, "coser") == 10
    assert severity("storyline_quality", "Logical Consistency", 10, "coser") == 5
    assert severity("anthropomorphism", "Emotional Depth", 8, "coser") == 5
    assert severity("storyline_quality", "Flow & Progression", 10, "her") == 5
    # a flaw without a severity counts 1 in CoSER; "her" refuses it
    missing = '{"flaws": [{"instance": "i", "type": "Flow & Progression"}]}'
    assert parse_flaws(missing, "storyline_quality", "coser")[0].severity == 1
    with pytest.raises(JudgeOutputError, match="not a number"):
        parse_flaws(missing, "storyline_quality", "her")


@pytest.mark.parametrize("protocol", SCORING_PROTOCOLS)
def test_identical_flaws_count_once_with_the_highest_severity(protocol):
    same = "Lear repeats 'truth' in every line"
    text = json.dumps(
        {
            "flaws": [
                {"instance": same, "type": "Flow & Progression", "severity": 2},
                {"instance": "Iago is too kind", "type": "Logical Consistency", "severity": 1},
                {"instance": f"  {same.upper()}. ", "type": "flow_progression", "severity": 4},  # same flaw
                {"instance": same, "type": "flow_progression", "severity": 3},  # same flaw
                {"instance": same, "type": "Logical Consistency", "severity": 2},  # another type: counts
                {"instance": "Lear repeats 'truth' in most lines", "type": "flow_progression", "severity": 1},
            ]
            * 3  # a small judge's ten-fold repetition
        }
    )
    flaws = parse_flaws(text, "storyline_quality", protocol)
    assert [(f.instance, f.severity) for f in flaws] == [
        (same, 4),
        ("Iago is too kind", 1),
        (same, 2),
        ("Lear repeats 'truth' in most lines", 1),
    ]
    assert transcript_score([f.severity for f in flaws], 0, protocol) == 60.0  # 100 - 5 * 8


def test_coser_answer_shape_is_read():
    wrapped = {"Storyline Quality": {"flaws": [{"instance": "i", "type": "Flow & Progression", "severity": 3}]}}
    [flaw] = parse_flaws(json.dumps(wrapped), "storyline_quality")
    assert (flaw.type, flaw.severity) == ("Flow & Progression", 3)
    with pytest.raises(JudgeOutputError, match="no `flaws` list"):
        parse_flaws(json.dumps(wrapped), "anthropomorphism")


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="protocol"):
        parse_flaws('{"flaws": []}', "storyline_quality", "CoSER")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="protocol"):
        TranscriptScorerConfig(protocol="paper")  # type: ignore[arg-type]
    assert TranscriptScorerConfig().protocol == "coser"


# ---------------------------------------------------------------- golden: CoSER's own judged example


def _coser_example():
    evaluation = json.loads((COSER_DATA / "example_evaluation_gpt-4o.json").read_text())
    test_set = json.loads((COSER_DATA / "example_test_set.json").read_text())
    scenes = {f"{s['book']}-{s['plot']['i_p']}-{s['i_c']}": s for s in test_set}
    assert set(scenes) == set(evaluation["cases"])
    return evaluation, scenes


@pytest.mark.parametrize("protocol", SCORING_PROTOCOLS)
def test_golden_coser_scores_are_reproduced(protocol):
    """Every critique of CoSER's judged example, read by our parser and scored by our formula with our
    actor-round count, gives CoSER's published dimension, sample and overall scores."""
    evaluation, _ = _coser_example()
    by_dimension: dict[str, list[float]] = {d: [] for d in TRANSCRIPT_DIMENSIONS}
    for case_id, case in evaluation["cases"].items():
        lines = [DialogueLine(character=m["role"], message=m["content"]) for m in case["simulation"]]
        rounds = count_actor_rounds(lines)
        assert rounds == count_actor_rounds(case["simulation"])
        sample = []
        for dim in TRANSCRIPT_DIMENSIONS:
            critique = case["critique"][DIMENSION_TITLES[dim]]
            flaws = parse_flaws(json.dumps(critique), dim, protocol)
            assert len(flaws) == len(critique["flaws"])  # no repeats in CoSER's lists: nothing merged
            if protocol == "coser":  # CoSER's judge used exactly our canonical names
                assert [f.type for f in flaws] == [f["type"] for f in critique["flaws"]]
            score = transcript_score([f.severity for f in flaws], rounds, protocol)
            assert score == critique["score"], (case_id, dim)
            by_dimension[dim].append(score)
            sample.append(score)
        assert sum(sample) / len(sample) == pytest.approx(case["score"], abs=1e-9)
    means = {d: sum(v) / len(v) for d, v in by_dimension.items()}
    for dim, mean in means.items():
        assert mean == pytest.approx(evaluation["scores"][DIMENSION_TITLES[dim]], abs=1e-9)
    average = sum(means.values()) / len(means)
    assert average == pytest.approx(evaluation["scores"]["avg"], abs=1e-9)
    assert round(average, 2) == 62.42
    assert [evaluation["cases"][c]["score"] for c in evaluation["cases"]] == [59.0, 60.0, 68.25]


def test_golden_actor_rounds_and_the_reference_example():
    evaluation, _ = _coser_example()
    rounds = {c: count_actor_rounds(case["simulation"]) for c, case in evaluation["cases"].items()}
    assert rounds == {"King Lear-17-0": 11, "King Lear-16-0": 5, "Othello-9-0": 13}
    critique = evaluation["cases"]["King Lear-17-0"]["critique"]["Storyline Consistency"]
    assert [f.severity for f in parse_flaws(json.dumps(critique), "storyline_consistency")] == [2, 3, 2, 3]


# ---------------------------------------------------------------- CoSER-comparable BLEU and ROUGE-L


def test_coser_dialogue_text_renders_as_coser_does():
    evaluation, scenes = _coser_example()
    raw = json.loads((COSER_DATA / "example_simulation_gpt-4o.json").read_text())
    for record in raw:  # CoSER's raw simulation (thoughts, NSP records) renders to its evaluated text
        case = evaluation["cases"][f"{record['book_title']}-{record['i_p']}-{record['i_c']}"]
        assert coser_dialogue_text(record["simulation"]) == case["simulation_str"]
        assert coser_dialogue_text(case["simulation"]) == case["simulation_str"]
    reference = coser_dialogue_text(scenes["King Lear-17-0"]["dialogues"])
    assert reference.startswith("Fool: Why to keep so many brains in one head, uncle?")
    assert "What’s amiss, Fool?" in reference and "[" not in reference  # thoughts gone, names kept
    ours = coser_dialogue_text(SIMULATED)  # DialogueLines, HER tags or CoSER brackets
    assert ours.split("\n\n") == [
        "Mr Bennet: (waves a letter) Lizzy, come here.",
        "Environment: The afternoon light fades across the study floor.",
        "Elizabeth Bennet: (sits down) What is it, Papa?",
    ]


def test_coser_bleu_and_rouge_l_reproduce_the_published_values():
    """BLEU matches CoSER's published per-case values to the last digit for two of the three scenes
    and ROUGE-L for one. The rest differ because (evidence below) the reference text CoSER scored
    differed slightly from the published test-set file: for Othello the published BLEU needs exactly
    5/4/2/1 fewer matching 1-4-grams (same hypothesis length) and the published ROUGE-L exactly two
    more reference tokens with the same LCS (27); for King Lear 17 one more token with the same LCS (30)."""
    evaluation, scenes = _coser_example()
    bleus, rouges = [], []
    for case_id, case in evaluation["cases"].items():
        hypothesis = coser_dialogue_text(case["simulation"])
        reference = coser_dialogue_text(scenes[case_id]["dialogues"])
        bleus.append(coser_bleu(hypothesis, reference))
        rouges.append(coser_rouge_l(hypothesis, reference))
        published = case["critique"]
        if case_id in ("King Lear-17-0", "King Lear-16-0"):
            assert bleus[-1] == pytest.approx(published["bleu"], rel=1e-12)
        if case_id == "King Lear-16-0":
            assert rouges[-1] == pytest.approx(published["rouge_l"], rel=1e-12)
        assert bleus[-1] == pytest.approx(published["bleu"], rel=0.13)
        assert rouges[-1] == pytest.approx(published["rouge_l"], rel=3e-3)
    assert rouges[0] == pytest.approx(2 * 30 / (688 + 139), rel=1e-7)  # LCS 30 of 688 and 139 tokens
    scores = evaluation["scores"]
    assert sum(bleus) / 3 == pytest.approx(scores["bleu"], rel=0.05)  # 0.02653 vs 0.02527
    assert sum(rouges) / 3 == pytest.approx(scores["rouge_l"], rel=2e-3)  # 0.08397 vs 0.08388


def test_coser_metrics_edge_cases():
    assert coser_bleu("", "King Lear: Speak.") is None and coser_rouge_l("King Lear: Speak.", " ") is None
    assert coser_rouge_l("a b c", "a b c") == pytest.approx(1.0, abs=1e-7)
    assert coser_bleu("Fool: Nuncle, hear me now.", "King Lear: Speak.") < 1e-200  # no 4-gram in common
    text = "Fool: Why, what an ass am I to put myself in his hands, nuncle, when all is lost."
    assert coser_bleu(text, text) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "text, match",
    [
        ("no json here", "no JSON object"),
        ('{"problems": []}', "no `flaws` list"),
        ('{"flaws": [{"instance": "a", "type": "knowledge", "severity": 2}]}', "allows"),  # wrong dimension
        ('{"flaws": [{"instance": "a", "type": "flow_progression", "severity": "high"}]}', "not a number"),
        ('{"flaws": [{"instance": "a", "type": "flow_progression", "severity": 2.5}]}', "whole number"),
        ('{"flaws": ["bad"]}', "not an object"),
    ],
)
def test_parse_flaws_rejects_what_it_cannot_read(text, match):
    with pytest.raises(JudgeOutputError, match=match):
        parse_flaws(text, "storyline_quality")


def test_schema_enumerates_the_dimension_flaw_types():
    for dim in TRANSCRIPT_DIMENSIONS:
        her = flaw_schema(dim, max_flaws=4, protocol="her")["properties"]["flaws"]
        assert her["maxItems"] == 4
        assert her["items"]["properties"]["type"]["enum"] == list(FLAW_TYPES[dim])
        assert her["items"]["properties"]["severity"] == {"type": "integer", "minimum": 1, "maximum": 5}
        coser = flaw_schema(dim, max_flaws=4)["properties"]["flaws"]  # the default protocol
        assert coser["items"]["properties"]["type"]["enum"] == [t.coser for t in FLAW_TYPES[dim].values()]
        top = 10 if dim == "storyline_quality" else 5
        assert coser["items"]["properties"]["severity"] == {"type": "integer", "minimum": 1, "maximum": top}
    assert flaw_type_names("character_fidelity") == [
        "Character Language",
        "Knowledge & Background",
        "Personality & Behavior",
        "Relationship & Social Status",
    ]
    assert flaw_type_names("storyline_consistency", "her") == ["reaction_deviation"]
    with pytest.raises(ValueError, match="unknown dimension"):
        flaw_schema("charm")


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize("protocol", SCORING_PROTOCOLS)
def test_every_judge_prompt_is_fully_rendered(scene, protocol):
    for dim in TRANSCRIPT_DIMENSIONS:
        messages = build_transcript_judge_prompt(scene, SIMULATED, dim, protocol=protocol)
        text = "\n".join(m.content for m in messages)
        assert not PLACEHOLDER.findall(text), (dim, PLACEHOLDER.findall(text))
        assert scene.plot.summary.strip() in text and scene.scenario.strip() in text
        for name in scene.major_characters:
            assert scene.profile_of(name) in text
        # both conversations keep speaker names and lose every thought and hidden plan
        assert "Mr Bennet: (waves a letter) Lizzy, come here." in text
        assert "Elizabeth Bennet: (sits down) What is it, Papa?" in text
        assert "This is rich" not in text and "Portray him" not in text and "I dread this" not in text
        assert "I can barely contain my amusement" not in text  # the book's own thoughts, too
        assert "Environment: The afternoon light" in text
        for flaw_type in flaw_type_names(dim, protocol):
            assert f"- {flaw_type}: " in text
        assert ("up to 10" in text) == (protocol == "coser" and dim == "storyline_quality")
    fidelity = build_transcript_judge_prompt(scene, SIMULATED, "character_fidelity")[1].content
    assert "(Mr Bennet, Elizabeth Bennet)" in fidelity


def test_rendered_transcript_reads_both_formats():
    out = render_transcript(SIMULATED).splitlines()
    assert out[0] == "Mr Bennet: (waves a letter) Lizzy, come here."
    assert out[2] == "Elizabeth Bennet: (sits down) What is it, Papa?"


# ---------------------------------------------------------------- retries and errors (scripted engine)


class ScriptedJudge(Engine):
    """Fault injector: answers each request from a script keyed by (dimension, attempt)."""

    kind, model_id = "scripted", "scripted-judge"

    def __init__(self, answers) -> None:
        self.answers = answers  # callable(dimension, call_index_for_dimension) -> text
        self.requests: list[GenRequest] = []
        self.seen: dict[str, int] = {}

    async def generate(self, requests):
        out = []
        for req in requests:
            self.requests.append(req)
            dim = next(
                d
                for d in TRANSCRIPT_DIMENSIONS
                if req.json_schema in (flaw_schema(d, 10), flaw_schema(d, 10, protocol="her"))
            )
            n = self.seen.get(dim, 0)
            self.seen[dim] = n + 1
            out.append(GenResult(text=self.answers(dim, n), prompt_tokens=10, completion_tokens=5))
        return out

    async def aclose(self):
        pass


GOOD = '{"flaws": [{"instance": "a", "type": "%s", "severity": 2}]}'


async def test_unreadable_output_retries_with_a_new_seed_then_succeeds(scene):
    def answers(dim, n):
        if dim == "anthropomorphism" and n == 0:
            return '{"flaws": [{"instance": "cut'  # truncated JSON
        return GOOD % next(iter(FLAW_TYPES[dim]))

    judge = ScriptedJudge(answers)
    result = await TranscriptScorer(judge).score(scene, SIMULATED, seed=7)
    assert result.status == "ok" and result.actor_rounds == 2
    assert all(score == transcript_score([2], 2) == 93.0 for score in result.scores.values())
    assert result.average == 93.0
    by_dim = {d.dimension: d for d in result.dimensions}
    assert by_dim["anthropomorphism"].attempts == 2 and by_dim["storyline_quality"].attempts == 1
    assert len(judge.requests) == 5 and result.usage.calls == 5
    first, retry = judge.requests[1], judge.requests[4]
    assert retry.seed != first.seed and retry.temperature == 0.7 and first.temperature == 0.0


async def test_output_that_never_parses_is_an_error_not_a_default_score(scene):
    def answers(dim, n):
        return "I think it was fine." if dim == "character_fidelity" else GOOD % next(iter(FLAW_TYPES[dim]))

    judge = ScriptedJudge(answers)
    result = await TranscriptScorer(judge, TranscriptScorerConfig(attempts=3)).score(scene, SIMULATED)
    assert result.status == "error" and result.average is None
    assert result.scores["character_fidelity"] is None
    assert result.scores["storyline_quality"] == 93.0
    failed = next(d for d in result.dimensions if d.dimension == "character_fidelity")
    assert failed.status == "error" and failed.attempts == 3 and failed.raw == "I think it was fine."
    assert "character_fidelity" in result.error
    assert judge.seen["character_fidelity"] == 3


@pytest.mark.parametrize("protocol", SCORING_PROTOCOLS)
async def test_the_scorer_asks_and_reads_in_its_protocol(scene, protocol):
    def answers(dim, n):  # a judge that repeats itself and uses the other protocol's spelling
        ft = next(iter(FLAW_TYPES[dim].items()))
        other = ft[0] if protocol == "coser" else ft[1].coser
        return json.dumps({"flaws": [{"instance": "same", "type": other, "severity": 2}] * 10})

    judge = ScriptedJudge(answers)
    result = await TranscriptScorer(judge, TranscriptScorerConfig(protocol=protocol)).score(scene, SIMULATED)
    assert result.status == "ok" and result.average == 93.0  # ten identical flaws count once
    for req in judge.requests:
        enum = req.json_schema["properties"]["flaws"]["items"]["properties"]["type"]["enum"]
        assert any(enum == flaw_type_names(d, protocol) for d in TRANSCRIPT_DIMENSIONS)
        assert all(f"- {name}: " in req.messages[1].content for name in enum)
    for dim in result.dimensions:
        assert [f.type for f in dim.flaws] == flaw_type_names(dim.dimension, protocol)[:1]


async def test_empty_transcript_is_refused(scene):
    with pytest.raises(ValueError, match="empty"):
        await TranscriptScorer(ScriptedJudge(lambda d, n: "")).score(scene, [])


# ---------------------------------------------------------------- the route's refusals


def test_route_refuses_bad_input_and_answers_503_while_loading(engine, scene_dict):
    app = build_app(ServerSettings.load(api_keys="k1"), engine=engine)
    line = {"character": "Mr Bennet", "message": "Lizzy."}
    with serve_app(app) as base:
        url = base + "/v1/score/transcript"
        auth = {"Authorization": "Bearer k1"}
        r = httpx.post(url, json={"scene": scene_dict, "transcript": [line]})
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        cases = [
            {"scene": scene_dict, "transcript": []},  # nothing to score
            {"scene": scene_dict, "transcript": [line], "dimensions": ["charm"]},
            {"scene": {**scene_dict, "dialogues": []}, "transcript": [line]},  # not a CoSER scene
            {"scene": scene_dict, "transcript": [line], "max_tokens": 10**6},  # over the server's bound
            {"scene": scene_dict, "transcript": [line], "surprise": 1},
        ]
        for body in cases:
            r = httpx.post(url, json=body, headers=auth)
            assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request", body
        service = app.state.service
        genrm, service.genrm = service.genrm, None  # as if the model were still loading
        try:
            r = httpx.post(url, json={"scene": scene_dict, "transcript": [line]}, headers=auth)
            assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
        finally:
            service.genrm = genrm
