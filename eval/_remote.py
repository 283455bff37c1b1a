"""Score transcripts on a running rm_server (``POST /v1/score/transcript``).

Transient failures (connection errors, 429, 5xx) are retried with exponential back-off (honouring a
``Retry-After`` header); anything else, or running out of attempts, raises
:class:`RemoteScoringError`, which the runner records as that sample's failure.

Several servers (``--judge-url http://a:8000,http://b:8000``, or a list): requests take turns at the
first URL they try, and one that meets a transient failure there goes on to the next URL at once; the
back-off starts only after every URL failed. Each transcript's score comes from one response only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from her_genrm import TranscriptScore
from her_roleplay import DialogueLine, Scene

ROUTE = "/v1/score/transcript"
_RETRY_STATUS = {429, 500, 502, 503, 504}


class RemoteScoringError(RuntimeError):
    """The scoring server refused the request or stayed unavailable."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class RemoteScorerOptions:
    """Judge settings sent with every request (the server bounds them)."""

    max_tokens: int | None = None
    max_flaws: int | None = None
    max_instance_chars: int | None = None
    protocol: str | None = None
    """"coser" (CoSER's flaw types and severities) or "her"; None: the server's default (coser)."""

    def as_body(self) -> dict[str, int | str]:
        return {k: v for k, v in vars(self).items() if v is not None}


class RemoteTranscriptScorer:
    """A transcript scorer backed by rm_server; same ``score`` contract as the local scorer."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout_s: float = 900.0,
        attempts: int = 5,
        options: RemoteScorerOptions | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_urls = _split_urls(base_url)
        self.base_url = ",".join(self.base_urls)
        self.attempts = attempts
        self.options = options or RemoteScorerOptions()
        self.model_id = f"remote:{self.base_url}"
        self._clients = {
            url: httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, transport=transport)
            for url in self.base_urls
        }
        self._turn = itertools.count()

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
            **self.options.as_body(),
        }
        if dimensions is not None:
            body["dimensions"] = list(dimensions)
        if seed is not None:
            body["seed"] = seed
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
            stop=stop_after_attempt(self.attempts),
            wait=_wait,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._post(body)
        except _Retryable as exc:
            raise RemoteScoringError(
                f"{ROUTE} on {self.base_url} still failing after {self.attempts} attempts: {exc}"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post(self, body: dict[str, Any]) -> TranscriptScore:
        """One attempt: the URLs in turn (from a rotating start) until one answers; the next URL gets the
        request only after the previous one failed, so at most one answer is ever read."""
        start = next(self._turn) % len(self.base_urls)
        failure: _Retryable | None = None
        for url in [*self.base_urls[start:], *self.base_urls[:start]]:
            try:
                return await self._post_to(url, body)
            except _Retryable as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def _post_to(self, url: str, body: dict[str, Any]) -> TranscriptScore:
        try:
            resp = await self._clients[url].post(ROUTE, json=body)
        except httpx.TransportError as exc:
            raise _Retryable(f"{url}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code in _RETRY_STATUS:
            raise _Retryable(f"{url}: HTTP {resp.status_code}: {_message(resp)}", _retry_after(resp))
        if resp.status_code != 200:
            raise RemoteScoringError(f"{url}{ROUTE} answered {resp.status_code}: {_message(resp)}")
        return TranscriptScore.model_validate(resp.json())

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()


def _split_urls(value: str | Sequence[str]) -> list[str]:
    parts = value.split(",") if isinstance(value, str) else list(value)
    urls = list(dict.fromkeys(p.strip().rstrip("/") for p in parts if p and p.strip()))
    if not urls:
        raise ValueError(f"no judge URL in {value!r}")
    return urls


_backoff = wait_exponential_jitter(initial=1.0, max=30.0)


def _wait(state: Any) -> float:
    exc = state.outcome.exception() if state.outcome else None
    after = getattr(exc, "retry_after", None)
    return max(after or 0.0, _backoff(state))


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return min(60.0, float(resp.headers.get("retry-after", "")))
    except ValueError:
        return None


def _message(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error", {})
        return f"{err.get('type', '')}: {err.get('message', '')}".strip(": ") or resp.text[:300]
    except (ValueError, AttributeError):
        return resp.text[:300]
