"""Our exception tree and the one mapping from exceptions to HTTP (status, error type).

    ServiceError
    ├── InvalidRequest  422  a request the caller must change (e.g. a template this server lacks)
    ├── InputTooLarge   422  an input exceeds a configured limit
    ├── BodyTooLarge    413  the request body exceeds RM_MAX_BODY_BYTES
    ├── Unauthorized    401  missing or wrong Bearer key
    └── NotReady        503  the model is still loading

The batcher's own QueueFull (429 + Retry-After), BatchTimeout (504) and BatcherStopped (503),
and the engine's EngineError family, are mapped here as well.
"""

from __future__ import annotations

from her_engines import EngineBadRequest, EngineError, EngineTimeout, EngineUnavailable

from ._admission import RateLimited
from ._batcher import BatcherStopped, BatchTimeout, QueueFull


class ServiceError(Exception):
    """Base of the errors this service raises on purpose."""


class InvalidRequest(ServiceError):
    pass


class InputTooLarge(ServiceError):
    pass


class BodyTooLarge(ServiceError):
    pass


class Unauthorized(ServiceError):
    pass


class NotReady(ServiceError):
    pass


_STATUS: list[tuple[type[Exception], int, str]] = [
    (InvalidRequest, 422, "invalid_request"),
    (InputTooLarge, 422, "input_too_large"),
    (BodyTooLarge, 413, "body_too_large"),
    (Unauthorized, 401, "unauthorized"),
    (NotReady, 503, "not_ready"),
    (RateLimited, 429, "rate_limited"),
    (QueueFull, 429, "queue_full"),
    (BatchTimeout, 504, "timeout"),
    (BatcherStopped, 503, "shutting_down"),
    (EngineBadRequest, 422, "engine_bad_request"),
    (EngineTimeout, 504, "engine_timeout"),
    (EngineUnavailable, 503, "engine_unavailable"),
    (EngineError, 502, "engine_error"),
]
# A bare ValueError from inside is a bug, answered 500 and logged, never dressed as the caller's mistake.


def status_of(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error type) of an exception; anything unknown is a 500."""
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal_error"


def mapped_exception_classes() -> list[type[Exception]]:
    return [cls for cls, _, _ in _STATUS]
