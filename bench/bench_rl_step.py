"""Benchmark one GRPO step with remote rewards (rm_server over HTTP) against the same step with a local
constant reward, so the cost of the remote path can be read off as "ratio plus judge time".

Run: ``.venv/bin/python bench/bench_rl_step.py [--steps 4] [--mode fast] [--deepspeed]``

Both runs use the CPU smoke config (tiny random policy, SmolLM2 tokenizer, same seed, same prompts);
the script starts its own rm_server (bundled judge, fast mode by default). The first step of each run
is warm-up and is left out. Printed per run: each step's wall time; for the remote run also the
reward call's wall time (client side) and the server's time on /v1/rewards (its rm_request_seconds
histogram). The goal reads: remote step <= 1.15 x local step + judge time, i.e.
(remote step - server judge time) / local step <= 1.15.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policy_trainer._grpo import GRPORun, GRPORunConfig  # noqa: E402
from tests._openai_server import ServerProcess, free_port  # noqa: E402

SMOKE = ROOT / "policy_trainer" / "configs" / "grpo_cpu_smoke.yaml"


def server_request_seconds(base_url: str, route: str = "/v1/rewards") -> float:
    """Sum of rm_request_seconds for one route, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=30).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "rm_request_seconds":
            total += sum(s.value for s in family.samples
                         if s.name == "rm_request_seconds_sum" and s.labels.get("route") == route)
    return total


class StepTimer:
    """TrainerCallback recording each optimizer step's wall time (generation, rewards, update) and,
    given the server's URL, the server's time on /v1/rewards during the step (read outside the timing)."""

    def __init__(self, base_url: str | None) -> None:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._server = server_request_seconds(base_url) if base_url else 0.0
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.steps.append(time.perf_counter() - timer._start)
                if base_url:
                    timer.server.append(server_request_seconds(base_url) - timer._server)

        self.callback = _Callback()
        self.steps: list[float] = []
        self.server: list[float] = []
        self._start = self._server = 0.0


class TimedReward:
    """Wraps a reward function (sync or async) and records the wall time of each call."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.__name__ = getattr(inner, "__name__", "reward")
        self.calls: list[float] = []

    async def __call__(self, prompts, completions, **columns):
        start = time.perf_counter()
        result = self.inner(prompts, completions, **columns)
        if hasattr(result, "__await__"):
            result = await result
        self.calls.append(time.perf_counter() - start)
        return result


def constant_reward(prompts, completions, **columns):
    """A local reward that costs nothing: the baseline step."""
    return [0.5] * len(completions)


def run_once(args: argparse.Namespace, url: str, out: Path, remote: bool) -> tuple[StepTimer, TimedReward]:
    config = GRPORunConfig.from_yaml(SMOKE, reward_url=url, output_dir=str(out), max_steps=args.steps)
    config.reward.judge_mode = args.mode
    config.save_final_model = False
    config.grpo.update(logging_steps=10_000, disable_tqdm=True)  # keep the output to the figures
    if not args.deepspeed:
        config.deepspeed = None
    timer = StepTimer(url if remote else None)
    timed: list[TimedReward] = []

    def wrap(func):
        timed.append(TimedReward(func))
        return timed[0]

    run = GRPORun(config, reward_func=None if remote else constant_reward, wrap_reward=wrap,
                  callbacks=[timer.callback])
    result = run.train()
    run.close()
    if result.stopped or result.global_step != args.steps:
        raise SystemExit(f"run did not finish: {result.stopped or result.global_step}")
    return timer, timed[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is warm-up)")
    parser.add_argument("--mode", choices=["fast", "cot"], default="fast")
    parser.add_argument("--deepspeed", action="store_true", help="keep the smoke config's DeepSpeed ZeRO-2")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")

    port = free_port()
    argv = ["env", "-u", "RM_REDIS_URL", "RM_MAX_WAIT_MS=5", str(ROOT / ".venv" / "bin" / "her"), "serve",
            "--port", str(port)]
    loads = []
    # local, remote, local again: the machine is shared, so the baseline is taken on both sides of
    # the remote run and the load average is printed beside each run.
    with tempfile.TemporaryDirectory(prefix="her-bench-rl-") as tmp, \
            ServerProcess(argv, port, ready_path="/readyz", startup_timeout=300) as server:
        runs = {}
        for name, remote in (("local-1", False), ("remote", True), ("local-2", False)):
            load_before = os.getloadavg()[0]
            runs[name] = run_once(args, server.base_url, Path(tmp) / name, remote=remote)
            loads.append(f"{name}: {load_before:.1f} -> {os.getloadavg()[0]:.1f}")

    local = runs["local-1"][0].steps[1:] + runs["local-2"][0].steps[1:]
    remote_timer, reward = runs["remote"]
    remote = remote_timer.steps[1:]
    calls, judged = reward.calls[1:], remote_timer.server[1:]
    med = statistics.median
    deepspeed = "on" if args.deepspeed else "off"
    print(f"GRPO step, tiny policy on CPU, judge mode {args.mode}, DeepSpeed {deepspeed}; "
          f"{len(remote)} measured steps per run (warm-up left out)")
    print("load average (1 min) per run: " + "; ".join(loads))
    print("local constant reward, step s: " + ", ".join(f"{s:.2f}" for s in local) + "  (runs 1 and 2)")
    print("remote reward, step s:         " + ", ".join(f"{s:.2f}" for s in remote))
    print("  reward call (client) s:      " + ", ".join(f"{s:.2f}" for s in calls))
    print("  server /v1/rewards s:        " + ", ".join(f"{s:.2f}" for s in judged))
    rest = [r - j for r, j in zip(remote, judged, strict=True)]
    print("  step minus judge time s:     " + ", ".join(f"{s:.2f}" for s in rest))
    print(f"median step: local {med(local):.2f} s, remote {med(remote):.2f} s "
          f"(ratio {med(remote) / med(local):.2f}x); median judge time (server) {med(judged):.2f} s")
    overhead = med(rest) / med(local)
    client_extra = med([c - j for c, j in zip(calls, judged, strict=True)])
    print(f"(remote step - judge time) / local step: {overhead:.3f}x (goal <= 1.15x); "
          f"client-side time beyond the server's: {client_extra:.3f} s per call")


if __name__ == "__main__":
    main()
