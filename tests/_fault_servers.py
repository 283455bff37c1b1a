"""A scripted stand-in for rm_server's `/v1/rewards`, to inject faults into the reward client.

Real HTTP (uvicorn in a thread via `_servers.serve_app`); only the judging is faked. Each request
takes the next action from `script`; an empty script answers normally. Actions:

    ("ok",)                    every item rewarded `reward` (a float, or a function of the completion)
    ("status", 503)            that HTTP status with our error envelope
    ("status", 429, "1")       ... plus a Retry-After header
    ("sleep", 3.0)             answer normally, but only after sleeping (client-side timeouts); a sleep
                               still going when the server shuts down ends then, so a long one costs nothing
    ("item_error", {1})        items at those positions get status "error" and reward None

Independently of the script, a request holding a completion that contains `refuse_marker`
answers 422 (an input the server refuses: lets tests check that one bad rollout fails alone).
Every request is recorded in `arrivals` as (monotonic time, body) before its action runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from _servers import serve_app
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class FaultServer:
    def __init__(
        self, *, reward: float | Callable[[str], float] = 0.75, refuse_marker: str = "REFUSE-ME"
    ) -> None:
        self.reward = reward
        self.refuse_marker = refuse_marker
        self.script: deque[tuple] = deque()
        self.forever: tuple | None = None  # when set, every request gets this action (after the script)
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()  # set at shutdown: ends ("sleep", s) actions still running
        self.url = ""

    @property
    def hits(self) -> int:
        with self._lock:
            return len(self.arrivals)

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [body for _, body in self.arrivals]

    def _next_action(self) -> tuple:
        with self._lock:
            if self.script:
                return self.script.popleft()
            return self.forever or ("ok",)

    def _ok(self, body: dict[str, Any], failing: set[int] = frozenset()) -> JSONResponse:  # type: ignore[assignment]
        completions = body.get("completions", [])
        rewards, status, details = [], [], []
        for i, completion in enumerate(completions):
            if i in failing:
                rewards.append(None)
                status.append("error")
                details.append({"status": "error", "error": f"injected judge failure on item {i}"})
            else:
                rewards.append(self.reward(completion) if callable(self.reward) else self.reward)
                status.append("ok")
                details.append({"status": "ok", "verdicts": ["a"]})
        return JSONResponse({"rewards": rewards, "status": status, "details": details})

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/healthz")
        async def healthz() -> dict[str, str]:
            return {"status": "ok"}

        @app.post("/v1/rewards")
        async def rewards(request: Request) -> JSONResponse:
            body = await request.json()
            with self._lock:
                self.arrivals.append((time.monotonic(), body))
            if any(self.refuse_marker in c for c in body.get("completions", [])):
                return _error(422, "input_too_large", "a completion exceeds the configured limit")
            action = self._next_action()
            kind = action[0]
            if kind == "status":
                headers = {"Retry-After": action[2]} if len(action) > 2 else None
                return _error(action[1], "injected", f"injected HTTP {action[1]}", headers)
            if kind == "sleep":
                deadline = time.monotonic() + action[1]
                while not self._closing.is_set() and (left := deadline - time.monotonic()) > 0:
                    await asyncio.sleep(min(left, 0.05))
                return self._ok(body)
            if kind == "item_error":
                return self._ok(body, set(action[1]))
            return self._ok(body)

        return app


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": kind, "message": message, "details": None}}, status_code=status, headers=headers
    )


@contextmanager
def fault_server(**kwargs: Any) -> Iterator[FaultServer]:
    """A running `FaultServer` (its base URL in `.url`)."""
    server = FaultServer(**kwargs)
    with serve_app(server.app()) as url:
        server.url = url
        try:
            yield server
        finally:
            server._closing.set()  # before uvicorn's shutdown, which waits for running handlers
