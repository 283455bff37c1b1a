"""`her train genrm-rl`: the judge's own RL stage (HER's step 3), GRPO on verifiable verdicts.

    her train genrm-rl --config policy_trainer/configs/genrm_rl_cpu.yaml --model judge_sft/ --pairs pairs.jsonl \
        --output-dir judge_rl/

The judge (usually the folder `her train genrm` wrote) samples fast verdicts for the labelled pairs in both
presentation orders, with the prompt its card names. Each sampled verdict earns

- ``verdict``: 1 when it names the labelled winner's slot, else 0 (a malformed answer is a wrong answer
  here: this is the judge's own output being graded, not a reward a policy would receive);
- ``order_agreement``: the share of the other order's samples of the same pair that name the same
  winner, weighted by ``agreement_bonus`` (J1's consistency reward: a judge that flips with the order
  earns less even when one order is right).

Both orders of a pair are generated in one batch (the pairs are read in order, ``shuffle_dataset`` off).
The output folder is a judge folder like `her train genrm`'s: ``her serve --model DIR`` serves it.

Sections: ``model`` (:class:`ModelSpec`; ``--model`` overrides its name_or_path), ``data``
(:class:`GenRMDataSpec`, fast mode in both orders), ``grpo`` (keyword arguments of ``trl.GRPOConfig``),
and top-level ``agreement_bonus`` and ``train_layers``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._genrm import GenRMDataSpec, pair_indices, read_data_section, shuffled_by_pair
from ._setup import (
    ConfigError,
    ModelSpec,
    TrainResult,
    build_model_and_tokenizer,
    check_top_level,
    check_train_layers,
    check_trainer_section,
    dataclass_from,
    load_run_yaml,
    resolve_path,
    with_precision,
)

log = logging.getLogger(__name__)

__all__ = ["GenRMRLRun", "GenRMRLRunConfig", "order_agreement_reward", "verdict_reward"]

_TOP_KEYS = {"model", "data", "grpo", "agreement_bonus", "train_layers"}
def _slot_named(completion: Any) -> str | None:
    from her_genrm import CompactTemplate

    text = completion[-1]["content"] if isinstance(completion, list) else completion
    return dict(CompactTemplate.verdict_values).get(str(text).strip())


def _winner(slot: str | None, a_first: bool) -> str | None:
    if slot is None or slot == "tie":
        return slot
    return "a" if (slot == "A") == a_first else "b"


def verdict_reward(completions: Sequence[Any], label_slot: Sequence[str], **_: Any) -> list[float]:
    """1.0 for a sampled verdict naming the labelled slot, else 0.0."""
    return [float(_slot_named(c) == label) for c, label in zip(completions, label_slot, strict=True)]


def order_agreement_reward(completions: Sequence[Any], pair_index: Sequence[int], a_first: Sequence[bool],
                           **_: Any) -> list[float]:
    """The share of the other order's samples of the same pair (in this batch) naming the same winner."""
    winners = [_winner(_slot_named(c), first) for c, first in zip(completions, a_first, strict=True)]
    rewards = []
    for i, winner in enumerate(winners):
        others = [w for w, index, first in zip(winners, pair_index, a_first, strict=True)
                  if index == pair_index[i] and first != a_first[i]]
        rewards.append(sum(w == winner for w in others) / len(others) if others and winner is not None else 0.0)
    return rewards


@dataclass
class GenRMRLRunConfig:
    model: ModelSpec
    data: GenRMDataSpec
    grpo: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``trl.GRPOConfig``."""
    agreement_bonus: float = 0.5
    """Weight of ``order_agreement`` beside ``verdict`` (1.0); 0 leaves the verifiable verdict alone."""
    train_layers: int | None = None
    """Train only the top N decoder layers and the final norm (None: all weights)."""
    base_dir: Path | None = None

    def __post_init__(self) -> None:
        from trl import GRPOConfig

        if self.data.modes != ["fast"] or not self.data.swap:
            raise ConfigError(f"data.modes={self.data.modes}, data.swap={self.data.swap}: the RL stage samples fast "
                              "verdicts in both orders; set modes: [fast] and swap: true")
        check_train_layers(self.train_layers)
        if self.agreement_bonus < 0:
            raise ConfigError(f"agreement_bonus={self.agreement_bonus}: give a weight >= 0")
        check_trainer_section("grpo", self.grpo, GRPOConfig)
        if self.grpo.get("shuffle_dataset", False) or "reward_weights" in self.grpo:
            raise ConfigError("grpo.shuffle_dataset / grpo.reward_weights: drop them (both orders of a pair must "
                              "share a generation batch; the weights come from agreement_bonus)")

    @classmethod
    def from_yaml(cls, path: str | Path, *, model: str | None = None, output_dir: str | None = None,
                  max_steps: int | None = None, pairs: list[str] | None = None) -> GenRMRLRunConfig:
        raw, base_dir = load_run_yaml(path, "grpo", output_dir=output_dir, max_steps=max_steps, model=model,
                                      data_files=pairs, data_key="pairs")
        return cls.from_dict(raw, base_dir=base_dir)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, base_dir: Path | None = None) -> GenRMRLRunConfig:
        check_top_level(raw, _TOP_KEYS, "grpo")
        return cls(model=dataclass_from(ModelSpec, "model", raw["model"]),
                   data=dataclass_from(GenRMDataSpec, "data", raw["data"]),
                   grpo=dict(raw["grpo"] or {}), agreement_bonus=float(raw.get("agreement_bonus", 0.5)),
                   train_layers=raw.get("train_layers"), base_dir=base_dir)

    def trl_args(self) -> Any:
        from trl import GRPOConfig

        kwargs = {**with_precision("grpo", self.grpo), "shuffle_dataset": False,
                  "reward_weights": [1.0, self.agreement_bonus]}
        try:
            args = GRPOConfig(**kwargs)
        except ValueError as exc:
            raise ConfigError(f"section 'grpo': {exc}") from exc
        batch, group = args.generation_batch_size, args.num_generations
        assert batch is not None and group is not None  # GRPOConfig's __post_init__ sets both
        prompts_per_batch = batch // group
        if prompts_per_batch % 2:
            raise ConfigError(f"grpo: {prompts_per_batch} prompts per generation batch (generation_batch_size "
                              f"{batch} / num_generations {group}); make it even "
                              "so both orders of a pair are sampled together")
        return args


class GenRMRLRun:
    """Builds the GRPOTrainer of a :class:`GenRMRLRunConfig` and runs it (``self.trainer`` after :meth:`build`)."""

    def __init__(self, config: GenRMRLRunConfig) -> None:
        self.config = config
        self.trainer: Any = None
        self.card: Any = None
        self.pairs = 0

    def _dataset(self, pairs: list[Any], template: Any) -> Any:
        from datasets import Dataset

        from her_genrm import training_rows

        # the SFT rows of the fast verdict, both orders of a pair next to each other: their target is the label
        rows = shuffled_by_pair(training_rows(pairs, template, modes=["fast"], swap=True), self.config.data.seed)
        index = pair_indices(rows)
        return Dataset.from_list([{"prompt": r["prompt"], "label_slot": r["completion"][0]["content"],
                                   "pair_index": index[r["pair_id"]], "a_first": r["a_first"]} for r in rows])

    def build(self) -> Any:
        if self.trainer is not None:
            return self.trainer
        from trl import GRPOTrainer

        from her_genrm import CompactTemplate, JudgeCard, read_judge_card

        cfg = self.config
        args = cfg.trl_args()
        pairs, library = read_data_section(cfg.data, cfg.base_dir)
        self.pairs = len(pairs)
        source = cfg.model.name_or_path
        card = read_judge_card(resolve_path(source, cfg.base_dir)) if source else None
        if card is None:
            log.info("%s has no judge card: training the trained-judge prompt (no principle list)", source)
            card = JudgeCard(principle_set_hash=library.version, base_model=str(source or "tiny_random"))
        self.card = card
        dataset = self._dataset(pairs, CompactTemplate(library, principle_detail=card.principle_detail))
        model, tokenizer = build_model_and_tokenizer(cfg.model, cfg.base_dir, train_layers=cfg.train_layers)
        rewards: list[Any] = [verdict_reward, order_agreement_reward]  # in the order of grpo.reward_weights
        self.trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=dataset,
                                   reward_funcs=rewards)
        return self.trainer

    def train(self) -> TrainResult:
        trainer = self.build()
        trainer.train()
        out = Path(trainer.args.output_dir)
        trainer.save_model()
        trainer.processing_class.save_pretrained(out)
        card = self.card.model_copy(update={"modes": ["fast"]})
        card.model_extra["rl_stage"] = {"pairs": self.pairs, "agreement_bonus": self.config.agreement_bonus,
                                        "steps": trainer.state.global_step, "from": str(self.config.model.name_or_path)}
        card.write(out)
        result = TrainResult.of(trainer, pairs=self.pairs)
        result.write()
        return result
