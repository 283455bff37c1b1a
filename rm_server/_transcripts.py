"""`POST /v1/score/transcript`: CoSER-style flaw scoring of a whole re-enacted scene.

Wire types and a thin router; the behaviour is :class:`her_genrm._transcript.TranscriptScorer`, run on
the server's judge engine (503 while it loads). Judge settings in the body are
:class:`her_genrm.TranscriptJudgeOptions`, bounded so one client cannot ask for unbounded generations.
"""

from __future__ import annotations

from typing import get_args

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from her_genrm import (
    TranscriptDimension,
    TranscriptInputError,
    TranscriptJudgeOptions,
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


class TranscriptScoreBody(_Body, TranscriptJudgeOptions):
    """A scene (a CoSER test-set record, as published) and a re-enactment of it."""

    scene: Scene = Field(description="the CoSER record: scenario, profiles, plot, original dialogues, ...")
    transcript: list[DialogueLine] = Field(
        min_length=1,
        description="the re-enactment, one {character, message} per line; messages in HER tags "
        "or CoSER brackets (thoughts are removed before judging)",
    )
    dimensions: list[TranscriptDimension] | None = Field(None, description="default: all four")
    seed: Seed | None = Field(None, description="default: the scene's own seed")


transcripts_router = APIRouter(dependencies=[Depends(require_key)], responses=ERROR_RESPONSES, tags=["transcripts"])


@transcripts_router.post("/v1/score/transcript", response_model=TranscriptScore)
async def score_transcript(body: TranscriptScoreBody, request: Request) -> TranscriptScore:
    """Score one re-enactment on CoSER's four dimensions: flaw lists, per-dimension scores, average.

    A dimension whose judge output stayed unreadable has status "error" and no score; the average is
    then null and the status "error" (HTTP 200: the request itself was served).
    """
    if len(body.transcript) > MAX_TRANSCRIPT_LINES:
        raise InputTooLarge(f"transcript has {len(body.transcript)} lines; at most {MAX_TRANSCRIPT_LINES}")
    config = TranscriptScorerConfig(**body.model_dump(include=set(TranscriptJudgeOptions.model_fields)))
    try:
        return await request.app.state.service.score_transcript(
            lambda engine: TranscriptScorer(engine, config).score(
                body.scene, body.transcript, dimensions=body.dimensions, seed=body.seed),
            judge_calls=len(body.dimensions or get_args(TranscriptDimension)))
    except TranscriptInputError as exc:
        raise InvalidRequest(str(exc)) from None
