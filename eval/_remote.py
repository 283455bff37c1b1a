"""Score transcripts on a running rm_server (``POST /v1/score/transcript``).

Requests go through :class:`her_genrm.RMTransport`, the same transport as the reward client: transient
failures (transport errors, 408, 429, 5xx) are retried with backoff (a ``Retry-After`` is obeyed), each URL
has a circuit breaker, and with several servers (``--judge-url http://a:8000,http://b:8000``, or a list)
requests take turns at the first URL they try and pass on to the next after a transient failure, the
backoff starting only once every URL failed. Each transcript's score comes from one response only.
Anything else, or running out of attempts, raises :class:`RemoteScoringError`, which the runner records
as that sample's failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from her_genrm import RMTransport, TranscriptJudgeOptions, TranscriptScore
from her_genrm._transport import Rejected, Retryable
from her_roleplay import DialogueLine, Scene

ROUTE = "/v1/score/transcript"


class RemoteScoringError(RuntimeError):
    """The scoring server refused the request or stayed unavailable."""


class RemoteTranscriptScorer:
    """A transcript scorer backed by rm_server; same ``score`` contract as the local scorer. ``options``
    go with every request; those left unset take the server's defaults."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout_s: float = 900.0,
        attempts: int = 5,
        options: TranscriptJudgeOptions | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self._transport = RMTransport(base_url, api_key=api_key, request_timeout_s=timeout_s, max_attempts=attempts,
                                      retry_budget_s=float("inf"), http_transport=transport)
        self.base_urls = list(self._transport.urls)
        self.base_url = ",".join(self.base_urls)
        self.attempts = attempts
        self.options = options or TranscriptJudgeOptions()
        self.model_id = f"remote:{self.base_url}"

    async def score(
        self,
        scene: Scene,
        transcript: Sequence[DialogueLine],
        *,
        dimensions: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> TranscriptScore:
        body: dict[str, Any] = {
            "scene": scene.model_dump(mode="json", by_alias=True, exclude_none=True),
            "transcript": [{"character": line.character, "message": line.message} for line in transcript],
            **self.options.model_dump(exclude_unset=True),  # unset: the server's default
        }
        if dimensions is not None:
            body["dimensions"] = list(dimensions)
        if seed is not None:
            body["seed"] = seed
        return await self._post(body)

    async def _post(self, body: dict[str, Any]) -> TranscriptScore:
        try:
            return TranscriptScore.model_validate(await self._transport.post(ROUTE, body))
        except Retryable as exc:
            raise RemoteScoringError(
                f"{ROUTE} on {self.base_url} still failing after {self.attempts} attempts: {exc}"
            ) from None
        except Rejected as exc:
            raise RemoteScoringError(str(exc)) from None

    async def aclose(self) -> None:
        await self._transport.aclose()
