"""`POST /v1/score/transcript`: CoSER-style flaw scoring of a whole re-enacted scene.

Wire types and a thin router; the behaviour is :class:`her_genrm._transcript.TranscriptScorer`, run on
the server's judge engine (503 while it loads). Judge settings in the body are bounded here so one
client cannot ask for unbounded generations.
"""

from __future__ import annotations

from typing import get_args

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from her_genrm import (
    MAX_INSTANCE_CHARS,
    ScoringProtocol,
    TranscriptDimension,
    TranscriptInputError,
    TranscriptScore,
    TranscriptScorer,
    TranscriptScorerConfig,
)
from her_roleplay import DialogueLine, Scene

from ._auth import require_key
from ._errors import InputTooLarge, InvalidRequest
from ._protocol import Seed, _Body
from ._routes import ERROR_RESPONSES

MAX_TRANSCRIPT_LINES = 200
MAX_JUDGE_TOKENS = 4096


class TranscriptScoreBody(_Body):
    """A scene (a CoSER test-set record, as published) and a re-enactment of it."""

    scene: Scene = Field(description="the CoSER record: scenario, profiles, plot, original dialogues, ...")
    transcript: list[DialogueLine] = Field(
        min_length=1,
        description="the re-enactment, one {character, message} per line; messages in HER tags "
        "or CoSER brackets (thoughts are removed before judging)",
    )
    dimensions: list[TranscriptDimension] | None = Field(None, description="default: all four")
    seed: Seed | None = Field(None, description="default: the scene's own seed")
    max_tokens: int = Field(1024, ge=16, le=MAX_JUDGE_TOKENS, description="token limit of one flaw list")
    max_flaws: int = Field(10, ge=1, le=10, description="flaws listed per dimension at most")
    max_instance_chars: int = Field(MAX_INSTANCE_CHARS, ge=10, le=MAX_INSTANCE_CHARS)
    protocol: ScoringProtocol = Field("coser", description="coser: CoSER's flaw types and severities "
                                      "(comparable with published scores); her: ours (severities 1-5)")


transcripts_router = APIRouter(dependencies=[Depends(require_key)], responses=ERROR_RESPONSES, tags=["transcripts"])


@transcripts_router.post("/v1/score/transcript", response_model=TranscriptScore)
async def score_transcript(body: TranscriptScoreBody, request: Request) -> TranscriptScore:
    """Score one re-enactment on CoSER's four dimensions: flaw lists, per-dimension scores, average.

    A dimension whose judge output stayed unreadable has status "error" and no score; the average is
    then null and the status "error" (HTTP 200: the request itself was served).
    """
    if len(body.transcript) > MAX_TRANSCRIPT_LINES:
        raise InputTooLarge(f"transcript has {len(body.transcript)} lines; at most {MAX_TRANSCRIPT_LINES}")
    config = TranscriptScorerConfig(
        max_tokens=body.max_tokens, max_flaws=body.max_flaws, max_instance_chars=body.max_instance_chars,
        protocol=body.protocol,
    )
    try:
        return await request.app.state.service.score_transcript(
            lambda engine: TranscriptScorer(engine, config).score(
                body.scene, body.transcript, dimensions=body.dimensions, seed=body.seed),
            judge_calls=len(body.dimensions or get_args(TranscriptDimension)))
    except TranscriptInputError as exc:
        raise InvalidRequest(str(exc)) from None
