"""The `openai` engine: any server that speaks the OpenAI HTTP API.

One shared ``httpx.AsyncClient``; the requests of a batch go out concurrently (at most
``max_concurrency`` in flight) and come back in order. Chat requests use
``/v1/chat/completions``, raw prompts ``/v1/completions``.

Servers differ in how they take constraints and assistant prefill, so the engine speaks one of
three *constraint styles*:

=============  ===================================  ===================================  ==========
style          ``json_schema``                      ``choices``                          prefill
=============  ===================================  ===================================  ==========
``vllm``       ``response_format`` json_schema and  ``structured_outputs.choice``        yes
               ``structured_outputs.json``
``llama_cpp``  ``response_format`` json_object      GBNF ``grammar`` (one alternative    no
               with ``schema`` (chat only)          per choice)
``openai``     ``response_format`` json_schema      a JSON-schema string ``enum``; the   no
               (chat only)                          output ``"A"`` is unquoted
=============  ===================================  ===================================  ==========

``auto`` (the default) asks ``GET /v1/models`` once: ``owned_by == "vllm"`` picks ``vllm``,
``"llamacpp"`` (llama.cpp's own server) or ``"me"`` (llama-cpp-python's server) picks
``llama_cpp``, anything else (or a failing ``/v1/models``) picks ``openai``.

Prefill on chat requests sends the assistant message last with ``continue_final_message: true``
and ``add_generation_prompt: false``. Only vLLM's chat endpoint honours these fields:
llama-cpp-python drops unknown fields silently (it would close the assistant turn and open a new
one), ``transformers serve`` rejects them with 422, and OpenAI has no continuation. So prefill on a
chat request in any other style raises `EngineBadRequest` rather than produce a silently wrong
prompt. On raw prompts prefill is simply appended to the prompt, in every style.

``choice_logprobs``: the server returns the top-k log-probabilities of every generated token.
At the first token that reaches into the choice text (after the opening quote in ``openai``
style), each choice gets the log-sum-exp of the listed tokens that are a prefix of it; the scores
are then renormalised over the choices. A choice with no listed token gets the smallest listed
log-probability (an upper bound: an unlisted token is no likelier than the last listed one). The
estimate is exact when the choices start with distinct tokens that all appear in the top-k list;
choices sharing a first token share its mass.

Errors: a refused connection, DNS or connect timeout raises `EngineUnavailable`; a read timeout
raises `EngineTimeout` (both fail the whole batch). A 4xx answer raises `EngineBadRequest` with the
server's message, except 429 (overloaded) which, like any 5xx or an unreadable body, becomes an
error result for that request only (``finish_reason="error"``, ``error=...``), so one failing item
does not sink its batch neighbours.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import TYPE_CHECKING, Any, Literal

import httpx

from ._types import (
    Engine,
    EngineBadRequest,
    EngineTimeout,
    EngineUnavailable,
    FinishReason,
    GenRequest,
    GenResult,
    TokenLogprobs,
)

if TYPE_CHECKING:
    from ._settings import EngineSettings

ConstraintStyle = Literal["vllm", "llama_cpp", "openai"]
_STYLES: tuple[str, ...] = ("vllm", "llama_cpp", "openai", "auto")
# One generated token as (text, logprob, [(alternative text, logprob), ...]).

class OpenAIEngine(Engine):
    """Engine backed by an OpenAI-compatible HTTP server.

    Args:
        model: the ``model`` field sent with every request (some servers require the exact name
            they were started with; `model_id` reports it).
        base_url: server root, with or without a trailing ``/v1``.
        api_key: sent as ``Authorization: Bearer ...`` when given.
        timeout: seconds allowed per HTTP request (connect, write, read); waiting for a
            concurrency slot does not count.
        max_concurrency: requests in flight at once (also the connection-pool size).
        constraint_style: ``vllm``, ``llama_cpp``, ``openai`` or ``auto`` (see the module doc).
        top_logprobs: alternatives asked per token for ``choices`` requests (OpenAI allows 20).
        extra_body: fields merged into every request body (e.g. ``{"top_k": 1}``).
    """

    kind = "openai"
    continuous_batching = True  # the server batches whatever is in flight

    @classmethod
    def options_from(cls, settings: EngineSettings) -> dict[str, Any]:
        """Constructor options from engine settings (unset ones left out)."""
        if not settings.engine_base_url:
            raise ValueError("engine=openai needs engine_base_url (RM_ENGINE_BASE_URL / --engine-base-url)")
        key = settings.engine_api_key.get_secret_value() if settings.engine_api_key else None
        return {"base_url": settings.engine_base_url, "api_key": key}

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_concurrency: int = 16,
        constraint_style: ConstraintStyle | Literal["auto"] = "auto",
        top_logprobs: int = 20,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if not base_url:
            raise EngineBadRequest("base_url is required for the openai engine, e.g. http://127.0.0.1:8000")
        if timeout <= 0 or max_concurrency < 1 or top_logprobs < 1:
            raise EngineBadRequest(
                f"need timeout > 0, max_concurrency >= 1 and top_logprobs >= 1; got timeout={timeout}, "
                f"max_concurrency={max_concurrency}, top_logprobs={top_logprobs}"
            )
        if constraint_style not in _STYLES:
            raise EngineBadRequest(f"constraint_style must be one of {_STYLES}, got {constraint_style!r}")
        root = base_url.rstrip("/")
        self.base_url = root[: -len("/v1")] if root.endswith("/v1") else root
        self.model_id = model
        self.timeout = timeout
        self.top_logprobs = top_logprobs
        self._extra_body = dict(extra_body or {})
        self._style: ConstraintStyle | None = None if constraint_style == "auto" else constraint_style
        self._style_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(max_concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )

    @property
    def constraint_style(self) -> ConstraintStyle | None:
        """The style in use; None until ``auto`` has asked the server (first `generate`)."""
        return self._style

    async def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Run `requests` concurrently; results keep their order (see the module doc for errors)."""
        if not requests:
            return []
        style = await self._resolve_style()
        # Build every body first so an unservable request fails before anything is sent.
        bodies = [self._body(req, style) for req in requests]
        outcomes = await asyncio.gather(
            *(self._send(req, path, body, style) for req, (path, body) in zip(requests, bodies, strict=True)),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return list(outcomes)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> OpenAIEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ----- style ---------------------------------------------------------------------------------

    async def _resolve_style(self) -> ConstraintStyle:
        if self._style is not None:
            return self._style
        async with self._style_lock:
            if self._style is None:
                self._style = await self._detect_style()
        return self._style

    async def _detect_style(self) -> ConstraintStyle:
        try:
            # `Connection: close` keeps this socket out of the pool: a server whose /v1/models
            # crashed (transformers serve without a hub cache) may leave it half-closed.
            resp = await self._client.get("/v1/models", headers={"Connection": "close"})
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.base_url, self.timeout) from exc
        try:
            owners = {str(m.get("owned_by", "")) for m in resp.json().get("data", [])}
        except (ValueError, AttributeError):
            owners = set()  # e.g. `transformers serve` answers 500 here; it takes the plain style
        if "vllm" in owners:
            return "vllm"
        if owners & {"llamacpp", "me"}:
            return "llama_cpp"
        return "openai"

    # ----- request bodies ------------------------------------------------------------------------

    def _body(self, req: GenRequest, style: ConstraintStyle) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model_id,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stream": False,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        if req.stop:
            body["stop"] = list(req.stop)
        chat = req.messages is not None
        if chat:
            path = "/v1/chat/completions"
            messages = [m.model_dump() for m in req.messages or []]
            if req.prefill:
                if style != "vllm":
                    raise EngineBadRequest(
                        f"assistant prefill needs a server that honours `continue_final_message` (vLLM); "
                        f"constraint style {style!r} cannot continue an assistant turn. Send a raw `prompt` "
                        "ending with the prefill instead."
                    )
                messages.append({"role": "assistant", "content": req.prefill})
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            body["messages"] = messages
        else:
            path = "/v1/completions"
            body["prompt"] = (req.prompt or "") + req.prefill
        if req.json_schema is not None:
            body.update(_schema_fields(req.json_schema, style, chat))
        elif req.choices is not None:
            body.update(_choice_fields(req.choices, style, chat))
        top = req.logprobs or (self.top_logprobs if req.choices is not None else None)
        if top:
            if chat:
                body["logprobs"] = True
                body["top_logprobs"] = top
            else:
                body["logprobs"] = top
        body.update(self._extra_body)
        return path, body

    # ----- one HTTP call -------------------------------------------------------------------------

    async def _send(
        self, req: GenRequest, path: str, body: dict[str, Any], style: ConstraintStyle
    ) -> GenResult:
        async with self._slots:
            try:
                resp = await self._client.post(path, json=body)
            except httpx.HTTPError as exc:
                raise _transport_error(exc, self.base_url + path, self.timeout) from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            return _error_result(f"server answered {resp.status_code}: {_server_message(resp)}")
        if resp.status_code >= 400:
            message = _server_message(resp)
            raise EngineBadRequest(f"server rejected the request ({resp.status_code}): {message}")
        try:
            payload = resp.json()
            choice = payload["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return _error_result(f"malformed response from {path}: {exc!r}: {resp.text[:200]}")
        usage = payload.get("usage") or {}
        result = GenResult(
            text=text or "",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=_finish_reason(choice.get("finish_reason")),
        )
        entries = _token_logprobs(choice.get("logprobs"))
        if req.logprobs:
            result.token_logprobs = entries
        if req.choices is not None:
            quoted = style == "openai"  # the output is a JSON string literal
            constraint = f"{style!r} choice constraint"
            return attach_choice_logprobs(result, req.choices, entries, quoted=quoted, constraint=constraint)
        return result


# ----- constraint encodings ------------------------------------------------------------------------


def _schema_fields(schema: dict[str, Any], style: ConstraintStyle, chat: bool) -> dict[str, Any]:
    if style == "vllm":
        return {
            "response_format": _json_schema_format(schema),
            "structured_outputs": {"json": schema},
        }
    if not chat:
        raise EngineBadRequest(
            f"constraint style {style!r} has no JSON-schema constraint for raw prompts; use chat messages"
        )
    if style == "llama_cpp":
        return {"response_format": {"type": "json_object", "schema": schema}}
    return {"response_format": _json_schema_format(schema)}


def _choice_fields(choices: list[str], style: ConstraintStyle, chat: bool) -> dict[str, Any]:
    if style == "vllm":
        return {"structured_outputs": {"choice": list(choices)}}
    if style == "llama_cpp":
        return {"grammar": "root ::= " + " | ".join(_gbnf_literal(c) for c in choices)}
    if not chat:
        raise EngineBadRequest("constraint style 'openai' has no choice constraint for raw prompts")
    return {"response_format": _json_schema_format({"type": "string", "enum": list(choices)}, name="choice")}


def _json_schema_format(schema: dict[str, Any], name: str = "output") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _gbnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


# ----- responses ---------------------------------------------------------------------------------


def attach_choice_logprobs(
    result: GenResult, choices: list[str], entries: list[TokenLogprobs], *, quoted: bool, constraint: str
) -> GenResult:
    """Check that `result.text` is one of `choices` and add `choice_logprobs` (see the module doc).

    `entries` are the generated tokens with their top alternatives; `quoted` means the output is
    a JSON string literal (``"A"``). A text outside the choices, or no usable logprobs, gives an
    error result naming `constraint` (the server probably ignored it).
    """
    # Choices may carry meaningful whitespace (" yes"), so an exact match wins over a stripped one.
    picked: str | None = result.text if result.text in choices else result.text.strip()
    if quoted:
        try:
            picked = json.loads(result.text)
        except ValueError:
            picked = None
    if picked not in choices:
        return result.model_copy(
            update={
                "finish_reason": "error",
                "error": f"output {result.text!r} is not one of the choices {choices}: "
                f"the server may ignore the {constraint}",
            }
        )
    scores = _choice_scores(entries, choices, quoted) if entries else None
    if scores is None:
        error = "the server returned no usable logprobs"
        return result.model_copy(update={"text": picked, "finish_reason": "error", "error": error})
    return result.model_copy(update={"text": picked, "choice_logprobs": scores})


def _token_logprobs(raw: Any) -> list[TokenLogprobs]:
    """Normalise chat (``content: [...]``) and legacy completion (``tokens/...``) logprobs."""
    if not isinstance(raw, dict):
        return []
    out: list[TokenLogprobs] = []
    if isinstance(raw.get("content"), list):
        for item in raw["content"]:
            alts = [(a["token"], float(a["logprob"])) for a in item.get("top_logprobs") or []]
            out.append((item["token"], float(item["logprob"]), alts))
    elif isinstance(raw.get("tokens"), list):
        tops = raw.get("top_logprobs") or [None] * len(raw["tokens"])
        for tok, lp, top in zip(raw["tokens"], raw.get("token_logprobs") or [], tops, strict=False):
            alts = [(t, float(v)) for t, v in (top or {}).items()]
            out.append((tok, float(lp) if lp is not None else -math.inf, alts))
    return out


def _choice_scores(entries: list[TokenLogprobs], choices: list[str], quoted: bool) -> dict[str, float] | None:
    lead = 1 if quoted else 0  # characters before the choice text (the opening quote)
    prefix = ""
    position = None
    for i, (token, _, _) in enumerate(entries):
        if len(prefix + token) > lead:
            position = i
            break
        prefix += token
    if position is None:
        return None
    token, logprob, alts = entries[position]
    listed = dict(alts)
    listed.setdefault(token, logprob)
    listed = {t: lp for t, lp in listed.items() if math.isfinite(lp)}
    if not listed:
        return None
    floor = min(listed.values())
    raw: dict[str, float] = {}
    for choice in choices:
        full = json.dumps(choice) if quoted else choice
        hits = [lp for t, lp in listed.items() if len(prefix + t) > lead and full.startswith(prefix + t)]
        raw[choice] = _logsumexp(hits) if hits else floor
    total = _logsumexp(list(raw.values()))
    return {c: v - total for c, v in raw.items()}


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _finish_reason(raw: Any) -> FinishReason:
    return "length" if raw == "length" else "stop"


def _error_result(message: str) -> GenResult:
    return GenResult(text="", finish_reason="error", error=message)


def _server_message(resp: httpx.Response) -> str:
    """The server's own error text: OpenAI envelope, FastAPI ``detail``, or the raw body."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("detail", "message", "error"):
            if data.get(key):
                return str(data[key])[:500]
    return str(data)[:500]


def _transport_error(exc: httpx.HTTPError, url: str, timeout: float) -> Exception:
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
        return EngineUnavailable(f"cannot reach {url}: {exc!r}")
    if isinstance(exc, httpx.TimeoutException):
        return EngineTimeout(f"no answer from {url} within {timeout} s")
    return EngineUnavailable(f"connection to {url} failed: {exc!r}")
