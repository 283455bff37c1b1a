"""Thin routers: parse the body, call the service, return its result. No behaviour here."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from her_genrm import Verdict

from ._auth import require_key
from ._protocol import (
    ErrorEnvelope,
    InfoResponse,
    JudgeBatchBody,
    JudgeBatchResponse,
    JudgeBody,
    OpenRLHFRewardBody,
    OpenRLHFRewardResponse,
    RewardsBody,
    RewardsResponse,
)
from ._serving import JudgeService, _request_from_body

_ERRORS = {code: {"model": ErrorEnvelope} for code in (401, 413, 422, 429, 503, 504)}

health = APIRouter(tags=["health"])
api = APIRouter(dependencies=[Depends(require_key)], responses=_ERRORS)


def service(request: Request) -> JudgeService:
    return request.app.state.service


@health.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process answers (the model may still be loading)."""
    return {"status": "ok"}


@api.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready: model loaded, batcher running, queue not full."""
    svc = service(request)
    full = svc.batcher.depth >= svc.settings.max_queue
    ready = svc.ready and not full
    body = {"status": "ready" if ready else "not_ready", "model_loaded": svc.genrm is not None,
            "queue_depth": svc.batcher.depth, "queue_full": full}
    return JSONResponse(body, status_code=200 if ready else 503)


@api.get("/v1/info", response_model=InfoResponse)
async def info(request: Request) -> InfoResponse:
    return request.app.state.info()


@api.get("/v1/principles")
async def principles(request: Request) -> dict:
    svc = service(request)
    library = request.app.state.library
    return {"version": library.version, "principles": library.to_list(),
            "model_loaded": svc.genrm is not None}


@api.post("/v1/judge", response_model=Verdict)
async def judge(body: JudgeBody, request: Request) -> Verdict:
    """Judge one pair of candidate replies."""
    return await service(request).judge_body(body)


@api.post("/v1/judge/batch", response_model=JudgeBatchResponse)
async def judge_batch(body: JudgeBatchBody, request: Request) -> JudgeBatchResponse:
    """Judge many pairs; they share engine batches with every other request."""
    svc = service(request)
    reqs = [_request_from_body(item) for item in body.items]
    use_cache = all(item.use_cache for item in body.items)
    return JudgeBatchResponse(verdicts=await svc.judge_many(reqs, use_cache=use_cache))


@api.post("/v1/rewards", response_model=RewardsResponse)
async def rewards(body: RewardsBody, request: Request) -> RewardsResponse:
    """Rewards for RL: completions vs references, or win rates inside groups."""
    return await service(request).rewards(body)


@api.post("/get_reward", response_model=OpenRLHFRewardResponse)
async def get_reward(body: OpenRLHFRewardBody, request: Request) -> OpenRLHFRewardResponse:
    """OpenRLHF remote reward protocol (point --remote_rm_url here)."""
    return await service(request).openrlhf_rewards(body)


metrics_router = APIRouter(tags=["metrics"])


@metrics_router.get("/metrics")
async def metrics(request: Request) -> Response:
    svc = service(request)
    svc.telemetry.set_queue_depth(svc.batcher.depth)
    payload, content_type = svc.telemetry.render()
    return Response(payload, media_type=content_type)
