"""The HER GenRM as a service: FastAPI app, micro-batcher, verdict cache, telemetry.

Run it with `her serve` (or `make serve`); embed it with `build_app(settings, engine=...)`.
"""

from ._app import build_app
from ._batcher import BatcherStopped, BatchTimeout, MicroBatcher, QueueFull
from ._cache import (
    KEY_PREFIX,
    LRUVerdictCache,
    RedisVerdictCache,
    VerdictCache,
    build_cache,
    mirror_verdict,
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
from ._settings import ServerSettings, get_settings
from ._telemetry import JudgeTelemetry

__all__ = [
    "HACK_PROBES",
    "KEY_PREFIX",
    "BatchTimeout",
    "BatcherStopped",
    "BodyTooLarge",
    "ErrorEnvelope",
    "InfoResponse",
    "InputTooLarge",
    "JudgeBatchBody",
    "JudgeBatchResponse",
    "JudgeBody",
    "JudgeService",
    "JudgeTelemetry",
    "LRUVerdictCache",
    "MicroBatcher",
    "NotReady",
    "OpenRLHFRewardBody",
    "OpenRLHFRewardResponse",
    "QueueFull",
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
    "get_settings",
    "mirror_verdict",
    "verdict_cache_key",
]
