"""Wire-independent request/result types and the one `Engine` interface.

Exception tree (third-party errors are translated into these at each engine's boundary)::

    EngineError
    ├── EngineUnavailable   the backend cannot be reached or is not installed
    ├── EngineTimeout       the backend did not answer in time
    └── EngineBadRequest    the request cannot be served as asked (e.g. two constraints)
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field, model_validator


class EngineError(Exception):
    """Base class of every engine failure."""


class EngineUnavailable(EngineError):
    """The backend is not installed, not loaded, or not reachable."""


class EngineTimeout(EngineError):
    """The backend did not answer within its deadline."""


class EngineBadRequest(EngineError):
    """The request is invalid for this engine."""


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenRequest(BaseModel):
    """One generation. Give `messages` (chat) or `prompt` (raw text), never both.

    `prefill` continues the assistant turn: the chat template is applied with the
    assistant message left open, and the result's `text` excludes the prefill.
    At most one constraint: `json_schema` (output is JSON valid against it) or
    `choices` (output is exactly one of the strings; `choice_logprobs` gives the
    log-probability of every choice, normalised over the choices).
    `logprobs` asks for the top-k alternatives of every generated token (`token_logprobs`), as the
    backend scores them after its constraint.
    """

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prefill: str = ""
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    json_schema: dict[str, Any] | None = None
    choices: list[str] | None = None
    logprobs: int | None = Field(None, ge=1, le=20)

    @model_validator(mode="after")
    def _check(self) -> GenRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` or `prompt`")
        if self.json_schema is not None and self.choices is not None:
            raise ValueError("at most one constraint: `json_schema` or `choices`")
        if self.choices is not None and (len(self.choices) < 2 or len(set(self.choices)) != len(self.choices)):
            raise ValueError("`choices` needs at least two distinct strings")
        return self


FinishReason = Literal["stop", "length", "error"]
# One generated token: (text, log-probability, top alternatives as (text, log-probability)).
TokenLogprobs = tuple[str, float, list[tuple[str, float]]]


class GenResult(BaseModel):
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = "stop"
    # For `choices` requests: log P(choice) normalised over the choices (sums to 1 after exp).
    choice_logprobs: dict[str, float] | None = None
    # For `logprobs` requests: every generated token with its top alternatives.
    token_logprobs: list[TokenLogprobs] | None = None
    error: str | None = None


@runtime_checkable
class Engine(Protocol):
    """Every backend implements this. `generate` keeps the order of `requests`.

    A failure of one request is reported in its own result (`finish_reason="error"`,
    `error=...`) where the backend allows it; a failure of the whole backend raises
    an `EngineError`.

    What a caller may rely on beyond `generate` is declared here, so nobody guesses by name: a backend
    that subclasses `Engine` inherits the defaults and overrides what it can do.
    """

    kind: str
    """The registry name of the backend (``vllm``, ``transformers``, ``openai``, ...)."""
    model_id: str
    continuous_batching: bool = False
    """Requests should reach `generate` as they arrive (the backend batches in flight), not in batches."""
    continues_turns: bool = False
    """A `prefill` is honoured on every model: the assistant turn is continued, never restarted."""

    @classmethod
    def options_from(cls, settings: Any) -> dict[str, Any]:
        """Constructor options from `settings` (`EngineSettings`); `build_engine` passes them on."""
        return {}

    @classmethod
    def gpus_needed(cls, settings: Any) -> float:
        """GPUs one engine built from `settings` (`EngineSettings`) occupies; a scheduler reserves them."""
        return 0.0

    @property
    def tokenizer(self) -> Any:
        """The tokenizer prompts are encoded with; None where the backend keeps it (a remote server)."""
        return None

    @property
    def alive(self) -> bool:
        """False once the backend was closed or died."""
        return True

    async def generate(self, requests: list[GenRequest]) -> list[GenResult]: ...

    async def aclose(self) -> None: ...


def render_chat(tokenizer: Any, req: GenRequest) -> str:
    """The prompt text a local engine's model continues: its chat template applied, the assistant turn left
    open when `req` is prefilled (the prefill is part of the text), else a generation prompt added."""
    if req.messages is None:
        return (req.prompt or "") + req.prefill
    messages = [m.model_dump() for m in req.messages]
    if req.prefill:
        messages.append({"role": "assistant", "content": req.prefill})
        return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
