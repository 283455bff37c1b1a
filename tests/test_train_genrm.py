"""`her train genrm`: a few real steps on the bundled model, and the folder served as it is."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from data_builder._books import load_book
from data_builder._negatives import hard_negatives
from her_genrm import JUDGE_CARD_FILE, CompactTemplate, read_judge_card, training_rows
from her_roleplay import default_library
from policy_trainer._genrm import GenRMRun, GenRMRunConfig, shuffled_by_pair
from policy_trainer._setup import ConfigError

COSER = Path(__file__).resolve().parent / "data" / "coser"


def _pairs_file(tmp_path: Path, n: int) -> Path:
    pairs = hard_negatives(load_book(COSER / "book_othello.json")[:2], per_turn=1, seed=0)[:n]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(p.model_dump_json() + "\n" for p in pairs), encoding="utf-8")
    return path


def _config(tmp_path: Path, pairs: Path, **overrides) -> GenRMRunConfig:
    raw = {
        "model": {"name_or_path": "smollm2-135m-instruct"},
        "data": {"pairs": [str(pairs)], "modes": ["fast", "cot"]},
        "sft": {"output_dir": str(tmp_path / "judge"), "use_cpu": True, "max_steps": 2,
                "per_device_train_batch_size": 2, "learning_rate": 1e-4, "save_strategy": "no",
                "report_to": [], "logging_steps": 1},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return GenRMRunConfig.from_dict(raw)


def test_config_errors_name_the_field(tmp_path):
    pairs = _pairs_file(tmp_path, 2)
    with pytest.raises(ConfigError, match="data.modes"):
        _config(tmp_path, pairs, data={"modes": ["verbose"]})
    with pytest.raises(ConfigError, match="does not exist"):
        GenRMRun(_config(tmp_path, tmp_path / "missing.jsonl")).build()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "context": "c", "a": "a", "b": "b", "label": "left", "source": "teacher"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: not a LabelledPair.*label"):
        GenRMRun(_config(tmp_path, bad)).build()


def test_both_orders_of_a_pair_are_read_together_and_policy_samples_train_fast_only(tmp_path):
    negatives = hard_negatives(load_book(COSER / "book_othello.json")[:2], per_turn=1, seed=0)[:6]
    sample = negatives[0].model_copy(update={"id": "sample", "source": "policy_sample", "comparisons": [],
                                             "pattern": None, "flaw_kind": None})
    rows = training_rows([*negatives, sample], CompactTemplate(default_library()), modes=["fast", "cot"])
    # 6 hard negatives x 2 orders x 2 modes, and the policy sample's 2 fast rows (it has no cot target)
    assert len(rows) == 6 * 4 + 2
    assert {(r["mode"], r["a_first"]) for r in rows if r["pair_id"] == "sample"} == {("fast", True), ("fast", False)}
    ordered = shuffled_by_pair(rows, seed=3)
    ids = [r["pair_id"] for r in ordered]
    runs = [pid for k, pid in enumerate(ids) if k == 0 or ids[k - 1] != pid]
    assert sorted(runs) == sorted(p.id for p in [*negatives, sample])  # each pair's rows are one contiguous run
    assert runs != [p.id for p in [*negatives, sample]]  # and the pairs are shuffled
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(p.model_dump_json() + "\n" for p in negatives), encoding="utf-8")
    assert _config(tmp_path, pairs).trl_args().train_sampling_strategy == "sequential"  # the trainer keeps it


@pytest.mark.model
def test_lora_run_merges_into_a_plain_model_folder(tmp_path):
    """LoRA on a tiny random Llama: the adapters are merged, so the folder loads without peft."""
    from transformers import AutoModelForCausalLM

    config = _config(tmp_path, _pairs_file(tmp_path, 4),
                     model={"name_or_path": None, "tiny_random": {"hidden_size": 32},
                            "tokenizer": "smollm2-135m-instruct"},
                     lora={"r": 4, "alpha": 8}, sft={"max_steps": 1})
    result = GenRMRun(config).train()
    out = Path(result.output_dir)
    assert result.global_step == 1
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert read_judge_card(out).principle_detail == "none"


@pytest.mark.model
@pytest.mark.timeout(1800)  # training (its own 900 s guard), a server start, two judgments, `her judge`: one hang guard
@pytest.mark.own_engine
def test_few_steps_make_a_folder_the_service_serves(tmp_path):
    """The README's `her train genrm` with the shipped CPU config, then `her serve --model DIR`."""
    import subprocess

    import torch
    from _openai_server import ServerProcess, free_port
    from safetensors.torch import load_file

    from her_engines import ensure_hf_folder

    pairs = _pairs_file(tmp_path, 4)
    out = tmp_path / "judge"
    her = str(Path(sys.executable).with_name("her"))
    done = subprocess.run([her, "train", "genrm", "--config", "policy_trainer/configs/genrm_cpu.yaml",
                           "--pairs", str(pairs), "--output-dir", str(out), "--max-steps", "2"],
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "run_summary.json").read_text())
    assert result["global_step"] == 2 and result["extra"]["pairs"] == 4
    assert result["extra"]["examples"] == 4 * 2 * 2  # both orders x (fast + cot)
    train_loss = result["log_history"][-1]["train_loss"]  # the run's summary entry
    assert 0.0 < train_loss < float("inf")
    # the top layers moved, the frozen bottom ones did not (train_layers: 8 in the CPU config)
    base = load_file(str(ensure_hf_folder("smollm2-135m-instruct") / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    top, bottom = "model.layers.29.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[top], trained[top])
    assert torch.equal(base[bottom], trained[bottom])
    card = json.loads((out / JUDGE_CARD_FILE).read_text())
    assert card["principle_detail"] == "none" and card["train_pairs"] == 4

    # `her serve --model DIR` serves it as it is, with the trained judge's short prompt
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RM_")}
    env.update(RM_KV_CACHE_GIB="0.5", RM_MAX_WAIT_MS="5")
    her = str(Path(sys.executable).with_name("her"))
    server = ServerProcess([her, "serve", "--port", str(port), "--model", str(out)], port, ready_path="/readyz",
                           startup_timeout=600, env=env)  # hang guard: a model load on a slow, busy box
    server.start()
    try:
        info = httpx.get(f"{server.base_url}/v1/info", timeout=10).json()
        trained_prompt = CompactTemplate(default_library(), principle_detail="none")
        assert info["templates"]["compact"] == trained_prompt.template_hash
        pair = json.loads(pairs.read_text().splitlines()[0])
        served = {}
        for mode in ("fast", "cot"):
            body = {"context": pair["context"], "a": pair["a"], "b": pair["b"], "mode": mode}
            verdict = httpx.post(f"{server.base_url}/v1/judge", json=body, timeout=300).json()
            assert verdict["status"] == "ok", verdict
            assert verdict["verdict"] in ("a", "b", "tie") and 0.0 <= verdict["p_a"] <= 1.0
            if mode == "cot":
                assert len(verdict["comparisons"]) >= 3
            served[mode] = verdict
    finally:
        left = server.terminate_gracefully()
    assert not left

    # `her judge --model DIR` reads the same card: the same prompt, so the same fast verdict on the same pair
    (tmp_path / "one.jsonl").write_text(json.dumps({"id": "p", "context": pair["context"], "a": pair["a"],
                                                     "b": pair["b"]}) + "\n")
    done = subprocess.run([her, "judge", "--in", str(tmp_path / "one.jsonl"), "--out", str(tmp_path / "v.jsonl"),
                           "--mode", "fast", "--model", str(out), "--kv-cache-gib", "0.5"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    local = json.loads((tmp_path / "v.jsonl").read_text().splitlines()[0])
    assert local["verdict"] == served["fast"]["verdict"]
    assert local["p_a"] == pytest.approx(served["fast"]["p_a"], abs=1e-3)


def test_the_order_divergence_is_zero_for_a_consistent_judge_and_grows_with_a_slot_preference():
    import torch

    from policy_trainer._order_consistency import in_ab_terms, order_divergence

    def winners(slot_probs, a_first):
        return in_ab_terms(torch.tensor(slot_probs).log(), torch.tensor(a_first))

    pair = torch.tensor([0, 0])
    # the same judgment in both orders: "a" is A when a is first, B when it is second
    consistent = winners([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]], [True, False])
    assert order_divergence(consistent, pair).item() == pytest.approx(0.0, abs=1e-6)
    # a judge that names slot B whatever it reads disagrees with itself once the pair is swapped
    mild = order_divergence(winners([[0.4, 0.5, 0.1], [0.4, 0.5, 0.1]], [True, False]), pair).item()
    strong = order_divergence(winners([[0.05, 0.9, 0.05], [0.05, 0.9, 0.05]], [True, False]), pair).item()
    assert 0.0 < mild < strong <= float(torch.log(torch.tensor(2.0)))
    # rows without their other order (or not fast rows, index -1) add nothing
    assert order_divergence(consistent, torch.tensor([0, 1])) is None
    assert order_divergence(consistent, torch.tensor([-1, -1])) is None


@pytest.mark.model
def test_the_consistency_term_trains_and_is_logged(tmp_path):
    """consistency_weight > 0 on a tiny random Llama: the loss adds the order divergence of each batch's pairs."""
    config = _config(tmp_path, _pairs_file(tmp_path, 4),
                     model={"name_or_path": None, "tiny_random": {"hidden_size": 32},
                            "tokenizer": "smollm2-135m-instruct"},
                     consistency_weight=1.0, sft={"max_steps": 2, "per_device_train_batch_size": 4})
    result = GenRMRun(config).train()
    assert result.global_step == 2
    logged = [entry for entry in result.log_history if "order_divergence" in entry]
    assert logged and all(0.0 <= e["order_divergence"] <= 0.7 for e in logged)
    with pytest.raises(ConfigError, match="consistency_weight"):
        _config(tmp_path, _pairs_file(tmp_path, 2), consistency_weight=1.0, data={"swap": False})
