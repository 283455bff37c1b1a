"""Start and stop a real OpenAI-compatible server process for tests.

The server runs in its own process group on a free loopback port, with its output in a log
file; `start` waits (bounded) until the server answers, and `stop` ends the whole group
(SIGTERM, then SIGKILL), so no worker or child process outlives the test session.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

LLAMA_CPP_INSTALL_HINT = "pip install 'llama-cpp-python[server]'  (compiles llama.cpp; ~7 min on 2 cores)"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def llama_cpp_server_missing() -> str | None:
    """Why the llama-cpp-python server cannot run here, or None when it can."""
    for module in ("llama_cpp", "sse_starlette", "starlette_context"):
        if importlib.util.find_spec(module) is None:
            return f"module {module!r} missing: {LLAMA_CPP_INSTALL_HINT}"
    return None


class ServerProcess:
    """One server process; use as a context manager or call `start` / `stop`.

    `ready_path` is polled with GET until it answers 200 (or `startup_timeout` passes, or the
    process exits, which raises `RuntimeError` with the log's tail).
    """

    def __init__(
        self, argv: list[str], port: int, *, ready_path: str, startup_timeout: float = 180.0
    ) -> None:
        self.argv = argv
        self.port = port
        self.ready_path = ready_path
        self.startup_timeout = startup_timeout
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = Path(tempfile.mkstemp(prefix="openai-server-", suffix=".log")[1])
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
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

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the group is already gone


def llama_cpp_server(gguf: Path, *, n_ctx: int = 2048, threads: int = 1) -> ServerProcess:
    """llama-cpp-python's OpenAI server over one GGUF file (not started yet).

    One thread by default: on a shared 2-core machine llama.cpp's 2 threads wait on each other
    (measured: 32 tokens in 1 s with 1 thread, 4-50 s with 2 under load).
    """
    port = free_port()
    argv = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        "--n_threads", str(threads),
        "--n_threads_batch", str(threads),
    ]  # fmt: skip
    return ServerProcess(argv, port, ready_path="/v1/models")
