"""`her train genrm-rl`: the judge's GRPO stage, its rewards and a real (tiny) run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_builder._books import load_book
from data_builder._negatives import hard_negatives
from her_genrm import read_judge_card
from policy_trainer._genrm_rl import GenRMRLRun, GenRMRLRunConfig, order_agreement_reward, verdict_reward
from policy_trainer._setup import ConfigError

COSER = Path(__file__).resolve().parent / "data" / "coser"


def _answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_the_verdict_reward_pays_the_labelled_slot_only():
    completions = [_answer("A"), _answer(" B\n"), _answer("tie"), _answer("A is better")]
    assert verdict_reward(completions, ["A", "B", "A", "A"]) == [1.0, 1.0, 0.0, 0.0]


def test_the_agreement_reward_pays_samples_that_name_the_same_winner_in_the_other_order():
    # pair 0: a first ("A" = a) and b first ("B" = a); pair 1 alone in its order gets nothing
    completions = [_answer("A"), _answer("B"), _answer("B"), _answer("A"), _answer("A")]
    pair_index = [0, 0, 0, 0, 1]
    a_first = [True, True, False, False, True]
    rewards = order_agreement_reward(completions, pair_index, a_first)
    # a-first samples say a, b; b-first samples say a, b: each agrees with half of the other order
    assert rewards == [0.5, 0.5, 0.5, 0.5, 0.0]
    assert order_agreement_reward([_answer("A"), _answer("B")], [0, 0], [True, False]) == [1.0, 1.0]
    assert order_agreement_reward([_answer("A"), _answer("A")], [0, 0], [True, False]) == [0.0, 0.0]
    assert order_agreement_reward([_answer("?"), _answer("?")], [0, 0], [True, False]) == [0.0, 0.0]


def _pairs(tmp_path: Path, n: int) -> Path:
    pairs = hard_negatives(load_book(COSER / "book_othello.json")[:2], per_turn=1, seed=0)[:n]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(p.model_dump_json() + "\n" for p in pairs), encoding="utf-8")
    return path


def _raw(tmp_path: Path, **grpo) -> dict:
    return {
        "model": {"name_or_path": None, "tiny_random": {"hidden_size": 32}, "tokenizer": "smollm2-135m-instruct"},
        "data": {"pairs": [str(_pairs(tmp_path, 3))], "modes": ["fast"]},
        "grpo": {"output_dir": str(tmp_path / "judge_rl"), "use_cpu": True, "max_steps": 1, "num_generations": 2,
                 "per_device_train_batch_size": 4, "max_completion_length": 2, "logging_steps": 1,
                 "save_strategy": "no", "report_to": [], **grpo},
    }


def test_config_errors_say_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match="modes: \\[fast\\]"):
        GenRMRLRunConfig.from_dict({**_raw(tmp_path), "data": {"pairs": ["x"], "modes": ["cot"]}})
    with pytest.raises(ConfigError, match="shuffle_dataset"):
        GenRMRLRunConfig.from_dict(_raw(tmp_path, shuffle_dataset=True))
    with pytest.raises(ConfigError, match="make it even"):
        GenRMRLRunConfig.from_dict(_raw(tmp_path, num_generations=4)).trl_args()  # 4 samples = 1 prompt


@pytest.mark.model
def test_a_short_run_writes_a_judge_folder_with_its_rl_stage(tmp_path):
    result = GenRMRLRun(GenRMRLRunConfig.from_dict(_raw(tmp_path))).train()
    assert result.global_step == 1
    rewards = [e for e in result.log_history if "rewards/verdict_reward/mean" in e]
    assert rewards and all(0.0 <= e["rewards/order_agreement_reward/mean"] <= 1.0 for e in rewards)
    out = Path(result.output_dir)
    card = read_judge_card(out)
    assert card is not None and card.principle_detail == "none" and card.modes == ["fast"]
    assert card.model_extra["rl_stage"]["pairs"] == 3 and card.model_extra["rl_stage"]["steps"] == 1
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32


def test_the_shipped_cpu_config_samples_both_orders_of_a_pair_together(tmp_path):
    root = Path(__file__).resolve().parents[1]
    config = GenRMRLRunConfig.from_yaml(root / "policy_trainer" / "configs" / "genrm_rl_cpu.yaml",
                                        model=str(tmp_path), pairs=[str(_pairs(tmp_path, 2))])
    args = config.trl_args()
    assert not args.shuffle_dataset and args.reward_weights == [1.0, config.agreement_bonus]
    assert (args.generation_batch_size // args.num_generations) % 2 == 0
    assert config.model.name_or_path == str(tmp_path.resolve())
    from her_genrm import CompactTemplate
    from her_roleplay import default_library
    from policy_trainer._genrm import read_data_section

    pairs, _ = read_data_section(config.data, config.base_dir)
    rows = GenRMRLRun(config)._dataset(pairs, CompactTemplate(default_library(), principle_detail="none")).to_list()
    assert len(rows) == 4 and [r["pair_index"] for r in rows] == [0, 0, 1, 1]  # both orders of a pair adjacent
    for first, second in (rows[:2], rows[2:]):
        assert first["a_first"] and not second["a_first"]
        assert {first["label_slot"], second["label_slot"]} == {"A", "B"}  # hard negatives: the real line wins
