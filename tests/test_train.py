"""Training entry points end to end: a tiny random-weight policy trained on CPU with rewards from the
real rm_server (bundled judge model) over HTTP, under DeepSpeed ZeRO-2 for the smoke config.

The suite's rm_server subprocess (conftest `rm_server`) serves these tests; the restart test kills
it (SIGKILL) mid-step and starts it again on the same port. The judge runs in fast mode (one forward
per order) with small groups.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml
from _openai_server import ServerProcess
from _pairs import short_rows
from _servers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "policy_trainer" / "configs"
SMOKE = CONFIGS / "grpo_cpu_smoke.yaml"
HER = ROOT / ".venv" / "bin" / "her"


# --- helpers ---------------------------------------------------------------------------------------


def judgments_total(base_url: str) -> float:
    """Sum of rm_judgments_total over all labels, read from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "rm_judgments":
            return sum(s.value for s in family.samples if s.name == "rm_judgments_total")
    raise AssertionError("rm_judgments_total is missing from /metrics")


def snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def moved(before: dict, model) -> bool:
    import torch

    return any(not torch.equal(before[name], p.detach()) for name, p in model.named_parameters())


def step_rewards(log_history: list[dict]) -> list[float]:
    return [entry["reward"] for entry in log_history if "reward" in entry]


def grpo_config(tmp_path: Path, url: str, scene, **reward):
    """The smoke config on short rows, without DeepSpeed (DeepSpeed runs in its own process below)."""
    from policy_trainer._data import DataSpec
    from policy_trainer._grpo import GRPORunConfig

    cfg = GRPORunConfig.from_yaml(SMOKE, reward_url=url, output_dir=str(tmp_path / "out"))
    cfg.data = DataSpec(jsonl=[str(short_rows(scene, tmp_path / "rows.jsonl"))])
    cfg.deepspeed = None
    cfg.save_final_model = False
    for key, value in reward.items():
        setattr(cfg.reward, key, value)
    return cfg


def launcher_free_env() -> dict[str, str]:
    """This process's env without a distributed launcher's variables (the run must set its own)."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"}
    return {k: v for k, v in os.environ.items() if k not in drop}


# --- configuration and data (no training) -----------------------------------------------------------


def test_config_errors_name_the_field_and_the_fix(tmp_path):
    from policy_trainer._grpo import GRPORunConfig
    from policy_trainer._setup import ConfigError, ModelSpec

    with pytest.raises(ConfigError, match="exactly one of `name_or_path`"):
        ModelSpec(name_or_path="x", tiny_random={"hidden_size": 8}, tokenizer="y")
    raw = yaml.safe_load(SMOKE.read_text())
    raw["grpo"]["num_generation"] = 4
    with pytest.raises(ConfigError, match="did you mean 'num_generations'"):
        GRPORunConfig.from_dict(raw, base_dir=CONFIGS)
    raw = yaml.safe_load(SMOKE.read_text())
    del raw["grpo"]["output_dir"]
    with pytest.raises(ConfigError, match="--output-dir"):
        GRPORunConfig.from_dict(raw, base_dir=CONFIGS)
    raw = yaml.safe_load(SMOKE.read_text())
    raw["reward"]["reference_column"] = "gold"
    with pytest.raises(ConfigError, match="column 'reference'"):
        GRPORunConfig.from_dict(raw, base_dir=CONFIGS)
    raw = yaml.safe_load(SMOKE.read_text())
    raw["deepspeed"] = "missing.json"
    with pytest.raises(ConfigError, match="missing.json is not a file"):
        GRPORunConfig.from_dict(raw, base_dir=CONFIGS)
    raw = yaml.safe_load(SMOKE.read_text())
    raw["train_layers"] = 0
    with pytest.raises(ConfigError, match="train_layers=0: give a positive number"):
        GRPORunConfig.from_dict(raw, base_dir=CONFIGS)

    from her_cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"tiny_random": {}}, "data": {"jsonl": []}, "grpo": {}}))
    assert main(["train", "grpo", "--config", str(bad)]) == 2


def test_launcher_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    for stage in (2, 3):
        cfg = load_config_from_file(str(CONFIGS / f"accelerate_zero{stage}.yaml"))
        assert cfg.distributed_type == "DEEPSPEED" and cfg.mixed_precision == "bf16"
        assert cfg.deepspeed_config["zero_stage"] == stage
    stages = {"deepspeed_zero2.json": 2, "deepspeed_zero3.json": 3, "deepspeed_zero2_cpu.json": 2}
    for name, stage in stages.items():
        assert json.loads((CONFIGS / name).read_text())["zero_optimization"]["stage"] == stage
    from policy_trainer._grpo import GRPORunConfig

    raw = yaml.safe_load((CONFIGS / "grpo_example.yaml").read_text())
    example = GRPORunConfig.from_dict(raw, base_dir=CONFIGS)
    assert example.reward.judge_mode == "cot" and example.grpo["num_generations"] == 8


def test_loop_configs_take_the_policy_and_the_rows_from_the_command_line(tmp_path, monkeypatch):
    """`her train sft|grpo --model DIR --data FILE`: the shipped loop configs (and a tiny-random one) get a real model
    and replace their data files; paths count from the working directory, not the YAML's folder."""
    from policy_trainer._grpo import GRPORunConfig
    from policy_trainer._sft import SFTRunConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft").mkdir()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("{}\n")
    grpo = GRPORunConfig.from_yaml(CONFIGS / "her_loop_grpo_cpu.yaml", model="sft", data_files=["rows.jsonl"])
    assert grpo.model.name_or_path == str(tmp_path / "sft") and grpo.data.jsonl == [str(rows)]
    assert grpo.train_layers == 8 and grpo.reward.strategy == "reference" and grpo.grpo["save_steps"] == 10
    sft = SFTRunConfig.from_yaml(CONFIGS / "her_loop_sft_cpu.yaml", data_files=["rows.jsonl"])
    assert sft.model.name_or_path == "smollm2-135m-instruct" and sft.data.jsonl == [str(rows)]
    smoke = GRPORunConfig.from_yaml(SMOKE, model="smollm2-135m-instruct", data_files=["rows.jsonl"])
    assert smoke.model.tiny_random is None and smoke.model.tokenizer is None
    assert smoke.data.scene_files == [] and smoke.data.jsonl == [str(rows)]


def test_grpo_rows_hold_the_prompt_and_the_visible_reference(scene, tmp_path):
    from her_roleplay import build_character_samples, strip_system_thinking
    from policy_trainer._data import DataSpec, grpo_rows_from_scene, load_grpo_dataset, load_sft_dataset

    rows = grpo_rows_from_scene(scene)
    samples = build_character_samples(scene)
    assert len(rows) == len(samples) >= 2
    for row, sample in zip(rows, samples, strict=True):
        assert row["prompt"][0]["role"] == "system" and row["prompt"][-1]["role"] == "user"
        assert len(row["prompt"]) == len(sample.messages) - 1
        assert row["reference"] == strip_system_thinking(sample.target).strip()
        assert "<system_thinking>" not in row["reference"]

    jsonl = tmp_path / "rows.jsonl"
    plan = "<system_thinking>Portray her as wary.</system_thinking>"
    messages = [{"role": "system", "content": "Play Ann."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": plan + "Hello."}]
    jsonl.write_text(json.dumps({"messages": messages}) + "\n")
    grpo = load_grpo_dataset(DataSpec(jsonl=[str(jsonl)]))
    assert grpo[0]["reference"] == "Hello." and grpo[0]["prompt"] == messages[:2]
    sft = load_sft_dataset(DataSpec(jsonl=[str(jsonl)]))
    assert sft[0]["completion"] == [messages[2]]  # the SFT target keeps its plan

    jsonl.write_text(json.dumps({"messages": messages[:2]}) + "\n")
    from policy_trainer._setup import ConfigError

    with pytest.raises(ConfigError, match=r"rows.jsonl:1: `messages` must end with the assistant target"):
        load_sft_dataset(DataSpec(jsonl=[str(jsonl)]))


class _StubClient:
    """Fault injection for the guard: replays fixed rewards and bumps the error counters it is told to."""

    __name__ = "stub_reward"

    def __init__(self, rewards, errors_during_call: dict[str, int]) -> None:
        from policy_trainer._reward_client import RewardStats

        self.rewards, self.errors = rewards, errors_during_call
        self.stats = RewardStats()

    async def __call__(self, prompts, completions, **columns):
        for kind, n in self.errors.items():
            self.stats.http_errors[kind] = self.stats.http_errors.get(kind, 0) + n
        self.stats.last_error = "boom" if self.errors else None
        return list(self.rewards)


def test_outage_guard_passes_item_failures_and_stops_on_outages():
    import asyncio
    from types import SimpleNamespace

    from policy_trainer._grpo import RewardOutageGuard, RewardServiceDown

    state = SimpleNamespace(global_step=4)

    def call(rewards, errors):
        guard = RewardOutageGuard(_StubClient(rewards, errors))
        return asyncio.run(guard(["p"] * len(rewards), ["c"] * len(rewards), trainer_state=state))

    # A single failed judgment on a healthy server stays a None (TRL leaves that rollout out).
    assert call([0.5, None], {}) == [0.5, None]
    # A 422 for one bad rollout is not an outage either.
    assert call([1.0, None], {"422": 1}) == [1.0, None]
    with pytest.raises(RewardServiceDown, match=r"rm_server unreachable for \d+ s at step 5 \(1/2"):
        call([1.0, None], {"connect": 3})
    with pytest.raises(RewardServiceDown, match="gave no reward for any rollout at step 5"):
        call([None, None], {})


# --- SFT -------------------------------------------------------------------------------------------


def test_sft_two_steps_train_only_the_final_turn(tmp_path):
    from policy_trainer._sft import SFTRun, SFTRunConfig

    cfg = SFTRunConfig.from_yaml(CONFIGS / "sft_cpu_smoke.yaml", output_dir=str(tmp_path / "sft"))
    run = SFTRun(cfg)
    trainer = run.build()
    # The loss mask covers exactly the final assistant turn: the labelled tokens decode to it.
    row = trainer.train_dataset[0]
    labelled = [t for t in row["labels"] if t != -100]
    target = run.trainer.processing_class.decode(labelled)
    from policy_trainer._data import load_sft_dataset

    first = load_sft_dataset(cfg.data, cfg.base_dir)[0]
    assert target.startswith(first["completion"][0]["content"])
    assert len(labelled) < len(row["input_ids"]) / 5  # the long prompt is context only

    before = snapshot(trainer.model)
    result = run.train()
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert result.global_step == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert moved(before, trainer.model)
    assert (tmp_path / "sft" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "sft" / "run_summary.json").read_text())["global_step"] == 2


# --- GRPO with remote rewards -------------------------------------------------------------------------


def test_dead_reward_server_stops_the_run_without_an_update(scene, tmp_path):
    from policy_trainer._grpo import GRPORun

    cfg = grpo_config(tmp_path, f"http://127.0.0.1:{free_port()}", scene, retry_budget_s=1.0,
                      max_backoff_s=0.2)
    run = GRPORun(cfg)
    trainer = run.build()
    before = snapshot(trainer.model)
    result = run.train()
    assert result.stopped is not None
    assert "rm_server unreachable for" in result.stopped and "at step 1" in result.stopped
    assert "no update was made on missing rewards" in result.stopped
    assert result.global_step == 0 and not moved(before, trainer.model)
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["stopped"] == result.stopped


def test_readme_accelerate_launch_line_exits_nonzero_when_the_server_stays_down(tmp_path):
    """The README's launcher line (`accelerate launch ... -m policy_trainer.cli grpo`), with the CPU accelerate
    file and the shipped smoke config, nothing at the reward URL: a DeepSpeed run that stops with exit 3."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw["deepspeed"] = str(CONFIGS / raw["deepspeed"])  # the launcher's DeepSpeed config must win over it
    raw["data"]["scene_files"] = [str(CONFIGS / p) for p in raw["data"]["scene_files"]]
    raw["reward"].update(retry_budget_s=1.0, max_backoff_s=0.2)
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    accelerate = HER.with_name("accelerate")
    proc = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(CONFIGS / "accelerate_zero2_cpu.yaml"),
         "-m", "policy_trainer.cli", "grpo", "--config", str(config),
         "--reward-url", f"http://127.0.0.1:{free_port()}", "--output-dir", str(out)],
        env=launcher_free_env(), capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode != 0, proc.stderr[-4000:]
    assert "stopped: rm_server unreachable for" in proc.stderr and "at step 1" in proc.stderr
    assert "exitcode  : 3" in proc.stderr  # the trainer's own code under accelerate's launcher
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["engine"] == "DeepSpeedEngine" and summary["global_step"] == 0
    assert summary["distributed_type"] == "DEEPSPEED"


# A local reward that differs between any two different rollouts, so the advantages are non-zero.
DEEPSPEED_RUN = """
import sys, zlib
from policy_trainer._grpo import GRPORun, GRPORunConfig

def text_hash_reward(prompts, completions, **columns):
    return [zlib.crc32(c[0]["content"].encode()) / 2**32 for c in completions]

config = GRPORunConfig.from_yaml(sys.argv[1], output_dir=sys.argv[2])
result = GRPORun(config, reward_func=text_hash_reward).train()
sys.exit(0 if result.stopped is None else 1)
"""


def test_deepspeed_zero2_wraps_and_trains_the_smoke_config(tmp_path):
    """grpo_cpu_smoke.yaml as shipped (scene data, ZeRO-2 on CPU over gloo, one plain process) for its 2
    steps; the reward is local here (the HTTP path is covered above) to keep the judge's CPU time out."""
    from safetensors.torch import load_file

    from policy_trainer._grpo import GRPORunConfig
    from policy_trainer._setup import build_model_and_tokenizer

    out = tmp_path / "ds"
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_RUN, str(SMOKE), str(out)],
                          env=launcher_free_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["engine"] == "DeepSpeedEngine" and summary["zero_stage"] == 2
    assert summary["distributed_type"] == "DEEPSPEED" and summary["global_step"] == 2
    rewards = step_rewards(summary["log_history"])
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
    # The saved weights left the seed's initial values: the DeepSpeed optimizer stepped.
    initial, _ = build_model_and_tokenizer(GRPORunConfig.from_yaml(SMOKE).model, CONFIGS)
    trained = load_file(str(out / "model.safetensors"))
    assert any(not torch_equal(trained[name], p) for name, p in initial.named_parameters() if name in trained)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b.detach())


def test_two_grpo_steps_with_rewards_over_http(rm_server, scene, tmp_path):
    from policy_trainer._grpo import GRPORun

    # prob rewards (P(win) from the judge's logprobs) differ between rollouts, so the advantages are
    # non-zero and the update must move the weights.
    cfg = grpo_config(tmp_path, rm_server.base_url, scene, reward_kind="prob")
    cfg.metrics_port = 0  # the trainer's Prometheus endpoint, on a free port
    run = GRPORun(cfg)
    trainer = run.build()
    before = snapshot(trainer.model)
    judged_before = judgments_total(rm_server.base_url)
    try:
        result = run.train()
        exported = scrape(f"http://127.0.0.1:{run.exporter.port}/metrics")
    finally:
        run.close()

    assert result.stopped is None and result.global_step == 2
    rewards = step_rewards(result.log_history)
    assert len(rewards) == 2 and all(math.isfinite(r) and 0.0 <= r <= 1.0 for r in rewards)
    # 2 steps × (1 prompt × 2 rollouts), each judged against its reference once
    pairs = 2 * cfg.grpo["per_device_train_batch_size"]
    assert judgments_total(rm_server.base_url) - judged_before == pairs
    assert run.client.stats.rewarded == pairs and run.client.stats.failed == 0
    assert moved(before, trainer.model)
    # what Prometheus reads from the trainer: the step, the rewards of the last call, one latency sample a step
    assert exported["her_trainer_global_step"] == 2
    assert exported["her_trainer_reward_rewarded_total"] == pairs and exported["her_trainer_reward_failed_total"] == 0
    assert exported["her_trainer_reward_call_seconds_count"] == 2
    assert exported["her_trainer_reward_call_seconds_sum"] > 0
    assert exported["her_trainer_reward_mean"] == pytest.approx(rewards[-1], abs=1e-6)


def scrape(url: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus endpoint, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def batches_judged(base_url: str) -> float:
    """How many batches the server's batcher has handed to the engine (rm_batch_size_count)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=30).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "rm_batch_size_count")


class _RestartDuringCall:
    """Reward wrapper: on its first call, SIGKILLs the server once the judge works on the call's pairs, then
    restarts it on the same port once the client has seen the outage, in a background thread."""

    def __init__(self, inner, server: ServerProcess) -> None:
        self.inner, self.server = inner, server
        self.__name__ = inner.__name__
        self.thread: threading.Thread | None = None
        self.killed_during_call = False
        self.error: BaseException | None = None

    def _outages(self) -> int:
        return sum(self.inner.client.stats.http_errors.values())  # inner: the RewardOutageGuard of the client

    def _kill_and_restart(self, call_done: threading.Event, batches_before: float, outages_before: int) -> None:
        try:
            # the judge works on this call's pairs: a batch of them reached the engine after the call began
            wait_for(lambda: call_done.is_set() or batches_judged(self.server.base_url) > batches_before,
                     "a pair of the reward call inside the judge")
            self.killed_during_call = not call_done.is_set()
            os.killpg(self.server._proc.pid, signal.SIGKILL)
            self.server.stop()  # reaps the killed process
            # the client noticed (its request failed; it retries against the dead port) before the server is back
            wait_for(lambda: call_done.is_set() or self._outages() > outages_before, "the client seeing the outage")
            self.server.start()
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    async def __call__(self, prompts, completions, **columns):
        done = threading.Event()
        if self.thread is None:
            started = (done, batches_judged(self.server.base_url), self._outages())
            self.thread = threading.Thread(target=self._kill_and_restart, args=started, daemon=True)
            self.thread.start()
        try:
            return await self.inner(prompts, completions, **columns)
        finally:
            done.set()


def test_step_completes_when_the_server_restarts_mid_step(rm_server, scene, tmp_path):
    from policy_trainer._grpo import GRPORun

    cfg = grpo_config(tmp_path, rm_server.base_url, scene)
    cfg.grpo["max_steps"] = 1
    # Other seeds than the test above: its verdicts are in the server's cache, and a cache hit would
    # answer before the kill.
    cfg.grpo["seed"] = cfg.model.seed = 1
    cfg.reward.retry_budget_s = 600  # hang guard only: the call outlasts a restart with its model load on a slow box
    chaos: list[_RestartDuringCall] = []
    run = GRPORun(cfg, wrap_reward=lambda f: chaos.append(_RestartDuringCall(f, rm_server)) or chaos[0])
    result = run.train()
    chaos[0].thread.join(timeout=600)  # it ended with the restart the call waited for; this only catches a hang
    assert chaos[0].error is None, chaos[0].error
    assert chaos[0].killed_during_call
    assert result.stopped is None and result.global_step == 1
    stats = run.client.stats
    assert stats.failed == 0 and stats.rewarded == 2  # no rollout dropped
    assert stats.retries >= 1 and sum(stats.http_errors.values()) >= 1  # it did see the outage
    assert all(math.isfinite(r) for r in step_rewards(result.log_history))
    # The restarted server counts from zero: both rewards of the step were judged by it.
    assert judgments_total(rm_server.base_url) == 2


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-x"]))
