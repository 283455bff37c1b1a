"""rm_server end to end: the real app under uvicorn, real HTTP, the real model, real Redis."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import httpx
import pytest
from _pairs import fixture_pairs
from _servers import RedisProcess, serve_app
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from her_engines import Engine, GenRequest, GenResult
from rm_server import ServerSettings, build_app

pytestmark = pytest.mark.model


def _settings(**kw) -> ServerSettings:
    base = {"max_wait_ms": 5.0, "request_timeout_s": 600.0}
    return ServerSettings.load(**{**base, **kw})


def _body(pair: dict, **kw) -> dict:
    ctx = pair["context"]
    ctx = [m.model_dump() for m in ctx] if isinstance(ctx, list) else ctx
    return {"context": ctx, "a": pair["a"], "b": pair["b"], **kw}


def _metrics(base: str, headers: dict | None = None) -> dict[str, float]:
    text = httpx.get(base + "/metrics", headers=headers or {}, timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.fixture(scope="module")
def pairs(scene):
    return fixture_pairs(scene, 8)


@pytest.fixture(scope="module")
def server(engine, redis_url_module):
    """One app on the machine's Redis (a fresh key space via a unique model revision is not needed:
    keys include the principle/template hashes and the test content)."""
    app = build_app(_settings(redis_url=redis_url_module, openrlhf_mode="fast"), engine=engine)
    with serve_app(app, ready_path="/healthz") as base:
        yield base


@pytest.fixture(scope="module")
def redis_url_module() -> str:
    from conftest import REDIS_URL

    return REDIS_URL


def test_health_ready_info_principles(server):
    assert httpx.get(server + "/healthz").json() == {"status": "ok", "state": "ready"}
    ready = httpx.get(server + "/readyz")
    assert ready.status_code == 200 and ready.json()["model_loaded"] is True
    info = httpx.get(server + "/v1/info").json()
    assert info["model"] == "smollm2-135m-instruct" and info["cache"] == "redis"
    assert len(info["principle_set_hash"]) == 16 and "compact" in info["templates"]
    principles = httpx.get(server + "/v1/principles").json()
    assert principles["version"] == info["principle_set_hash"]
    assert len(principles["principles"]) == info["principles"] >= 48


def test_cot_and_fast_on_vllm_over_http_with_engine_statistics(server, pairs, unique):
    info = httpx.get(server + "/v1/info").json()
    assert info["engine"] == "vllm" and info["batching"] == "continuous"
    seed = int(unique[:6], 16) + 7
    cot = httpx.post(server + "/v1/judge", json=_body(pairs[2], mode="cot", seed=seed), timeout=600).json()
    assert cot["status"] == "ok", cot
    assert all(o["status"] == "ok" for o in cot["orders"])  # constrained JSON parsed in both orders
    assert cot["comparisons"] and {c["winner"] for c in cot["comparisons"]} <= {"a", "b", "tie"}
    fast = httpx.post(server + "/v1/judge", json=_body(pairs[3], mode="fast", seed=seed), timeout=600).json()
    assert fast["status"] == "ok" and math.isfinite(fast["p_a"]) and 0.0 <= fast["p_a"] <= 1.0
    m = _metrics(server)
    engine_stats = {k.split("{")[0] for k in m if k.startswith("vllm:")}
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= engine_stats
    hits = sum(v for k, v in m.items() if k.startswith("vllm:prefix_cache_hits_total"))
    assert hits > 0  # the two orders of a pair share the judge instructions and the context


def test_judge_then_cached_hit_and_mirrored_order(server, pairs, unique):
    body = _body(pairs[0], seed=int(unique[:6], 16))  # a fresh seed → a fresh cache key
    first = httpx.post(server + "/v1/judge", json=body, timeout=600)
    assert first.status_code == 200, first.text
    v = first.json()
    assert v["status"] == "ok" and v["cached"] is False and v["verdict"] in ("a", "b", "tie")
    assert [o["a_first"] for o in v["orders"]] == [True, False]
    again = httpx.post(server + "/v1/judge", json=body, timeout=60).json()
    assert again["cached"] is True and again["verdict"] == v["verdict"] and again["p_a"] == v["p_a"]
    swapped = httpx.post(
        server + "/v1/judge", json={**body, "a": body["b"], "b": body["a"]}, timeout=60
    ).json()
    assert swapped["cached"] is True
    assert swapped["p_a"] == pytest.approx(1 - v["p_a"])
    assert swapped["verdict"] == {"a": "b", "b": "a", "tie": "tie"}[v["verdict"]]


def test_batch_route_returns_one_verdict_per_item_in_order(server, pairs, unique):
    seed = int(unique[:6], 16) + 1
    items = [_body(p, mode="fast", seed=seed) for p in pairs[:4]]
    r = httpx.post(server + "/v1/judge/batch", json={"items": items}, timeout=600)
    assert r.status_code == 200, r.text
    verdicts = r.json()["verdicts"]
    assert len(verdicts) == 4 and all(v["status"] == "ok" for v in verdicts)
    # each item's verdict equals the single-item verdict for the same pair (now a cache hit)
    for item, v in zip(items, verdicts, strict=True):
        single = httpx.post(server + "/v1/judge", json=item, timeout=60).json()
        assert single["cached"] is True and single["p_a"] == pytest.approx(v["p_a"])


def test_rewards_with_groups_are_win_rates(server, pairs, unique):
    prompt = [m.model_dump() for m in pairs[1]["context"]]
    completions = [
        pairs[1]["a"],
        pairs[1]["b"],
        "(bows) Good day.",
        f"Hello {unique}.",
        "Yes.",
        "Indeed, sir.",
    ]
    body = {
        "prompts": [prompt] * 6,
        "completions": completions,
        "group_ids": [0, 0, 0, 1, 1, 1],
        "mode": "fast",
    }
    r = httpx.post(server + "/v1/rewards", json=body, timeout=600)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == ["ok"] * 6
    rewards = out["rewards"]
    for group in (rewards[:3], rewards[3:]):
        assert all(0.0 <= x <= 1.0 for x in group)
        # every pair hands out exactly one point: Σ win_rate · (n−1) = C(n, 2)
        assert sum(group) * 2 == pytest.approx(3.0)
    assert all(len(d["verdicts"]) == 2 for d in out["details"])
    # the same verdicts (now cached) aggregated by Bradley–Terry: a complete round robin keeps the order
    r = httpx.post(server + "/v1/rewards", json={**body, "aggregate": "bradley_terry"}, timeout=600)
    assert r.status_code == 200, r.text
    fitted = r.json()["rewards"]
    for rates, strengths in ((rewards[:3], fitted[:3]), (rewards[3:], fitted[3:])):
        assert all(0.0 < x < 1.0 for x in strengths)
        for i in range(3):
            for j in range(3):
                if rates[i] > rates[j] + 1e-9:
                    assert strengths[i] > strengths[j]


def test_rewards_against_references_with_format_penalty(server, pairs):
    prompt = [m.model_dump() for m in pairs[2]["context"]]
    broken = "<role_thinking>unclosed thought<role_action>waves</role_action>Hi."
    body = {
        "prompts": [prompt, prompt],
        "completions": [pairs[2]["a"], broken],
        "references": [pairs[2]["b"], pairs[2]["b"]],
        "mode": "fast",
        "format_penalty": 0.5,
    }
    out = httpx.post(server + "/v1/rewards", json=body, timeout=600).json()
    assert out["status"] == ["ok", "ok"]
    assert out["details"][1]["format_violations"] and not out["details"][0]["format_violations"]
    assert out["rewards"][1] in (-0.5, 0.0, 0.5)  # discrete outcome minus the penalty


def test_openrlhf_protocol(server, pairs, unique):
    empty = httpx.post(server + "/get_reward", json={"query": [], "prompts": [], "labels": []})
    assert empty.status_code == 200 and empty.json() == {"rewards": [], "scores": [], "extra_logs": {}}
    prompt = "Mr Bennet: Lizzy, come into my room.\nElizabeth Bennet:"
    response = " (follows him) What is it, Papa?"
    label = f"Yes. ({unique})"  # unique per run: the shared Redis cannot hold this verdict yet
    body = {"query": [prompt + response], "prompts": [prompt], "labels": [label]}
    r = httpx.post(server + "/get_reward", json=body, timeout=600)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["rewards"]) == 1 and out["rewards"] == out["scores"]
    assert out["rewards"][0] in (0.0, 0.5, 1.0) and out["extra_logs"]["judge_ok"] == [1.0]
    # the judged response was query minus prompt: judging that exact pair now hits the cache
    hit = httpx.post(
        server + "/v1/judge", json={"context": prompt, "a": response, "b": label, "mode": "fast"}, timeout=60
    ).json()
    assert hit["cached"] is True


def test_bad_input_is_a_clear_4xx(server, pairs):
    r = httpx.post(server + "/v1/judge", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request"
    r = httpx.post(server + "/v1/judge", json={"context": "x", "a": "only a"})
    assert r.status_code == 422 and "b" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/judge", json={"context": "x", "a": "y" * 9000, "b": "z"})
    assert r.status_code == 422 and "8000" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/judge", json={**_body(pairs[0]), "template": "her-rm"})
    assert r.status_code == 422 and "her-rm" in r.json()["error"]["message"]
    r = httpx.post(
        server + "/v1/rewards", json={"prompts": ["p"], "completions": ["c", "d"], "references": ["r"]}
    )
    assert r.status_code == 422 and "completions has 2" in r.json()["error"]["message"]
    r = httpx.post(server + "/get_reward", json={"query": ["abc"], "labels": ["l"]})
    assert r.status_code == 422 and "prompts" in r.json()["error"]["message"]


def test_metrics_scrape_parses_and_counts(server, pairs, unique):
    def judged_ok(m: dict[str, float]) -> float:
        return sum(v for k, v in m.items() if k.startswith("rm_judgments_total{mode=fast,status=ok"))

    before = _metrics(server)
    body = _body(pairs[1], mode="fast", seed=int(unique[:6], 16) + 3)  # a fresh cache key, then its hit
    for _ in range(2):
        assert httpx.post(server + "/v1/judge", json=body, timeout=600).json()["status"] == "ok"
    m = _metrics(server)
    assert judged_ok(m) == judged_ok(before) + 2  # the cached answer counts too (not in the window)
    assert m["rm_cache_requests_total{result=hit}"] >= before.get("rm_cache_requests_total{result=hit}", 0) + 1
    assert m["rm_window_judgments"] >= 1
    assert 0.0 <= m["rm_first_slot_win_ratio"] <= 1.0 or math.isnan(m["rm_first_slot_win_ratio"])
    assert m["rm_tokens_total{kind=prompt}"] > 0
    assert m["rm_queue_capacity"] == 512


# ---------------------------------------------------------------- auth and limits


def test_auth_refusal_and_acceptance(engine, pairs):
    app = build_app(_settings(api_keys="k-one,k-two", max_body_bytes=4096), engine=engine)
    with serve_app(app) as base:
        assert httpx.get(base + "/healthz").status_code == 200
        assert httpx.get(base + "/metrics").status_code == 200  # scrapers need no key by default
        assert httpx.get(base + "/readyz").status_code == 200  # nor do orchestrators' readiness probes
        r = httpx.get(base + "/v1/info")
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        assert httpx.get(base + "/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(base + "/v1/info", headers={"Authorization": "Bearer k-two"}).status_code == 200
        r = httpx.post(
            base + "/v1/judge",
            json={"context": "x" * 5000, "a": "1", "b": "2"},
            headers={"Authorization": "Bearer k-one"},
        )
        assert r.status_code == 413 and "4096" in r.json()["error"]["message"]


# ---------------------------------------------------------------- faults (injected engines)


class DelayedEngine:
    """Fault injector: the real engine, each generate() call answered `delay_s` late."""

    def __init__(self, inner: Engine, delay_s: float = 0.0) -> None:
        self._inner, self.delay_s = inner, delay_s

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the real engine's
        return getattr(self._inner, name)

    async def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        await asyncio.sleep(self.delay_s)
        return await self._inner.generate(requests)


class FirstSlotBiasedEngine(DelayedEngine):
    """Fault injector: the real engine's fast-mode verdict scores, with slot A's and the best choice's swapped,
    so every order prefers whichever reply is shown first (the position bias the gauges exist to catch)."""

    async def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        return [self._first_slot_wins(r) for r in await super().generate(requests)]

    @staticmethod
    def _first_slot_wins(result: GenResult) -> GenResult:
        if not result.choice_logprobs:
            return result
        logprobs = dict(result.choice_logprobs)
        best = max(logprobs, key=logprobs.__getitem__)
        logprobs["A"], logprobs[best] = logprobs[best], logprobs["A"]
        return result.model_copy(update={"choice_logprobs": logprobs})


HANG_S = 60.0  # hang guard of the held engines below; events end their holds long before it


async def _burst(base: str, n: int, *, release: threading.Event | None = None, after: int = 0) -> list[httpx.Response]:
    """`n` concurrent judgments. With `release`: set it once `after` of them were answered (or HANG_S passed)."""
    async with httpx.AsyncClient(timeout=300) as client:
        sent = [
            asyncio.ensure_future(client.post(
                base + "/v1/judge", json={"context": "x", "a": f"a{i}", "b": "b", "use_cache": False, "mode": "fast"}
            ))
            for i in range(n)
        ]
        if release is not None:
            deadline = time.monotonic() + HANG_S
            while sum(t.done() for t in sent) < after and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            release.set()
        return await asyncio.gather(*sent)


class OverlapEngine(DelayedEngine):
    """Fault injector: the real engine, recording how many generate() calls run at the same time. Each call is
    held until `released` is set (by the test, or by the call that makes `together` calls run at once), or for
    `hold_s`. `continuous` stands in for the engine's batching capability."""

    def __init__(self, inner: Engine, continuous: bool, *, hold_s: float = HANG_S, together: int | None = None) -> None:
        super().__init__(inner)
        self.continuous_batching = continuous
        self.hold_s, self.together = hold_s, together
        self.released = threading.Event()  # set from the test's thread or the server's
        self.running = self.most_running = 0

    async def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        if self.together is not None and self.running >= self.together:
            self.released.set()
        try:
            deadline = time.monotonic() + self.hold_s
            while not self.released.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return await super().generate(requests)
        finally:
            self.running -= 1


@pytest.mark.parametrize("continuous", [True, False])
def test_pairs_reach_a_continuously_batching_engine_on_arrival(engine, continuous):
    # continuous: each call waits until all 4 are inside (so their overlap does not depend on how fast they
    # arrive); micro: each is held 0.5 s, time enough for a second call to enter if the batcher let it in.
    engine = OverlapEngine(engine, continuous, together=4, hold_s=HANG_S / 4 if continuous else 0.5)
    app = build_app(_settings(max_batch_size=1, max_wait_ms=0), engine=engine)
    with serve_app(app) as base:
        assert httpx.get(base + "/v1/info").json()["batching"] == ("continuous" if continuous else "micro")
        responses = asyncio.run(_burst(base, 4))
    assert all(r.status_code == 200 for r in responses)
    # continuous: no request waits for another's engine call; micro: one engine call at a time
    assert engine.most_running == (4 if continuous else 1)


def test_continuous_batching_keeps_the_bounded_queue(engine):
    # One pair in the engine (held there) and one queued fill the server; the other four are refused, and only
    # then is the engine let go, however slowly the burst arrives.
    engine = OverlapEngine(engine, continuous=True)
    app = build_app(_settings(max_inflight=1, max_queue=1), engine=engine)
    with serve_app(app) as base:
        responses = asyncio.run(_burst(base, 6, release=engine.released, after=4))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes and engine.most_running == 1


def test_full_queue_answers_429_with_retry_after(engine):
    engine = OverlapEngine(engine, continuous=False)  # held as above, on the micro-batching path
    app = build_app(_settings(max_queue=1, max_batch_size=1, max_wait_ms=0), engine=engine)
    with serve_app(app) as base:
        responses = asyncio.run(_burst(base, 6, release=engine.released, after=4))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "queue_full"


def test_request_timeout_answers_504(engine):
    app = build_app(_settings(request_timeout_s=0.2), engine=DelayedEngine(engine, 1.0))
    with serve_app(app) as base:
        r = httpx.post(base + "/v1/judge", json={"context": "x", "a": "1", "b": "2", "mode": "fast"}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"


def test_gauges_move_with_a_first_slot_biased_judge(engine, pairs):
    """The real judge made to prefer slot A in every order: first-slot ratio → 1, swap consistency → 0."""
    app = build_app(_settings(hack_probe_every=0), engine=FirstSlotBiasedEngine(engine))
    with serve_app(app) as base:
        for pair in pairs[:6]:
            v = httpx.post(base + "/v1/judge", json=_body(pair, mode="fast", use_cache=False), timeout=60).json()
            assert v["status"] == "ok" and v["consistent"] is False
            assert [o["winner"] for o in v["orders"]] == ["a", "b"] or [o["winner"] for o in v["orders"]] == ["b", "a"]
        m = _metrics(base)
    assert m["rm_first_slot_win_ratio"] == 1.0
    assert m["rm_swap_consistency_ratio"] == 0.0
    assert m["rm_window_judgments"] == 6
    assert sum(v for k, v in m.items() if k.startswith("rm_judgments_total{mode=fast,status=ok")) == 6


def test_redis_dies_mid_run_and_the_cache_recovers(engine):
    redis = RedisProcess().start()
    app = build_app(_settings(redis_url=redis.url, hack_probe_every=0), engine=engine)
    try:
        with serve_app(app) as base:

            def judge(i: int) -> dict:
                r = httpx.post(base + "/v1/judge", json={"context": "x", "a": f"r{i}", "b": "b", "mode": "fast"},
                               timeout=60)
                assert r.status_code == 200, r.text
                return r.json()

            assert judge(1)["cached"] is False and judge(1)["cached"] is True
            port = redis.port
            redis.kill()
            assert judge(2)["cached"] is False  # still served
            assert judge(2)["cached"] is True  # from the in-process tier while Redis is down
            m = _metrics(base)
            assert sum(v for k, v in m.items() if k.startswith("rm_cache_errors_total")) >= 1
            assert m["rm_cache_requests_total{result=error}"] >= 1  # the fault is counted, not a plain miss
            redis = RedisProcess(port).start()
            shared = Redis.from_url(redis.url)
            deadline = time.monotonic() + 60  # hang guard: the circuit (1 s) closes and Redis is used again
            k = 3
            while not shared.dbsize():  # new verdicts reach Redis again, with no restart of ours
                judge(k)
                k += 1
                assert time.monotonic() < deadline, "Redis not used again after it came back"
                time.sleep(0.3)
    finally:
        redis.kill()


def test_hack_canary_runs_end_to_end_and_counts_outcomes(engine, pairs):
    """The canary is on by default; at every judgment here, each fresh ok verdict sends one canary pair through
    the real judge, and its outcome is counted (real / degenerate / tie / error), never dropped silently."""
    assert ServerSettings.model_fields["hack_probe_every"].default > 0
    app = build_app(_settings(hack_probe_every=1), engine=engine)
    with serve_app(app) as base:
        for pair in pairs[:2]:
            verdict = httpx.post(base + "/v1/judge", json=_body(pair, mode="fast", use_cache=False), timeout=300)
            assert verdict.json()["status"] == "ok"
        deadline = time.monotonic() + 600  # hang guard: the probes are real judgments in the background
        counted = 0.0
        while time.monotonic() < deadline:
            m = _metrics(base)
            counted = sum(v for k, v in m.items() if k.startswith("rm_hack_probes_total"))
            if counted >= 2:
                break
            time.sleep(0.5)
        assert counted >= 2, m
        assert m["rm_window_probes"] >= 1 and 0.0 <= m["rm_hack_probe_flip_ratio"] <= 1.0
