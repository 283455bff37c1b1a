"""vLLM engine start on CPU: the model worker inside the engine-core process vs in a process of its own.

Each run is a fresh Python process that builds our `vllm` engine on the bundled model, generates 16 tokens and
closes it; the two layouts alternate so that the machine's noise falls on both. Printed: seconds to a ready
engine and resident memory of the engine's process tree, median per layout, and the ratio.

    .venv/bin/python bench/bench_engine_start.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import asyncio, json, subprocess, sys, time

def tree_rss_gb(pid):
    rows = [line.split() for line in subprocess.run(["ps", "-eo", "pid=,ppid=,rss="], capture_output=True,
                                                    text=True).stdout.splitlines()]
    tree, grew = {pid}, True
    while grew:
        grew = False
        for p, parent, _ in rows:
            if int(parent) in tree and int(p) not in tree:
                tree.add(int(p)); grew = True
    return sum(int(rss) for p, _, rss in rows if int(p) in tree) / 1e6

def main():
    started = time.monotonic()
    from her_engines import GenRequest, create_engine
    engine = create_engine("vllm", kv_cache_gib=0.5)
    ready = time.monotonic() - started
    [out] = asyncio.run(engine.generate([GenRequest(prompt="One, two, three,", max_tokens=16)]))
    print(json.dumps({"ready_s": ready, "rss_gb": tree_rss_gb(__import__("os").getpid()), "ok": out.error is None}))
    asyncio.run(engine.aclose())

if __name__ == "__main__":
    main()
"""

LAYOUTS = {"worker in the engine core": "0", "worker in its own process": "1"}


def one_run(flag: str) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING=flag)
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"engine run failed ({flag}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="starts per layout")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    for i in range(args.runs):
        for name, flag in LAYOUTS.items():
            run = one_run(flag)
            results[name].append(run)
            print(f"run {i + 1}/{args.runs}, {name}: ready in {run['ready_s']:.1f} s, {run['rss_gb']:.2f} GB",
                  flush=True)
    median = {name: (statistics.median(r["ready_s"] for r in runs), statistics.median(r["rss_gb"] for r in runs))
              for name, runs in results.items()}
    (inside, inside_gb), (own, own_gb) = median.values()
    print(f"\nmedian ready: {inside:.1f} s vs {own:.1f} s = {own / inside:.2f}x faster start; "
          f"memory {inside_gb:.2f} vs {own_gb:.2f} GB")


if __name__ == "__main__":
    main()
