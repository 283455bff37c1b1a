"""Thin routers: parse the body, call the service, return its result. No behaviour here."""

from __future__ import annotations

from typing import Any

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
from ._serving import JudgeService

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorEnvelope} for code in (400, 401, 413, 422, 429, 503, 504)
}

health = APIRouter(tags=["health"])
api = APIRouter(dependencies=[Depends(require_key)], responses=ERROR_RESPONSES)


def service(request: Request) -> JudgeService:
    return request.app.state.service


@health.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """Alive: 200 while the process can serve or is still loading; 503 once the model failed to load
    or the engine died (restarting is the fix)."""
    svc = service(request)
    if svc.failure is not None or svc.state == "failed":
        return JSONResponse({"status": "degraded", "error": svc.failure}, status_code=503)
    return JSONResponse({"status": "ok", "state": svc.state})


@health.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready: model loaded, engine alive, batcher running, queue not full. Needs no key (probes carry none)."""
    svc = service(request)
    state = svc.state
    full = svc.batcher.depth >= svc.settings.max_queue
    ready = state == "ready" and not full
    body = {"status": "ready" if ready else "not_ready", "state": state, "error": svc.failure,
            "model_loaded": svc.genrm is not None, "queue_depth": svc.batcher.depth, "queue_full": full}
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
    [verdict] = await service(request).judge_bodies([body])
    return verdict


@api.post("/v1/judge/batch", response_model=JudgeBatchResponse)
async def judge_batch(body: JudgeBatchBody, request: Request) -> JudgeBatchResponse:
    """Judge many pairs; they share engine batches with every other request."""
    return JudgeBatchResponse(verdicts=await service(request).judge_bodies(body.items))


@api.post("/v1/rewards", response_model=RewardsResponse)
async def rewards(body: RewardsBody, request: Request) -> RewardsResponse:
    """Rewards for RL: completions vs references, or win rates inside groups."""
    return await service(request).rewards(body)


@api.post("/get_reward", response_model=OpenRLHFRewardResponse)
async def get_reward(body: OpenRLHFRewardBody, request: Request) -> OpenRLHFRewardResponse:
    """OpenRLHF remote reward protocol (point --remote_rm_url here)."""
    return await service(request).openrlhf_rewards(body)


metrics_router = APIRouter(tags=["metrics"])


@metrics_router.get("/metrics", response_class=Response,
                    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition"}})
async def metrics(request: Request) -> Response:
    svc = service(request)
    svc.telemetry.set_queue_depth(svc.batcher.depth)
    svc.telemetry.set_ready(svc.ready)
    payload, content_type = svc.telemetry.render()
    return Response(payload, media_type=content_type)
