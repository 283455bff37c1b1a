"""Health that tells the truth: a failed model load and an engine that dies show on /healthz, /readyz and
/metrics, and with RM_EXIT_ON_ENGINE_FAILURE the process exits non-zero (real `her serve` processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from _openai_server import ServerProcess, free_port, group_members
from _servers import wait_for

HER = str(Path(sys.executable).with_name("her"))
MISSING_MODEL = "/nonexistent/her-judge"
PAIR = {"context": "User: Hello!", "a": "Hi there.", "b": ":", "mode": "fast"}
# Hang guards only: a `her serve` start, a model load and a judgment may each take minutes on a slow, busy box.
START_S = 600.0
CALL_S = 600.0


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RM_")}
    env.update(extra)
    return env


def _metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not on /metrics")


def _wait_for_state(base: str, state: str, proc: subprocess.Popen | None = None, timeout: float = START_S) -> dict:
    def reached() -> dict | None:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before reaching {state!r}")
        body = httpx.get(base + "/readyz", timeout=5).json()
        return body if body.get("state") == state else None

    return wait_for(reached, f"/readyz reporting {state!r}", timeout, every_s=0.3, ignore=(httpx.HTTPError,))


def test_failed_model_load_is_reported_not_healthy(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([HER, "serve", "--port", str(port), "--engine", "transformers", "--model", MISSING_MODEL],
                            stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        ready = _wait_for_state(base, "failed", proc)
        assert ready["status"] == "not_ready" and ready["model_loaded"] is False
        assert MISSING_MODEL in ready["error"]
        assert httpx.get(base + "/readyz").status_code == 503
        health = httpx.get(base + "/healthz")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert MISSING_MODEL in health.json()["error"]
        judged = httpx.post(base + "/v1/judge", json=PAIR)
        assert judged.status_code == 503 and judged.json()["error"]["type"] == "engine_unavailable"
        assert _metric(base, "rm_ready") == 0.0
        assert proc.poll() is None  # not configured to exit: it stays up to say what went wrong
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def test_failed_model_load_exits_non_zero_when_configured(tmp_path):
    port = free_port()
    proc = subprocess.run([HER, "serve", "--port", str(port), "--engine", "transformers", "--model", MISSING_MODEL],
                          capture_output=True, text=True, timeout=START_S,
                          env=_env(RM_EXIT_ON_ENGINE_FAILURE="true"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "exiting with status 1" in proc.stderr and MISSING_MODEL in proc.stderr


@pytest.mark.model
@pytest.mark.own_engine
def test_engine_death_at_run_time_turns_readiness_off():
    """Kill vLLM's engine core under a serving `her serve`: readiness and liveness turn 503 with the
    reason, judging answers 503, and the server still shuts down cleanly."""
    port = free_port()
    server = ServerProcess([HER, "serve", "--port", str(port)], port, ready_path="/readyz", startup_timeout=START_S,
                           env=_env(RM_KV_CACHE_GIB="0.5"))
    server.start()
    base = server.base_url
    try:
        assert httpx.post(base + "/v1/judge", json=PAIR, timeout=CALL_S).json()["status"] == "ok"
        assert _metric(base, "rm_ready") == 1.0
        cores = [pid for pid, cmd in group_members(server._proc.pid).items()
                 if pid != server._proc.pid and "EngineCor" in _comm(pid)]
        assert cores, f"no vLLM engine core process in {group_members(server._proc.pid)}"
        for pid in cores:
            os.kill(pid, signal.SIGKILL)
        ready = _wait_for_state(base, "failed", timeout=300)
        assert "died" in ready["error"]
        assert httpx.get(base + "/readyz").status_code == 503
        assert httpx.get(base + "/healthz").status_code == 503
        judged = httpx.post(base + "/v1/judge", json={**PAIR, "a": "Hi again."}, timeout=CALL_S)
        assert judged.status_code == 503, judged.text
        assert _metric(base, "rm_ready") == 0.0
    finally:
        left = server.terminate_gracefully()
    assert not left, f"processes left behind: {left}"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
