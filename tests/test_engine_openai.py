"""The `openai` engine against a real vLLM OpenAI server process, plus injected faults.

The server (``python -m vllm.entrypoints.openai.api_server``, what users deploy) serves the bundled
SmolLM2 (its converted HF folder) on a free loopback port for this module and is stopped at the end;
the fault tests (dead port, slow or failing server) and the encoding checks need no server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from _openai_server import ServerProcess, free_port, vllm_openai_server

from her_engines import (
    ChatMessage,
    Engine,
    EngineBadRequest,
    EngineTimeout,
    EngineUnavailable,
    GenRequest,
    GenResult,
    create_engine,
)
from her_engines._models import ensure_hf_folder
from her_engines._openai import OpenAIEngine, attach_choice_logprobs

VERDICT_SCHEMA = {
    "type": "object",
    "properties": {
        "winner": {"type": "string", "enum": ["A", "B", "tie"]},
        "confidence": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
    },
    "required": ["winner", "confidence"],
    "additionalProperties": False,
}


def _user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


def _probability_mass(result: GenResult) -> float:
    assert result.choice_logprobs is not None, result.error
    return sum(math.exp(v) for v in result.choice_logprobs.values())


# ----- the real server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server() -> ServerProcess:
    with vllm_openai_server(ensure_hf_folder("smollm2-135m-instruct")) as server:
        yield server


@pytest.fixture(scope="module")
async def served(vllm_server: ServerProcess) -> AsyncIterator[OpenAIEngine]:
    # timeout: a hang guard per model call (the default 120 s is a deployment's choice, not a test's)
    eng = create_engine("openai", model="smollm2-135m-instruct", base_url=vllm_server.base_url + "/v1", timeout=600)
    yield eng
    await eng.aclose()


async def test_plain_chat_returns_text_and_token_counts(served: OpenAIEngine) -> None:
    [result] = await served.generate([GenRequest(messages=_user("Name a colour."), max_tokens=12)])
    assert isinstance(served, Engine)
    assert served.constraint_style == "vllm"  # detected from GET /v1/models
    assert result.error is None and result.text.strip()
    assert result.prompt_tokens > 5
    assert 0 < result.completion_tokens <= 12
    assert result.finish_reason in ("stop", "length")


async def test_raw_prompt_uses_completions_and_honours_max_tokens(served: OpenAIEngine) -> None:
    [result] = await served.generate([GenRequest(prompt="One, two, three, four,", max_tokens=5)])
    assert result.text and result.completion_tokens == 5
    assert result.finish_reason == "length"


async def test_json_schema_output_parses_and_validates(served: OpenAIEngine) -> None:
    prompt = "Two replies, A: 'Hello, friend!' and B: 'Go away.'. Which is kinder? Answer in JSON."
    [result] = await served.generate(
        [GenRequest(messages=_user(prompt), max_tokens=48, json_schema=VERDICT_SCHEMA)]
    )
    assert result.error is None and result.finish_reason == "stop", result
    verdict = json.loads(result.text)
    assert set(verdict) == {"winner", "confidence"}
    assert verdict["winner"] in ("A", "B", "tie")
    assert verdict["confidence"] in (1, 2, 3, 4, 5)


async def test_choices_give_logprobs_that_sum_to_one(served: OpenAIEngine) -> None:
    prompt = "Which letter comes first in the alphabet, A or B? Answer with the letter only."
    [result] = await served.generate(
        [GenRequest(messages=_user(prompt), max_tokens=4, choices=["A", "B"])]
    )
    assert result.error is None and result.text in ("A", "B")
    assert set(result.choice_logprobs or {}) == {"A", "B"}
    assert math.isclose(_probability_mass(result), 1.0, rel_tol=1e-9)
    # Greedy decoding under the grammar picks the likelier choice.
    assert result.text == max(result.choice_logprobs, key=result.choice_logprobs.__getitem__)


async def test_choices_on_a_raw_prompt(served: OpenAIEngine) -> None:
    req = GenRequest(prompt="Q: Is fire hot? Answer yes or no.\nA:", max_tokens=4, choices=[" yes", " no"])
    [result] = await served.generate([req])
    assert result.error is None and result.text.strip() in ("yes", "no")
    assert math.isclose(_probability_mass(result), 1.0, rel_tol=1e-9)


async def test_eight_concurrent_requests_keep_their_order(served: OpenAIEngine) -> None:
    # Each request may only answer with words that carry its own index, so a reordering shows.
    requests = [
        GenRequest(messages=_user(f"Pick one word, {i}."), max_tokens=8, choices=[f"alpha{i}", f"beta{i}"])
        for i in range(8)
    ]
    results = await served.generate(requests)
    assert len(results) == 8
    for i, result in enumerate(results):
        assert result.error is None, result.error
        assert result.text in (f"alpha{i}", f"beta{i}")


async def test_prefill_continues_the_assistant_turn(served: OpenAIEngine) -> None:
    ask = _user("Is the sky blue? Answer Yes or No.")
    plain, prefilled = await served.generate(
        [GenRequest(messages=ask, max_tokens=8), GenRequest(messages=ask, prefill="The answer is", max_tokens=8)]
    )
    assert prefilled.error is None and prefilled.text
    assert prefilled.prompt_tokens > plain.prompt_tokens  # the open assistant turn is in the prompt
    assert not prefilled.text.startswith("The answer is")  # and the result continues it


async def test_a_request_the_server_refuses_raises_bad_request_with_its_words(vllm_server: ServerProcess) -> None:
    # 5,000 words cannot fit the server's 4,096-token context: vLLM answers 400 and says why.
    async with OpenAIEngine("smollm2-135m-instruct", base_url=vllm_server.base_url) as eng:
        with pytest.raises(EngineBadRequest, match="(?i)context|length|token"):
            await eng.generate([GenRequest(messages=_user("word " * 5000), max_tokens=8)])


# ----- injected faults -----------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def _tcp_server(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def _never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # hold the connection until the client gives up and closes it
    writer.close()


def _answers(status: str, body: dict) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        await reader.readexactly(length)
        payload = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        writer.close()

    return handler


async def test_dead_port_raises_unavailable() -> None:
    base_url = f"http://127.0.0.1:{free_port()}"
    for style in ("auto", "vllm"):  # the style probe and the generation call both translate
        async with OpenAIEngine("m", base_url=base_url, constraint_style=style) as eng:
            with pytest.raises(EngineUnavailable, match="cannot reach"):
                await eng.generate([GenRequest(messages=_user("hi"))])


async def test_slow_server_raises_timeout() -> None:
    async with _tcp_server(_never_answers) as base_url:
        async with OpenAIEngine("m", base_url=base_url, timeout=0.5, constraint_style="vllm") as eng:
            with pytest.raises(EngineTimeout, match="within 0.5 s"):
                await eng.generate([GenRequest(messages=_user("hi"))])


async def test_server_error_fails_only_its_own_results() -> None:
    body = {"error": {"message": "CUDA out of memory", "type": "InternalServerError"}}
    async with _tcp_server(_answers("500 Internal Server Error", body)) as base_url:
        async with OpenAIEngine("m", base_url=base_url, constraint_style="vllm") as eng:
            results = await eng.generate([GenRequest(messages=_user("hi")), GenRequest(prompt="x")])
    assert [r.finish_reason for r in results] == ["error", "error"]
    assert all("500" in (r.error or "") and "CUDA out of memory" in (r.error or "") for r in results)


async def test_client_error_raises_bad_request_with_the_servers_message() -> None:
    body = {"detail": "max_tokens is too large for this model"}
    async with _tcp_server(_answers("400 Bad Request", body)) as base_url:
        async with OpenAIEngine("m", base_url=base_url, constraint_style="vllm") as eng:
            with pytest.raises(EngineBadRequest, match="max_tokens is too large"):
                await eng.generate([GenRequest(messages=_user("hi"))])


# ----- request encoding and scoring (no server) -----------------------------------------------------


async def test_prefill_is_refused_before_sending_where_the_server_cannot_continue() -> None:
    req = GenRequest(messages=_user("hi"), prefill='{"winner": "')
    for style in ("llama_cpp", "openai"):
        async with OpenAIEngine(
            "m", base_url=f"http://127.0.0.1:{free_port()}", constraint_style=style
        ) as eng:
            # A dead port: reaching the network would raise EngineUnavailable instead.
            with pytest.raises(EngineBadRequest, match="continue_final_message"):
                await eng.generate([req])


def test_vllm_style_request_bodies() -> None:
    eng = OpenAIEngine("judge", base_url="http://127.0.0.1:1/v1/", constraint_style="vllm")
    assert eng.base_url == "http://127.0.0.1:1"
    path, body = eng._body(
        GenRequest(messages=_user("hi"), prefill="Sure", choices=["A", "B"], seed=3, stop=["\n"]), "vllm"
    )
    assert path == "/v1/chat/completions"
    assert body["messages"][-1] == {"role": "assistant", "content": "Sure"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["structured_outputs"] == {"choice": ["A", "B"]}
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert (body["seed"], body["stop"], body["model"]) == (3, ["\n"], "judge")
    path, body = eng._body(GenRequest(prompt="p", json_schema=VERDICT_SCHEMA), "vllm")
    assert path == "/v1/completions" and body["structured_outputs"] == {"json": VERDICT_SCHEMA}
    assert body["response_format"]["json_schema"]["schema"] == VERDICT_SCHEMA


def test_quoted_choice_scores_skip_the_opening_quote() -> None:
    # openai style: the output is the JSON string "B"; the choice is decided at the second token.
    entries = [
        ('"', -0.01, [('"', -0.01), ("The", -5.0)]),
        ("B", -0.4, [("B", -0.4), ("A", -1.2), ("C", -2.0)]),
        ('"', -0.0, [('"', -0.0)]),
    ]
    result = attach_choice_logprobs(
        GenResult(text='"B"'), ["A", "B", "tie"], entries, quoted=True, constraint="t"
    )
    assert result.text == "B" and result.choice_logprobs is not None
    scores = result.choice_logprobs
    assert math.isclose(sum(math.exp(v) for v in scores.values()), 1.0)
    assert scores["B"] > scores["A"] > scores["tie"]  # "tie" is unlisted: floored at the lowest listed
    assert math.isclose(scores["B"] - scores["A"], 0.8)


def test_output_outside_the_choices_is_an_error_result() -> None:
    result = attach_choice_logprobs(GenResult(text="Maybe"), ["A", "B"], [], quoted=False, constraint="c")
    assert result.finish_reason == "error" and "not one of the choices" in (result.error or "")
    assert result.choice_logprobs is None
