"""TRL: a callback that adds the reward client's running counters to every `Trainer.log`.

Imported on first use (`policy_trainer.RewardClientMetricsCallback`): transformers pulls in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from ._reward_client import RewardClient


class RewardClientMetricsCallback(TrainerCallback):
    """Adds `client.metrics()` (running counters: failures, retries, circuit opens…) to every log.

    Per-call figures already reach TRL through its `log_metric` hook; this adds the cumulative
    ones. Reporters (wandb, tensorboard) see them only if this callback runs before them:
    `RewardClientMetricsCallback.install(trainer, client)` puts it first.
    """

    def __init__(self, client: RewardClient) -> None:
        self.client = client

    @classmethod
    def install(cls, trainer: Any, client: RewardClient) -> Any:
        callback = cls(client)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if logs is None:
            return
        metrics = self.client.metrics()
        logs.update(metrics)
        # Trainer.log appended its record before calling back: keep the history complete too.
        history = getattr(state, "log_history", None)
        if history:
            history[-1].update(metrics)
