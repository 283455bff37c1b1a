"""Benchmark the transformers engine: load time cold vs warm, greedy tokens/s at batch 1 vs 8.

Run: ``.venv/bin/python bench/bench_engine.py [--model NAME] [--new-tokens 48] [--batch 8]``

"Cold" uses a fresh cache folder, so the load includes the one-time GGUF -> HF conversion;
"warm" loads the converted folder. Throughput counts the tokens actually generated.
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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

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


if __name__ == "__main__":
    asyncio.run(main())
