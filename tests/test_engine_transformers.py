"""The transformers engine on the real SmolLM2-135M-Instruct (CPU, greedy unless stated)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from her_engines import DEFAULT_MODEL, EngineBadRequest, EngineUnavailable, GenRequest, _models
from her_engines._models import ensure_hf_folder, resolve_model
from her_engines._transformers import TransformersEngine

pytestmark = pytest.mark.model



@pytest.fixture(scope="module")
def engine(transformers_engine):
    """This module's tests name the engine under test `engine`: here, the transformers fallback."""
    return transformers_engine

ASK = [{"role": "user", "content": "Describe a cat in one sentence."}]
MOOD_SCHEMA = {
    "type": "object",
    "properties": {
        "mood": {"type": "string", "enum": ["happy", "sad", "angry"]},
        "intensity": {"type": "integer", "minimum": 1, "maximum": 5},
        "sure": {"type": "boolean"},
    },
    "required": ["mood", "intensity", "sure"],
}
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": ["A", "B"]}},
    "required": ["winner"],
}


def check_mood(obj: object) -> None:
    """Validate against MOOD_SCHEMA by hand: exact keys, enum membership, types, bounds."""
    assert isinstance(obj, dict)
    assert set(obj) == {"mood", "intensity", "sure"}
    assert obj["mood"] in {"happy", "sad", "angry"}
    assert isinstance(obj["intensity"], int) and not isinstance(obj["intensity"], bool)
    assert 1 <= obj["intensity"] <= 5
    assert isinstance(obj["sure"], bool)


def n_tokens(engine: TransformersEngine, req: GenRequest) -> int:
    return len(engine.tokenizer(engine.render(req), add_special_tokens=req.messages is None).input_ids)


async def test_chat_request(engine) -> None:
    req = GenRequest(messages=ASK, max_tokens=24)
    (res,) = await engine.generate([req])
    assert res.error is None and res.finish_reason in {"stop", "length"}
    assert res.text.strip()
    assert "<|im_start|>" not in res.text and "Describe a cat" not in res.text
    assert res.prompt_tokens == n_tokens(engine, req)
    assert 1 <= res.completion_tokens <= 24
    if res.finish_reason == "length":
        assert res.completion_tokens == 24


async def test_prefill_keeps_the_turn_open(engine) -> None:
    prefill = "A cat is a small"
    req = GenRequest(messages=ASK, prefill=prefill, max_tokens=16)
    rendered = engine.render(req)
    assert rendered.endswith(prefill)
    assert not rendered.rstrip().endswith("<|im_end|>")
    assert rendered.startswith(engine.render(GenRequest(messages=ASK)))  # same chat, assistant turn opened
    (res,) = await engine.generate([req])
    assert res.error is None and not res.text.startswith(prefill)
    # Continuing the prefill is the same as continuing the rendered text as a raw prompt.
    (raw,) = await engine.generate([GenRequest(prompt=rendered, max_tokens=16)])
    assert res.text == raw.text
    assert res.prompt_tokens == raw.prompt_tokens == n_tokens(engine, req)


async def test_json_schema_output_is_valid(engine) -> None:
    req = GenRequest(
        messages=[{"role": "user", "content": "I lost my keys again. Reply in JSON with my mood."}],
        json_schema=MOOD_SCHEMA,
        max_tokens=40,
    )
    other = GenRequest(
        messages=[{"role": "user", "content": "Pick A or B."}], json_schema=VERDICT_SCHEMA, max_tokens=20
    )
    mood, verdict = await engine.generate([req, other])  # two schemas in one batch
    assert mood.finish_reason == "stop", mood
    check_mood(json.loads(mood.text))
    assert verdict.finish_reason == "stop", verdict
    assert json.loads(verdict.text) in ({"winner": "A"}, {"winner": "B"})


async def test_token_logprobs_are_scored_after_the_grammar(engine) -> None:
    req = GenRequest(messages=[{"role": "user", "content": "Pick A or B."}], json_schema=VERDICT_SCHEMA,
                     max_tokens=20, logprobs=5)
    plain = req.model_copy(update={"logprobs": None})
    res, without = await engine.generate([req, plain])
    assert res.text == without.text and without.token_logprobs is None  # asking changes nothing else
    entries = res.token_logprobs
    assert len(entries) == res.completion_tokens
    assert "".join(t for t, _, _ in entries).startswith(res.text)
    for token, logprob, alternatives in entries:
        assert len(alternatives) == 5 and logprob <= 0.0
        assert alternatives[0] == (token, pytest.approx(logprob))  # greedy takes the best allowed token
        assert [lp for _, lp in alternatives] == sorted((lp for _, lp in alternatives), reverse=True)


async def test_json_schema_length_limit_reports_length(engine) -> None:
    (res,) = await engine.generate([GenRequest(messages=ASK, json_schema=MOOD_SCHEMA, max_tokens=3)])
    assert res.finish_reason == "length" and res.completion_tokens == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(res.text)


async def test_choices_are_scored_exactly(engine) -> None:
    choices = ["yes", "no", "it depends on the weather"]
    req = GenRequest(messages=[{"role": "user", "content": "Is the sky blue?"}], choices=choices)
    (res,) = await engine.generate([req])
    assert res.error is None and res.choice_logprobs is not None
    assert list(res.choice_logprobs) == choices
    assert abs(sum(math.exp(v) for v in res.choice_logprobs.values()) - 1.0) < 1e-5
    assert res.text == max(res.choice_logprobs, key=res.choice_logprobs.__getitem__)
    assert res.completion_tokens == len(engine.tokenizer(res.text, add_special_tokens=False).input_ids)

    # Against a plain full forward over prompt + choice (no KV-cache reuse).
    prompt = engine.tokenizer(engine.render(req), add_special_tokens=False).input_ids
    totals = []
    with torch.inference_mode():
        for choice in choices:
            ids = engine.tokenizer(choice, add_special_tokens=False).input_ids
            logprobs = torch.log_softmax(engine.model(torch.tensor([prompt + ids])).logits[0].double(), -1)
            totals.append(sum(float(logprobs[len(prompt) - 1 + k, t]) for k, t in enumerate(ids)))
    expected = torch.tensor(totals) - torch.logsumexp(torch.tensor(totals), 0)
    for choice, value in zip(choices, expected.tolist(), strict=True):
        assert res.choice_logprobs[choice] == pytest.approx(value, abs=1e-3)


async def test_choices_sampling_is_seeded(engine) -> None:
    req = GenRequest(prompt="The answer is", choices=["yes", "no", "maybe"], temperature=1.0, seed=7)
    first = await engine.generate([req] * 4)
    again = await engine.generate([req] * 4)
    assert [r.text for r in first] == [r.text for r in again]
    assert all(r.text in req.choices for r in first)
    assert first[0].choice_logprobs == again[0].choice_logprobs


async def test_mixed_batch_keeps_order(engine) -> None:
    reqs = [
        GenRequest(prompt="Q: 2+2=? A:", choices=["4", "5"]),
        GenRequest(messages=ASK, max_tokens=8),
        GenRequest(
            messages=[{"role": "user", "content": "Pick A or B, please, in JSON."}],
            json_schema=VERDICT_SCHEMA,
            max_tokens=20,
        ),
        GenRequest(prompt="Once upon a time there was", max_tokens=8, temperature=0.7, seed=1),
    ]
    results = await engine.generate(reqs)
    assert len(results) == len(reqs)
    assert [r.prompt_tokens for r in results] == [n_tokens(engine, q) for q in reqs]
    assert results[0].text in {"4", "5"} and results[0].choice_logprobs is not None
    assert all(r.choice_logprobs is None for r in results[1:])
    assert json.loads(results[2].text)["winner"] in {"A", "B"}
    assert all(r.error is None for r in results)


async def test_left_padding_does_not_change_greedy_output(engine) -> None:
    short = GenRequest(prompt="The capital of France is", max_tokens=24)
    others = [
        GenRequest(
            prompt="Write a long story about a dragon and a knight who become friends after a fight.",
            max_tokens=24,
        ),
        GenRequest(messages=ASK, max_tokens=12),
    ]
    (alone,) = await engine.generate([short])
    batched = await engine.generate([others[0], short, others[1]])
    # fp32 and masked padding: observed token-identical here; a batch changes only matmul blocking,
    # so an argmax flip would need a near-tie in the very first tokens.
    assert batched[1].text == alone.text
    assert batched[1].completion_tokens == alone.completion_tokens


async def test_seeded_sampling_is_reproducible(engine) -> None:
    req = GenRequest(prompt="My favourite animal is", max_tokens=16, temperature=0.8, top_p=0.95, seed=123)
    (a,) = await engine.generate([req])
    (b,) = await engine.generate([req])
    assert a.text == b.text
    # Each row samples from its own generator, so batch neighbours do not change a seeded result.
    mixed = await engine.generate([GenRequest(prompt="Hello", max_tokens=20, temperature=0.8, seed=123), req])
    assert mixed[1].text == a.text
    others = await engine.generate([req.model_copy(update={"seed": s}) for s in (1, 2, 3)])
    assert any(o.text != a.text for o in others)


async def test_stop_strings(engine) -> None:
    base = GenRequest(prompt="Here is a list of fruits: apple, banana,", max_tokens=24)
    (free,) = await engine.generate([base])
    words = free.text.split()
    assert len(words) >= 4, free.text
    stop = words[2]  # a string known to appear mid-output
    (cut,) = await engine.generate([base.model_copy(update={"stop": ["@@never@@", stop]})])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.completion_tokens < free.completion_tokens


async def test_bad_request_fails_alone(engine) -> None:
    good = GenRequest(prompt="The capital of France is", max_tokens=6)
    too_long = GenRequest(prompt="word " * 9000, max_tokens=6)
    bad_choice = GenRequest(prompt="Pick", choices=["", "x"])
    bad_schema = GenRequest(
        prompt="JSON:", json_schema={"type": "object", "properties": {"a": {"type": 7}}}, max_tokens=6
    )
    (alone,) = await engine.generate([good])
    results = await engine.generate([too_long, good, bad_choice, bad_schema])
    assert results[1].error is None and results[1].text == alone.text
    for bad in (results[0], results[2], results[3]):
        assert bad.finish_reason == "error" and bad.error and bad.text == ""
    assert "context" in results[0].error
    assert "choice" in results[2].error
    assert "json_schema" in results[3].error


async def test_second_start_uses_cached_folder(engine, monkeypatch) -> None:
    resolved = resolve_model(DEFAULT_MODEL)
    assert resolved.kind == "gguf" and resolved.source.name.endswith(".gguf")
    assert engine.model_path == resolved.hf_folder
    assert (resolved.hf_folder / "config.json").is_file()

    def no_conversion(*args: object) -> None:
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(_models, "_convert_gguf", no_conversion)
    second = TransformersEngine(DEFAULT_MODEL)
    try:
        assert second.model_path == engine.model_path
        assert second.model_id == DEFAULT_MODEL
        (res,) = await second.generate([GenRequest(prompt="Hi", max_tokens=2)])
        assert res.completion_tokens >= 1
    finally:
        await second.aclose()
    with pytest.raises(EngineUnavailable):
        await second.generate([GenRequest(prompt="Hi", max_tokens=2)])


def test_resolve_model_paths(engine, tmp_path, monkeypatch) -> None:
    folder = resolve_model(str(engine.model_path))
    assert folder.kind == "hf" and folder.hf_folder == engine.model_path.resolve()
    assert ensure_hf_folder(folder) == folder.hf_folder

    monkeypatch.setenv("HER_CACHE_DIR", str(tmp_path / "cache"))
    gguf = resolve_model(str(resolve_model(DEFAULT_MODEL).source))
    assert gguf.kind == "gguf" and gguf.model_id == "smollm2-135m-instruct.q4_1"
    assert gguf.hf_folder.parent == tmp_path / "cache" / "models"

    with pytest.raises(EngineUnavailable, match="unknown model"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineUnavailable, match="config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HER_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file" * 100)
    with pytest.raises(EngineUnavailable, match="could not convert"):
        ensure_hf_folder(str(broken))
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_bad_options_are_rejected() -> None:
    with pytest.raises(EngineBadRequest, match="dtype"):
        TransformersEngine(dtype="float8")
    with pytest.raises(EngineBadRequest, match="max_batch_size"):
        TransformersEngine(max_batch_size=0)


# ---- shared-prefix KV reuse ------------------------------------------------------------------

# A judge-like system prompt: long enough (well over MIN_PREFIX_TOKENS) to be shared, short enough for CPU.
LONG_SYSTEM = (
    "You judge replies in a role-play. Read the scene, then compare the two candidate replies. "
    + " ".join(
        f"Principle {i}: the reply should keep the character's voice, facts and mood consistent, case {i}."
        for i in range(8)
    )
)
USER_TURNS = [
    "Hi.",
    "Which reply keeps the captain calmer during the storm?",
    "Tell me, briefly, who speaks first in the scene and why it matters for the judgement.",
    "Pick one.",
    "Is the second reply in character? Answer in a short sentence.",
]


def judge_like(user: str, **kw: object) -> GenRequest:
    return GenRequest(messages=[{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": user}], **kw)


@pytest.fixture(scope="module")
def engine_off():
    """The same model with prefix reuse switched off: the reference for exact comparisons."""
    import asyncio

    eng = TransformersEngine(DEFAULT_MODEL, prefix_cache=False)
    yield eng
    asyncio.run(eng.aclose())


def test_common_prefix_len() -> None:
    from her_engines._prefix import common_prefix_len

    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert common_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # leaves one token of the shorter row
    assert common_prefix_len([[7, 8, 9]]) == 2
    assert common_prefix_len([[1, 2], [3, 4]]) == 0
    assert common_prefix_len([[5], [5, 6]]) == 0


async def test_prefix_reuse_keeps_greedy_output(engine, engine_off) -> None:
    assert engine.prefix_store is not None and engine_off.prefix_store is None
    reqs = [judge_like(u, max_tokens=16) for u in USER_TURNS]
    lengths = [n_tokens(engine, r) for r in reqs]
    assert len(set(lengths)) == len(lengths)  # different suffix lengths: padding sits mid-row
    before = engine.prefix_store.tokens_served
    reused = await engine.generate(reqs)
    assert engine.prefix_store.tokens_served - before >= len(reqs) * 100  # the system prompt was shared
    full = await engine_off.generate(reqs)
    for a, b in zip(reused, full, strict=True):
        assert a.error is None and b.error is None
        # fp32 with the same positions and masks: observed token-identical. A different split of the
        # prompt changes only summation order, so a flip would need a near-tie in 16 greedy tokens.
        assert (a.text, a.completion_tokens, a.finish_reason) == (b.text, b.completion_tokens, b.finish_reason)
        assert a.prompt_tokens == b.prompt_tokens


async def test_stored_prefix_serves_a_later_single_request(engine, engine_off) -> None:
    store = engine.prefix_store
    await engine.generate([judge_like(u, max_tokens=1) for u in USER_TURNS[:2]])  # stores the shared prefix
    req = judge_like("A question no earlier batch asked: is the tone right?", max_tokens=12)
    ids = engine.tokenizer(engine.render(req), add_special_tokens=False).input_ids
    entry = store._lookup(ids, len(ids) - 1)
    assert entry is not None and len(entry) >= 100
    snapshot = [(k.clone(), v.clone()) for k, v in entry.layers]
    before = store.rows_served
    (single,) = await engine.generate([req])
    assert store.rows_served == before + 1  # served from the stored prefix alone
    (reference,) = await engine_off.generate([req])
    assert single.text == reference.text
    # Generation worked on a copy: the stored tensors are untouched.
    for (k, v), (k0, v0) in zip(entry.layers, snapshot, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)


async def test_prefix_reuse_with_json_schema_and_sampling(engine, engine_off) -> None:
    reqs = [
        judge_like("Reply in JSON with my mood: I lost my keys again.", json_schema=MOOD_SCHEMA, max_tokens=40),
        judge_like("Pick A or B, in JSON.", json_schema=VERDICT_SCHEMA, max_tokens=20),
        judge_like("Say something kind.", max_tokens=10, temperature=0.8, seed=5),
        judge_like("Hi.", max_tokens=10),
    ]
    before = engine.prefix_store.rows_served
    reused = await engine.generate(reqs)
    assert engine.prefix_store.rows_served == before + len(reqs)
    assert reused[0].finish_reason == "stop", reused[0]
    check_mood(json.loads(reused[0].text))
    assert json.loads(reused[1].text) in ({"winner": "A"}, {"winner": "B"})
    full = await engine_off.generate(reqs)
    # The seeded sampled row draws from its own generator: same logits, same sample.
    assert [r.text for r in reused] == [r.text for r in full]


async def test_prefix_reuse_keeps_choice_logprobs(engine, engine_off) -> None:
    choices = ["A", "B", "tie"]
    reqs = [judge_like(u, choices=choices) for u in USER_TURNS[:3]]
    before = engine.prefix_store.rows_served
    reused = await engine.generate(reqs)
    assert engine.prefix_store.rows_served >= before + len(reqs)
    full = await engine_off.generate(reqs)
    for a, b in zip(reused, full, strict=True):
        assert a.choice_logprobs is not None and b.choice_logprobs is not None
        for c in choices:
            assert a.choice_logprobs[c] == pytest.approx(b.choice_logprobs[c], abs=1e-3)


async def test_batch_without_shared_prefix(engine, engine_off) -> None:
    # Long prompts (over the minimum) whose first tokens already differ: nothing to share.
    reqs = [
        GenRequest(prompt="Once upon a time, " + "the river ran past the mill and " * 12, max_tokens=8),
        GenRequest(prompt="In the year 1800, " + "a letter arrived at the house and " * 12, max_tokens=8),
    ]
    store = engine.prefix_store
    before = (store.rows_served, len(store))
    results = await engine.generate(reqs)
    assert (store.rows_served, len(store)) == before
    assert all(r.error is None and r.completion_tokens >= 1 for r in results)
    assert [r.text for r in results] == [r.text for r in await engine_off.generate(reqs)]
