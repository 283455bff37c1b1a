"""The default engine: a Hugging Face causal LM run in-process (CPU by default).

How a call to :meth:`TransformersEngine.generate` is served:

- Free-text and ``json_schema`` requests share batched ``model.generate`` calls (left padding,
  prompts sorted by length to keep padding small). Per-row behaviour lives in our own logits
  processors and stopping criterion rather than in generate's flags, so requests with different
  temperatures, seeds, schemas, stop strings and token limits still share one batch: a row's
  grammar masks only its own logits, a sampled row draws from its own seeded ``torch.Generator``
  (so a seeded result does not depend on its batch neighbours), and a row stops on its own.
- ``choices`` requests decode nothing: the prompt runs once, its KV cache is repeated for every
  choice and one teacher-forced forward scores all choices exactly.
- Shared prompt prefixes (``prefix_cache=True``): when the prompts of a batch open with the same
  tokens (a judge's long system prompt), that prefix runs once and its KV cache is copied to every
  row, which then computes only its own suffix. Suffixes are left-padded *after* the prefix, and
  position ids come from the attention mask, so a row sees exactly the positions it would see alone.
  Recent prefixes are kept across calls (see `_prefix.PrefixStore`).
- All model work runs on one worker thread, one batch at a time, so the event loop never blocks.

A ``json_schema`` constrains the generated text only (after any prefill), so ``text`` itself parses.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from ._hf_decoding import (
    GrammarMask,
    Prepared,
    RowSampler,
    RowStop,
    TokenLogprobRecorder,
    sample_index,
    seeded_generator,
)
from ._models import DEFAULT_MODEL, ResolvedModel, ensure_hf_folder, resolve_model
from ._prefix import PrefixKV, PrefixStore
from ._types import (
    Engine,
    EngineBadRequest,
    EngineError,
    EngineUnavailable,
    GenRequest,
    GenResult,
    render_chat,
)

if TYPE_CHECKING:
    from ._settings import EngineSettings

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GRAMMAR_CACHE_SIZE = 128
_log = logging.getLogger(__name__)




class TransformersEngine(Engine):
    """In-process HF model. Loads once in the constructor (blocking; a few seconds from the cached
    HF folder, ~30 s the first time a GGUF is converted).

    `model` is a name or path understood by :func:`resolve_model`. `max_batch_size` caps how many
    requests share one forward. `threads` sets torch's CPU threads (default: torch's, i.e. all cores or
    OMP_NUM_THREADS).
    `prefix_cache` reuses the KV cache of prompt prefixes shared within a batch and across recent
    calls (`prefix_store` then counts what it saved; None when off).
    Raises `EngineUnavailable` if the model cannot be found or loaded, `EngineBadRequest` for
    invalid options. `model_path` is the HF folder actually loaded; `render(req)` shows the prompt text.
    """

    kind = "transformers"
    continuous_batching = False  # batches only what one generate() call brings
    continues_turns = True
    tokenizer: Any = None  # set once the model folder is loaded

    @classmethod
    def options_from(cls, settings: EngineSettings) -> dict[str, Any]:
        """Constructor options from engine settings (unset ones left out)."""
        return {"threads": settings.threads} if settings.threads is not None else {}

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 16,
        threads: int | None = None,
        prefix_cache: bool = True,
    ) -> None:
        if dtype not in _DTYPES:
            raise EngineBadRequest(f"dtype {dtype!r} not supported; use one of {sorted(_DTYPES)}")
        if max_batch_size < 1:
            raise EngineBadRequest(f"max_batch_size must be >= 1, got {max_batch_size}")
        if threads is not None and threads < 1:
            raise EngineBadRequest(f"threads must be >= 1, got {threads}")
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise EngineBadRequest(f"invalid device {device!r}: {exc}") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable("device 'cuda' asked for but torch sees no CUDA device")

        self.resolved: ResolvedModel = resolve_model(model)
        self.model_id: str = self.resolved.model_id
        self.max_batch_size = max_batch_size
        if threads is not None:
            torch.set_num_threads(threads)
        self.model_path: Path = ensure_hf_folder(self.resolved)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(
                self.model_path, dtype=_DTYPES[dtype], local_files_only=True
            ).to(self.device)  # type: ignore[arg-type]  # transformers wraps .to() with a model-typed signature
        except (OSError, ValueError, RuntimeError) as exc:
            raise EngineUnavailable(f"could not load model from {self.model_path}: {exc}") from exc
        self.model.eval()

        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        if not eos_ids:
            raise EngineUnavailable(f"model at {self.model_path} defines no end-of-sequence token")
        self.eos_ids = eos_ids
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:  # pad with eos: padded positions are masked out anyway
            self.pad_id = min(eos_ids)
        self.context_len: int = int(getattr(self.model.config, "max_position_embeddings", 0)) or 2**31
        self.vocab_size: int = int(self.model.config.vocab_size)

        self.prefix_store: PrefixStore | None = PrefixStore(self.model) if prefix_cache else None
        self._grammar_compiler: Any = None
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="her-transformers")
        self._lock = threading.Lock()  # one forward at a time, even for direct sync callers
        self._closed = False

    # ---- public API -------------------------------------------------------------------------

    async def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Serve `requests` in order; a bad request gets its own error result."""
        if self._closed:
            raise EngineUnavailable("engine is closed")
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, self._generate_sync, list(requests))
        except RuntimeError as exc:  # the executor was shut down by a concurrent aclose()
            raise EngineUnavailable("engine is closed") from exc
        return await future

    async def aclose(self) -> None:
        """Wait for running work, then free the model. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, True)
        self.model = None
        self._grammars.clear()
        if self.prefix_store is not None:
            self.prefix_store.clear()
            self.prefix_store.model = None
        gc.collect()

    def render(self, req: GenRequest) -> str:
        """The exact prompt text the model continues (chat template applied, prefill included)."""
        return render_chat(self.tokenizer, req)

    # ---- worker thread ----------------------------------------------------------------------

    def _generate_sync(self, requests: list[GenRequest]) -> list[GenResult]:
        results: list[GenResult | None] = [None] * len(requests)
        decode: list[Prepared] = []
        score: list[Prepared] = []
        with self._lock, torch.inference_mode():
            for i, req in enumerate(requests):
                try:
                    prepared = self._prepare(i, req)
                except EngineError as exc:
                    results[i] = _error_result(exc)
                    continue
                except Exception as exc:  # a template or tokenizer failure on this request only
                    results[i] = _error_result(EngineBadRequest(f"could not prepare request: {exc}"))
                    continue
                (score if req.choices is not None else decode).append(prepared)
            if len(score) >= 2:
                self._warm_prefix(score)
            for p in score:
                results[p.index] = self._isolated([p], self._score_choices)[0]
            decode.sort(key=lambda p: len(p.ids))  # similar lengths together: less padding
            for start in range(0, len(decode), self.max_batch_size):
                group = decode[start : start + self.max_batch_size]
                for p, res in zip(group, self._isolated(group, self._decode), strict=True):
                    results[p.index] = res
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _isolated(self, group: list[Prepared], run: Any) -> list[GenResult]:
        """Run a group; if it fails, rerun its members one by one so only the culprit fails."""
        try:
            return run(group)
        except Exception as exc:
            if len(group) == 1:
                return [_error_result(exc)]
        return [self._isolated([p], run)[0] for p in group]

    def _prepare(self, index: int, req: GenRequest) -> Prepared:
        text = self.render(req)
        # A chat template writes its own special tokens; a raw prompt gets the tokenizer's usual ones.
        ids = self.tokenizer(text, add_special_tokens=req.messages is None).input_ids
        if not ids:
            raise EngineBadRequest("prompt is empty after tokenisation")
        prepared = Prepared(index=index, req=req, ids=ids)
        if req.choices is not None:
            prepared.choice_ids = [self.tokenizer(c, add_special_tokens=False).input_ids for c in req.choices]
            if any(not c for c in prepared.choice_ids):
                raise EngineBadRequest("every choice must be a non-empty string")
            need = len(ids) + max(len(c) for c in prepared.choice_ids)
        else:
            need = len(ids) + req.max_tokens
            if req.json_schema is not None:
                prepared.grammar = self._grammar_for(req.json_schema)
        if need > self.context_len:
            raise EngineBadRequest(
                f"prompt ({len(ids)} tokens) plus {need - len(ids)} new tokens exceeds the model context "
                f"({self.context_len} tokens); shorten the prompt or lower max_tokens"
            )
        return prepared

    def _prefix_for(self, group: list[Prepared]) -> PrefixKV | None:
        return self.prefix_store.for_rows([p.ids for p in group]) if self.prefix_store is not None else None

    def _warm_prefix(self, group: list[Prepared]) -> None:
        """Compute and store the prefix shared by requests that will then run one by one."""
        try:
            self._prefix_for(group)
        except Exception as exc:  # only a speed-up: each request still runs (and reports errors) on its own
            _log.warning("shared-prefix computation failed, scoring prompts in full: %s", exc)

    def _grammar_for(self, schema: dict[str, Any]) -> Any:
        key = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()
        if key in self._grammars:
            self._grammars.move_to_end(key)
            return self._grammars[key]
        try:
            import xgrammar as xgr
        except ImportError as exc:
            raise EngineUnavailable("json_schema needs the `xgrammar` package") from exc
        if self._grammar_compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=sorted(self.eos_ids)
            )
            self._grammar_compiler = xgr.GrammarCompiler(info)
        try:
            # Compact JSON: free whitespace lets a small model ramble in spaces until max_tokens.
            grammar = self._grammar_compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception as exc:
            raise EngineBadRequest(f"json_schema could not be compiled: {exc}") from exc
        self._grammars[key] = grammar
        if len(self._grammars) > _GRAMMAR_CACHE_SIZE:
            self._grammars.popitem(last=False)
        return grammar

    def _decode(self, group: list[Prepared]) -> list[GenResult]:
        prefix = self._prefix_for(group)
        shared = len(prefix) if prefix is not None else 0
        width = shared + max(len(p.ids) - shared for p in group)
        input_ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(group), width), dtype=torch.long)
        if prefix is not None:
            input_ids[:, :shared] = torch.tensor(prefix.ids)
            attention[:, :shared] = 1
        for row, p in enumerate(group):  # suffixes left-padded: every prompt ends at the same column
            input_ids[row, width - len(p.ids) + shared :] = torch.tensor(p.ids[shared:])
            attention[row, width - len(p.ids) + shared :] = 1
        stop = RowStop(group, width, self.eos_ids, self.tokenizer)
        processors = LogitsProcessorList()
        if any(p.grammar is not None for p in group):
            processors.append(GrammarMask([p.grammar for p in group], self.vocab_size, stop))
        recorder = TokenLogprobRecorder(group)
        if recorder.k:
            processors.append(recorder)
        if any(p.req.temperature > 0 for p in group):
            processors.append(RowSampler(group))
        config = GenerationConfig(
            max_new_tokens=max(p.req.max_tokens for p in group),
            do_sample=False,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        # With a cache of `shared` tokens, generate feeds only the columns after it, and derives
        # position ids from the attention mask (cumsum), so the padding between prefix and suffix
        # does not shift a row's positions.
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            past_key_values=prefix.fork(len(group)) if prefix is not None else None,
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([stop]),
        )
        new = out[:, width:].tolist()
        results = [self._decoded_result(p, new[row], stop.done[row]) for row, p in enumerate(group)]
        for row in recorder.k:
            kept = new[row][: results[row].completion_tokens]
            results[row].token_logprobs = recorder.entries(row, kept, self.tokenizer)
        return results

    def _decoded_result(self, p: Prepared, new_ids: list[int], done: tuple[int, str] | None) -> GenResult:
        n, why = done if done is not None else (min(len(new_ids), p.req.max_tokens), "length")
        tokens = new_ids[:n]
        text = self.tokenizer.decode(tokens[:-1] if why == "eos" else tokens, skip_special_tokens=True)
        if why == "stop":
            cut = min((i for i in (text.find(s) for s in p.req.stop) if i >= 0), default=len(text))
            text = text[:cut]
        return GenResult(
            text=text,
            prompt_tokens=len(p.ids),
            completion_tokens=len(tokens),
            finish_reason="length" if why == "length" else "stop",
        )

    def _score_choices(self, group: list[Prepared]) -> list[GenResult]:
        (p,) = group
        choices = p.req.choices or []
        prefix = self._prefix_for(group)
        shared = len(prefix) if prefix is not None else 0
        prompt = torch.tensor([p.ids[shared:]], device=self.device)
        out = self.model(
            input_ids=prompt,
            position_ids=torch.arange(shared, len(p.ids), device=self.device).unsqueeze(0),
            past_key_values=prefix.fork(1) if prefix is not None else None,
            use_cache=True,
            logits_to_keep=1,
        )
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        totals = torch.tensor([float(first[c[0]]) for c in p.choice_ids], dtype=torch.float64)
        longest = max(len(c) for c in p.choice_ids)
        if longest > 1:
            # Teacher forcing over all choices at once, reusing the prompt's KV cache for every row.
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(choices))
            feed = torch.full((len(choices), longest - 1), self.pad_id, dtype=torch.long)
            for row, c in enumerate(p.choice_ids):
                feed[row, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            # Right padding is harmless here: causal attention never lets a real token see it.
            mask = torch.ones((len(choices), len(p.ids) + longest - 1), dtype=torch.long)
            positions = torch.arange(len(p.ids), len(p.ids) + longest - 1).expand(len(choices), -1)
            logits = self.model(
                input_ids=feed.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
            ).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, c in enumerate(p.choice_ids):
                if len(c) == 1:
                    continue
                targets = torch.tensor(c[1:], dtype=torch.long, device=logprobs.device)
                totals[row] += float(logprobs[row, torch.arange(len(c) - 1), targets].double().sum())
        normalised = totals - torch.logsumexp(totals, dim=0)
        if p.req.temperature > 0:
            pick = sample_index(normalised, p.req.temperature, p.req.top_p, seeded_generator(p.req.seed))
        else:
            pick = int(torch.argmax(normalised))
        return [
            GenResult(
                text=choices[pick],
                prompt_tokens=len(p.ids),
                completion_tokens=len(p.choice_ids[pick]),
                finish_reason="stop",
                choice_logprobs={c: float(v) for c, v in zip(choices, normalised, strict=True)},
            )
        ]


def _error_result(exc: BaseException) -> GenResult:
    kind = type(exc).__name__ if isinstance(exc, EngineError) else f"EngineError ({type(exc).__name__})"
    return GenResult(text="", finish_reason="error", error=f"{kind}: {exc}")
