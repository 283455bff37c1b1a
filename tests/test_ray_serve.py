"""Scale-out: `her serve --replicas` on Ray Serve, and URL-list failover in the clients.

- Failover without Ray: the reward client and the `her eval` remote scorer given several URLs, over
  real HTTP (scripted fault servers; one dead port plus the suite's live `her serve`).
- Ray Serve: a local Ray head (`ray start --head --block`, loopback only), `her serve --replicas 2` on
  it (two vLLM replicas of the real app, shared Redis cache), a client at steady concurrency, one
  replica killed mid-run with `ray.kill`: every reward arrives exactly once and Serve brings the
  replica back.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from _fault_servers import fault_server
from _reliability import record_case
from _servers import free_port, serve_app
from fastapi import FastAPI, Request

from her_genrm import AFFINITY_HEADER
from policy_trainer import RewardClient

QUICK = {"max_backoff_s": 0.05, "retry_budget_s": 10.0, "judge_mode": "fast"}


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


def _items(n: int, tag: str) -> tuple[list[str], list[str], list[str]]:
    prompts = [f"User ({tag} #{i}): Good evening, sir. Will you dance?" for i in range(n)]
    completions = [f"<role_action>bows</role_action>With pleasure, madam ({i})." for i in range(n)]
    references = [f"I never dance, madam ({i})." for i in range(n)]
    return prompts, completions, references


# ---------------------------------------------------------------------- failover without Ray


def test_url_lists_are_parsed_and_checked():
    client = RewardClient(url=" http://a.test:1/ ,http://b.test:2,", judge_mode="fast")
    assert client.config.urls == ("http://a.test:1", "http://b.test:2")
    assert client.config.url == "http://a.test:1,http://b.test:2"  # what OpenRLHF passes, normalised
    assert RewardClient(url=["http://a.test:1/", "http://b.test:2"]).config.urls == client.config.urls
    with pytest.raises(ValueError, match="url='b.test:2' must be an http"):
        RewardClient(url="http://a.test:1,b.test:2")
    assert set(client.circuit_states) == {"http://a.test:1", "http://b.test:2"}


async def test_failover_answers_each_chunk_from_exactly_one_server():
    """A server answering 503 and a dead port: every chunk is judged once, by the healthy server."""
    with fault_server(reward=0.1) as broken, fault_server(reward=0.9) as healthy:
        broken.forever = ("status", 503)
        client = RewardClient(url=[broken.url, _dead_url(), healthy.url], chunk_size=1,
                              circuit_failure_threshold=3, circuit_reset_s=60, **QUICK)
        prompts, completions, references = _items(24, "failover")
        rewards = await client(prompts, completions, reference=references)
        assert rewards == [0.9] * 24  # all from the healthy server, none from the broken one
        judged = Counter(body["completions"][0] for body in healthy.bodies())
        assert sorted(judged) == sorted(completions) and set(judged.values()) == {1}  # once each
        assert client.stats.failovers >= 1 and client.stats.retries == 0  # no backoff was needed
        assert client.stats.http_errors["503"] >= 1 and client.stats.http_errors["connect"] >= 1
        # both bad URLs opened their circuits; the client as a whole still takes requests
        states = client.circuit_states
        assert states[healthy.url] == "closed" and list(states.values()).count("open") == 2
        assert client.circuit_state == "closed"
        hits = broken.hits
        assert await client(prompts[:4], completions[:4], reference=references[:4]) == [0.9] * 4
        assert broken.hits == hits  # an open circuit is skipped, not probed per request
        await client.aclose()


async def test_a_timed_out_server_is_never_read_twice():
    """A server slower than the client's timeout may still judge the chunk; only the next URL's answer
    counts, and nothing is sent again once that answer arrived."""
    with fault_server(reward=0.1) as slow, fault_server(reward=0.9) as fast:
        slow.forever = ("sleep", 600.0)  # never in time; the healthy server's answer must beat only 3 s
        client = RewardClient(url=[slow.url, fast.url], chunk_size=1, request_timeout_s=3.0, **QUICK)
        prompts, completions, references = _items(6, "timeout")
        rewards = await client(prompts, completions, reference=references)
        assert rewards == [0.9] * 6
        assert Counter(b["completions"][0] for b in fast.bodies()) == Counter(completions)
        assert client.stats.http_errors.get("timeout", 0) == slow.hits
        await client.aclose()


async def test_a_context_keeps_its_server_and_carries_its_affinity_key():
    with fault_server(reward=0.2) as a, fault_server(reward=0.8) as b:
        client = RewardClient(url=[a.url, b.url], chunk_size=1, **QUICK)
        prompts, completions, references = _items(16, "affinity")
        first = await client(prompts, completions, reference=references)
        again = await client(prompts, completions, reference=references)
        assert first == again and set(first) == {0.2, 0.8}  # spread over both; each context stays put
        await client.aclose()


    keys: list[str | None] = []
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {}

    @app.post("/v1/rewards")
    async def rewards(request: Request) -> dict:
        keys.append(request.headers.get(AFFINITY_HEADER))
        return {"rewards": [0.5] * len((await request.json())["completions"])}

    with serve_app(app) as url:
        client = RewardClient(url=url, chunk_size=1, **QUICK)
        prompts, completions, references = _items(3, "header")
        await client(prompts * 2, completions * 2, reference=references * 2)
        await client.aclose()
    assert len(keys) == 6 and all(keys) and len(set(keys)) == 3  # one key per context, the same each time


async def test_eval_remote_scorer_fails_over():
    from eval._remote import RemoteTranscriptScorer

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "down.test":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.host == "busy.test":
            return httpx.Response(503, json={"error": {"type": "not_ready", "message": "loading"}})
        return httpx.Response(200, json={"status": "ok", "average": 4.0, "actor_rounds": 1, "dimensions": []})

    scorer = RemoteTranscriptScorer("http://down.test,http://busy.test,http://up.test", attempts=1,
                                    transport=httpx.MockTransport(handler))
    assert scorer.base_urls == ["http://down.test", "http://busy.test", "http://up.test"]
    scores = [await scorer._post({"scene": {}, "transcript": []}) for _ in range(3)]
    assert [s.average for s in scores] == [4.0] * 3
    assert seen.count("up.test") == 3  # one answer per request, whichever URL it started at
    await scorer.aclose()


@pytest.mark.model
async def test_failover_from_a_dead_url_to_the_live_server(rm_server):
    dead = _dead_url()
    client = RewardClient(url=f"{dead},{rm_server.base_url}", chunk_size=1, request_timeout_s=300,
                          circuit_failure_threshold=2, circuit_reset_s=60, max_backoff_s=0.5,
                          retry_budget_s=300, judge_mode="fast")
    prompts, completions, references = _items(8, f"live-{os.getpid()}-{time.time_ns()}")
    rewards = await client(prompts, completions, reference=references)
    assert len(rewards) == 8 and all(r is not None and 0.0 <= r <= 1.0 for r in rewards), rewards
    assert client.stats.rewarded == 8 and client.stats.failed == 0
    assert client.stats.failovers >= 1 and client.stats.http_errors.get("connect", 0) >= 1
    assert client.circuit_states == {dead: "open", rm_server.base_url: "closed"}
    await client.aclose()


# ---------------------------------------------------------------------- Ray Serve

APP = "her-genrm"
CONCURRENCY = 4
# The kill and the stop follow events, not the clock: a replica is killed once this many rewards have
# arrived (traffic is flowing through both), and traffic stops once as many have arrived after Serve
# reported the replacement RUNNING. The deadline only catches a hang, whatever the machine's speed.
REWARDS_BEFORE_KILL = 2 * CONCURRENCY
REWARDS_AFTER_RECOVERY = 2 * CONCURRENCY
RUN_DEADLINE_S = 600.0

# Runs in a subprocess (a Ray driver of its own, so the test process never joins the cluster): list the
# replicas, or kill one and report when Serve has two RUNNING replicas again (JSON lines on stdout).
CONTROL = r"""
import json, sys, time
import ray
from rm_server._ray import replica_actor_names, running_replicas

address, app, action = sys.argv[1:4]
ray.init(address=address, log_to_driver=False)

def state():
    return {"names": replica_actor_names(app), "running": running_replicas(app), "t": time.time()}

if action == "status":
    print(json.dumps(state()), flush=True)
else:
    deadline = time.time() + float(sys.argv[4])
    victim = state()["names"][0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    print(json.dumps({"event": "killed", "victim": victim, "t": time.time()}), flush=True)
    while time.time() < deadline:
        now = state()
        if now["running"] == 2 and victim not in now["names"] and len(now["names"]) == 2:
            print(json.dumps({"event": "recovered", **now}), flush=True)
            break
        time.sleep(0.5)
ray.shutdown()
"""


def test_ray_settings_and_deployment_options(monkeypatch):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'ray[serve]'")
    from rm_server._ray import CONSISTENT_HASH_ROUTER, RaySettings, deployment_options, without_ray_env
    from rm_server._settings import ServerSettings

    monkeypatch.setenv("RM_RAY_MAX_REPLICAS", "4")
    monkeypatch.setenv("RM_RAY_TARGET_ONGOING_REQUESTS", "16")
    rs = RaySettings.load(replicas=2)  # a CLI flag next to env settings
    assert (rs.replicas, rs.max_replicas, rs.autoscaling) == (2, 4, True)
    with without_ray_env():  # ServerSettings refuses RM_ names it does not know
        settings = ServerSettings.load(engine="transformers")
    assert os.environ["RM_RAY_MAX_REPLICAS"] == "4"  # put back afterwards
    options = deployment_options(settings, rs)
    assert options["autoscaling_config"] == {
        "min_replicas": 2, "initial_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 16.0,
        "upscale_delay_s": 30.0, "downscale_delay_s": 300.0}
    assert "num_replicas" not in options and options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert options["request_router_config"].request_router_class == CONSISTENT_HASH_ROUTER
    fixed = deployment_options(settings, RaySettings(replicas=3, max_replicas=3, routing="power-of-two"))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed and "request_router_config" not in fixed
    with pytest.raises(ValueError, match="max_replicas=1 is below replicas=2"):
        RaySettings(replicas=2, max_replicas=1)


class RayHead:
    """`ray start --head --block` with its own temp dir and auth token; SIGTERM stops every process it
    started (the `--block` contract), so nothing else on the machine is touched."""

    def __init__(self, num_cpus: int = 2) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="her-ray-", dir="/tmp")
        token = Path(self.temp_dir) / "auth_token"
        token.write_text(os.urandom(32).hex())
        # Ray 2.60 turns token auth on by itself for local clusters; a driver given an explicit address
        # only uses it when told to, so every process of the test gets the same mode and token.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RM_", "RAY_"))}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
        ray_bin = str(Path(sys.executable).with_name("ray"))
        self.argv = [ray_bin, "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                     f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
                     f"--temp-dir={self.temp_dir}", f"--ray-client-server-port={free_port()}",
                     f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
        self.log = Path(self.temp_dir) / "head.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> RayHead:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while b"Ray runtime started" not in self.log.read_bytes():
            assert self.proc.poll() is None, f"ray start exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray head not up:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)
        return self

    def control(self, *args: str) -> list[str]:
        return [sys.executable, "-c", CONTROL, self.address, APP, *args]

    def status(self) -> dict:
        out = subprocess.run(self.control("status"), env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_serve_judge(redis_url):
    """Ray head + `her serve --replicas 2` on it (vLLM, 0.5 GiB KV cache each, shared Redis cache)."""
    from _openai_server import ServerProcess

    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'ray[serve]'")
    head = RayHead().start()
    port = free_port()
    env = dict(head.env, RM_KV_CACHE_GIB="0.5", RM_MAX_WAIT_MS="5", RM_REDIS_URL=redis_url,
               RM_RAY_HEALTH_CHECK_PERIOD_S="2")
    her = str(Path(sys.executable).with_name("her"))
    server = ServerProcess([her, "serve", "--port", str(port), "--replicas", "2", "--ray-address", head.address],
                           port, ready_path="/readyz", startup_timeout=400, env=env)
    started = time.monotonic()
    try:
        server.start()
        yield head, server, time.monotonic() - started
    finally:
        left = server.terminate_gracefully()
        head.stop()
        assert not left, f"`her serve --replicas` left processes behind after SIGTERM: {left}"


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.own_engine
async def test_killed_replica_loses_no_reward_and_comes_back(ray_serve_judge, unique):
    from rm_server._ray import REPLICA_HEADER

    head, server, startup_s = ray_serve_judge
    status = await asyncio.to_thread(head.status)
    assert len(status["names"]) == 2 and status["running"] == 2, status
    client = RewardClient(url=server.base_url, judge_mode="fast", chunk_size=1, request_timeout_s=120,
                          retry_budget_s=300, max_backoff_s=1.0, circuit_reset_s=2.0)
    received: list[tuple[int, float | None]] = []
    sent: list[int] = []
    stop = asyncio.Event()
    arrived = asyncio.Condition()
    next_id = iter(range(100_000))

    async def worker() -> None:
        while not stop.is_set():
            i = next(next_id)
            sent.append(i)
            p, c, r = _items(1, f"{unique}-{i}")
            [reward] = await client(p, c, reference=r)
            async with arrived:
                received.append((i, reward))
                arrived.notify_all()

    async def rewards_reach(n: int) -> None:
        async with arrived:
            await asyncio.wait_for(arrived.wait_for(lambda: len(received) >= n), timeout=RUN_DEADLINE_S)

    run_started = time.monotonic()
    workers = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
    await rewards_reach(REWARDS_BEFORE_KILL)
    before_kill = len(received)
    control = await asyncio.create_subprocess_exec(*head.control("kill", str(RUN_DEADLINE_S)), env=head.env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await control.communicate()
    events = {e["event"]: e for e in map(json.loads, out.decode().split("\n")[:-1])}
    await rewards_reach(len(received) + REWARDS_AFTER_RECOVERY)  # traffic on the replacement too
    stop.set()
    await asyncio.wait_for(asyncio.gather(*workers), timeout=RUN_DEADLINE_S)
    await client.aclose()

    counts = Counter(i for i, _ in received)
    lost = [i for i in sent if i not in counts]
    duplicated = [i for i, n in counts.items() if n > 1]
    failed = [i for i, r in received if r is None]
    recover_s = events["recovered"]["t"] - events["killed"]["t"] if "recovered" in events else float("nan")
    print(f"\nray serve: 2 replicas ready in {startup_s:.0f} s; sent {len(sent)}, rewards {len(received)} "
          f"({before_kill} before the kill), lost {len(lost)}, duplicated {len(duplicated)}, failed {len(failed)}, "
          f"retries {client.stats.retries}, http errors {client.stats.http_errors}; replica back "
          f"{recover_s:.0f} s after the kill; traffic ran {time.monotonic() - run_started:.0f} s")
    record_case(
        "7. Ray Serve replica killed mid-run", load={"concurrency": CONCURRENCY, "requests": len(sent),
                                                     "duration_s": round(time.monotonic() - run_started)},
        faults=f"ray.kill of one of 2 replicas after {before_kill} rewards",
        inputs="RewardClient (reference strategy, fast mode, one item a request) through Serve's proxy",
        sent=len(sent), answered=len(received),
        figures={"replicas ready s": round(startup_s), "replica back after kill s": round(recover_s),
                 "duplicated": len(duplicated), "null rewards": len(failed), "client retries": client.stats.retries})
    assert "killed" in events, err.decode()[-3000:]
    assert "recovered" in events, f"Serve did not bring the killed replica back: {err.decode()[-3000:]}"
    assert not lost and not duplicated and not failed, (lost, duplicated, failed)
    assert len(received) == len(sent) and before_kill >= REWARDS_BEFORE_KILL

    # Both replicas (the replacement too) answer from the shared Redis cache what the killed one judged,
    # and an affinity key keeps going to one replica.
    p, c, r = _items(1, f"{unique}-0")
    body = {"prompts": p, "completions": c, "references": r, "strategy": "reference", "mode": "fast"}

    def post(key: str) -> str:
        res = httpx.post(server.base_url + "/v1/rewards", json=body, timeout=60, headers={AFFINITY_HEADER: key})
        assert res.status_code == 200 and res.json()["details"][0]["cached"] >= 1, res.text
        return res.headers[REPLICA_HEADER]

    assert len({post(os.urandom(4).hex()) for _ in range(16)}) == 2  # random keys: both replicas answer
    for key in ("context-a", "context-b", "context-c"):
        assert len({post(key) for _ in range(3)}) == 1  # one key: one replica
