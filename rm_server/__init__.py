"""The HER GenRM as a service: FastAPI app, micro-batcher, verdict cache, telemetry.

Run it with `her serve` (or `make serve`); embed it with `build_app(settings, engine=...)`.
"""

from ._app import build_app
from ._cache import (
    RedisVerdictCache,
    VerdictCache,
    build_cache,
    verdict_cache_key,
)
from ._errors import BodyTooLarge, InputTooLarge, NotReady, ServiceError, Unauthorized
from ._protocol import (
    ErrorEnvelope,
    InfoResponse,
    JudgeBatchBody,
    JudgeBatchResponse,
    JudgeBody,
    OpenRLHFRewardBody,
    OpenRLHFRewardResponse,
    RewardDetail,
    RewardsBody,
    RewardsResponse,
)
from ._serving import HACK_PROBES, JudgeService
from ._settings import ServerSettings
from ._telemetry import JudgeTelemetry

__all__ = [
    "HACK_PROBES",
    "BodyTooLarge",
    "ErrorEnvelope",
    "InfoResponse",
    "InputTooLarge",
    "JudgeBatchBody",
    "JudgeBatchResponse",
    "JudgeBody",
    "JudgeService",
    "JudgeTelemetry",
    "NotReady",
    "OpenRLHFRewardBody",
    "OpenRLHFRewardResponse",
    "RedisVerdictCache",
    "RewardDetail",
    "RewardsBody",
    "RewardsResponse",
    "ServerSettings",
    "ServiceError",
    "Unauthorized",
    "VerdictCache",
    "build_app",
    "build_cache",
    "verdict_cache_key",
]
