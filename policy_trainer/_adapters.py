"""Adapters: the shapes trainers hand over, and how existing trainers plug in without code changes.

- Input shapes: TRL gives reward functions plain strings or conversational message lists; verl gives
  strings plus an `extra_info` dict. `context_of` / `completion_text` / `reference_text` /
  `group_key` turn them into what `/v1/rewards` takes.
- TRL: `RewardClient` is itself the reward function (async, picklable);
  `RewardClientMetricsCallback(client)` adds the client's running counters to every `Trainer.log`.
- verl: `compute_score` / `compute_score_async` / `compute_score_batch` follow verl's custom reward
  function contract; point `custom_reward_function.path` at `policy_trainer/verl_reward.py`.
- OpenRLHF needs no code: point `--reward.remote_url` (releases before the dotted CLI:
  `--remote_rm_url`) at the server's `/get_reward`, with the reference reply as the dataset label.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client module imports this one; at run time it is imported where needed
    from ._reward_client import RewardClient

ROLES = frozenset({"system", "user", "assistant"})
PROMPT_KEY = "prompt"  # where verl's extra_info carries the conversation the rollout answers
URL_ENV = "HER_RM_URL"


# ---------------------------------------------------------------------- input shapes


def _content_text(content: Any, where: str) -> str:
    """Text of a message's content: a string, or a list of parts of which the text ones are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise TypeError(f"{where}: only text content parts can be judged, got {part!r:.80}")
        return "".join(texts)
    raise TypeError(
        f"{where}: message content must be a string or a list of text parts, got {type(content).__name__}"
    )


def _messages(value: Sequence[Any], where: str) -> list[dict[str, str]]:
    out = []
    for k, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TypeError(f"{where}[{k}]: expected a {{'role', 'content'}} message, got {message!r:.80}")
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"{where}[{k}]: role {role!r} cannot be judged; expected one of {sorted(ROLES)}")
        out.append({"role": role, "content": _content_text(message["content"], f"{where}[{k}]")})
    return out


def context_of(prompt: Any, where: str = "prompt") -> str | list[dict[str, str]]:
    """The judge context of a prompt: plain text stays text; chat messages become {role, content} dicts."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and not isinstance(prompt, bytes):
        return _messages(prompt, where)
    raise TypeError(f"{where}: expected a string or a list of chat messages, got {type(prompt).__name__}")


def completion_text(completion: Any, where: str = "completion") -> str:
    """The rollout's text: a string as is, or the content of the last assistant message of a list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and not isinstance(completion, bytes):
        messages = _messages(completion, where)
        for message in reversed(messages):
            if message["role"] == "assistant":
                return message["content"]
        raise ValueError(f"{where}: the message list holds no assistant message to judge")
    raise TypeError(f"{where}: expected a string or a list of chat messages, got {type(completion).__name__}")


def reference_text(reference: Any, where: str = "reference") -> str:
    """A dataset's reference reply (same shapes as a completion); None is an error, not a default."""
    if reference is None:
        raise ValueError(f"{where} is missing (None): the reference strategy needs a reference reply per row")
    return completion_text(reference, where)


def group_key(context: str | list[dict[str, str]]) -> str:
    """Identity of a prompt: hash of its canonical JSON, so equal prompts land in one group."""
    blob = json.dumps(context, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


# ---------------------------------------------------------------------- TRL


def _metrics_callback_class() -> type:
    from transformers import TrainerCallback

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

    RewardClientMetricsCallback.__module__ = __name__
    RewardClientMetricsCallback.__qualname__ = "RewardClientMetricsCallback"  # picklable by name
    return RewardClientMetricsCallback


def __getattr__(name: str) -> Any:
    # The callback subclasses transformers' TrainerCallback, whose import pulls in torch (~4 s):
    # build it on first use so that importing the client stays light.
    if name == "RewardClientMetricsCallback":
        cls = globals()[name] = _metrics_callback_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------- verl

_clients: dict[tuple, RewardClient] = {}
_clients_lock = threading.Lock()


def _verl_client(kwargs: Mapping[str, Any], *, batched: bool) -> RewardClient:
    """One client per process and configuration (verl calls compute_score once per rollout)."""
    from ._reward_client import RewardClient, RewardClientConfig

    fields = set(RewardClientConfig.__dataclass_fields__)
    overrides = {k: v for k, v in kwargs.items() if k in fields}
    overrides.setdefault("url", os.environ.get(URL_ENV))
    if not overrides["url"]:
        raise RuntimeError(
            f"set {URL_ENV} (or reward_kwargs.url) to the rm_server base URL, e.g. http://127.0.0.1:8000"
        )
    strategy = overrides.get("strategy", "reference")
    if strategy != "reference" and not batched:
        raise ValueError(
            "verl's per-rollout compute_score sees one rollout at a time: only strategy "
            "'reference' works there; use compute_score_batch for 'group'"
        )
    key = tuple(sorted((k, repr(v)) for k, v in overrides.items()))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = RewardClient(**overrides)
    return client


def _verl_prompt(extra_info: Any, where: str) -> Any:
    if not isinstance(extra_info, Mapping) or PROMPT_KEY not in extra_info:
        raise ValueError(
            f"{where}: extra_info[{PROMPT_KEY!r}] must hold the prompt (text or chat messages) "
            "the rollout answers; add it when building the verl parquet"
        )
    prompt = extra_info[PROMPT_KEY]
    if not isinstance(prompt, str) and hasattr(prompt, "tolist"):  # parquet rows arrive as numpy arrays
        prompt = prompt.tolist()
    return prompt


def _verl_failure(client: RewardClient, failed: int, total: int) -> RuntimeError:
    return RuntimeError(
        f"rm_server gave no reward for {failed} of {total} rollout(s) "
        f"(last error: {client.stats.last_error}); verl has no 'missing reward' value and 0 would be "
        "a false reward, so the step stops here"
    )


def _verl_batch(
    client: RewardClient,
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Any] | None,
) -> tuple[list[Any], list[str], dict[str, list[Any]]]:
    """verl's fields → the client's (prompts, completions, columns)."""
    n = len(solution_strs)
    extras = list(extra_infos) if extra_infos is not None else [None] * n
    if not (len(data_sources) == len(ground_truths) == len(extras) == n):
        raise ValueError(
            f"verl batch lengths differ: data_sources={len(data_sources)}, solution_strs={n}, "
            f"ground_truths={len(ground_truths)}, extra_infos={len(extras)}"
        )
    prompts = [_verl_prompt(extra, f"rollout {i}") for i, extra in enumerate(extras)]
    return prompts, list(solution_strs), {client.config.reference_column: list(ground_truths)}


def compute_score(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any
) -> float:
    """verl reward of one rollout, judged against `ground_truth` (the dataset's reference reply).

    - prompt: `extra_info["prompt"]` (text or chat messages: the conversation the rollout answers);
    - server: env `HER_RM_URL` (or `url` in `custom_reward_function.reward_kwargs`, where any other
      `RewardClientConfig` field may be set too, e.g. `judge_mode: fast`);
    - a failed judgment raises RuntimeError: verl has no "no reward" value and 0.0 would be a false one.
    """
    client = _verl_client(kwargs, batched=False)
    prompts, completions, columns = _verl_batch(
        client, [data_source], [solution_str], [ground_truth], [extra_info]
    )
    [reward] = client.score_sync(prompts, completions, **columns)
    if reward is None:
        raise _verl_failure(client, 1, 1)
    return reward


async def compute_score_async(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any
) -> float:
    """`compute_score` for verl's reward loop, which awaits coroutine functions on its own event loop."""
    client = _verl_client(kwargs, batched=False)
    prompts, completions, columns = _verl_batch(
        client, [data_source], [solution_str], [ground_truth], [extra_info]
    )
    [reward] = await client(prompts, completions, **columns)
    if reward is None:
        raise _verl_failure(client, 1, 1)
    return reward


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """verl's batched contract (`reward_model.reward_manager=batch`): one score per rollout.

    The rollouts go out together (chunked, concurrent). With `strategy: group` in reward_kwargs the
    rollouts sharing a prompt are judged against each other instead of against the references.
    Any missing reward raises RuntimeError, as in `compute_score`.
    """
    client = _verl_client(kwargs, batched=True)
    prompts, completions, columns = _verl_batch(
        client, data_sources, solution_strs, ground_truths, extra_infos
    )
    rewards = client.score_sync(prompts, completions, **columns)
    failed = sum(r is None for r in rewards)
    if failed:
        raise _verl_failure(client, failed, len(rewards))
    return [float(r) for r in rewards if r is not None]


__all__ = [
    "PROMPT_KEY",
    "ROLES",
    "URL_ENV",
    "RewardClientMetricsCallback",  # noqa: F822 - built on first access (module __getattr__)
    "completion_text",
    "compute_score",
    "compute_score_async",
    "compute_score_batch",
    "context_of",
    "group_key",
    "reference_text",
]
