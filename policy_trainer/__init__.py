"""The RL client: a TRL reward function backed by rm_server, adapters for verl and OpenRLHF,
and TRL GRPO / SFT entry points (`her train`) with DeepSpeed configs."""

from typing import Any

from her_genrm import CircuitBreaker

from ._data import DataSpec, load_grpo_dataset, load_sft_dataset
from ._grpo import GRPORun, GRPORunConfig, RewardOutageGuard, RewardServiceDown
from ._reward_client import RewardClient, RewardClientConfig, RewardStats
from ._setup import ConfigError, ModelSpec, TrainResult
from ._sft import SFTRun, SFTRunConfig
from ._verl import compute_score, compute_score_async, compute_score_batch

__all__ = [
    "CircuitBreaker",
    "ConfigError",
    "DataSpec",
    "GRPORun",
    "GRPORunConfig",
    "ModelSpec",
    "RewardClient",
    "RewardClientConfig",
    "RewardClientMetricsCallback",
    "RewardOutageGuard",
    "RewardServiceDown",
    "RewardStats",
    "SFTRun",
    "SFTRunConfig",
    "TrainResult",
    "compute_score",
    "compute_score_async",
    "compute_score_batch",
    "load_grpo_dataset",
    "load_sft_dataset",
]


def __getattr__(name: str) -> Any:
    # The callback subclasses transformers' TrainerCallback, whose import pulls in torch (~4 s): import it
    # on first use so that importing the reward client stays light.
    if name == "RewardClientMetricsCallback":
        from ._trl import RewardClientMetricsCallback

        return RewardClientMetricsCallback
    raise AttributeError(f"module 'policy_trainer' has no attribute {name!r}")
