"""verl custom reward function backed by rm_server (HER GenRM), for verl 0.9.1's reward loop.

verl loads this file by path (or as `pkg://policy_trainer.verl_reward`); `policy_trainer` must be
installed in verl's environment (`pip install -e .`). Hydra overrides (verl 0.9.1 reads only the
`reward.` group; a top-level `custom_reward_function.*` is accepted and then ignored):

    reward.custom_reward_function.path=<repo>/policy_trainer/verl_reward.py
    reward.custom_reward_function.name=compute_score_async     # or compute_score (thread pool)
    +reward.custom_reward_function.reward_kwargs.judge_mode=fast  # any RewardClientConfig field

with the default reward manager (`reward.reward_manager.name=naive`), and in the environment of
every reward worker `HER_RM_URL=http://<rm_server host>:8000` (plus `RM_API_KEY` when the server
requires keys). verl 0.9.1 has no `batch` manager: `compute_score_batch` serves older releases.

Data: `reward_model.ground_truth` is the reference reply (verl itself reads that key);
`extra_info["prompt"]` holds the conversation the rollout answers (`her build policy` / `her build
verl` write it; otherwise `extra_info["raw_prompt"]`, which verl adds on its rollout-time reward
path, is used). A rollout the server cannot judge raises RuntimeError, since 0.0 would be a false
reward: verl's v1 trainer then leaves that rollout out (its legacy trainer stops the step).
"""

from policy_trainer._verl import compute_score, compute_score_async, compute_score_batch

__all__ = ["compute_score", "compute_score_async", "compute_score_batch"]
