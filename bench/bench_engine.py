"""Benchmark the transformers engine: load time cold vs warm, greedy tokens/s at batch 1 vs 8,
and shared-prefix KV reuse on vs off for a judge-like batch.

Run: ``.venv/bin/python bench/bench_engine.py [--model NAME] [--new-tokens 48] [--batch 8] [--prefix-only]``

"Cold" uses a fresh cache folder, so the load includes the one-time GGUF -> HF conversion;
"warm" loads the converted folder. Throughput counts the tokens actually generated.
The prefix comparison sends 16 chat requests that share a ~750-token system prompt and differ in a
150-250-token user turn (like the GenRM judge's batches), once decoding 48 tokens and once scoring
choices (prefill only, like the judge's fast mode); the prefix store is cleared before each run so
only reuse within the batch counts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time

import torch  # noqa: F401  (imported before timing so the load figures exclude import time)
import transformers  # noqa: F401

from her_engines import DEFAULT_MODEL, GenRequest
from her_engines._transformers import TransformersEngine

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


def timed_load(model: str) -> tuple[TransformersEngine, float]:
    start = time.perf_counter()
    engine = TransformersEngine(model)
    return engine, time.perf_counter() - start


async def tokens_per_second(
    engine: TransformersEngine, batch: int, new_tokens: int, repeats: int = 2
) -> tuple[float, int]:
    """Best of `repeats` runs (the machine is shared: the best run is the least disturbed one)."""
    # The same chat prompt in every row: equal prompt lengths, so no padding blurs the comparison.
    req = GenRequest(messages=[{"role": "user", "content": PROMPT}], max_tokens=new_tokens)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        results = await engine.generate([req] * batch)
        elapsed = time.perf_counter() - start
        best = max(best, sum(r.completion_tokens for r in results) / elapsed)
    return best, results[0].prompt_tokens


def judge_like_batch(engine: TransformersEngine, rows: int, system_tokens: int, **kw: object) -> list[GenRequest]:
    """`rows` chat requests sharing a system prompt of about `system_tokens` tokens."""
    rule = "Principle {i}: the reply keeps the character's voice, facts, mood and knowledge consistent. "
    system = "You judge two candidate replies in a role-play scene and pick the better one. "
    i = 0
    while len(engine.tokenizer(system, add_special_tokens=False).input_ids) < system_tokens:
        system += rule.format(i=i)
        i += 1
    turns = [
        f"Scene {r}: " + "The guest answers the host politely, then looks out at the rain. " * (10 + r % 6)
        for r in range(rows)
    ]
    return [GenRequest(messages=[{"role": "system", "content": system}, {"role": "user", "content": t}], **kw)
            for t in turns]


async def timed_batch(engine: TransformersEngine, reqs: list[GenRequest]) -> float:
    if engine.prefix_store is not None:
        engine.prefix_store.clear()  # count only the reuse inside this batch
    start = time.perf_counter()
    results = await engine.generate(reqs)
    elapsed = time.perf_counter() - start
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    return elapsed


async def prefix_reuse(model: str, rows: int = 16, system_tokens: int = 750, new_tokens: int = 48) -> None:
    on = TransformersEngine(model, prefix_cache=True, max_batch_size=rows)
    off = TransformersEngine(model, prefix_cache=False, max_batch_size=rows)
    decode = judge_like_batch(on, rows, system_tokens, max_tokens=new_tokens)
    score = judge_like_batch(on, rows, system_tokens, choices=["A", "B", "tie"])
    sizes = [len(on.tokenizer(on.render(r), add_special_tokens=False).input_ids) for r in decode]
    await on.generate([GenRequest(prompt="warm up", max_tokens=4)])
    await off.generate([GenRequest(prompt="warm up", max_tokens=4)])
    print(f"judge-like batch: {rows} prompts of {min(sizes)}-{max(sizes)} tokens sharing ~{system_tokens}")
    t_off, t_on = await timed_batch(off, decode), await timed_batch(on, decode)
    print(f"  prefill + {new_tokens} new tokens:  reuse off {t_off:6.1f} s   on {t_on:6.1f} s   "
          f"ratio {t_off / t_on:.1f}x")
    t_off, t_on = await timed_batch(off, score), await timed_batch(on, score)
    print(f"  choices (prefill only):      reuse off {t_off:6.1f} s   on {t_on:6.1f} s   ratio {t_off / t_on:.1f}x")
    await on.aclose()
    await off.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prefix-only", action="store_true", help="run only the prefix-reuse comparison")
    args = parser.parse_args()
    if args.prefix_only:
        await prefix_reuse(args.model, new_tokens=args.new_tokens)
        return

    cache = tempfile.mkdtemp(prefix="her-bench-cache-")
    os.environ["HER_CACHE_DIR"] = cache
    try:
        cold_engine, cold = timed_load(args.model)
        await cold_engine.aclose()
        engine, warm = timed_load(args.model)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    load1, load5, _ = os.getloadavg()
    print(f"model {engine.model_id}  torch threads {torch.get_num_threads()}  "
          f"cpus {os.cpu_count()}  load average {load1:.1f} / {load5:.1f} (1 / 5 min)")
    print(f"load cold (GGUF -> HF conversion): {cold:6.1f} s")
    print(f"load warm (cached HF folder):      {warm:6.1f} s   cold/warm {cold / warm:.1f}x")

    # Warm-up: the first generations after a load run far slower (page-in, allocator growth).
    await tokens_per_second(engine, args.batch, 8)
    one, prompt_tokens = await tokens_per_second(engine, 1, args.new_tokens)
    many, _ = await tokens_per_second(engine, args.batch, args.new_tokens)
    print(f"greedy, prompt {prompt_tokens} tokens, {args.new_tokens} new tokens:")
    print(f"  batch 1:  {one:6.1f} tokens/s")
    print(f"  batch {args.batch}:  {many:6.1f} tokens/s   ratio {many / one:.1f}x")
    await engine.aclose()
    await prefix_reuse(args.model, new_tokens=args.new_tokens)


if __name__ == "__main__":
    asyncio.run(main())
