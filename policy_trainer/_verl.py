"""verl: `compute_score` / `compute_score_async` (and `compute_score_batch` for verl's older batch manager)
follow verl's custom reward function contract; point `reward.custom_reward_function.path` at
`policy_trainer/verl_reward.py` (verl 0.9.1's key).

TRL needs no adapter (`RewardClient` is itself the reward function; `RewardClientMetricsCallback` adds its
counters to the logs), nor does OpenRLHF: point `--reward.remote_url` (releases before the dotted CLI:
`--remote_rm_url`) at the server's `/get_reward`, with the reference reply as the dataset label.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._shapes import PROMPT_KEY

if TYPE_CHECKING:  # the client module imports this one; at run time it is imported where needed
    from ._reward_client import RewardClient

URL_ENV = "HER_RM_URL"


# ---------------------------------------------------------------------- verl
#
# What verl 0.9.1 does (verl/trainer/ppo/reward.py, verl/experimental/reward_loop/):
# - `reward.custom_reward_function.{path,name,reward_kwargs}` is read by `get_custom_reward_fn`; the
#   top-level `custom_reward_function.*` is still accepted by Hydra, but main_ppo never reads it.
# - Its reward loop calls the function once per rollout, with keywords: `data_source`,
#   `solution_str` (the decoded response), `ground_truth` (`reward_model["ground_truth"]` of the row,
#   looked up by verl itself: a row without it fails with KeyError before we run), `extra_info`
#   (the row's extra_info plus, on the rollout-time path, the rollout's extra fields such as
#   `raw_prompt`) and the reward_kwargs. Coroutine functions are awaited on the worker's loop,
#   plain ones run in its thread pool. Registered managers: naive (default), dapo, gdpo,
#   rate_limited, remote (plain functions only); no `batch` manager any more, and none of them
#   sees a whole prompt group.
# - An exception fails that rollout: the v1 trainer (the default) marks its prompt's group
#   `failure` and keeps no trajectory of it (no reward, not 0); the legacy trainer stops the step.
#   None is no "missing reward" there (it is stored as the rollout's reward_score) and NaN would
#   reach the advantages: an unjudged rollout raises.

_clients: dict[tuple, RewardClient] = {}
_clients_lock = threading.Lock()

VERL_PROMPT_KEYS = (PROMPT_KEY, "raw_prompt")
"""Where the conversation is looked for in verl's `extra_info`, in order: `prompt` (put there by
`her build policy` / `her build verl`), then `raw_prompt` (verl 0.9.1 adds the rollout's chat
messages under this name when it scores a rollout as soon as it is generated, its default path)."""

VERL_PASSED_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})
"""Keywords verl's managers add when verl runs its own reward model; not used here."""


def _verl_client(kwargs: Mapping[str, Any], *, batched: bool) -> RewardClient:
    """One client per process and configuration (verl calls compute_score once per rollout)."""
    from ._reward_client import RewardClient, RewardClientConfig

    fields = set(RewardClientConfig.__dataclass_fields__)
    unknown = sorted(set(kwargs) - fields - VERL_PASSED_KWARGS)
    if unknown:
        raise ValueError(
            f"reward_kwargs {unknown} are not reward client settings; "
            f"reward.custom_reward_function.reward_kwargs takes {sorted(fields)}"
        )
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
            "'reference' works there (verl 0.9.1's reward loop has no batched manager)"
        )
    key = tuple(sorted((k, repr(v)) for k, v in overrides.items()))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = RewardClient(**overrides)
    return client


def _plain(value: Any) -> Any:
    """Rows reach us as numpy arrays (parquet via pandas, verl's object arrays): back to lists."""
    if not isinstance(value, str) and hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [dict(v) if isinstance(v, Mapping) else v for v in value]
    return value


def _verl_prompt(extra_info: Any, where: str) -> Any:
    if isinstance(extra_info, Mapping):
        for key in VERL_PROMPT_KEYS:
            if extra_info.get(key) is not None:
                return _plain(extra_info[key])
    keys = sorted(extra_info) if isinstance(extra_info, Mapping) else type(extra_info).__name__
    raise ValueError(
        f"{where}: extra_info[{PROMPT_KEY!r}] must hold the prompt (text or chat messages) the rollout "
        f"answers (or extra_info['raw_prompt'], which verl adds on its rollout-time reward path); "
        f"got {keys}. `her build policy` and `her build verl` write extra_info['prompt']"
    )


def _verl_failure(client: RewardClient, failed: int, total: int) -> RuntimeError:
    return RuntimeError(
        f"rm_server gave no reward for {failed} of {total} rollout(s) "
        f"(last error: {client.stats.last_error}); 0 would be a false reward, so the rollout fails "
        "instead (verl 0.9.1's v1 trainer then leaves it out; its legacy trainer stops the step)"
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
    return prompts, list(solution_strs), {client.config.reference_column: [_plain(g) for g in ground_truths]}


def compute_score(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any
) -> float:
    """verl reward of one rollout, judged against `ground_truth` (the row's `reward_model.ground_truth`).

    - prompt: `extra_info["prompt"]`, else `extra_info["raw_prompt"]` (text or chat messages);
    - server: env `HER_RM_URL` (or `url` in `reward.custom_reward_function.reward_kwargs`, where any
      other `RewardClientConfig` field may be set too, e.g. `judge_mode: fast`);
    - a rollout that cannot be judged raises RuntimeError (verl fails that rollout; never 0.0).
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
    """`compute_score` as a coroutine: verl's reward loop awaits it on its own event loop, so the
    rollouts of a worker are judged concurrently without tying up its thread pool."""
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
    """verl's batched contract (its `BatchRewardManager`): one score per rollout.

    verl 0.9.1's trainer no longer runs that manager (`Unknown reward manager: batch`); this serves
    releases that still do, and direct calls. The rollouts go out together (chunked, concurrent);
    with `strategy: group` the rollouts sharing a prompt are judged against each other. Any
    missing reward raises RuntimeError, as in `compute_score`.
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
    "URL_ENV",
    "VERL_PASSED_KWARGS",
    "VERL_PROMPT_KEYS",
    "compute_score",
    "compute_score_async",
    "compute_score_batch",
]
