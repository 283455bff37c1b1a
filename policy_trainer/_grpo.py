"""`her train grpo`: TRL's GRPOTrainer with rewards from rm_server, configured from one YAML file.

    run = GRPORun(GRPORunConfig.from_yaml("policy_trainer/configs/grpo_cpu_smoke.yaml"))
    result = run.train()          # TrainResult; result.stopped is set if rm_server stayed down

The YAML file has the sections ``model`` (:class:`ModelSpec`), ``data`` (:class:`DataSpec`), ``reward``
(the fields of ``RewardClientConfig``), ``grpo`` (keyword arguments of ``trl.GRPOConfig``), and the
top-level keys ``deepspeed`` (a DeepSpeed JSON file, or null) and ``save_final_model``.

Reward outages. The reward client retries a restarting rm_server for up to
``reward.retry_budget_s``, so a restart costs only time. When the budget runs out some rewards come
back None. TRL 1.16 turns None into NaN, leaves NaN rows out of the group baselines (nanmean/nanstd)
and zeroes their advantages, so it would train on whatever is left; with every reward missing it
still runs the optimizer step (all-zero advantages: no policy-gradient signal, but the scheduler
advances, and with ``beta > 0`` the KL term alone moves the weights). :class:`RewardOutageGuard`
prevents both: it raises :class:`RewardServiceDown` from inside the reward computation, which comes
before the step's backward pass and optimizer update, and the run ends with a message saying so.
A ``None`` for a single item on a healthy server (e.g. a judgment that failed to parse) is not an
outage: TRL's NaN handling leaves that rollout out of the update, as intended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._data import DataSpec, load_grpo_dataset
from ._reward_client import RewardClient, RewardClientConfig
from ._setup import (
    ConfigError,
    ModelSpec,
    TrainResult,
    build_model_and_tokenizer,
    check_deepspeed_file,
    check_keys,
    check_top_level,
    check_train_layers,
    check_trainer_section,
    dataclass_from,
    ensure_single_process_env,
    init_fields,
    load_run_yaml,
    resolve_path,
    with_precision,
)

log = logging.getLogger(__name__)

__all__ = ["GRPORun", "GRPORunConfig", "RewardOutageGuard", "RewardServiceDown"]

_TOP_KEYS = {"model", "data", "reward", "grpo", "deepspeed", "save_final_model", "train_layers", "metrics_port"}
# Failed attempts that mean "the server is not answering", as opposed to "this input is bad" (4xx).
_OUTAGE_KINDS = {"connect", "timeout", "transport", "408", "429", "500", "502", "503", "504"}
REFERENCE_COLUMN = "reference"  # where _data puts the reference reply


class RewardServiceDown(RuntimeError):
    """The reward service stayed unreachable past the retry budget during a step.

    Raised from the reward computation, i.e. before that step's update: no parameter moved on
    missing rewards.
    """

    def __init__(
        self, *, step: int, down_s: float, missing: int, total: int, last_error: str | None,
        unreachable: bool = True,
    ) -> None:
        self.step, self.down_s, self.missing, self.total = step, down_s, missing, total
        self.last_error, self.unreachable = last_error, unreachable
        detail = f"; last error: {last_error}" if last_error else ""
        if unreachable:
            what = f"rm_server unreachable for {down_s:.0f} s at step {step}"
            fix = "Bring the server back (or raise reward.retry_budget_s)"
        else:  # it answered, but with no usable reward at all
            what = f"rm_server gave no reward for any rollout at step {step}"
            fix = "Check the server's log and rm_parse_failures_total"
        super().__init__(
            f"{what} ({missing}/{total} rewards missing{detail}); no update was made on missing rewards. "
            f"{fix} and resume from the last checkpoint."
        )


def _outage_count(stats: Any) -> int:
    errors = getattr(stats, "http_errors", {}) or {}
    return sum(n for kind, n in errors.items() if str(kind) in _OUTAGE_KINDS) + int(
        getattr(stats, "circuit_rejections", 0)
    )


class RewardOutageGuard:
    """A TRL reward function around a :class:`RewardClient` that refuses to hand back rewards lost to
    an outage.

    Same contract as the client: ``await guard(prompts, completions, **columns) -> list[float | None]``.
    If a call returns any None while the client recorded server/transport failures during it (the
    retry budget ran out), or returns nothing but None, it raises :class:`RewardServiceDown` instead.
    Per-item failures on a healthy server still come back as None. Picklable when the client is.
    """

    def __init__(self, client: RewardClient, *, on_call_seconds: Callable[[float], None] | None = None) -> None:
        self.client = client
        self._on_call_seconds = on_call_seconds  # e.g. the trainer exporter's latency histogram
        self.__name__ = getattr(client, "__name__", "her_genrm_reward")  # TRL names metrics after it

    async def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> list[float | None]:
        failures_before = _outage_count(self.client.stats)
        started = time.monotonic()
        rewards = await self.client(prompts, completions, **columns)
        if self._on_call_seconds is not None:
            self._on_call_seconds(time.monotonic() - started)
        missing = sum(r is None for r in rewards)
        unreachable = _outage_count(self.client.stats) > failures_before
        if missing and (unreachable or missing == len(rewards)):
            state = columns.get("trainer_state")
            step = int(getattr(state, "global_step", -1)) + 1  # the step these rewards were for
            raise RewardServiceDown(
                step=step, down_s=time.monotonic() - started, missing=missing, total=len(rewards),
                last_error=getattr(self.client.stats, "last_error", None), unreachable=unreachable,
            )
        return rewards


# --- configuration ---------------------------------------------------------------------------------


@dataclass
class GRPORunConfig:
    """One GRPO run: which policy, which prompts, which reward service, which TRL settings.

    Checks at construction (each message gives the values and the fix): unknown keys anywhere;
    ``grpo.output_dir`` set (or given with ``--output-dir``); DeepSpeed named only at the top level and
    its file present; the reward strategy's needs met by the data (``reference`` rewards read the
    dataset column ``reference``; ``group`` rewards need ``num_generations >= 2``).
    """

    model: ModelSpec
    data: DataSpec
    reward: RewardClientConfig
    grpo: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``trl.GRPOConfig`` (output_dir, batch sizes, num_generations, ...)."""
    deepspeed: str | None = None
    """DeepSpeed JSON config (relative: to the YAML file), or None. Leave None under ``accelerate launch``
    with one of the accelerate_zero*.yaml files: those carry the DeepSpeed settings themselves."""
    save_final_model: bool = True
    """Save the model and tokenizer in output_dir when the run finishes."""
    train_layers: int | None = None
    """Train only the top N decoder layers and the final norm (None: all weights): what fits a real policy's
    update on a CPU."""
    metrics_port: int | None = None
    """Serve the reward client's counters, reward-call latency and the step at :PORT/metrics for Prometheus
    (``policy_trainer._exporter``); 0 picks a free port; None: no endpoint."""
    base_dir: Path | None = None
    """The folder relative paths count from (the YAML file's folder); None: the working directory."""

    def __post_init__(self) -> None:
        from trl import GRPOConfig

        check_trainer_section("grpo", self.grpo, GRPOConfig)
        num_generations = self.grpo.get("num_generations", 8)  # TRL's default
        if self.reward.strategy == "group" and num_generations < 2:
            raise ConfigError(f"reward.strategy='group' compares rollouts of one prompt, but "
                              f"grpo.num_generations={num_generations}; use >= 2")
        if self.reward.strategy == "reference" and self.reward.reference_column != REFERENCE_COLUMN:
            raise ConfigError(f"reward.reference_column={self.reward.reference_column!r}, but the training "
                              f"data carries the reference reply in column {REFERENCE_COLUMN!r}; drop the key"
                              )
        check_deepspeed_file(self.deepspeed, self.base_dir)
        check_train_layers(self.train_layers)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, base_dir: Path | None = None) -> GRPORunConfig:
        check_top_level(raw, _TOP_KEYS, "grpo")
        try:
            reward = RewardClientConfig(**dict(raw.get("reward") or {}))
        except TypeError as exc:
            check_keys("reward", raw.get("reward") or {}, init_fields(RewardClientConfig))
            raise ConfigError(f"section 'reward': {exc}") from exc
        except ValueError as exc:
            raise ConfigError(f"section 'reward': {exc}") from exc
        return cls(
            model=dataclass_from(ModelSpec, "model", raw["model"]),
            data=dataclass_from(DataSpec, "data", raw["data"]),
            reward=reward,
            grpo=dict(raw["grpo"] or {}),
            deepspeed=raw.get("deepspeed"),
            save_final_model=bool(raw.get("save_final_model", True)),
            train_layers=raw.get("train_layers"),
            metrics_port=raw.get("metrics_port"),
            base_dir=base_dir,
        )

    @classmethod
    def from_yaml(
        cls, path: str | Path, *, reward_url: str | None = None, output_dir: str | None = None,
        max_steps: int | None = None, model: str | None = None, data_files: list[str] | None = None,
    ) -> GRPORunConfig:
        """Load a YAML file; the keyword arguments override the file (the CLI flags)."""
        raw, base_dir = load_run_yaml(path, "grpo", output_dir=output_dir, max_steps=max_steps, model=model,
                                      data_files=data_files)
        if reward_url is not None:
            raw["reward"] = {**(raw.get("reward") or {}), "url": reward_url}
        return cls.from_dict(raw, base_dir=base_dir)

    def deepspeed_path(self) -> Path:
        if self.deepspeed is None:
            raise ConfigError("no deepspeed config set")
        return resolve_path(self.deepspeed, self.base_dir)

    def trl_args(self) -> Any:
        """The ``trl.GRPOConfig``. With DeepSpeed, call after the distributed env is set (GRPORun does)."""
        from trl import GRPOConfig

        kwargs = with_precision("grpo", self.grpo)
        if self.deepspeed is not None:
            kwargs["deepspeed"] = str(self.deepspeed_path())
        try:
            return GRPOConfig(**kwargs)
        except ValueError as exc:  # TRL's own cross-field checks (batch sizes vs num_generations, ...)
            raise ConfigError(f"section 'grpo': {exc}") from exc


# --- the run ---------------------------------------------------------------------------------------


class GRPORun:
    """Builds the GRPOTrainer of a :class:`GRPORunConfig` and runs it.

    ``reward_func`` replaces the guarded rm_server client (e.g. a local reward for a benchmark);
    ``wrap_reward`` wraps whichever reward function is used (fault injection in tests). After
    :meth:`build`, ``self.client`` is the RewardClient (None with ``reward_func``) and
    ``self.trainer`` the trainer.
    """

    def __init__(
        self,
        config: GRPORunConfig,
        *,
        reward_func: Callable[..., Any] | None = None,
        wrap_reward: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
        callbacks: Iterable[Any] = (),
    ) -> None:
        self.config = config
        self._reward_func = reward_func
        self._wrap_reward = wrap_reward
        self._callbacks = list(callbacks)
        self.client: RewardClient | None = None
        self.exporter: Any = None
        self.trainer: Any = None

    def build(self) -> Any:
        """The GRPOTrainer (built once)."""
        if self.trainer is not None:
            return self.trainer
        from trl import GRPOTrainer

        cfg = self.config
        if cfg.deepspeed is not None:
            ensure_single_process_env()
        args = cfg.trl_args()
        dataset = load_grpo_dataset(cfg.data, cfg.base_dir)
        model, tokenizer = build_model_and_tokenizer(cfg.model, cfg.base_dir, train_layers=cfg.train_layers)
        callbacks = list(self._callbacks)
        if self._reward_func is not None:
            reward = self._reward_func
        else:
            self.client = RewardClient(cfg.reward)
            on_call_seconds = None
            if cfg.metrics_port is not None:
                from ._exporter import RewardMetricsExporter

                self.exporter = RewardMetricsExporter(self.client, cfg.metrics_port)
                on_call_seconds = self.exporter.latency.observe
                callbacks.append(self.exporter.callback())
            reward = RewardOutageGuard(self.client, on_call_seconds=on_call_seconds)
            callbacks.append(_metrics_callback(self.client))
        if self._wrap_reward is not None:
            reward = self._wrap_reward(reward)
        self.trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=reward, args=args,
                                   train_dataset=dataset, callbacks=[c for c in callbacks if c is not None])
        return self.trainer

    def train(self, *, resume: bool = False) -> TrainResult:
        """Train to the end, or stop cleanly on :class:`RewardServiceDown`; writes run_summary.json. ``resume``:
        continue from the last checkpoint in output_dir (weights, optimizer, scheduler, step, data order), if any."""
        trainer = self.build()
        stopped = None
        checkpoint = last_checkpoint(trainer.args.output_dir) if resume else None
        if resume:
            log.info("resuming from %s", checkpoint or "the start (no checkpoint in the output folder yet)")
        try:
            trainer.train(resume_from_checkpoint=checkpoint)
        except RewardServiceDown as exc:
            stopped = str(exc)
            log.error("%s", exc)
        if stopped is None and self.config.save_final_model:
            trainer.save_model()
        extra = {"reward_client": self.client.metrics()} if self.client is not None else {}
        result = TrainResult.of(trainer, stopped=stopped, **extra)
        result.write()
        return result

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
        if self.client is not None:
            self.client.close()


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` folder a Trainer saved in ``output_dir`` (None: none yet)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None


def _metrics_callback(client: RewardClient) -> Any:
    """The client's running counters (retries, failures, circuit opens) in every training log."""
    from ._trl import RewardClientMetricsCallback

    return RewardClientMetricsCallback(client)
