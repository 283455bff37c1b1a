"""What both trainers set up the same way: YAML files, the policy model and its tokenizer, and the
single-process distributed environment DeepSpeed needs when no launcher provided one.

A model section names exactly one source:

- ``name_or_path``: ``smollm2-135m-instruct`` (the bundled model, converted once to an HF folder), an
  HF model folder or a ``.gguf`` file (all resolved by ``her_engines``; nothing contacts a hub);
- ``tiny_random``: a small ``LlamaConfig`` built from the given sizes with random weights (CPU smoke
  runs and tests), which then needs ``tokenizer`` to say whose vocabulary it uses.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

__all__ = [
    "ConfigError", "ModelSpec", "TrainResult", "build_model_and_tokenizer", "ensure_single_process_env",
    "load_yaml",
]

_DTYPES = ("float32", "bfloat16", "float16")
_TINY_DEFAULTS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}


class ConfigError(ValueError):
    """A training config that cannot work; the message names the field, the value and the fix."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file (ConfigError if unreadable or not a mapping)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top, got {type(data).__name__}")
    return data


def load_run_yaml(path: str | Path, section: str, *, output_dir: str | None = None, max_steps: int | None = None,
                  model: str | None = None, data_files: Sequence[str] | None = None,
                  data_key: str = "jsonl") -> tuple[dict[str, Any], Path]:
    """(raw config, its folder) with the command line's overrides applied: --output-dir / --max-steps to the
    trainer section, --model to model.name_or_path (a real model then, not tiny_random), and data files to
    data.<data_key> (replacing the config's data files). Paths given on the command line count from the
    working directory, not the YAML's folder."""
    path = Path(path)
    raw = load_yaml(path)
    raw[section] = dict(raw.get(section) or {})
    if output_dir is not None:
        raw[section]["output_dir"] = output_dir
    if max_steps is not None:
        raw[section]["max_steps"] = max_steps
    if model:
        kept = {k: v for k, v in (raw.get("model") or {}).items() if k not in ("tiny_random", "tokenizer", "seed")}
        raw["model"] = {**kept, "name_or_path": str(Path(model).resolve()) if Path(model).exists() else model}
    if data_files:
        data = {k: v for k, v in (raw.get("data") or {}).items() if k not in ("scene_files", "jsonl")}
        raw["data"] = {**data, data_key: [str(Path(p).resolve()) for p in data_files]}
    if raw.get("deepspeed") and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # Accelerate refuses a second DeepSpeed config beside its own; the launcher's file wins, so the same
        # training YAML runs with `her train` and under `accelerate launch`.
        log.info("launched by accelerate with DeepSpeed: its config wins over deepspeed: %s", raw["deepspeed"])
        raw["deepspeed"] = None
    return raw, path.resolve().parent


def with_precision(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """A trainer section with `bf16` decided by the hardware when the YAML leaves it unset (TRL would
    turn it on everywhere, and without native bf16 a CPU emulates it at a fraction of fp32's speed).
    An explicit `bf16: true/false`, or `fp16: true`, wins."""
    from her_engines import native_bf16_reason

    kwargs = dict(values)
    if kwargs.get("bf16") is None and not kwargs.get("fp16"):
        kwargs["bf16"], why = native_bf16_reason()
        log.info("%s.bf16 unset: bf16 autocast %s (%s)", section, "on" if kwargs["bf16"] else "off, fp32", why)
    return kwargs


def sft_config(sft: Mapping[str, Any], deepspeed: str | None, base_dir: Path | None) -> Any:
    """``trl.SFTConfig`` for a completion-only run: the loss on the completion alone, no truncation by
    default (a cut from the end would remove exactly the trained text), DeepSpeed resolved from the YAML,
    bf16 by the hardware unless set."""
    from trl import SFTConfig

    kwargs = {"max_length": None, **with_precision("sft", sft), "completion_only_loss": True}
    if deepspeed is not None:
        kwargs["deepspeed"] = str(resolve_path(deepspeed, base_dir))
    try:
        return SFTConfig(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"section 'sft': {exc}") from exc


def resolve_path(value: str | Path, base: Path | None) -> Path:
    """`value` as a path; relative paths count from `base` (the YAML file's folder) when given."""
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return path


def check_keys(section: str, given: Mapping[str, Any], allowed: set[str] | list[str]) -> None:
    """ConfigError naming unknown keys of a section, with the closest valid names."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown key(s) in section {section!r}: {', '.join(hints)}")


def check_top_level(raw: Mapping[str, Any], allowed: set[str], trainer_section: str) -> None:
    """Unknown top-level keys (with hints), and the model, data and trainer sections present."""
    check_keys("top level", raw, allowed)
    for required in ("model", "data", trainer_section):
        if required not in raw:
            raise ConfigError(f"the config has no {required!r} section")


def init_fields(cls: type) -> set[str]:
    """Names a dataclass accepts as keyword arguments."""
    return {f.name for f in dataclasses.fields(cls) if f.init}


def dataclass_from(cls: type, section: str, raw: Mapping[str, Any] | None) -> Any:
    """Build dataclass `cls` from a YAML section, rejecting unknown keys with a hint."""
    raw = dict(raw or {})
    check_keys(section, raw, init_fields(cls))
    try:
        return cls(**raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"section {section!r}: {exc}") from exc


def check_trainer_section(name: str, values: Mapping[str, Any], config_cls: type) -> None:
    """Checks shared by the `grpo:` and `sft:` sections: only fields of the TRL config class,
    DeepSpeed named at the top level (so its path resolves against the YAML file), output_dir set."""
    check_keys(name, values, init_fields(config_cls))
    if "deepspeed" in values:
        raise ConfigError(f"{name}.deepspeed is set; name the DeepSpeed JSON with the top-level "
                          "`deepspeed:` key instead (it is resolved against the YAML file's folder)")
    if not values.get("output_dir"):
        raise ConfigError(f"{name}.output_dir is not set: give it in the YAML file or with --output-dir")


def check_deepspeed_file(deepspeed: str | None, base_dir: Path | None) -> None:
    if deepspeed is not None and not resolve_path(deepspeed, base_dir).is_file():
        raise ConfigError(f"deepspeed: {resolve_path(deepspeed, base_dir)} is not a file (relative paths count "
                          f"from {base_dir or Path.cwd()})")


@dataclass
class ModelSpec:
    """Which policy to train.

    Give exactly one of `name_or_path` and `tiny_random`.
    """

    name_or_path: str | None = None
    """Bundled model id (`smollm2-135m-instruct`), HF folder or `.gguf` file; relative paths count
    from the YAML file's folder."""
    tiny_random: dict[str, Any] | None = None
    """LlamaConfig sizes for a random-weight model (missing sizes take small defaults: 2 layers, width 64)."""
    tokenizer: str | None = None
    """Tokenizer source (same forms as `name_or_path`); default: `name_or_path`. Required with
    `tiny_random`."""
    dtype: str = "float32"
    """Weights dtype: float32 | bfloat16 | float16 (CPU runs: float32)."""
    seed: int = 0
    """Seed for the random weights of `tiny_random`."""

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.tiny_random is None):
            raise ConfigError(
                "model: give exactly one of `name_or_path` (a real model) and `tiny_random` (sizes of a "
                f"random-weight Llama); got name_or_path={self.name_or_path!r}, "
                f"tiny_random={self.tiny_random!r}"
            )
        if self.tiny_random is not None and not self.tokenizer:
            raise ConfigError("model.tiny_random needs model.tokenizer (e.g. smollm2-135m-instruct): a "
                              "random model has no vocabulary of its own")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r}; expected one of {list(_DTYPES)}")
        if self.tiny_random is not None:
            from transformers import LlamaConfig

            check_keys("model.tiny_random", self.tiny_random, set(LlamaConfig().to_dict()))


def _resolve_model_source(name: str, base: Path | None) -> Path:
    from her_engines import DEFAULT_MODEL, EngineUnavailable, ensure_hf_folder

    if name != DEFAULT_MODEL:
        name = str(resolve_path(name, base))
    try:
        return ensure_hf_folder(name)
    except EngineUnavailable as exc:
        raise ConfigError(f"model source {name!r}: {exc}") from exc


def build_model_and_tokenizer(spec: ModelSpec, base: Path | None = None, *,
                              train_layers: int | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for `spec`; `base` is the folder relative paths count from; `train_layers`: only
    the top N decoder layers (and the final norm) stay trainable (None: all weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, spec.dtype)
    tok_source = spec.tokenizer or spec.name_or_path
    assert tok_source is not None  # guaranteed by ModelSpec checks
    tokenizer = AutoTokenizer.from_pretrained(_resolve_model_source(tok_source, base))
    if tokenizer.pad_token is None:
        # Batched generation and padding need a pad token; the EOS token is the usual stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    if spec.tiny_random is not None:
        sizes = {**_TINY_DEFAULTS, **spec.tiny_random}
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sizes,
        )
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config).to(dtype)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    else:
        assert spec.name_or_path is not None
        folder = _resolve_model_source(spec.name_or_path, base)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if train_layers is not None:
        train_top_layers(model, train_layers)
    return model, tokenizer


def check_train_layers(n: int | None) -> None:
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ConfigError(f"train_layers={n!r}: give a positive number of top layers, or drop the key to train "
                          "all weights")


def train_top_layers(model: Any, n: int) -> None:
    """Freeze everything but the top ``n`` decoder layers and the final norm: the backward pass then stops
    ``n`` layers deep, several times cheaper per example on CPU."""
    layers = model.model.layers
    if n > len(layers):
        raise ConfigError(f"train_layers={n} but the model has {len(layers)} layers")
    for param in model.parameters():
        param.requires_grad_(False)
    for module in [*layers[-n:], model.model.norm]:
        for param in module.parameters():
            param.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("training the top %d of %d layers: %.1fM of %.1fM parameters", n, len(layers), trainable / 1e6,
             sum(p.numel() for p in model.parameters()) / 1e6)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DistEnv:
    """The variables `ensure_single_process_env` set (empty when a launcher had set them)."""

    set_here: dict[str, str] = field(default_factory=dict)


def ensure_single_process_env() -> DistEnv:
    """Make a plain `python`/`her` process look like rank 0 of a world of 1.

    DeepSpeed initialises torch.distributed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; `accelerate
    launch` and `deepspeed` set them, a plain process does not. When RANK is unset this sets all of
    them for one process (a free loopback port), so the same config runs with or without a launcher.
    """
    if "RANK" in os.environ:
        return DistEnv()
    values = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(_free_port())}
    os.environ.update(values)
    log.info("no launcher environment: running DeepSpeed as a single process (%s)", values)
    return DistEnv(values)


@dataclass
class TrainResult:
    """What a training run did; also written as ``run_summary.json`` in the output folder.

    `engine` is the class of the model the trainer stepped (``DeepSpeedEngine`` when DeepSpeed wrapped
    it) and `zero_stage` its ZeRO stage (None without DeepSpeed). `stopped` says why the run ended
    early (None when it ran to the end); the CLI exits non-zero when it is set.
    """

    global_step: int
    output_dir: str
    engine: str
    zero_stage: int | None
    distributed_type: str
    log_history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, trainer: Any, *, stopped: str | None = None, **extra: Any) -> TrainResult:
        wrapped = getattr(trainer, "model_wrapped", None) or trainer.model
        stage = getattr(wrapped, "zero_optimization_stage", None)
        return cls(
            global_step=int(trainer.state.global_step),
            output_dir=str(trainer.args.output_dir),
            engine=type(wrapped).__name__,
            zero_stage=int(stage()) if callable(stage) else None,
            distributed_type=str(trainer.accelerator.state.distributed_type.value),
            log_history=list(trainer.state.log_history),
            stopped=stopped,
            extra=extra,
        )

    def write(self) -> Path:
        path = Path(self.output_dir) / "run_summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n", encoding="utf-8")
        return path
