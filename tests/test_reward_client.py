"""The RL reward client: faults injected over real HTTP, then the real rm_server end to end.

Fault tests run against `_fault_servers.FaultServer` (a scripted /v1/rewards under uvicorn); the
end-to-end tests start `her serve` as a subprocess with the real bundled model, and finally kill and
restart it in the middle of a call.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from _fault_servers import fault_server
from _pairs import fixture_pairs
from _servers import free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

import policy_trainer
from her_genrm import CircuitBreaker
from policy_trainer import RewardClientMetricsCallback, _verl
from policy_trainer._reward_client import RewardClient, RewardClientConfig

# Short backoffs; the budget only has to outlast a few quick retries, on a slow, busy machine too.
QUICK = {"max_backoff_s": 0.05, "retry_budget_s": 60.0, "judge_mode": "fast"}
PROMPT = [{"role": "system", "content": "You are Mr. Darcy."}, {"role": "user", "content": "Elizabeth: Sir?"}]
GOOD = "<role_action>bows</role_action>Good evening."
PLANNED = "<system_thinking>He means to stay polite.</system_thinking>Good evening, madam."


def _client(url: str, **kw) -> RewardClient:
    return RewardClient(url=url, **{**QUICK, **kw})




# ---------------------------------------------------------------------- configuration and inputs


def test_config_checks_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match="url='localhost:8000'.*http"):
        RewardClientConfig(url="localhost:8000")
    with pytest.raises(ValueError, match="chunk_size must be >= 2"):
        RewardClientConfig(strategy="group", chunk_size=1)
    with pytest.raises(ValueError, match="judge_mode='slow'"):
        RewardClientConfig(judge_mode="slow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="format_penalty=-0.1"):
        RewardClientConfig(format_penalty=-0.1)
    with pytest.raises(ValueError, match="max_concurrency=0"):
        RewardClientConfig(max_concurrency=0)
    base = RewardClientConfig(url="http://example.test:9/", judge_mode="fast")
    client = RewardClient(base, strategy="group")
    assert (client.config.url, client.config.strategy, client.config.judge_mode) == (
        "http://example.test:9", "group", "fast")


async def test_bad_inputs_are_errors_not_silent_defaults():
    client = _client("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="'reference'.*columns passed are"):
        await client(["p"], ["c"], other=["x"])
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        await client(["p", "q"], ["c"], reference=["r"])
    with pytest.raises(ValueError, match=r"reference\[0\] is missing"):
        await client(["p"], ["c"], reference=[None])
    with pytest.raises(ValueError, match="role 'tool'"):
        await client([[{"role": "tool", "content": "x"}]], ["c"], reference=["r"])
    assert client.stats.calls == 0 and client.stats.http_errors == {}  # nothing was sent


async def test_conversational_inputs_are_sent_stripped_and_in_order():
    with fault_server(reward=lambda c: len(c) / 100) as fs:
        client = _client(fs.url)
        completions = [[{"role": "assistant", "content": PLANNED}], [{"role": "assistant", "content": GOOD}]]
        refs = [[{"role": "assistant", "content": PLANNED}], GOOD]
        rewards = await client([PROMPT, PROMPT], completions, reference=refs)
        [body] = fs.bodies()
        assert body["completions"] == ["Good evening, madam.", GOOD]  # the judge never sees the plan
        assert body["references"] == ["Good evening, madam.", GOOD]
        assert body["prompts"] == [PROMPT, PROMPT]
        assert (body["strategy"], body["mode"], body["reward"], body["format_penalty"]) == (
            "reference", "fast", "discrete", 0.0)
        assert rewards == [len("Good evening, madam.") / 100, len(GOOD) / 100]
        await client.aclose()


async def test_group_strategy_keeps_each_prompt_group_in_one_request():
    prompts = [f"Scene {k}" for k in (0, 1, 2)] * 3  # interleaved, as a sampler may order them
    completions = [f"reply {i}" for i in range(9)]
    with fault_server(reward=lambda c: int(c.split()[1]) / 10) as fs:
        client = _client(fs.url, strategy="group", chunk_size=4, aggregate="bradley_terry")
        rewards = await client(prompts, completions)
        bodies = fs.bodies()
        assert len(bodies) == 3  # 3 + 3 > chunk_size 4: one whole group per request
        for body in bodies:
            assert body["aggregate"] == "bradley_terry"
            assert len(set(body["group_ids"])) == 1 and len(body["group_ids"]) == 3
            assert len(set(body["prompts"])) == 1 and "references" not in body
        assert rewards == [i / 10 for i in range(9)]  # mapped back to input positions
        await client.aclose()


async def test_format_penalty_is_judged_on_the_raw_rollout():
    twice = "<system_thinking>Plan.</system_thinking><system_thinking>Again.</system_thinking>Hi."
    with fault_server() as fs:
        client = _client(fs.url, format_penalty=0.25)
        broken = "<role_action>bows Good evening."
        rewards = await client(["p"] * 3, [GOOD, broken, twice], reference=["r"] * 3)
        assert rewards == [0.75, 0.5, 0.5]  # the duplicate plan is only visible before stripping
        assert fs.bodies()[0]["completions"][2] == "Hi."
        assert client.stats.format_violations == 2
        await client.aclose()


# ---------------------------------------------------------------------- injected faults


async def test_slow_server_times_out_then_the_retry_succeeds():
    with fault_server() as fs:
        fs.script.append(("sleep", 600.0))  # far past the timeout; it ends when the fault server stops
        # the timeout under test, with room for the retry's normal answer to come back within it on a busy box
        client = _client(fs.url, request_timeout_s=3.0)
        assert await client(["p"], [GOOD], reference=["r"]) == [0.75]
        assert fs.hits == 2 and client.stats.retries == 1
        assert client.stats.http_errors == {"timeout": 1}
        await client.aclose()


async def test_retry_after_is_obeyed():
    with fault_server() as fs:
        fs.script.append(("status", 429, "1"))
        # backoff alone would wait <= 0.05 s; a busy server (429) must not open the circuit
        client = _client(fs.url, circuit_failure_threshold=1)
        assert await client(["p"], [GOOD], reference=["r"]) == [0.75]
        (first, _), (second, _) = fs.arrivals
        assert second - first >= 0.95
        assert client.stats.retries == 1 and client.stats.http_errors == {"429": 1}
        assert client.stats.circuit_opens == 0
        await client.aclose()


async def test_503_twice_then_ok_counts_the_retries():
    with fault_server() as fs:
        fs.script.extend([("status", 503), ("status", 503)])
        client = _client(fs.url)
        metrics: dict[str, list[float]] = {}
        rewards = await client(["p", "q"], [GOOD, GOOD], reference=["r", "r"],
                               log_metric=lambda k, v: metrics.setdefault(k, []).append(v))
        assert rewards == [0.75, 0.75]
        assert fs.hits == 3 and client.stats.retries == 2 and client.stats.http_errors == {"503": 2}
        assert metrics["reward_client/retries"] == [2.0] and metrics["reward_client/failed"] == [0.0]
        await client.aclose()


async def test_dead_server_gives_none_never_zero():
    # the budget runs out (the point), after several refused attempts even if the machine stalls for a while
    client = _client(f"http://127.0.0.1:{free_port()}", retry_budget_s=3.0, max_backoff_s=0.2)
    rewards = await client(["p", "q", "r"], [GOOD] * 3, reference=["x"] * 3)
    assert rewards == [None, None, None]
    assert client.stats.failed == 3 and client.stats.rewarded == 0 and client.stats.retries >= 1
    assert client.stats.http_errors["connect"] >= 2 and "Connect" in (client.stats.last_error or "")
    metrics = client.metrics()
    assert metrics["reward_client/failed_frac"] == 1.0 and math.isnan(metrics["reward_client/mean"])
    await client.aclose()


async def test_circuit_opens_after_n_failures_fails_fast_then_half_opens():
    with fault_server() as fs:
        fs.forever = ("status", 503)
        # no retries inside a call: each call makes at most one attempt, so counts are exact. The reset time is
        # the window in which the calls right after an opening must find the circuit open: seconds, not less.
        client = _client(fs.url, retry_budget_s=0, circuit_failure_threshold=2, circuit_reset_s=3.0)
        args = (["p"], [GOOD])
        assert await client(*args, reference=["r"]) == [None]
        assert client.circuit_state == "closed"  # one failure is below the threshold
        assert await client(*args, reference=["r"]) == [None]
        assert client.circuit_state == "open" and client.stats.circuit_opens == 1 and fs.hits == 2
        assert await client(*args, reference=["r"]) == [None]  # fails fast: nothing sent
        assert fs.hits == 2 and client.stats.circuit_rejections == 1
        wait_for(lambda: client.circuit_state == "half_open", "the circuit half-open", timeout=30.0, every_s=0.02)
        assert await client(*args, reference=["r"]) == [None]  # the one trial fails: open again
        assert fs.hits == 3 and client.circuit_state == "open" and client.stats.circuit_opens == 2
        wait_for(lambda: client.circuit_state == "half_open", "the circuit half-open", timeout=30.0, every_s=0.02)
        fs.forever = None
        assert await client(*args, reference=["r"]) == [0.75]
        assert fs.hits == 4 and client.circuit_state == "closed"
        await client.aclose()


async def test_open_circuit_is_waited_out_when_the_budget_allows():
    with fault_server() as fs:
        fs.script.append(("status", 502))
        client = _client(fs.url, retry_budget_s=60.0, circuit_failure_threshold=1, circuit_reset_s=1.0)
        assert await client(["p"], [GOOD], reference=["r"]) == [0.75]
        assert fs.hits == 2 and client.stats.circuit_opens == 1 and client.stats.circuit_rejections >= 1
        assert fs.arrivals[1][0] - fs.arrivals[0][0] >= 0.95  # held back until the half-open probe
        await client.aclose()


async def test_item_error_fails_only_that_item_and_is_not_retried():
    with fault_server() as fs:
        fs.script.append(("item_error", {1}))
        client = _client(fs.url)
        extra: dict[str, list] = {}
        rewards = await client(["p"] * 3, [GOOD] * 3, reference=["r"] * 3,
                               log_extra=lambda k, v: extra.setdefault(k, []).extend(v))
        assert rewards == [0.75, None, 0.75]
        assert fs.hits == 1 and client.stats.retries == 0 and client.stats.failed == 1
        assert "injected judge failure" in (client.stats.last_error or "")
        assert extra["reward_status"][0] == "ok" and extra["reward_status"][1].startswith("error: injected")
        await client.aclose()


async def test_400_is_not_retried():
    with fault_server() as fs:
        fs.script.append(("status", 400))
        client = _client(fs.url)
        assert await client(["p", "q"], [GOOD, GOOD], reference=["r", "r"]) == [None, None]
        assert fs.hits == 1 and client.stats.retries == 0 and "HTTP 400" in (client.stats.last_error or "")
        await client.aclose()


async def test_a_refused_rollout_fails_alone():
    with fault_server() as fs:
        client = _client(fs.url)
        rewards = await client(["p"] * 3, [GOOD, "REFUSE-ME " * 3, GOOD], reference=["r"] * 3)
        assert rewards == [0.75, None, 0.75]
        assert fs.hits == 4  # the chunk, then each rollout alone
        await client.aclose()


def test_circuit_breaker_states_with_a_fake_clock():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, reset_s=10.0, clock=lambda: now[0])
    assert breaker.admit() == 0.0 and not breaker.failure() and breaker.state == "closed"
    breaker.success()  # a success in between resets the count
    assert not breaker.failure() and breaker.failure() and breaker.state == "open"
    now[0] = 4.0
    assert breaker.admit() == pytest.approx(6.0)
    now[0] = 10.0
    assert breaker.state == "half_open" and breaker.admit() == 0.0  # this caller is the trial
    assert breaker.admit() > 0  # nobody else while the trial is out
    breaker.release()  # the trial ended without a verdict (e.g. 429): the next caller may probe
    assert breaker.admit() == 0.0
    breaker.success()
    assert breaker.state == "closed" and breaker.admit() == 0.0


# ---------------------------------------------------------------------- pickling, sync use, trainers


async def test_pickled_client_works_and_keeps_its_counters():
    with fault_server() as fs:
        client = _client(fs.url)
        assert await client(["p"], [GOOD], reference=["r"]) == [0.75]  # now holds an httpx client
        copy = pickle.loads(pickle.dumps(client))
        assert copy.stats.calls == 1 and copy.config == client.config and copy.__name__ == "her_genrm_reward"
        assert await copy(["p"], [GOOD], reference=["r"]) == [0.75]
        assert copy.stats.calls == 2 and client.stats.calls == 1
        await client.aclose()
        await copy.aclose()


async def test_score_sync_works_inside_and_outside_a_running_loop():
    with fault_server() as fs:
        client = _client(fs.url)
        assert client.score_sync(["p"], [GOOD], reference=["r"]) == [0.75]  # a loop runs in this thread
        no_loop = await asyncio.to_thread(client.score_sync, ["p"], [GOOD], reference=["r"])  # none there
        assert no_loop == [0.75]
        client.close()
        assert fs.hits == 2


async def test_metrics_callback_adds_counters_to_trainer_logs():
    with fault_server() as fs:
        client = _client(fs.url)
        await client(["p"], [GOOD], reference=["r"])
        callback = RewardClientMetricsCallback(client)
        # one class, found by pickle under its public name
        assert pickle.loads(pickle.dumps(type(callback))) is policy_trainer.RewardClientMetricsCallback
        state = SimpleNamespace(log_history=[{"loss": 1.0}])
        logs = {"loss": 1.0}
        callback.on_log(None, state, None, logs=logs)
        assert logs["reward_client/calls"] == 1.0 and logs["reward_client/mean"] == 0.75
        assert state.log_history[-1]["reward_client/rewarded"] == 1.0
        await client.aclose()


def test_trl_grpo_trainer_calls_the_async_client(tmp_path):
    """A real GRPOTrainer step (tiny random model) rewarded through the client."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=1))
    data = Dataset.from_list([{"prompt": "w1 w2 w3", "reference": "w4 w5"},
                              {"prompt": "w6 w7", "reference": "w8"}])
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=4, max_steps=1, logging_steps=1, report_to=[],
                      save_strategy="no")
    with fault_server() as fs:
        client = _client(fs.url)
        trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[client], args=args,
                              train_dataset=data)
        trainer.train()
        log = next(entry for entry in trainer.state.log_history if "rewards/her_genrm_reward/mean" in entry)
        assert log["rewards/her_genrm_reward/mean"] == pytest.approx(0.75)
        assert log["reward_client/failed"] == 0.0  # our per-call metric, through TRL's log_metric hook
        assert fs.hits >= 1 and all(len(b["references"]) == len(b["completions"]) for b in fs.bodies())
        assert {r for b in fs.bodies() for r in b["references"]} <= {"w4 w5", "w8"}


# ---------------------------------------------------------------------- verl adapter


def _verl_module():
    """Load verl_reward.py by path, the way verl's custom_reward_function.path does."""
    path = Path(_verl.__file__).with_name("verl_reward.py")
    spec = importlib.util.spec_from_file_location("custom_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verl_compute_score_contract(monkeypatch):
    verl = _verl_module()
    monkeypatch.delenv("HER_RM_URL", raising=False)
    with pytest.raises(RuntimeError, match="HER_RM_URL"):
        verl.compute_score("coser", GOOD, "ref", {"prompt": "p"})
    with fault_server() as fs:
        monkeypatch.setenv("HER_RM_URL", fs.url)
        kw = {"judge_mode": "fast", "max_backoff_s": 0.05, "retry_budget_s": 60.0}
        assert verl.compute_score("coser", PLANNED, "ref", {"prompt": PROMPT}, **kw) == 0.75
        body = fs.bodies()[-1]
        assert body["references"] == ["ref"] and body["completions"] == ["Good evening, madam."]
        assert body["prompts"] == [PROMPT] and body["mode"] == "fast"
        with pytest.raises(ValueError, match=r"extra_info\['prompt'\]"):
            verl.compute_score("coser", GOOD, "ref", {"index": 3}, **kw)
        scores = verl.compute_score_batch(["coser"] * 2, [GOOD, GOOD], ["r1", "r2"],
                                          [{"prompt": "p"}, {"prompt": "q"}], **kw)
        assert scores == [0.75, 0.75]
        fs.script.append(("item_error", {0}))
        with pytest.raises(RuntimeError, match="no reward for 1 of 1"):  # never a silent 0.0
            verl.compute_score("coser", GOOD, "ref", {"prompt": "p"}, **kw)
        assert asyncio.run(verl.compute_score_async("coser", GOOD, "ref", {"prompt": "p"}, **kw)) == 0.75
    for client in _verl._clients.values():
        client.close()
    _verl._clients.clear()


# ---------------------------------------------------------------------- the real rm_server


def _judgments(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "rm_judgments_total")


def _dialogue(scene, n_prompts: int = 2, skip: int = 0) -> tuple[list, list[str], list[str]]:
    """n prompts × 2 completions from the fixture scene; each one's reference is the other candidate."""
    prompts, completions, references = [], [], []
    for pair in fixture_pairs(scene, skip + n_prompts)[skip:]:
        context = [m.model_dump() for m in pair["context"]]
        for mine, other in ((pair["a"], pair["b"]), (pair["b"], pair["a"])):
            prompts.append(context)
            completions.append(mine)
            references.append(other)
    return prompts, completions, references


@pytest.mark.model
@pytest.mark.parametrize("strategy", ["reference", "group"])
async def test_real_server_rewards(rm_server, scene, strategy):
    # different turns per strategy, so that neither is answered from the other's cached verdicts
    prompts, completions, references = _dialogue(scene, skip=0 if strategy == "reference" else 2)
    before = _judgments(rm_server.base_url)
    client = RewardClient(url=rm_server.base_url, strategy=strategy, judge_mode="fast", request_timeout_s=600)
    rewards = await client(prompts, completions, reference=references)
    assert all(isinstance(r, float) and math.isfinite(r) and 0.0 <= r <= 1.0 for r in rewards), rewards
    if strategy == "group":  # two members per group: their win rates share one point
        assert rewards[0] + rewards[1] == pytest.approx(1.0) and rewards[2] + rewards[3] == pytest.approx(1.0)
    pairs = 4 if strategy == "reference" else 2
    assert _judgments(rm_server.base_url) - before >= pairs
    assert client.stats.failed == 0 and client.stats.rewarded == 4
    await client.aclose()


@pytest.mark.model
async def test_real_server_restart_mid_call_drops_no_rollout(rm_server, scene):
    prompts, completions, references = _dialogue(scene, 1)
    rm_server.stop()  # the server goes away before the step's rewards are asked for
    # Hang guards only: the budget and the wait cover a `her serve` restart with its model load on a slow box.
    client = RewardClient(url=rm_server.base_url, judge_mode="fast", request_timeout_s=600,
                          retry_budget_s=700, max_backoff_s=2.0, circuit_reset_s=3.0)
    call = asyncio.ensure_future(client(prompts, completions, reference=references))
    deadline = time.monotonic() + 60
    while client.stats.http_errors.get("connect", 0) == 0:  # it is retrying against the dead port
        assert time.monotonic() < deadline and not call.done()
        await asyncio.sleep(0.05)
    await asyncio.to_thread(rm_server.start)  # same port; the model loads again (503 meanwhile)
    rewards = await asyncio.wait_for(call, timeout=750)
    assert all(r is not None and 0.0 <= r <= 1.0 for r in rewards), rewards
    assert client.stats.failed == 0 and client.stats.retries >= 1
    await client.aclose()
