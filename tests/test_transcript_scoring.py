"""Flaw-based transcript scoring (her_genrm._transcript) and its rm_server route.

The formula and the parser are checked on hand-built flaw lists; prompts are rendered for the real
fixture; retries and errors use a scripted engine (fault injection). Real-model scoring (constrained output
parsing, the formula on real flaws, the route serving it) runs end to end in tests/test_eval.py.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from _servers import serve_app

from her_engines import GenRequest, GenResult
from her_genrm._templates import JudgeOutputError
from her_genrm._transcript import (
    FLAW_TYPES,
    TRANSCRIPT_DIMENSIONS,
    TranscriptScorer,
    TranscriptScorerConfig,
    build_transcript_judge_prompt,
    count_actor_rounds,
    flaw_schema,
    parse_flaws,
    render_transcript,
    transcript_score,
)
from her_roleplay import DialogueLine
from rm_server import ServerSettings, build_app

PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


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
    # out-of-range severities count as 5 and 1: sum 5 + 1 + 1 = 7 -> 65
    assert transcript_score([9, 0, -3], 0) == 65.0
    with pytest.raises(ValueError, match="actor_rounds"):
        transcript_score([1], -1)


def test_actor_rounds_exclude_environment():
    assert count_actor_rounds(SIMULATED) == 2
    assert count_actor_rounds([DialogueLine(character=" environment ", message="Rain.")]) == 0


# ---------------------------------------------------------------- parsing judge output


def test_parse_flaws_clamps_and_normalises():
    text = json.dumps(
        {
            "flaws": [
                {"instance": "x" * 500, "type": "Language Style", "severity": 7},
                {"instance": "b", "type": "knowledge", "severity": 0},
                {"instance": "c", "type": "relationships", "severity": 3.0},
            ]
        }
    )
    flaws = parse_flaws(text, "character_fidelity")
    assert [f.severity for f in flaws] == [5, 1, 3]
    assert [f.type for f in flaws] == ["language_style", "knowledge", "relationships"]
    assert len(flaws[0].instance) == 200
    fenced = '```json\n{"flaws": []}\n```'
    assert parse_flaws(fenced, "storyline_quality") == []


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
        schema = flaw_schema(dim, max_flaws=4)
        flaws = schema["properties"]["flaws"]
        assert flaws["maxItems"] == 4
        assert flaws["items"]["properties"]["type"]["enum"] == list(FLAW_TYPES[dim])
        assert flaws["items"]["properties"]["severity"] == {"type": "integer", "minimum": 1, "maximum": 5}
    with pytest.raises(ValueError, match="unknown dimension"):
        flaw_schema("charm")


# ---------------------------------------------------------------- prompts


def test_every_judge_prompt_is_fully_rendered(scene):
    for dim in TRANSCRIPT_DIMENSIONS:
        messages = build_transcript_judge_prompt(scene, SIMULATED, dim)
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
        for flaw_type in FLAW_TYPES[dim]:
            assert flaw_type in text
    fidelity = build_transcript_judge_prompt(scene, SIMULATED, "character_fidelity")[1].content
    assert "(Mr Bennet, Elizabeth Bennet)" in fidelity


def test_rendered_transcript_reads_both_formats():
    out = render_transcript(SIMULATED).splitlines()
    assert out[0] == "Mr Bennet: (waves a letter) Lizzy, come here."
    assert out[2] == "Elizabeth Bennet: (sits down) What is it, Papa?"


# ---------------------------------------------------------------- retries and errors (scripted engine)


class ScriptedJudge:
    """Fault injector: answers each request from a script keyed by (dimension, attempt)."""

    model_id = "scripted-judge"

    def __init__(self, answers) -> None:
        self.answers = answers  # callable(dimension, call_index_for_dimension) -> text
        self.requests: list[GenRequest] = []
        self.seen: dict[str, int] = {}

    async def generate(self, requests):
        out = []
        for req in requests:
            self.requests.append(req)
            dim = next(d for d in TRANSCRIPT_DIMENSIONS if req.json_schema == flaw_schema(d, 10))
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
