"""`her train genrm`: fine-tune a judge on labelled pairs with TRL's SFTTrainer.

    result = GenRMRun(GenRMRunConfig.from_yaml("policy_trainer/configs/genrm_cpu.yaml")).train()

Sections: ``model`` (:class:`ModelSpec`), ``data`` (:class:`GenRMDataSpec`), ``lora`` (optional,
:class:`LoraSpec`), ``sft`` (keyword arguments of ``trl.SFTConfig``) and top-level ``deepspeed``,
as for the policy trainers (the same accelerate/DeepSpeed files apply).

Each labelled pair becomes judge prompts built by the judge's own prompt builder (the short
trained-judge prompt, no principle list) with the answer as the completion: the cot JSON and/or the
fast verdict token, in both presentation orders. The output folder is a complete model folder
(LoRA weights merged) with a judge card, so ``her serve --model DIR`` serves it as it is.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from her_genrm import Mode

from ._setup import (
    ConfigError,
    ModelSpec,
    TrainResult,
    build_model_and_tokenizer,
    check_deepspeed_file,
    check_top_level,
    check_train_layers,
    check_trainer_section,
    dataclass_from,
    ensure_single_process_env,
    load_run_yaml,
    resolve_path,
    sft_config,
)

log = logging.getLogger(__name__)

__all__ = ["GenRMDataSpec", "GenRMRun", "GenRMRunConfig", "LoraSpec"]

_TOP_KEYS = {"model", "data", "lora", "train_layers", "consistency_weight", "sft", "deepspeed"}
_MODES: tuple[str, ...] = get_args(Mode)


@dataclass
class GenRMDataSpec:
    pairs: list[str] = field(default_factory=list)
    """Labelled pair files (jsonl of ``her_genrm.LabelledPair``: `her build negatives` / `her build teacher-pairs`)."""
    modes: list[str] = field(default_factory=lambda: list(_MODES))
    """Answers to train: ``cot`` (JSON with comparisons) and/or ``fast`` (the verdict token)."""
    swap: bool = True
    """Both presentation orders of every pair (keeps position bias out of the data)."""
    principles: str | None = None
    """Principle library file (None: the bundled one); its ids are what cot answers may name."""
    limit: int | None = None
    """Use at most this many pairs (a seeded random subset)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ConfigError("data.pairs is empty: name at least one labelled pair file")
        bad = [m for m in self.modes if m not in _MODES]
        if bad or not self.modes:
            raise ConfigError(f"data.modes={self.modes}; expected a non-empty subset of {list(_MODES)}")


@dataclass
class LoraSpec:
    """LoRA adapters instead of full fine-tuning (merged into the weights when saving)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


@dataclass
class GenRMRunConfig:
    model: ModelSpec
    data: GenRMDataSpec
    sft: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``trl.SFTConfig``."""
    lora: LoraSpec | None = None
    train_layers: int | None = None
    """Train only the top N decoder layers and the final norm (None: all weights). The backward pass
    then stops N layers deep: on CPU, several times cheaper per example. Not combined with LoRA."""
    consistency_weight: float = 0.0
    """Weight of the order-consistency term (J1's idea, as a loss): the Jensen–Shannon divergence between the
    fast verdicts of a pair's two presentation orders, read in a/b terms, so the judge says the same thing
    whichever slot a reply sits in. 0: plain SFT. Needs fast rows in both orders (data.swap)."""
    deepspeed: str | None = None
    base_dir: Path | None = None

    def __post_init__(self) -> None:
        from trl import SFTConfig

        pairs_both_orders_fast = self.data.swap and "fast" in self.data.modes
        if self.consistency_weight < 0 or (self.consistency_weight and not pairs_both_orders_fast):
            raise ConfigError(f"consistency_weight={self.consistency_weight}: give a weight >= 0, and with it "
                              "data.swap: true and fast in data.modes (the term compares the fast verdicts of a "
                              "pair's two orders)")

        check_train_layers(self.train_layers)
        if self.train_layers is not None and self.lora is not None:
            raise ConfigError(f"train_layers={self.train_layers} together with lora: choose one (LoRA already "
                              "trains a small part)")

        check_trainer_section("sft", self.sft, SFTConfig)
        if self.sft.get("completion_only_loss") is False:
            raise ConfigError("sft.completion_only_loss=false would train the judge to write the prompt; "
                              "drop the key")
        check_deepspeed_file(self.deepspeed, self.base_dir)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, base_dir: Path | None = None) -> GenRMRunConfig:
        check_top_level(raw, _TOP_KEYS, "sft")
        return cls(
            model=dataclass_from(ModelSpec, "model", raw["model"]),
            data=dataclass_from(GenRMDataSpec, "data", raw["data"]),
            sft=dict(raw["sft"] or {}),
            lora=dataclass_from(LoraSpec, "lora", raw["lora"]) if raw.get("lora") else None,
            train_layers=raw.get("train_layers"),
            consistency_weight=float(raw.get("consistency_weight") or 0.0),
            deepspeed=raw.get("deepspeed"),
            base_dir=base_dir,
        )

    @classmethod
    def from_yaml(cls, path: str | Path, *, output_dir: str | None = None, max_steps: int | None = None,
                  pairs: list[str] | None = None, modes: list[str] | None = None,
                  consistency_weight: float | None = None) -> GenRMRunConfig:
        raw, base_dir = load_run_yaml(path, "sft", output_dir=output_dir, max_steps=max_steps, data_files=pairs,
                                      data_key="pairs")
        if modes:
            raw["data"] = {**(raw.get("data") or {}), "modes": list(modes)}
        if consistency_weight is not None:
            raw["consistency_weight"] = consistency_weight
        return cls.from_dict(raw, base_dir=base_dir)

    def trl_args(self) -> Any:
        # Rows are shuffled by pair here (see GenRMRun._dataset); read in that order, both presentation orders
        # of a pair share a batch. A config may still ask for TRL's random sampler.
        return sft_config({"train_sampling_strategy": "sequential", **self.sft}, self.deepspeed, self.base_dir)


def read_pairs(paths: Iterable[str | Path]) -> list[Any]:
    """Labelled pairs from jsonl files; ConfigError naming the file and line of a bad record."""
    from her_genrm import read_labelled_pairs

    try:
        return [pair for path in paths for pair in read_labelled_pairs(path)]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def read_data_section(spec: GenRMDataSpec, base_dir: Path | None) -> tuple[list[Any], Any]:
    """The labelled pairs a ``data`` section names (a seeded subset of ``limit``) and its principle library."""
    from her_roleplay import PrincipleLibrary, default_library

    pairs = read_pairs(resolve_path(p, base_dir) for p in spec.pairs)
    if spec.limit is not None and len(pairs) > spec.limit:
        pairs = random.Random(spec.seed).sample(pairs, spec.limit)
    if not pairs:
        raise ConfigError(f"no labelled pairs in {spec.pairs}")
    library = PrincipleLibrary.load(resolve_path(spec.principles, base_dir)) if spec.principles else default_library()
    return pairs, library


def pair_indices(rows: list[dict]) -> dict[str, int]:
    """A number per pair, in the order the rows name them (datasets and batches carry ints, not ids)."""
    return {pair_id: k for k, pair_id in enumerate(dict.fromkeys(r["pair_id"] for r in rows))}


def shuffled_by_pair(rows: list[dict], seed: int) -> list[dict]:
    """Pairs in random order, each pair's rows (both presentation orders) kept together: read in this order
    (the sequential sampler of `trl_args`), both orders of a pair meet in one batch and pull the judge's slot
    preference in opposite directions."""
    by_pair: dict[str, list[dict]] = {}
    for row in rows:
        by_pair.setdefault(row["pair_id"], []).append(row)
    groups = list(by_pair.values())
    random.Random(seed).shuffle(groups)
    return [row for group in groups for row in group]


class GenRMRun:
    """Builds the SFTTrainer of a :class:`GenRMRunConfig` and runs it (``self.trainer`` after :meth:`build`)."""

    def __init__(self, config: GenRMRunConfig, *, callbacks: Iterable[Any] = ()) -> None:
        self.config = config
        self._callbacks = list(callbacks)
        self.trainer: Any = None
        self.pairs = 0
        self.library: Any = None

    def _dataset(self) -> Any:
        from datasets import Dataset

        from her_genrm import CompactTemplate, training_rows

        spec = self.config.data
        pairs, self.library = read_data_section(spec, self.config.base_dir)
        self.pairs = len(pairs)
        template = CompactTemplate(self.library, principle_detail="none")
        try:
            rows = training_rows(pairs, template, modes=spec.modes, swap=spec.swap)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if "cot" in spec.modes and (fast_only := sum(1 for p in pairs if not p.comparisons)):
            log.info("%d of %d pairs have no per-principle outcomes (e.g. policy samples): fast rows only",
                     fast_only, len(pairs))
        rows = shuffled_by_pair(rows, spec.seed)
        if not self.config.consistency_weight:
            return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        index = pair_indices(rows)
        return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"], "a_first": r["a_first"],
                                   "pair_index": index[r["pair_id"]] if r["mode"] == "fast" else -1} for r in rows])

    def build(self) -> Any:
        if self.trainer is not None:
            return self.trainer
        from trl import SFTTrainer

        cfg = self.config
        if cfg.deepspeed is not None:
            ensure_single_process_env()
        args = cfg.trl_args()
        dataset = self._dataset()
        model, tokenizer = build_model_and_tokenizer(cfg.model, cfg.base_dir, train_layers=cfg.train_layers)
        peft_config = None
        if cfg.lora is not None:
            from peft import LoraConfig

            peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                     target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
        trainer_class: type = SFTTrainer
        if cfg.consistency_weight:
            from her_genrm import CompactTemplate

            from ._order_consistency import order_consistent_trainer

            value_of = {slot: value for value, slot in CompactTemplate.verdict_values}
            ids = [tokenizer(value_of[slot], add_special_tokens=False).input_ids[0] for slot in ("A", "B", "tie")]
            if len(set(ids)) != len(ids):
                raise ConfigError(f"consistency_weight: the verdicts {value_of} share a first token in this tokenizer")
            trainer_class = order_consistent_trainer(cfg.consistency_weight, ids)
        self.trainer = trainer_class(model=model, processing_class=tokenizer, args=args, train_dataset=dataset,
                                  peft_config=peft_config, callbacks=self._callbacks)
        return self.trainer

    def train(self) -> TrainResult:
        from her_genrm import JudgeCard

        trainer = self.build()
        trainer.train()
        out = Path(trainer.args.output_dir)
        model = trainer.model
        if self.config.lora is not None:
            model = model.merge_and_unload()  # a plain model folder: vLLM and transformers load it as is
        model.save_pretrained(out)
        trainer.processing_class.save_pretrained(out)
        base = self.config.model.name_or_path or "tiny_random"
        JudgeCard(principle_detail="none", principle_set_hash=self.library.version, base_model=str(base),
                  modes=list(self.config.data.modes), swap=self.config.data.swap, train_pairs=self.pairs).write(out)
        result = TrainResult.of(trainer, pairs=self.pairs, examples=len(trainer.train_dataset))
        result.write()
        return result
