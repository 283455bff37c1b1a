"""Session-wide fixtures: the real bundled model on vLLM loaded once, the fixture scene, real Redis.

At the end of the session no vLLM process (``VLLM::EngineCore``, ``VLLM::Worker``, an OpenAI server)
that the suite started may remain; `pytest_sessionfinish` fails the run if one does.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import pytest

# Under pytest-xdist (`make test`: two workers on two cores) every process computes on one thread, and vLLM
# does not pin its engines: its default binds each engine's compute thread to core 0, so the engines of
# both workers (and two Ray replicas) would share one core while the other idles. Set before torch loads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

# The reliability suite's option (--reliability-long) and its report writer (results/reliability/).
pytest_plugins = ["_reliability"]

# A copy of the real CoSER sample from shared/fixtures, unchanged, so the suite is self-contained.
FIXTURES = Path(__file__).resolve().parent / "data"
SCENE_FILE = FIXTURES / "coser_test_sample_pride_and_prejudice.json"
REDIS_URL = os.environ.get("HER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def scene_file() -> Path:
    return SCENE_FILE


@pytest.fixture(scope="session")
def scene_dict() -> dict:
    return json.loads(SCENE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def scene():
    from her_roleplay import load_scenes

    return load_scenes(SCENE_FILE)[0]


# The test machine runs several vLLM engines at once (two xdist workers' session engines, a `her serve`,
# Ray replicas or an OpenAI server): a small KV cache each keeps the suite's memory inside 24 GiB.
TEST_KV_CACHE_GIB = 0.5  # ~11k fp32 tokens of this model: more than a 4096-token request needs


@pytest.fixture(scope="session")
def engine():
    """The real SmolLM2-135M-Instruct on vLLM (the default engine), loaded once per session."""
    from her_engines import create_engine

    eng = create_engine("vllm", kv_cache_gib=TEST_KV_CACHE_GIB)
    yield eng
    asyncio.run(eng.aclose())


@pytest.fixture(scope="session")
def rm_server():
    """One real `her serve` subprocess for the suite: the default engine (vLLM) on the bundled model,
    in-process verdict cache, no auth, short batching wait. Tests may stop and start it again.

    At the end it gets SIGTERM alone, as an orchestrator sends it; any process of its group left
    behind (a vLLM engine core or worker) fails the teardown."""
    from _openai_server import ServerProcess, free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RM_")}
    env.update(RM_KV_CACHE_GIB=str(TEST_KV_CACHE_GIB), RM_MAX_WAIT_MS="5")
    her = str(Path(sys.executable).with_name("her"))
    server = ServerProcess([her, "serve", "--port", str(port)], port, ready_path="/readyz",
                           startup_timeout=600, env=env)
    server.start()
    yield server
    left = server.terminate_gracefully()
    assert not left, f"`her serve` left processes behind after SIGTERM: {left}"


@pytest.fixture(scope="session")
def transformers_engine():
    """The same model on the transformers fallback engine."""
    from her_engines import create_engine

    return create_engine("transformers")


@pytest.fixture(scope="session")
def genrm(engine):
    from her_genrm import GenRM

    return GenRM(engine)


@pytest.fixture
def redis_url() -> str:
    """The machine's shared Redis (never flushed or stopped by tests)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:  # make test starts it; say so instead of failing obscurely
        pytest.fail(f"Redis at {REDIS_URL} is not answering ({exc}); `make redis` starts it")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


# --------------------------------------------------------------------------- two workers (pytest-xdist)

# `make test` runs two xdist workers (`--dist loadgroup`), and the suite's tests that need a model form two chains,
# one per worker (xdist sends the two largest groups to different workers first): tests on the suite's `her serve`
# in one, tests on the in-process engine in the other, so each session model is loaded once. Tests that start
# engines of their own (`own_engine`: a vLLM server, Ray replicas, a `her` command with a model) join one chain
# or the other, so at most one such set of engines runs per worker, beside its session one (24 GiB). Which chain:
# by module, to even out the two (measured per-test times on a 2-core AVX2 box, `--durations`). The rest go
# wherever a worker is free. The reliability report gathers the rows of both workers (tests/_reliability.py).
SERVE_GROUP, ENGINE_GROUP = "her-serve", "engine"
OWN_ENGINE_FIXTURES = {"vllm_server", "ray_serve_judge"}
# Ray (two replicas), vLLM's OpenAI server, `make bench`; every other own-engine test joins the engine chain.
OWN_ENGINE_BESIDE_SERVE = {"test_ray_serve.py", "test_engine_openai.py", "test_readme.py"}


def worker_group(item: pytest.Item) -> str | None:
    names = set(getattr(item, "fixturenames", ()))
    if "rm_server" in names:
        return SERVE_GROUP
    if item.get_closest_marker("own_engine") or names & OWN_ENGINE_FIXTURES:
        return SERVE_GROUP if item.path.name in OWN_ENGINE_BESIDE_SERVE else ENGINE_GROUP
    if names & {"engine", "genrm"}:
        return ENGINE_GROUP
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = worker_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


class _GroupsTookEffect:
    """xdist's loadgroup works by suffixing node ids with "@group"; where a pytest release stops it from doing so,
    every test is scheduled alone (each worker then loads every session engine): stop instead of running so."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        ungrouped = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if ungrouped:
            raise pytest.UsageError(f"pytest-xdist did not group {len(ungrouped)} tests (e.g. {ungrouped[0]}): "
                                    "this pytest and pytest-xdist do not work together (pyproject.toml pins them)")


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") and config.getvalue("loadgroup"):
        config.pluginmanager.register(_GroupsTookEffect(), "her-groups-took-effect")


# --------------------------------------------------------------------------- no orphaned vLLM process

_VLLM_MARKERS = ("VLLM::", "vllm.entrypoints")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _boot_ticks_now() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * _CLOCK_TICKS)


# vLLM renames its processes (setproctitle), which also overwrites what /proc shows of their environment,
# so "ours" means: started after this session began (nothing else starts vLLM here during a test run).
_SESSION_STARTED = _boot_ticks_now()


def vllm_processes() -> dict[int, str]:
    """pid -> command line of every vLLM engine, worker or server process started during this session."""
    from _openai_server import live_processes

    return {p.pid: p.cmdline for p in live_processes()
            if p.start_ticks >= _SESSION_STARTED and any(m in p.cmdline or m in p.name for m in _VLLM_MARKERS)}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import time

    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the other worker's engines are alive; the controller checks after both ended

    deadline = time.monotonic() + 60  # engine processes exit a moment after their shutdown returns (hang bound)
    while True:
        left = vllm_processes()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if left:
        lines = "\n".join(f"  {pid}: {cmd[:160]}" for pid, cmd in sorted(left.items()))
        session.config.get_terminal_writer().line(f"vLLM processes outlived the test session:\n{lines}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
