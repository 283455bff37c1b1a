"""HER's loop on this CPU, shaped like a deployment: SFT cold start → GRPO against the served judge → held-out
evaluation of SFT against RL, with the judge and the trainer watched by a real Prometheus.

    .venv/bin/python bench/her_loop.py --judge runs/judge     # a trained judge (bench/genrm_demo.py writes some)
    .venv/bin/python bench/her_loop.py --quick                # every stage for a few steps: checks the pipeline

Stages, each the command a user types (timed; the trainer is its own `accelerate launch` process):

1. `her build policy`: SFT and GRPO rows of King Lear and Othello (CoSER's evaluation scenes left out); the
   test split (10% of conversations) is never trained on.
2. `her train sft` on the SFT rows: the cold start (top layers of the bundled 135M).
3. `her serve --model JUDGE` with Redis, a Prometheus scraping it and the trainer, the shipped alert rules.
4. `accelerate launch ... policy_trainer.cli grpo` (DeepSpeed ZeRO-2 on CPU) from the SFT checkpoint: each rollout
   judged against the book's line in both orders, every reward over HTTP; a checkpoint every `--eval-every`
   steps.
5. `her eval policy` on the test prompts: SFT, every checkpoint and the final RL policy against the book under
   the served judge (95% CIs), RL head to head against SFT, format pass rate, length, distinct-n.

Writes bench/results/her_loop/: report.md, metrics.json, curves.png (reward and judge health against the step,
held-out win rate per checkpoint), the alerts Prometheus fired (from its own ALERTS series), and each stage's
folder (policy/, sft/, rl/, eval/, logs/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
COSER = ROOT / "tests" / "data" / "coser"
CONFIGS = ROOT / "policy_trainer" / "configs"
BIN = Path(sys.executable).parent
HER = str(BIN / "her")
# What the report plots from Prometheus against the trainer's step (the judge's window gauges and the rewards).
SERIES = {
    "reward mean": "her_trainer_reward_mean",
    "reward std": "her_trainer_reward_std",
    "null rewards": "her_trainer_reward_failed_total",
    "swap consistency": "rm_swap_consistency_ratio",
    "first-slot wins": "rm_first_slot_win_ratio",
    "prefer longer": "rm_prefer_longer_ratio",
    "pattern top-1": "rm_pattern_top1_ratio",
    "pattern entropy (bits)": "rm_pattern_entropy_bits",
    "canary flips": "rm_hack_probe_flip_ratio",
}


PROGRESS_BAR = re.compile(r"\|\s*\d+/\d+ \[")  # tqdm lines stay in the stage's log, out of the console


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(stage: str, argv: list[str], timings: dict[str, float], logs: Path, env: dict[str, str] | None = None) -> None:
    """One stage: its command, output teed to logs/STAGE.log, wall time recorded; a failure stops the loop."""
    print(f"\n== {stage}: {' '.join(argv)}", flush=True)
    started = time.monotonic()
    with (logs / f"{stage}.log").open("w") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.strip() and not line.startswith(("WARNING", "INFO", "DEBUG")) and not PROGRESS_BAR.search(line):
                print(f"   {line}", end="", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"her_loop: stage {stage} failed (exit {proc.returncode}); see {logs / f'{stage}.log'}")
    timings[stage] = round(time.monotonic() - started, 1)
    print(f"== {stage}: {timings[stage]:.0f} s", flush=True)


def wait_until(check: Any, what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 1200.0) -> None:
    """Poll `check` until it is true; fail early if `proc` died (the deadline only catches a hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"her_loop: {what}: the process exited ({proc.returncode}); see {log}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"her_loop: {what}: not ready after {timeout:.0f} s; see {log}")


class Services:
    """The judge (`her serve`) and a Prometheus scraping it and the trainer's exporter, with the shipped rules."""

    def __init__(self, out: Path, judge: str) -> None:
        self.out, self.judge = out, judge
        self.judge_port, self.trainer_port, self.prom_port = free_port(), free_port(), free_port()
        self.judge_url = f"http://127.0.0.1:{self.judge_port}"
        self.prom_url = f"http://127.0.0.1:{self.prom_port}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Services:
        logs = self.out / "logs"
        redis = os.environ.get("RM_REDIS_URL", "redis://127.0.0.1:6379/0")
        judge_log = logs / "judge.log"
        judge = subprocess.Popen([HER, "serve", "--model", self.judge, "--port", str(self.judge_port),
                                  "--redis-url", redis, "--kv-cache-gib", "1"],
                                 stdout=judge_log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(judge)
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            raise SystemExit("her_loop: the prometheus server is not on PATH (`make prometheus` installs it)")
        config = {
            "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
            "rule_files": [str(ROOT / "docker" / "prometheus" / "alerts.yml")],
            "scrape_configs": [
                {"job_name": "rm_server", "static_configs": [{"targets": [f"127.0.0.1:{self.judge_port}"]}]},
                {"job_name": "trainer", "static_configs": [{"targets": [f"127.0.0.1:{self.trainer_port}"]}]},
            ],
        }
        (self.out / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom_log = logs / "prometheus.log"
        prom = subprocess.Popen([prometheus, f"--config.file={self.out / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={self.out / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{self.prom_port}", "--log.level=warn"],
                                stdout=prom_log.open("wb"), stderr=subprocess.STDOUT)
        self.procs.append(prom)
        wait_until(lambda: httpx.get(self.prom_url + "/-/ready", timeout=2).status_code == 200, "prometheus",
                   prom, prom_log)
        wait_until(lambda: httpx.get(self.judge_url + "/readyz", timeout=5).status_code == 200, "the judge",
                   judge, judge_log)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    def query_range(self, expr: str, start: float, end: float) -> list[tuple[float, float]]:
        body = httpx.get(f"{self.prom_url}/api/v1/query_range", timeout=30,
                         params={"query": expr, "start": start, "end": end, "step": "2s"}).json()
        result = body.get("data", {}).get("result", [])
        return [(float(t), float(v)) for series in result[:1] for t, v in series["values"]]

    def fired_alerts(self, start: float, end: float) -> dict[str, float]:
        """Each alert that reached `firing` during the run, with the first time it did (Prometheus's ALERTS)."""
        body = httpx.get(f"{self.prom_url}/api/v1/query_range", timeout=30, params={
            "query": 'ALERTS{alertstate="firing"}', "start": start, "end": end, "step": "2s"}).json()
        return {s["metric"]["alertname"]: float(s["values"][0][0]) for s in body.get("data", {}).get("result", [])}


def step_at(steps: list[tuple[float, float]], t: float) -> float | None:
    """The trainer's step at time `t` (the last scraped value before it)."""
    before = [v for ts, v in steps if ts <= t]
    return before[-1] if before else None


def plot(curves: dict[str, list[tuple[float, float]]], heldout: list[tuple[int, float | None]],
         alerts: dict[str, float | None], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, pts in curves.items() if pts]
    fig, axes = plt.subplots(len(names) + 1, 1, figsize=(8, 2.0 * (len(names) + 1)), sharex=True)
    axes = list(axes) if len(names) else [axes]
    ax = axes[0]
    xs = [s for s, v in heldout if v is not None]
    ax.plot(xs, [v for _, v in heldout if v is not None], "o-", color="tab:green")
    ax.set_ylabel("held-out win\nvs book", fontsize=8)
    for ax, name in zip(axes[1:], names, strict=True):
        ax.plot([s for s, _ in curves[name]], [v for _, v in curves[name]], lw=1)
        ax.set_ylabel(name, fontsize=8)
    for name, step in alerts.items():
        if step is not None:
            for ax in axes:
                ax.axvline(step, color="tab:red", ls="--", lw=0.8)
            axes[0].text(step, axes[0].get_ylim()[1], name, rotation=90, va="top", fontsize=6, color="tab:red")
    axes[-1].set_xlabel("GRPO step")
    fig.suptitle("HER loop: rewards and judge health against the step (dashed: alerts firing)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "her_loop"))
    parser.add_argument("--quick", action="store_true", help="a few steps and prompts per stage (pipeline check)")
    parser.add_argument("--judge", default=None, metavar="DIR",
                        help="the judge to serve (a `her train genrm` folder); default: the bundled model")
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--rl-steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10, help="checkpoint (and held-out evaluation) interval")
    parser.add_argument("--eval-prompts", type=int, default=40, help="held-out prompts per evaluation")
    args = parser.parse_args()
    if args.quick:  # the held-out policies load on the transformers engine there: seconds, not a vLLM start each
        args.sft_steps, args.rl_steps, args.eval_every, args.eval_prompts = 2, 2, 1, 3

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    logs, timings = out / "logs", {}
    started = time.monotonic()
    books = [str(COSER / "book_king_lear.json"), str(COSER / "book_othello.json")]
    run("build_policy", [HER, "build", "policy", "--sources", *books, "--exclude", str(COSER / "example_test_set.json"),
                         "--out", str(out / "policy")], timings, logs)
    sft = yaml.safe_load((CONFIGS / "her_loop_sft_cpu.yaml").read_text())
    if args.quick:  # a pipeline check: one short sample a step
        sft["sft"]["per_device_train_batch_size"] = 1
    (out / "sft.yaml").write_text(yaml.safe_dump(sft, sort_keys=False))
    run("sft", [HER, "train", "sft", "--config", str(out / "sft.yaml"),
                "--data", str(out / "policy" / "sft" / "train.jsonl"), "--output-dir", str(out / "sft"),
                "--max-steps", str(args.sft_steps)], timings, logs)
    judge = args.judge or "smollm2-135m-instruct"
    # The shipped GRPO config with this run's checkpoint interval (each checkpoint is evaluated held-out).
    grpo = yaml.safe_load((CONFIGS / "her_loop_grpo_cpu.yaml").read_text())
    grpo["deepspeed"] = str(CONFIGS / grpo["deepspeed"])
    grpo["grpo"]["save_steps"] = args.eval_every
    if args.quick:
        grpo["grpo"].update(max_completion_length=32, per_device_train_batch_size=2, num_generations=2)
    (out / "grpo.yaml").write_text(yaml.safe_dump(grpo, sort_keys=False))
    with Services(out, judge) as services:
        rl_started = time.time()
        run("rl", [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / "accelerate_zero2_cpu.yaml"),
                   "-m", "policy_trainer.cli", "grpo", "--config", str(out / "grpo.yaml"),
                   "--model", str(out / "sft"), "--data", str(out / "policy" / "grpo" / "train.jsonl"),
                   "--reward-url", services.judge_url, "--output-dir", str(out / "rl"),
                   "--max-steps", str(args.rl_steps), "--metrics-port", str(services.trainer_port)],
            timings, logs, env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
        time.sleep(4)  # two scrape intervals: the last step's values reach Prometheus
        rl_ended = time.time()
        checkpoints = sorted((out / "rl").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        policies = ["--policy", f"rl={out / 'rl'}", "--policy", f"sft={out / 'sft'}"]
        policies += [a for c in checkpoints if c.name != f"checkpoint-{args.rl_steps}"
                     for a in ("--policy", f"rl-step{c.name.split('-')[1]}={c}")]
        run("eval", [HER, "eval", "policy", "--prompts", str(out / "policy" / "grpo" / "test.jsonl"), *policies,
                     "--judge-url", services.judge_url, "--limit", str(args.eval_prompts),
                     *(["--engine", "transformers", "--max-tokens", "48"] if args.quick else ["--kv-cache-gib", "1"]),
                     "--out", str(out / "eval")], timings, logs)
        steps = services.query_range("her_trainer_global_step", rl_started, rl_ended)
        curves = {}
        for name, metric in SERIES.items():
            points = services.query_range(metric, rl_started, rl_ended)
            curves[name] = [(s, v) for t, v in points if (s := step_at(steps, t)) is not None]
        fired = services.fired_alerts(rl_started, time.time())
    evaluation = json.loads((out / "eval" / "metrics.json").read_text())
    by_step = {0: evaluation["policies"]["sft"]["win_rate_vs_book"]["rate"],
               args.rl_steps: evaluation["policies"]["rl"]["win_rate_vs_book"]["rate"]}
    for name, m in evaluation["policies"].items():
        if name.startswith("rl-step"):
            by_step[int(name.removeprefix("rl-step"))] = m["win_rate_vs_book"]["rate"]
    heldout = sorted(by_step.items())
    alert_steps = {name: step_at(steps, t) for name, t in fired.items()}
    plot(curves, heldout, alert_steps, out / "curves.png")
    summary = {
        "wall_time_s": round(time.monotonic() - started, 1), "stage_time_s": timings, "judge": judge,
        "sft_steps": args.sft_steps, "rl_steps": args.rl_steps, "heldout_prompts": evaluation["prompts"],
        "heldout_win_rate_by_step": heldout, "policies": evaluation["policies"],
        "head_to_head": evaluation["head_to_head"], "alerts_fired_at_step": alert_steps,
        "rl_seconds_per_step": round(timings["rl"] / max(args.rl_steps, 1), 1),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(render_report(summary))
    print((out / "report.md").read_text())
    return 0


def _rate(m: dict[str, Any]) -> str:
    if m["rate"] is None:
        return "n/a"
    ci = f" [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]" if m.get("ci95") else ""
    return f"{m['rate']:.2f}{ci} (n={m['judged']}, errors {m['errors']})"


def render_report(s: dict[str, Any]) -> str:
    lines = ["# HER loop on this CPU", "",
             f"Judge `{s['judge']}`; SFT {s['sft_steps']} steps, GRPO {s['rl_steps']} steps "
             f"({s['rl_seconds_per_step']} s a step, rewards over HTTP); {s['heldout_prompts']} held-out prompts.", "",
             "| policy | win rate vs book (95% CI) | format pass | mean words | distinct-2 |", "|---|---|---|---|---|"]
    for name, m in s["policies"].items():
        lines.append(f"| {name} | {_rate(m['win_rate_vs_book'])} | {m['format_pass_rate']:.2f} | "
                     f"{m['mean_words']:.1f} | {m['distinct_2']:.2f} |" if m["samples"] else f"| {name} | no samples |")
    lines += ["", "Head to head (the first policy's share of wins, ties half):", ""]
    lines += [f"- {name}: {_rate(m)}" for name, m in s["head_to_head"].items()]
    lines += ["", "Alerts that fired (Prometheus, shipped rules), at the trainer's step:", ""]
    lines += [f"- {name}: step {step}" for name, step in s["alerts_fired_at_step"].items()] or ["- none"]
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["stage_time_s"].items()),
              "", "![curves](curves.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
