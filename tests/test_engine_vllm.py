"""The `vllm` engine: lazy import and install hint everywhere; the real engine only where vLLM runs."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest

from her_engines import ChatMessage, EngineUnavailable, GenRequest, GenResult, create_engine
from her_engines._vllm import _entries, _render

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_importing_the_module_does_not_import_vllm() -> None:
    code = "import sys, her_engines._vllm, her_engines; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here, so the missing-package path cannot run")
def test_create_engine_without_vllm_gives_the_install_hint() -> None:
    with pytest.raises(EngineUnavailable, match=r"pip install her-genrm\[vllm\]"):
        create_engine("vllm", model="smollm2-135m-instruct")


def test_chat_rendering_leaves_the_prefilled_turn_open() -> None:
    from transformers import AutoTokenizer

    from her_engines._models import ensure_hf_folder

    tokenizer = AutoTokenizer.from_pretrained(ensure_hf_folder("smollm2-135m-instruct"))
    messages = [ChatMessage(role="user", content="Rate it.")]
    fresh = _render(tokenizer, GenRequest(messages=messages))
    prefilled = _render(tokenizer, GenRequest(messages=messages, prefill='{"score": '))
    fresh_text = tokenizer.decode(fresh["prompt_token_ids"])
    prefilled_text = tokenizer.decode(prefilled["prompt_token_ids"])
    assert fresh_text.rstrip().endswith("assistant")
    assert prefilled_text.endswith('{"score": ')  # no end-of-turn after the prefill
    assert prefilled_text.startswith(fresh_text)
    assert _render(tokenizer, GenRequest(prompt="Q: 2+2=", prefill=" A:")) == "Q: 2+2= A:"


def test_vllm_logprobs_become_choice_scores() -> None:
    def lp(text: str, value: float) -> SimpleNamespace:
        return SimpleNamespace(decoded_token=text, logprob=value)

    # Position 0 sampled token 7 ("B"); token 3 ("A") was the runner-up.
    positions = [{7: lp("B", -0.3), 3: lp("A", -1.5), 9: lp("The", -4.0)}]
    entries = _entries([7], positions)
    assert entries == [("B", -0.3, [("B", -0.3), ("A", -1.5), ("The", -4.0)])]
    from her_engines._openai import attach_choice_logprobs

    result = attach_choice_logprobs(GenResult(text="B"), ["A", "B"], entries, quoted=False, constraint="test")
    assert result.choice_logprobs is not None
    assert math.isclose(sum(math.exp(v) for v in result.choice_logprobs.values()), 1.0)
    assert result.choice_logprobs["B"] > result.choice_logprobs["A"]


@pytest.mark.model
@pytest.mark.slow
async def test_real_vllm_engine_generates_constrained_output() -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install her-genrm[vllm])")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM is installed but this machine has no GPU")
    engine = create_engine("vllm", model="smollm2-135m-instruct", gpu_memory_utilization=0.3)
    try:
        user = [ChatMessage(role="user", content="Is the sky blue? Answer Yes or No.")]
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
        plain, shaped, picked = await engine.generate(
            [
                GenRequest(messages=user, max_tokens=16),
                GenRequest(messages=user, max_tokens=32, json_schema=schema),
                GenRequest(messages=user, max_tokens=4, choices=["Yes", "No"]),
            ]
        )
    finally:
        await engine.aclose()
    assert plain.text and plain.prompt_tokens > 0 and plain.completion_tokens > 0
    assert isinstance(json.loads(shaped.text)["ok"], bool)
    assert picked.text in ("Yes", "No") and picked.choice_logprobs is not None
    assert math.isclose(sum(math.exp(v) for v in picked.choice_logprobs.values()), 1.0, rel_tol=1e-6)
