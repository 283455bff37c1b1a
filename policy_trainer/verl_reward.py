"""verl custom reward function backed by rm_server (HER GenRM).

verl loads this file by path, so it uses absolute imports: `policy_trainer` must be installed in
verl's environment (`pip install -e .`). Configuration (Hydra overrides):

    custom_reward_function.path=<repo>/policy_trainer/verl_reward.py
    custom_reward_function.name=compute_score          # one rollout per call (naive manager)
    # or: custom_reward_function.name=compute_score_batch  reward_model.reward_manager=batch
    # or: custom_reward_function.name=compute_score_async  (verl's async reward loop)
    +custom_reward_function.reward_kwargs.judge_mode=fast # any RewardClientConfig field

and in the environment of every reward worker: `HER_RM_URL=http://<rm_server host>:8000`
(plus `RM_API_KEY` when the server requires keys).

Data: `reward_model.ground_truth` is the reference reply; `extra_info["prompt"]` must hold the
conversation the rollout answers (text or chat messages). A rollout the server cannot judge raises
RuntimeError: verl has no "missing reward" value, and 0.0 would train on a false reward.
"""

from policy_trainer._adapters import compute_score, compute_score_async, compute_score_batch

__all__ = ["compute_score", "compute_score_async", "compute_score_batch"]
