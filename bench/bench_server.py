"""rm_server benchmark on the transformers fallback engine, one run, real `her serve` subprocesses:

1. judge throughput with N concurrent clients through the micro-batcher (RM_MAX_BATCH_SIZE=16) vs the
   same engine served one request at a time (RM_MAX_BATCH_SIZE=1). Goal ≥ 4×.
2. cached verdict p50 latency vs uncached (goal ≤ 0.01×), and cached verdicts/s (goal ≥ 1,000 on 2 cores),
   with Redis as the cache.

Run: ``.venv/bin/python bench/bench_server.py [--clients 16] [--mode cot] [--redis redis://127.0.0.1:6379/0]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _openai_server import ServerProcess  # noqa: E402
from _pairs import fixture_pairs  # noqa: E402
from _servers import free_port  # noqa: E402

from her_roleplay import load_scenes  # noqa: E402

SCENE = ROOT / "tests" / "data" / "coser_test_sample_pride_and_prejudice.json"


def start_server(batch_size: int, redis_url: str | None) -> ServerProcess:
    port = free_port()
    # The transformers fallback's micro-batcher (bench_vllm.py measures the default vLLM engine).
    env = {"RM_ENGINE": "transformers", "RM_BATCHING": "micro", "RM_MAX_BATCH_SIZE": str(batch_size),
           "RM_MAX_WAIT_MS": "20", "RM_LOG_LEVEL": "warning"}
    if redis_url:
        env["RM_REDIS_URL"] = redis_url
    os.environ.update(env)
    try:
        server = ServerProcess([str(ROOT / ".venv" / "bin" / "her"), "serve", "--port", str(port)], port,
                               ready_path="/readyz", startup_timeout=300)
        return server.start()
    finally:
        for key in env:
            os.environ.pop(key, None)


def bodies(n: int, mode: str, tag: str) -> list[dict]:
    scene = load_scenes(SCENE)[0]
    out = []
    for i, p in enumerate(fixture_pairs(scene, n)):
        ctx = [m.model_dump() for m in p["context"]]
        # a distinct marker per pair so no two requests share a cache entry
        out.append({"context": ctx, "a": p["a"], "b": f"{p['b']} ({tag}-{i})", "mode": mode})
    return out


async def throughput(base: str, items: list[dict], clients: int) -> float:
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            r = await client.post(base + "/v1/judge", json={**body, "use_cache": False})
            r.raise_for_status()

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=3600) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return len(items) / (time.perf_counter() - start)


async def latencies(base: str, items: list[dict]) -> list[float]:
    out = []
    async with httpx.AsyncClient(timeout=600) as client:
        for body in items:
            start = time.perf_counter()
            r = await client.post(base + "/v1/judge", json=body)
            r.raise_for_status()
            out.append(time.perf_counter() - start)
    return out


async def cached_rate(base: str, items: list[dict], clients: int, seconds: float, batch: int) -> tuple[float, float]:
    """Cached verdicts/s: single-pair requests from `clients` clients, and /v1/judge/batch of `batch` items."""
    stop = time.perf_counter() + seconds
    done = 0

    async def single(client: httpx.AsyncClient, k: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            r = await client.post(base + "/v1/judge", json=items[k % len(items)])
            assert r.json()["cached"], r.text
            done += 1
            k += 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(single(client, k) for k in range(clients)))
        single_rate = done / (time.perf_counter() - start)
        payload = {"items": [items[k % len(items)] for k in range(batch)]}
        verdicts, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            r = await client.post(base + "/v1/judge/batch", json=payload)
            verdicts += sum(v["cached"] for v in r.json()["verdicts"])
        batch_rate = verdicts / (time.perf_counter() - start)
    return single_rate, batch_rate


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=16, help="pairs per throughput run")
    parser.add_argument("--mode", choices=["cot", "fast"], default="cot")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:8]

    results = {}
    for batch_size in (16, 1):
        server = start_server(batch_size, args.redis)
        try:
            rate = await throughput(server.base_url, bodies(args.pairs, args.mode, f"{tag}-t{batch_size}"),
                                    args.clients)
            results[batch_size] = rate
            print(f"max_batch_size={batch_size:>2}: {rate:.3f} verdicts/s ({args.clients} clients, {args.mode})")
            if batch_size == 16:
                fresh = bodies(8, "fast", f"{tag}-lat")
                uncached = await latencies(server.base_url, fresh)
                cached = await latencies(server.base_url, fresh * 5)
                single_rate, batch_rate = await cached_rate(server.base_url, fresh, args.clients, args.seconds, 64)
        finally:
            server.stop()

    print()
    print(f"micro-batched vs one-at-a-time throughput: {results[16] / results[1]:.2f}x  (goal >= 4x)")
    p50_cached, p50_uncached = statistics.median(cached), statistics.median(uncached)
    print(f"p50 latency: cached {p50_cached * 1000:.2f} ms, uncached {p50_uncached * 1000:.1f} ms (fast mode), "
          f"ratio {p50_cached / p50_uncached:.4f}  (goal <= 0.01)")
    print(f"cached verdicts/s: {single_rate:.0f} single-pair requests ({args.clients} clients), "
          f"{batch_rate:.0f} via /v1/judge/batch of 64  (goal >= 1000)")


if __name__ == "__main__":
    asyncio.run(main())
