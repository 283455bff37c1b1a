"""Real servers for tests: the app under uvicorn on a free loopback port, and private redis-servers."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import httpx
import uvicorn

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_app(app, *, ready_path: str = "/healthz", timeout: float = 300.0) -> Iterator[str]:
    """Run `app` with uvicorn in a thread (real sockets, real HTTP); yields its base URL. `timeout` only
    catches an app that never comes up (its startup may build a judge on a slow, busy machine)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if server.started and httpx.get(base + ready_path, timeout=2).status_code < 500:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"app did not become ready on {base}{ready_path}")
        time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class RedisProcess:
    """A private redis-server on its own port (so tests may kill it; the shared one is never touched)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60  # readiness wait: a process start on a busy machine, not a bound
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


def wait_for(condition: Callable[[], T], what: str, timeout: float = 600.0, every_s: float = 0.05, *,
             ignore: tuple[type[BaseException], ...] = (), detail: Callable[[], str] = str) -> T:
    """Poll `condition` until it returns something true, and return that; the deadline only catches a hang
    (AssertionError naming `what`, then `detail()`). Exceptions in `ignore` count as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = condition()
            if found:
                return found
        except ignore:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen in {timeout:g} s\n{detail()}".rstrip())
        time.sleep(every_s)
