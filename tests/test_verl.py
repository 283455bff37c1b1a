"""verl 0.9.1's own code running our reward function on rows our data builder made.

Nothing of verl is replaced: Hydra composes verl's `ppo_trainer` config with the README's overrides,
verl's `RewardLoopWorker` loads the function (`load_reward_manager` → `get_custom_reward_fn`) and its
`NaiveRewardManager` calls it; the rows are read by verl's `RLHFDataset` from the parquet `her build
policy` wrote. Built here by hand is only what a policy rollout would produce: the DataProto verl's
agent loop hands to a reward worker (same fields as `_compute_score` in
verl/experimental/agent_loop/agent_loop.py, or the trainer's batch made with verl's `collate_fn`).
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from data_builder._policy import SplitConfig, build_and_export
from data_builder._verl import read_rows, to_verl_row, verl_problems
from her_cli.main import main

REPO = Path(__file__).resolve().parents[1]
FUNCTION_FILE = REPO / "policy_trainer" / "verl_reward.py"
# The README's keys, exactly (the path is the repo's file here; `pkg://policy_trainer.verl_reward` also works).
README_OVERRIDES = [
    f"reward.custom_reward_function.path={FUNCTION_FILE}",
    "reward.custom_reward_function.name=compute_score_async",
    "+reward.custom_reward_function.reward_kwargs.judge_mode=fast",
    "data.max_prompt_length=4096",
    "data.filter_overlong_prompts=True",
]
VERL_VERSION = "0.9.1"
SAMPLES = 6  # rollouts scored through verl's batch entry point (two fast judgments each)
TOO_LONG = "word " * 2000  # over the server's RM_MAX_CANDIDATE_CHARS (8000): refused with 422


def _verl():
    try:
        import verl
    except ImportError as exc:  # say what to install instead of failing on an import deep inside
        pytest.fail(f"verl is not installed ({exc}); `make install` installs it: see the Makefile's verl line")
    assert verl.__version__ == VERL_VERSION, f"these tests describe verl {VERL_VERSION}, found {verl.__version__}"
    return verl


def _compose(*overrides: str):
    """verl's trainer config as `python -m verl.trainer.main_ppo <overrides>` builds it."""
    from hydra import compose, initialize_config_dir

    config_dir = Path(_verl().__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose("ppo_trainer", overrides=list(overrides))


@pytest.fixture(scope="module")
def policy_rows(tmp_path_factory) -> Path:
    """`her build policy` on the test scenes: every turn of the Pride and Prejudice sample in train."""
    out = tmp_path_factory.mktemp("verl-policy")
    build_and_export([REPO / "tests" / "data" / "coser_test_sample_pride_and_prejudice.json"], out,
                     SplitConfig(fractions=(1.0, 0.0, 0.0)))
    return out / "verl" / "train.parquet"


# --------------------------------------------------------------------------- config keys (no model)


def test_readme_keys_reach_verls_loader():
    from verl.trainer.ppo.reward import get_custom_reward_fn, resolve_reward_manager_cls

    from policy_trainer._verl import compute_score, compute_score_async

    cfg = _compose(*README_OVERRIDES)
    fn = get_custom_reward_fn(cfg)
    assert fn.args == (compute_score_async, {"judge_mode": "fast"})  # verl merges reward_kwargs into every call
    assert resolve_reward_manager_cls(cfg).__name__ == "NaiveRewardManager"  # the default manager serves it
    sync = get_custom_reward_fn(_compose("reward.custom_reward_function.path=pkg://policy_trainer.verl_reward",
                                         "reward.custom_reward_function.name=compute_score",
                                         "+reward.custom_reward_function.reward_kwargs.url=http://rm:8000"))
    assert sync.args == (compute_score, {"url": "http://rm:8000"})  # the URL without relying on env inheritance
    # what the issue hit: the old top-level keys are accepted, then nothing reads them ...
    old = _compose(f"custom_reward_function.path={FUNCTION_FILE}", "custom_reward_function.name=compute_score")
    assert old.custom_reward_function.path == str(FUNCTION_FILE) and get_custom_reward_fn(old) is None
    # ... and the batch manager is gone from the reward loop
    with pytest.raises(ValueError, match="Unknown reward manager: batch"):
        resolve_reward_manager_cls(_compose(*README_OVERRIDES, "reward.reward_manager.name=batch"))
    # a misspelt reward_kwargs key is refused instead of silently judging with the default (cot) mode
    typo = get_custom_reward_fn(
        _compose(*README_OVERRIDES[:2], "+reward.custom_reward_function.reward_kwargs.mode=fast"))
    call = {"data_source": "her/roleplay", "solution_str": "Hi.", "ground_truth": "Hm.", "extra_info": {"prompt": "p"}}
    with pytest.raises(ValueError, match=r"reward_kwargs \['mode'\] are not reward client settings"):
        asyncio.run(typo(**call))


# --------------------------------------------------------------------------- rows (no model)


def test_builder_rows_and_converted_rows_are_verl_rows(policy_rows, tmp_path, capsys):
    rows = read_rows(policy_rows)
    assert rows and all(verl_problems(r) == [] for r in rows)
    assert all(r["extra_info"]["prompt"] == r["prompt"] and r["reward_model"]["ground_truth"] for r in rows)

    # HER's layout (reference under reward_model.answer) and verl's own preprocessing (no extra_info.prompt)
    her = {"data_source": "her", "prompt": rows[0]["prompt"], "reward_model": {"style": "model", "answer": "Hm."}}
    plain = {**copy.deepcopy(rows[1]), "extra_info": {"index": 7, "split": "train"}}
    assert "reward_model.ground_truth is missing (verl reads it before any reward function)" in verl_problems(her)
    assert any("extra_info.prompt is missing" in p for p in verl_problems(plain))
    converted = to_verl_row(her, index=0)
    assert verl_problems(converted) == [] and converted["reward_model"]["ground_truth"] == "Hm."
    assert to_verl_row(plain, index=0)["extra_info"] == {"index": 7, "split": "train", "prompt": rows[1]["prompt"]}
    with pytest.raises(ValueError, match="no reference reply"):
        to_verl_row({"prompt": rows[0]["prompt"]}, index=3)

    # the command: our GRPO rows and a HER-layout file into verl's layout
    grpo = policy_rows.parent.parent / "grpo" / "train.jsonl"
    (tmp_path / "her.jsonl").write_text(json.dumps(her) + "\n", encoding="utf-8")
    assert main(["build", "verl", "--in", str(grpo), str(tmp_path / "her.jsonl"), "--out", str(tmp_path / "v")]) == 0
    assert f"verl rows (train {len(rows)}, her 1)" in capsys.readouterr().out
    for name in ("train", "her"):
        for ext in ("jsonl", "parquet"):
            out = read_rows(tmp_path / "v" / f"{name}.{ext}")
            assert out and all(verl_problems(r) == [] for r in out), (name, ext)
    from_grpo = read_rows(tmp_path / "v" / "train.parquet")
    assert [r["reward_model"]["ground_truth"] for r in from_grpo] == [r["reward_model"]["ground_truth"] for r in rows]
    assert from_grpo[0]["extra_info"]["sample_id"] == rows[0]["extra_info"]["sample_id"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "text"}) + "\n", encoding="utf-8")
    assert main(["build", "verl", "--in", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "v")]) == 2
    assert "prompt must be a list of chat messages" in capsys.readouterr().err


# --------------------------------------------------------------------------- verl's reward loop, live server


class VerlSide:
    """verl's RewardLoopWorker and RLHFDataset, in-process (Ray would put the worker in an actor).

    The worker keeps the event loop current at its construction (verl's `get_event_loop`), so it is
    built and driven on one private thread."""

    def __init__(self, cfg, parquet: Path) -> None:
        from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
        from verl.utils.dataset.rl_dataset import RLHFDataset

        self.thread = ThreadPoolExecutor(1, thread_name_prefix="verl-reward-worker")
        self.worker = self.thread.submit(RewardLoopWorker, cfg).result()
        self.tokenizer = self.worker.input_tokenizer
        self.dataset = RLHFDataset(str(parquet), self.tokenizer, cfg.data)

    def run(self, coroutine_fn, *args):
        return self.thread.submit(lambda: self.worker.loop.run_until_complete(coroutine_fn(*args))).result()

    def _ids(self, row: dict, text: str) -> tuple[list[int], list[int]]:
        prompt = self.tokenizer.apply_chat_template(row["raw_prompt"], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"]
        return prompt, self.tokenizer(text + self.tokenizer.eos_token, add_special_tokens=False)["input_ids"]

    def batch(self, rows: list[dict], texts: list[str]):
        """The trainer's batch: prompts left-padded, responses right-padded, columns via collate_fn."""
        import torch
        from tensordict import TensorDict
        from verl import DataProto
        from verl.utils.dataset.rl_dataset import collate_fn

        ids = [self._ids(r, t) for r, t in zip(rows, texts, strict=True)]
        width_p, width_r = max(len(p) for p, _ in ids), max(len(r) for _, r in ids)
        pad = self.tokenizer.pad_token_id or 0
        prompts = torch.tensor([[pad] * (width_p - len(p)) + p for p, _ in ids])
        responses = torch.tensor([r + [pad] * (width_r - len(r)) for _, r in ids])
        mask = torch.tensor([[0] * (width_p - len(p)) + [1] * (len(p) + len(r)) + [0] * (width_r - len(r))
                             for p, r in ids])
        columns = collate_fn([{k: v for k, v in copy.deepcopy(r).items() if not isinstance(v, torch.Tensor)}
                              for r in rows])
        tensors = TensorDict({"prompts": prompts, "responses": responses, "attention_mask": mask},
                             batch_size=len(rows))
        return DataProto(batch=tensors, non_tensor_batch=columns)

    def rollout(self, row: dict, text: str):
        """One finished rollout as verl's agent loop scores it right away (its default path): the
        row's columns repeated, plus the rollout's extra fields, which carry `raw_prompt`."""
        import numpy as np
        import torch
        from tensordict import TensorDict
        from verl import DataProto

        row = {k: v for k, v in copy.deepcopy(row).items() if not isinstance(v, torch.Tensor)}
        prompt, response = self._ids(row, text)
        tensors = TensorDict({"prompts": torch.tensor([prompt]), "responses": torch.tensor([response]),
                              "attention_mask": torch.ones(1, len(prompt) + len(response), dtype=torch.int64)},
                             batch_size=1)
        extra_fields = {"raw_prompt": row["raw_prompt"], "turn_scores": [], "tool_rewards": []}
        columns = {**{k: np.array([v]) for k, v in row.items()}, "__num_turns__": np.array([2]),
                   "tool_extra_fields": np.array([extra_fields], dtype=object)}
        return DataProto(batch=tensors, non_tensor_batch=columns)

    def close(self) -> None:
        from policy_trainer import _verl

        for client in _verl._clients.values():  # the worker's clients live on its loop
            self.thread.submit(lambda c=client: self.worker.loop.run_until_complete(c.aclose())).result()
        _verl._clients.clear()
        self.thread.shutdown()


@pytest.fixture
def verl_side(rm_server, policy_rows, monkeypatch):
    from her_engines import ensure_hf_folder

    monkeypatch.setenv("HER_RM_URL", rm_server.base_url)  # what every reward worker's environment needs
    policy = ensure_hf_folder("smollm2-135m-instruct")  # stands in for the policy: its tokenizer decodes
    side = VerlSide(_compose(*README_OVERRIDES, f"actor_rollout_ref.model.path={policy}"), policy_rows)
    yield side
    side.close()


def _finite(result: dict) -> float:
    score = result["reward_score"]
    assert isinstance(score, float) and math.isfinite(score) and 0.0 <= score <= 1.0, result
    assert result["reward_extra_info"] == {"acc": score}
    return score


@pytest.mark.model
def test_verl_reward_loop_scores_builder_rows_and_fails_what_it_cannot_judge(verl_side):
    rows = [verl_side.dataset[i] for i in range(len(verl_side.dataset))]
    assert len(rows) > SAMPLES and os.environ["HER_RM_URL"]
    # a rollout per row: another turn's real reply (fluent, in HER's format, not this turn's answer)
    texts = [rows[(i + 1) % len(rows)]["reward_model"]["ground_truth"] for i in range(SAMPLES)]

    # 1. the worker's batch entry point (one concurrent call per rollout, as RewardLoopManager uses it)
    results = verl_side.run(verl_side.worker.compute_score_batch, verl_side.batch(rows[:SAMPLES], texts))
    assert len(results) == SAMPLES
    scores = [_finite(r) for r in results]

    # 2. the rollout-time path, on a row as verl's own preprocessing makes it (no extra_info.prompt):
    #    the conversation comes from the raw_prompt verl adds to extra_info
    plain = {**rows[0], "extra_info": {"index": 0, "split": "train"}}
    _finite(verl_side.run(verl_side.worker.compute_score, verl_side.rollout(plain, texts[0])))
    with pytest.raises(ValueError, match=r"extra_info\['prompt'\]"):  # the batch path has no raw_prompt there
        verl_side.run(verl_side.worker.compute_score, verl_side.batch([plain], texts[:1]))

    # 3. HER's layout fails inside verl before our function runs; converted, it is scored
    her = {**rows[1], "reward_model": {"style": "model", "answer": rows[1]["reward_model"]["ground_truth"]}}
    with pytest.raises(KeyError, match="ground_truth"):
        verl_side.run(verl_side.worker.compute_score, verl_side.rollout(her, texts[1]))
    fixed = {**rows[1], **to_verl_row({k: her[k] for k in ("data_source", "prompt", "reward_model")}, index=1)}
    _finite(verl_side.run(verl_side.worker.compute_score, verl_side.rollout(fixed, texts[1])))

    # 4. a rollout the server refuses: the call fails (verl then drops the rollout); it is never a 0
    with pytest.raises(RuntimeError, match="no reward for 1 of 1 rollout") as failed:
        verl_side.run(verl_side.worker.compute_score, verl_side.rollout(rows[2], TOO_LONG))
    assert "422" in str(failed.value)
    # and the server is fine: the same row with a judgeable rollout still gets its reward
    assert _finite(verl_side.run(verl_side.worker.compute_score, verl_side.rollout(rows[2], texts[2]))) == scores[2]
