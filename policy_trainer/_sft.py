"""`her train sft`: the cold start on dual-layer samples, TRL's SFTTrainer configured from one YAML file.

    result = SFTRun(SFTRunConfig.from_yaml("policy_trainer/configs/sft_cpu_smoke.yaml")).train()

Sections: ``model`` (:class:`ModelSpec`), ``data`` (:class:`DataSpec`), ``sft`` (keyword arguments of
``trl.SFTConfig``), top-level ``deepspeed`` and ``save_final_model``, as for GRPO.

The samples are in TRL's conversational prompt-completion format (see ``_data``): the completion is
the character's final assistant turn, system_thinking included, and the loss falls on it alone
(``completion_only_loss``); earlier turns are context. Two TRL defaults are changed for this data:
``completion_only_loss`` is always on, and ``max_length`` defaults to None (no truncation), because
role-play prompts often pass TRL's 1024 tokens and a cut from the end would remove exactly the
trained turn. If you set ``max_length``, samples whose final turn no longer fits are dropped by TRL;
the run logs how many.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._data import DataSpec, load_sft_dataset
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
    sft_config,
)

log = logging.getLogger(__name__)

__all__ = ["SFTRun", "SFTRunConfig"]

_TOP_KEYS = {"model", "data", "sft", "deepspeed", "save_final_model", "train_layers"}


@dataclass
class SFTRunConfig:
    """One SFT cold-start run. Checks at construction: unknown keys; ``sft.output_dir`` set;
    ``completion_only_loss`` not switched off and ``assistant_only_loss`` not on (the loss is on the
    final turn by construction); DeepSpeed named only at the top level and its file present."""

    model: ModelSpec
    data: DataSpec
    sft: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``trl.SFTConfig``."""
    deepspeed: str | None = None
    """DeepSpeed JSON config (relative: to the YAML file), or None."""
    save_final_model: bool = True
    """Save the model and tokenizer in output_dir when the run finishes."""
    train_layers: int | None = None
    """Train only the top N decoder layers and the final norm (None: all weights): what fits a real policy's
    update on a CPU."""
    base_dir: Path | None = None
    """The folder relative paths count from (the YAML file's folder); None: the working directory."""

    def __post_init__(self) -> None:
        from trl import SFTConfig

        check_trainer_section("sft", self.sft, SFTConfig)
        if self.sft.get("completion_only_loss") is False:
            raise ConfigError("sft.completion_only_loss=false would train on the whole conversation, "
                              "other characters' lines included; the cold start trains the final turn only: "
                              "drop the key")
        if self.sft.get("assistant_only_loss"):
            raise ConfigError("sft.assistant_only_loss=true does not apply: the samples are "
                              "prompt-completion pairs whose completion is the one trained turn; "
                              "drop the key")
        check_deepspeed_file(self.deepspeed, self.base_dir)
        check_train_layers(self.train_layers)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, base_dir: Path | None = None) -> SFTRunConfig:
        check_top_level(raw, _TOP_KEYS, "sft")
        return cls(
            model=dataclass_from(ModelSpec, "model", raw["model"]),
            data=dataclass_from(DataSpec, "data", raw["data"]),
            sft=dict(raw["sft"] or {}),
            deepspeed=raw.get("deepspeed"),
            save_final_model=bool(raw.get("save_final_model", True)),
            train_layers=raw.get("train_layers"),
            base_dir=base_dir,
        )

    @classmethod
    def from_yaml(
        cls, path: str | Path, *, output_dir: str | None = None, max_steps: int | None = None,
        model: str | None = None, data_files: list[str] | None = None,
    ) -> SFTRunConfig:
        raw, base_dir = load_run_yaml(path, "sft", output_dir=output_dir, max_steps=max_steps, model=model,
                                      data_files=data_files)
        return cls.from_dict(raw, base_dir=base_dir)

    def trl_args(self) -> Any:
        return sft_config(self.sft, self.deepspeed, self.base_dir)


class SFTRun:
    """Builds the SFTTrainer of an :class:`SFTRunConfig` and runs it (``self.trainer`` after
    :meth:`build`)."""

    def __init__(self, config: SFTRunConfig, *, callbacks: Iterable[Any] = ()) -> None:
        self.config = config
        self._callbacks = list(callbacks)
        self.trainer: Any = None
        self.samples = 0

    def build(self) -> Any:
        if self.trainer is not None:
            return self.trainer
        from trl import SFTTrainer

        cfg = self.config
        if cfg.deepspeed is not None:
            ensure_single_process_env()
        args = cfg.trl_args()
        # Only prompt/completion go to TRL: the bookkeeping columns are not model inputs.
        dataset = load_sft_dataset(cfg.data, cfg.base_dir).select_columns(["prompt", "completion"])
        self.samples = len(dataset)
        model, tokenizer = build_model_and_tokenizer(cfg.model, cfg.base_dir, train_layers=cfg.train_layers)
        self.trainer = SFTTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=dataset,
                                  callbacks=self._callbacks)
        kept = len(self.trainer.train_dataset)
        if kept == 0:
            raise ConfigError(f"sft.max_length={args.max_length} leaves no sample whose final turn fits; "
                              "raise it or set it to null")
        if kept < self.samples:
            log.warning("%d of %d samples dropped: their final turn does not fit in max_length=%s",
                        self.samples - kept, self.samples, args.max_length)
        return self.trainer

    def train(self) -> TrainResult:
        trainer = self.build()
        trainer.train()
        if self.config.save_final_model:
            # TRL switches the KV cache off for training; a saved policy generates (GRPO, vLLM, chat) with it on.
            trainer.model.config.use_cache = True
            trainer.save_model()
        result = TrainResult.of(trainer, samples=self.samples, samples_trained=len(trainer.train_dataset))
        result.write()
        return result
