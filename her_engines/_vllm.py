"""The `vllm` engine: vLLM's in-process ``AsyncLLM`` (install with ``pip install her-genrm[vllm]``).

vLLM is imported inside the constructor, so importing this module never needs it. Chat requests
are rendered with the model's own chat template (prefill: the assistant message is left open with
``continue_final_message``) and sent as token ids; every request of a batch is submitted at once
and vLLM's scheduler batches them, with prefix caching so shared judge instructions are computed
once. Constraints use ``StructuredOutputsParams`` (``json`` or ``choice``; vLLM >= 0.11), and
``choice_logprobs`` come from the top-k logprobs of the first generated token, scored as in the
`openai` engine.

Errors: vLLM missing or failing to start → `EngineUnavailable`; a request vLLM rejects as invalid
→ `EngineBadRequest`; a dead engine process → `EngineUnavailable`; any other failure of one
request → an error result for that request only.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from pathlib import Path
from typing import Any

from ._factory import DEFAULT_MODEL
from ._openai import TokenLogprobs, attach_choice_logprobs
from ._types import EngineBadRequest, EngineUnavailable, GenRequest, GenResult

INSTALL_HINT = "pip install her-genrm[vllm]"


class VLLMEngine:
    """In-process vLLM engine (needs a vLLM build for this machine, usually a GPU).

    Args:
        model: an HF folder, a hub id vLLM can load, or ``smollm2-135m-instruct`` (the bundled GGUF,
            converted once to an HF folder).
        gpu_memory_utilization, max_model_len, enable_prefix_caching: passed to ``AsyncEngineArgs``.
        top_logprobs: alternatives per token asked for ``choices`` requests.
        engine_args: any other ``AsyncEngineArgs`` field (e.g. ``dtype="bfloat16"``, ``seed=0``).
    """

    def __init__(
        self,
        model: str,
        *,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        top_logprobs: int = 20,
        **engine_args: Any,
    ) -> None:
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineUnavailable(f"the vllm engine needs vLLM: {INSTALL_HINT} ({exc})") from exc
        self.model_id = model
        self.top_logprobs = top_logprobs
        self._ids = itertools.count()
        self._tokenizer: Any = None
        args = AsyncEngineArgs(
            model=_local_path(model),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            **engine_args,
        )
        try:
            self._llm = AsyncLLM.from_engine_args(args)
        except Exception as exc:  # vLLM raises many kinds here (no GPU, OOM, bad config)
            raise EngineUnavailable(f"vLLM could not start {model!r}: {exc}") from exc

    async def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Submit all `requests` at once; results keep their order."""
        tokenizer = await self._get_tokenizer()
        jobs = [self._one(tokenizer, req) for req in requests]
        return list(await asyncio.gather(*jobs))

    async def aclose(self) -> None:
        self._llm.shutdown()

    async def _get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            tokenizer = self._llm.get_tokenizer()
            # Older vLLM releases made this a coroutine.
            self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        return self._tokenizer

    async def _one(self, tokenizer: Any, req: GenRequest) -> GenResult:
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt = _render(tokenizer, req)
        params = self._sampling_params(req)
        final = None
        try:
            async for out in self._llm.generate(prompt, params, f"her-{next(self._ids)}"):
                final = out
        except EngineDeadError as exc:
            raise EngineUnavailable(f"the vLLM engine died: {exc}") from exc
        except (ValueError, TypeError) as exc:  # vLLM's validation errors derive from ValueError
            raise EngineBadRequest(f"vLLM rejected the request: {exc}") from exc
        except Exception as exc:
            return GenResult(text="", finish_reason="error", error=f"vLLM generation failed: {exc!r}")
        if final is None or not final.outputs:
            return GenResult(text="", finish_reason="error", error="vLLM returned no output")
        out = final.outputs[0]
        result = GenResult(
            text=out.text,
            prompt_tokens=len(final.prompt_token_ids or []),
            completion_tokens=len(out.token_ids),
            finish_reason="length" if out.finish_reason == "length" else "stop",
        )
        if req.choices is None:
            return result
        entries = _entries(out.token_ids, out.logprobs or [])
        return attach_choice_logprobs(
            result, req.choices, entries, quoted=False, constraint="vLLM choice constraint"
        )

    def _sampling_params(self, req: GenRequest) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        structured = None
        if req.json_schema is not None:
            structured = StructuredOutputsParams(json=req.json_schema)
        elif req.choices is not None:
            structured = StructuredOutputsParams(choice=list(req.choices))
        return SamplingParams(
            n=1,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=list(req.stop) or None,
            logprobs=self.top_logprobs if req.choices is not None else None,
            structured_outputs=structured,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )


def _local_path(model: str) -> str:
    """The bundled model and local paths become an HF folder; anything else goes to vLLM as is."""
    if model == DEFAULT_MODEL or Path(model).expanduser().exists():
        from ._models import ensure_hf_folder

        return str(ensure_hf_folder(model))
    return model


def _render(tokenizer: Any, req: GenRequest) -> Any:
    """A raw prompt stays text; chat becomes token ids of the rendered chat template."""
    if req.messages is None:
        return (req.prompt or "") + req.prefill
    messages = [m.model_dump() for m in req.messages]
    if req.prefill:
        messages.append({"role": "assistant", "content": req.prefill})
    text = tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=not req.prefill,
        continue_final_message=bool(req.prefill),
    )
    # The template already holds any BOS token; encoding without specials avoids a second one.
    return {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


def _entries(token_ids: Any, logprobs: list[dict[int, Any]]) -> list[TokenLogprobs]:
    """vLLM's per-position ``{token_id: Logprob}`` maps as (text, logprob, alternatives)."""
    out: list[TokenLogprobs] = []
    for token_id, position in zip(token_ids, logprobs, strict=False):
        alts = [(lp.decoded_token or "", float(lp.logprob)) for lp in position.values()]
        sampled = position.get(token_id)
        if sampled is None:  # never expected; stop rather than misalign the positions
            break
        out.append((sampled.decoded_token or "", float(sampled.logprob), alts))
    return out
