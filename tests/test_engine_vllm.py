"""The `vllm` engine for real: vLLM's CPU build here (the CUDA build on GPU machines), bundled model.

Every test shares the session engine (`conftest.engine`, loaded once). Nothing here skips: vLLM is
part of the install on every machine it runs on.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from her_engines import (
    ChatMessage,
    EngineSettings,
    EngineUnavailable,
    GenRequest,
    GenResult,
    create_engine,
    resolve_engine_kind,
)
from her_engines._openai import attach_choice_logprobs
from her_engines._vllm import CPU_DEFAULTS, VLLMEngine, _entries, _render, vllm_platform_defaults

pytestmark = pytest.mark.model

ASK = [ChatMessage(role="user", content="Is the sky blue? Answer Yes or No.")]
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {
        "winner": {"type": "string", "enum": ["A", "B", "tie"]},
        "reason": {"type": "string", "maxLength": 40},
    },
    "required": ["winner", "reason"],
    "additionalProperties": False,
}


def _metric(name: str) -> float:
    return sum(s.value for fam in REGISTRY.collect() for s in fam.samples if s.name == name)


# ----- units: no engine ----------------------------------------------------------------------------


def test_importing_the_module_does_not_import_vllm() -> None:
    code = "import sys, her_engines._vllm, her_engines; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_auto_picks_vllm_where_it_is_installed_and_settings_map_to_engine_options() -> None:
    assert resolve_engine_kind("auto") == "vllm"
    settings = EngineSettings(kv_cache_gib=1.5, dtype="bfloat16")
    assert settings.resolved_engine() == "vllm"
    options = settings.engine_options("vllm")
    assert options["kv_cache_gib"] == 1.5 and options["dtype"] == "bfloat16"
    assert "enforce_eager" not in options  # unset → the platform default decides
    assert EngineSettings(threads=1).engine_options("transformers") == {"threads": 1}
    with pytest.raises(ValueError, match="engine_base_url"):
        EngineSettings(engine="openai").engine_options("openai")


def test_platform_defaults_differ_for_cpu_and_gpu() -> None:
    cpu = vllm_platform_defaults("cpu")
    assert cpu == CPU_DEFAULTS and cpu["dtype"] == "float32" and cpu["enforce_eager"] is True
    assert vllm_platform_defaults("cuda") == {}  # vLLM's own defaults on GPUs


def test_chat_rendering_leaves_the_prefilled_turn_open() -> None:
    from transformers import AutoTokenizer

    from her_engines._models import ensure_hf_folder

    tokenizer = AutoTokenizer.from_pretrained(ensure_hf_folder("smollm2-135m-instruct"))
    fresh = _render(tokenizer, GenRequest(messages=ASK))
    prefilled = _render(tokenizer, GenRequest(messages=ASK, prefill='{"score": '))
    fresh_text = tokenizer.decode(fresh["prompt_token_ids"])
    prefilled_text = tokenizer.decode(prefilled["prompt_token_ids"])
    assert fresh_text.rstrip().endswith("assistant")
    assert prefilled_text.endswith('{"score": ')  # no end-of-turn after the prefill
    assert prefilled_text.startswith(fresh_text)
    assert _render(tokenizer, GenRequest(prompt="Q: 2+2=", prefill=" A:")) == "Q: 2+2= A:"


def test_vllm_logprobs_become_choice_scores() -> None:
    def lp(text: str, value: float) -> SimpleNamespace:
        return SimpleNamespace(decoded_token=text, logprob=value)

    positions = [{7: lp("B", -0.3), 3: lp("A", -1.5), 9: lp("The", -4.0)}]
    entries = _entries([7], positions)
    assert entries == [("B", -0.3, [("B", -0.3), ("A", -1.5), ("The", -4.0)])]
    result = attach_choice_logprobs(GenResult(text="B"), ["A", "B"], entries, quoted=False, constraint="test")
    assert result.choice_logprobs is not None
    assert math.isclose(sum(math.exp(v) for v in result.choice_logprobs.values()), 1.0)
    assert result.choice_logprobs["B"] > result.choice_logprobs["A"]


# ----- the real engine -----------------------------------------------------------------------------


def test_the_session_engine_is_vllm_with_the_cpu_defaults(engine) -> None:
    assert isinstance(engine, VLLMEngine) and engine.alive and engine.continuous_batching
    args = engine.engine_args
    assert args["enable_prefix_caching"] is True and args["enforce_eager"] is True
    from conftest import TEST_KV_CACHE_GIB

    assert args["dtype"] == "float32" and args["kv_cache_memory_bytes"] == int(TEST_KV_CACHE_GIB * (1 << 30))


async def test_every_request_feature_in_one_call(engine) -> None:
    plain, shaped, picked, prefilled, stopped, short = await engine.generate(
        [
            GenRequest(messages=ASK, max_tokens=16),
            GenRequest(messages=ASK, max_tokens=48, json_schema=VERDICT_SCHEMA),
            GenRequest(messages=ASK, max_tokens=4, choices=["Yes", "No"]),
            GenRequest(messages=ASK, prefill="The answer is", max_tokens=8),
            GenRequest(prompt="1, 2, 3, 4, 5,", max_tokens=32, stop=[" 8"]),
            GenRequest(prompt="Once upon a time", max_tokens=3),
        ]
    )
    assert plain.text and plain.prompt_tokens > 0 and plain.completion_tokens > 0
    assert json.loads(shaped.text)["winner"] in ("A", "B", "tie")
    assert "\n" not in shaped.text  # compact JSON: no free whitespace
    assert picked.text in ("Yes", "No") and picked.choice_logprobs is not None
    assert all(math.isfinite(v) for v in picked.choice_logprobs.values())
    assert math.isclose(sum(math.exp(v) for v in picked.choice_logprobs.values()), 1.0, rel_tol=1e-6)
    assert prefilled.prompt_tokens > plain.prompt_tokens  # the prefill is part of the prompt
    assert not prefilled.text.startswith("The answer is")  # and not part of the result
    assert " 8" not in stopped.text and "6" in stopped.text
    assert short.finish_reason == "length" and short.completion_tokens == 3


async def test_token_logprobs_follow_the_written_tokens(engine) -> None:
    req = GenRequest(messages=ASK, max_tokens=48, json_schema=VERDICT_SCHEMA, logprobs=5)
    [res] = await engine.generate([req])
    entries = res.token_logprobs
    assert entries and len(entries) == res.completion_tokens
    assert "".join(t for t, _, _ in entries).startswith(res.text)  # the end-of-turn token is listed too
    for token, logprob, alternatives in entries:
        assert logprob <= 0.0 and (token, logprob) in alternatives and len(alternatives) <= 6


async def test_seeded_sampling_with_long_prompts_in_one_step_keeps_the_engine_alive(engine) -> None:
    """Two ~1,300-token prompts used to share one 2,048-token step, so one prefill was split; vLLM then
    rewinds that request's seeded generator, which kills the CPU engine. Whole prefills avoid it."""
    assert engine.engine_args["enable_chunked_prefill"] is False
    assert engine.engine_args["max_num_batched_tokens"] >= engine.engine_args["max_model_len"]
    long_prompts = [" ".join(f"{word}{i}" for i in range(650)) for word in ("alpha", "omega")]
    results = await engine.generate([GenRequest(prompt=text, max_tokens=4, temperature=0.9, seed=7 + k)
                                     for k, text in enumerate(long_prompts)])
    assert [r.finish_reason for r in results] == ["length", "length"]
    assert all(r.prompt_tokens > 1000 for r in results)
    [after] = await engine.generate([GenRequest(messages=ASK, max_tokens=4)])
    assert after.finish_reason != "error"


async def test_seed_and_temperature(engine) -> None:
    def sampled(seed: int) -> GenRequest:
        return GenRequest(prompt="The colour of the sea is", max_tokens=12, temperature=1.5, top_p=0.95, seed=seed)

    first, again, other_a, other_b = await engine.generate([sampled(1), sampled(1), sampled(2), sampled(3)])
    assert first.text == again.text  # same seed, same sample
    assert len({first.text, other_a.text, other_b.text}) > 1  # different seeds differ at T=1.5


async def test_requests_of_one_call_sharing_a_prefix_hit_vllms_prefix_cache(engine) -> None:
    # Like the two orders of a pair: submitted together, the second must still reuse the first's
    # blocks (vLLM only reuses blocks computed in an earlier step, so the engine staggers them).
    shared = [ChatMessage(role="system", content="You are a careful judge of role-play replies. " * 40)]
    hits_before = _metric("vllm:prefix_cache_hits_total")
    first, second = await engine.generate(
        [
            GenRequest(messages=[*shared, ChatMessage(role="user", content=f"Reply {x}.")], max_tokens=2)
            for x in "AB"
        ]
    )
    assert first.error is None and second.error is None
    assert _metric("vllm:prefix_cache_hits_total") - hits_before >= 300  # ~400 shared tokens, whole blocks


async def test_calls_from_other_event_loops_and_threads(engine) -> None:
    # The server runs in its own loop, the CLI in asyncio.run: the engine serves them all.
    results: list[GenResult] = []

    def in_thread() -> None:
        results.extend(asyncio.run(engine.generate([GenRequest(prompt="Hello", max_tokens=2)])))

    thread = threading.Thread(target=in_thread)
    thread.start()
    mine = await engine.generate([GenRequest(prompt="Hi", max_tokens=2)])
    await asyncio.to_thread(thread.join, 600)  # hang guard only
    assert len(results) == 1 and results[0].completion_tokens == 2 and mine[0].completion_tokens == 2


async def test_a_cancelled_caller_does_not_break_the_engine(engine) -> None:
    generated = _metric("vllm:generation_tokens_total")
    task = asyncio.create_task(engine.generate([GenRequest(prompt="Count: 1, 2,", max_tokens=200)]))
    deadline = time.monotonic() + 600  # hang guard only
    while _metric("vllm:generation_tokens_total") == generated:  # cancelled mid-decode, not before it began
        assert not task.done() and time.monotonic() < deadline, "the request never began decoding"
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (after,) = await engine.generate([GenRequest(prompt="Hi", max_tokens=2)])
    assert after.completion_tokens == 2 and _metric("vllm:num_requests_running") == 0


def test_a_missing_model_folder_is_unavailable(tmp_path) -> None:
    with pytest.raises(EngineUnavailable, match="unknown model"):
        create_engine("vllm", model=str(tmp_path / "nothing-here"))


def test_the_end_of_session_orphan_check_sees_the_engine_processes(engine) -> None:
    from conftest import vllm_processes

    assert any("VLLM::" in cmd for cmd in vllm_processes().values())  # the detector would see leftovers


@pytest.mark.own_engine
def test_sigterm_to_a_her_command_leaves_no_vllm_process(tmp_path, scene) -> None:
    """`her judge` killed mid-run (SIGTERM, as a scheduler or `timeout` sends it) shuts its engine down."""
    import os
    import signal
    from pathlib import Path

    from _openai_server import group_members, wait_for_group_exit
    from _pairs import fixture_pairs

    src = tmp_path / "pairs.jsonl"
    rows = [{"context": [m.model_dump() for m in p["context"]], "a": p["a"], "b": p["b"]}
            for p in fixture_pairs(scene, 8)]
    src.write_text("\n".join(json.dumps(r) for r in rows))
    her = Path(sys.executable).with_name("her")
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([str(her), "judge", "--in", str(src), "--out", str(out), "--kv-cache-gib", "0.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # hang guard only: a process start and a model load
        # Judging has begun: the engine is up and `her judge` opened its output, which it does just before it
        # submits the pairs (8 pairs, cot: they take far longer than this poll's period).
        while not (out.exists() and any("VLLM::" in cmd for cmd in group_members(proc.pid).values())):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 128 + signal.SIGTERM
        assert wait_for_group_exit(proc.pid) == {}  # the engine's processes exit too, in their own time
    finally:
        if proc.poll() is None or group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
