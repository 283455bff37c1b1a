"""Bookkeeping of the reliability suite (tests/test_reliability.py): load runs, waits for events, memory
sampling, and the rows of the reliability report.

Any test may add a row with `record_case(...)` (tests/test_ray_serve.py adds "replica killed mid-run").
The table is written at the end of a session that ran the reliability suite (its session fixture calls
`write_report`), or of any session that recorded a row when this module is loaded as a plugin
(`pytest_plugins = ["_reliability"]` in conftest.py, which also adds the `--reliability-long` flag).

Where: `results/reliability/reliability.md` and `reliability_soak.png` under the repo root (git-ignored), so
a test run leaves the work tree clean. The committed copy in docs/ is refreshed only on purpose, by naming
another directory in HER_RELIABILITY_REPORT_DIR (relative to the repo root):
`HER_RELIABILITY_REPORT_DIR=docs pytest tests/test_reliability.py` rewrites docs/reliability.md. A partial
run merges its rows into the earlier ones of the file it writes.

No assertion may depend on how fast the machine is (CPUs differ by 1.5x and more, and the suite must pass
while another process keeps a core busy): cases wait for events (`wait_until`, `run_load(min_answered=...)`)
under deadlines that only a hang reaches, never for a fixed time followed by a check of how far things got.

"Lost" is always: requests sent minus answers received with a definite HTTP status. A connection that
broke, a read that timed out on the client side, anything that leaves the caller not knowing what
happened, is lost. Every case must keep it at 0.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import json
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT_DIR_ENV = "HER_RELIABILITY_REPORT_DIR"
DEFAULT_REPORT_DIR = ROOT / "results" / "reliability"
REPORT_NAME = "reliability.md"
SOAK_PLOT_NAME = "reliability_soak.png"
LONG_ENV = "HER_RELIABILITY_LONG"
LONG_FLAG = "--reliability-long"
_ROWS_MARK = "reliability-rows"
_ROWS_KEY = "reliability_rows"  # a worker's rows in pytest-xdist's workeroutput
SUITE_MODULE = "tests/test_reliability.py"

# ----------------------------------------------------------------------------------------- where


def report_dir() -> Path:
    """results/reliability/ under the repo root, or HER_RELIABILITY_REPORT_DIR (a relative one is taken from the
    repo root, so `HER_RELIABILITY_REPORT_DIR=docs` means the committed docs/ wherever pytest runs from)."""
    value = os.environ.get(REPORT_DIR_ENV, "").strip()
    if not value:
        return DEFAULT_REPORT_DIR
    path = Path(value).expanduser()
    return path if path.is_absolute() else ROOT / path


def report_path() -> Path:
    return report_dir() / REPORT_NAME


def soak_plot_path() -> Path:
    return report_dir() / SOAK_PLOT_NAME


# ----------------------------------------------------------------------------------------- sizes


def long_mode(config: Any = None) -> bool:
    """True with `--reliability-long` (when the flag is registered) or HER_RELIABILITY_LONG=1."""
    if os.environ.get(LONG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    if config is not None:
        try:
            return bool(config.getoption(LONG_FLAG))
        except ValueError:  # the flag is not registered (conftest does not load this module as a plugin)
            return False
    return False


def pytest_addoption(parser: Any) -> None:
    """Registered when conftest.py has `pytest_plugins = ["_reliability"]`."""
    parser.addoption(LONG_FLAG, action="store_true", default=False,
                     help=f"reliability suite: longer soak and bigger bursts (same as {LONG_ENV}=1)")


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """As a plugin: write the report of a session that ran the suite or recorded a row (any test may).

    Under pytest-xdist a worker hands its rows to the controller (`pytest_testnodedown`), which writes
    the one report once every worker is done: the rows of all workers, and the outcomes of all tests."""
    config = session.config
    if hasattr(config, "workerinput"):
        config.workeroutput[_ROWS_KEY] = json.dumps({"rows": [asdict(r) for r in ROWS.values()],
                                                     "soak": _SOAK.get("curve")})
        return
    outcomes = {_plain(k): v for k, v in outcomes_of(config).items()}
    ran_suite = any(nodeid.startswith(SUITE_MODULE) for nodeid in outcomes)
    if not (ROWS or ran_suite) or _WRITTEN:
        return
    measured = {row.test for row in ROWS.values()}
    for nodeid, outcome in outcomes.items():  # a case that failed before it could measure still gets its row
        if nodeid.startswith(SUITE_MODULE) and nodeid not in measured and outcome != "passed":
            ROWS[nodeid] = Row(name=nodeid.split("::", 1)[1], load={}, faults="—", inputs="—", sent=0, answered=0,
                               test=nodeid, result=outcome, figures={"note": "no measurement (failed before it)"})
    # A run of the whole suite module replaces all of its rows; a partial one (-k, -m, a node id) keeps the
    # other cases' earlier rows of that file.
    whole = ran_suite and not config.getoption("keyword") and not config.getoption("markexpr") and not any(
        SUITE_MODULE in str(a) and "::" in str(a) for a in config.args)
    write_report(outcomes, replace_module=SUITE_MODULE if whole else None, long=long_mode(config))


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: on the controller, as each worker ends
def pytest_testnodedown(node: Any, error: Any) -> None:
    data = json.loads(getattr(node, "workeroutput", {}).get(_ROWS_KEY, "null") or "null")
    if not data:
        return
    for raw in data["rows"]:
        ROWS[raw["name"]] = Row(**raw)
    if data["soak"] is not None:
        _SOAK["curve"] = data["soak"]


def _plain(nodeid: str) -> str:
    """A node id without the `@group` suffix pytest-xdist's loadgroup adds."""
    head, at, group = nodeid.rpartition("@")
    return head if at and "]" not in group and "::" not in group else nodeid


# ----------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    name: str
    load: dict[str, Any]
    faults: str
    inputs: str
    sent: int
    answered: int
    figures: dict[str, Any] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    test: str = ""
    measured: str = ""
    result: str = ""

    @property
    def lost(self) -> int:
        return self.sent - self.answered


ROWS: dict[str, Row] = {}
_WRITTEN = False


def record_case(
    name: str,
    *,
    load: dict[str, Any],
    faults: str,
    inputs: str,
    sent: int,
    answered: int,
    figures: dict[str, Any] | None = None,
    statuses: dict[Any, int] | None = None,
) -> Row:
    """Add (or replace) the row `name` of the reliability report (`report_path()`).

    load: what was held, e.g. {"concurrency": 4, "requests": 200, "duration_s": 60}.
    faults: what was injected ("none", "redis-server SIGKILL at 3 s, restarted at 8 s", ...).
    inputs: what was sent ("/v1/judge fast, use_cache=false, 16 fixture pairs").
    sent / answered: requests sent and answers received with a definite HTTP status (lost = the difference).
    figures: the case's key numbers, name -> value (floats are rounded in the table).
    statuses: HTTP status -> count, when the case has a status mix worth showing.
    Record before asserting, so that a failing case still shows what it measured.
    """
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    row = Row(
        name=name, load=dict(load), faults=faults, inputs=inputs, sent=int(sent), answered=int(answered),
        figures=dict(figures or {}), statuses={str(k): int(v) for k, v in sorted((statuses or {}).items(),
                                                                                key=lambda kv: str(kv[0]))},
        test=_plain(current.rsplit(" (", 1)[0]), measured=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    ROWS[name] = row
    return row


def outcomes_of(config: Any) -> dict[str, str]:
    """node id -> passed/failed/skipped of the tests reported so far in this session."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    out: dict[str, str] = {}
    if reporter is None:
        return out
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in reporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", None)
            if not nodeid:
                continue
            when = getattr(report, "when", "call")
            if outcome == "passed" and when != "call":
                continue
            if out.get(nodeid) in ("failed", "error"):
                continue
            out[nodeid] = "failed" if outcome == "error" else outcome
    return out


# ----------------------------------------------------------------------------------------- load


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    data = sorted(values)
    if not data:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(data)))
    return data[min(rank, len(data)) - 1]


@dataclass
class Load:
    """What a load run sent and got back. While a run goes on, `received` counts the answers so far; `answered`
    (sent minus lost) also counts the requests still in flight, so it is the final figure only once all came back."""

    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    latencies: dict[int, list[float]] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    error_types: Counter = field(default_factory=Counter)  # (status, error.type) of non-200 answers
    samples: dict[int, list[str]] = field(default_factory=dict)  # a few bodies of each non-200 status
    missing_retry_after: int = 0  # 429s without a usable Retry-After
    retry_after: list[int] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)  # time.monotonic() of each answer, in arrival order
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0

    @property
    def answered(self) -> int:
        return self.sent - len(self.lost)

    @property
    def received(self) -> int:
        """Answers received so far with a definite HTTP status (requests in flight not counted)."""
        return sum(self.statuses.values())

    def server_errors(self) -> dict[int, int]:
        return {s: n for s, n in self.statuses.items() if s >= 500}

    def add(self, response: httpx.Response, seconds: float) -> None:
        status = response.status_code
        self.statuses[status] += 1
        self.latencies.setdefault(status, []).append(seconds)
        self.answered_at.append(time.monotonic())
        if status == 200:
            return
        kind = ""
        try:
            kind = response.json()["error"]["type"]
        except Exception:  # noqa: BLE001 - a body that is not our error envelope is itself worth showing
            kind = "<not an error envelope>"
        self.error_types[(status, kind)] += 1
        kept = self.samples.setdefault(status, [])
        if len(kept) < 3:
            kept.append(response.text[:400])
        if status == 429:
            value = response.headers.get("Retry-After", "")
            if value.isdigit() and int(value) >= 1:
                self.retry_after.append(int(value))
            else:
                self.missing_retry_after += 1

    def add_lost(self, exc: BaseException) -> None:
        self.lost.append(f"{type(exc).__name__}: {exc}"[:300])

    def merge(self, other: Load) -> Load:
        self.sent += other.sent
        self.statuses.update(other.statuses)
        for status, values in other.latencies.items():
            self.latencies.setdefault(status, []).extend(values)
        self.lost.extend(other.lost)
        self.error_types.update(other.error_types)
        for status, bodies in other.samples.items():
            self.samples.setdefault(status, []).extend(bodies[: max(0, 3 - len(self.samples.get(status, [])))])
        self.missing_retry_after += other.missing_retry_after
        self.retry_after.extend(other.retry_after)
        self.answered_at = sorted(self.answered_at + other.answered_at)
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        return self

    def p(self, q: float, status: int = 200) -> float:
        return percentile(self.latencies.get(status, []), q)

    def share(self, status: int) -> float:
        return self.statuses.get(status, 0) / self.answered if self.answered else math.nan

    def describe(self) -> str:
        """For assertion messages: the status mix, error types, a few bodies and the lost requests."""
        return (f"statuses={dict(self.statuses)} error_types={dict(self.error_types)} "
                f"samples={self.samples} lost={self.lost[:5]}")


async def send(client: httpx.AsyncClient, load: Load, method: str, url: str, **kwargs: Any) -> httpx.Response | None:
    """One request, counted in `load` (its answer, or as lost)."""
    load.sent += 1
    began = time.perf_counter()
    try:
        response = await client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        load.add_lost(exc)
        return None
    load.add(response, time.perf_counter() - began)
    return response


async def run_load(
    base: str,
    body: Callable[[int], dict[str, Any]],
    *,
    concurrency: int,
    duration_s: float | None = None,
    min_answered: int | None = None,
    requests: int | None = None,
    give_up_s: float | None = None,
    path: str = "/v1/judge",
    headers: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    pause_after_refusal_s: float = 0.05,
    stop: threading.Event | None = None,
    load: Load | None = None,
) -> Load:
    """`concurrency` closed-loop clients posting `body(i)` to `path`. They send no new request once `stop` is
    set, once `requests` were sent, or once both `duration_s` passed and `min_answered` answers came back
    (either alone when the other is not given), so that a slow machine runs longer instead of doing less;
    and in any case after `give_up_s` (default with `min_answered`: `duration_s` + 600 s), a bound that
    only a hung server reaches: the caller asserts on what it needs (e.g. `load.answered >= min_answered`).
    Requests in flight then finish (each within `timeout_s`, else it counts as lost).

    A client that got a 429 waits `pause_after_refusal_s` before its next request (no busy loop on a 2-core
    machine; it does not honour Retry-After: that is the point). `load`: a fresh `Load` to fill in place, for a
    caller that watches the run while it goes on (`load.received`); it is also returned."""
    if duration_s is None and min_answered is None and requests is None and stop is None:
        raise ValueError("give duration_s, min_answered, requests or stop")
    load = load if load is not None else Load()
    load.started = time.monotonic()
    deadline = None if duration_s is None else load.started + duration_s
    if give_up_s is None and min_answered is not None:
        give_up_s = (duration_s or 0.0) + 600.0
    give_up = None if give_up_s is None else load.started + give_up_s
    timed = duration_s is not None or min_answered is not None
    counter = iter(range(10**9))

    def more() -> int | None:
        now = time.monotonic()
        if stop is not None and stop.is_set():
            return None
        if give_up is not None and now >= give_up:
            return None
        if timed and (deadline is None or now >= deadline) and load.received >= (min_answered or 0):
            return None
        i = next(counter)
        if requests is not None and i >= requests:
            return None
        return i

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s, limits=limits, headers=headers) as client:

        async def worker() -> None:
            while (i := more()) is not None:
                response = await send(client, load, "POST", path, json=body(i))
                if response is not None and response.status_code == 429:
                    await asyncio.sleep(pause_after_refusal_s)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    load.elapsed_s = time.monotonic() - load.started
    return load


async def wait_until(check: Callable[[], Any], *, timeout_s: float, every_s: float = 0.2) -> bool:
    """Poll `check()` every `every_s` seconds until it returns something true (-> True), or `timeout_s` passed
    (-> False; a bound for hangs only: the caller records what it saw and asserts). `check` may be a coroutine
    function; one that blocks (HTTP, Redis) should wrap its work in `asyncio.to_thread`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every_s)


async def burst(base: str, bodies: list[dict[str, Any]], *, path: str = "/v1/judge",
                headers: dict[str, str] | None = None, timeout_s: float = 120.0) -> Load:
    """All `bodies` at once, each on its own connection."""
    load = Load()
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s, limits=limits, headers=headers) as client:
        await asyncio.gather(*(send(client, load, "POST", path, json=b) for b in bodies))
    load.elapsed_s = time.monotonic() - load.started
    return load


def metrics(base: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """The server's /metrics as {'name{label=value,...}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", headers=headers or {}, timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# ----------------------------------------------------------------------------------------- memory

MIB = 1024 * 1024


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a process (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return 0  # a zombie has no VmRSS line


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, grandchildren, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class RssSample:
    t: float  # seconds since sampling began
    main: int  # bytes, the watched process
    children: int  # bytes, all its descendants together (vLLM's engine core)


class RssSampler:
    """Samples the RSS of `pid` and of its descendants every `interval_s` in a thread."""

    def __init__(self, pid: int, interval_s: float = 1.0) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[RssSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.t0 = 0.0  # time.monotonic() when sampling began: a sample's t is seconds since then

    def __enter__(self) -> RssSampler:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sample()

    def _sample(self) -> None:
        main = rss_bytes(self.pid)
        if main is None:
            return
        kids = sum(rss_bytes(c) or 0 for c in descendants(self.pid))
        self.samples.append(RssSample(time.monotonic() - self.t0, main, kids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)


def plot_soak(samples: list[RssSample], warmup_s: float, bound_mib: float, path: Path | None = None) -> Path:
    """The soak's RSS curves as a small PNG (default: `soak_plot_path()`, next to the report): the API process
    (with its bound) above, the engine core below."""
    path = path or soak_plot_path()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in samples]
    main = [s.main / MIB for s in samples]
    kids = [s.children / MIB for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 4.2), dpi=100)
    top.plot(t, main, color="tab:blue", label="her serve API process")
    base = next((s.main / MIB for s in samples if s.t >= warmup_s), main[0] if main else 0.0)
    top.axhline(base + bound_mib, color="tab:red", linestyle="--", label=f"bound: after warm-up + {bound_mib:g} MiB")
    top.set_ylim(min(main) - 8, base + bound_mib + 8)
    top.set_ylabel("RSS (MiB)")
    top.set_title("Soak: RSS under steady /v1/judge load (sampled 1/s)", fontsize=9)
    bottom.plot(t, kids, color="tab:orange", label="vLLM engine core (children: weights + KV cache)")
    bottom.set_ylabel("RSS (MiB)")
    bottom.set_xlabel("seconds under load")
    for ax in (top, bottom):
        ax.axvline(warmup_s, color="grey", linestyle=":", label="end of warm-up")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- report


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _natural(name: str) -> list[Any]:
    """Sort key: "2a. ..." before "10. ..."."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _load_cell(load: dict[str, Any]) -> str:
    names = {"concurrency": "concurrency", "requests": "requests", "duration_s": "duration"}
    parts = []
    for key, value in load.items():
        label = names.get(key, key)
        parts.append(f"{label} {_fmt(value)}{' s' if key.endswith('_s') else ''}")
    return ", ".join(parts)


def _previous(path: Path) -> tuple[dict[str, Row], dict[str, Any] | None]:
    """The rows and soak curve stored in an earlier report (its trailing comment)."""
    if not path.exists():
        return {}, None
    match = re.search(rf"<!-- {_ROWS_MARK}\n(.*?)\n-->", path.read_text(encoding="utf-8"), re.S)
    if not match:
        return {}, None
    try:
        data = json.loads(match.group(1))
        return {r["name"]: Row(**r) for r in data["rows"]}, data.get("soak")
    except (ValueError, TypeError, KeyError):
        return {}, None


def write_report(outcomes: dict[str, str] | None = None, *, path: Path | None = None,
                 replace_module: str | None = None, long: bool = False, soak: dict[str, Any] | None = None) -> Path:
    """Write the report (default: `report_path()`, i.e. results/reliability/reliability.md, or the one in
    HER_RELIABILITY_REPORT_DIR) from this session's rows.

    Rows of an earlier run stored in that same file are kept (marked with their date) for cases this session
    did not measure, except those of `replace_module` (a complete run of that module replaces all its rows)."""
    global _WRITTEN
    _WRITTEN = True
    path = path or report_path()
    outcomes = outcomes or {}
    for row in ROWS.values():
        row.result = outcomes.get(row.test, row.result or "recorded")
    rows = dict(ROWS)
    carried = []
    old_rows, old_soak = _previous(path)
    for name, old in old_rows.items():
        if name in rows:
            continue
        if replace_module and old.test.startswith(replace_module):
            continue
        rows[name] = old
        carried.append(name)
    soak = soak if soak is not None else _SOAK.get("curve")
    soak_note = ""
    if soak is None and old_soak is not None and not (replace_module and replace_module.startswith(_SOAK_TEST)):
        soak, soak_note = old_soak, f"(Earlier run, {old_soak.get('measured', '?')}.) "
    lines = [
        "# Reliability",
        "",
        "Measured by `tests/test_reliability.py` (plus rows other tests add with `record_case`, e.g.",
        "`tests/test_ray_serve.py`). Every run of the test suite writes this report to `results/reliability/`",
        "(git-ignored); the copy in `docs/` is refreshed on purpose with `HER_RELIABILITY_REPORT_DIR=docs`.",
        "Generated: do not edit it by hand.",
        f"Run: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"{'long sizes (--reliability-long / HER_RELIABILITY_LONG=1)' if long else 'default (CI) sizes'}, "
        f"{os.cpu_count()} CPU cores, loopback only, the real bundled model on vLLM.",
        "",
        "**Lost** = requests sent − answers received with a definite HTTP status (a broken connection or a",
        "client-side timeout counts as lost). Every case requires 0.",
        "",
        "| Case | Result | Load held | Faults injected | Inputs tried | Sent | Answered | Lost | Statuses "
        "| Key figures |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    rows = dict(sorted(rows.items(), key=lambda kv: _natural(kv[0])))
    for row in rows.values():
        statuses = ", ".join(f"{k}×{v}" for k, v in row.statuses.items()) or "—"
        figures = "; ".join(f"{k} {_fmt(v)}" for k, v in row.figures.items()) or "—"
        result = row.result if row.name not in carried else f"{row.result} (earlier run, {row.measured})"
        lines.append("| " + " | ".join(_cell(c) for c in (
            row.name, result, _load_cell(row.load), row.faults, row.inputs, row.sent, row.answered, row.lost,
            statuses, figures)) + " |")
    if soak:
        lines += [
            "",
            "## Soak memory curve",
            "",
            f"![RSS of the server under steady load]({SOAK_PLOT_NAME})",
            "",
            soak_note + soak["text"],
            "",
            "| t (s) | API process RSS (MiB) | engine core RSS (MiB) |",
            "| ---: | ---: | ---: |",
        ]
        lines += [f"| {t:.0f} | {m:.1f} | {c:.1f} |" for t, m, c in soak["points"]]
    lines += [
        "",
        "## How to run",
        "",
        "```sh",
        "flock /tmp/her-cpu.lock .venv/bin/python -m pytest -q tests/test_reliability.py   # CI sizes, a few minutes",
        "HER_RELIABILITY_LONG=1 flock /tmp/her-cpu.lock .venv/bin/python -m pytest -q tests/test_reliability.py",
        "# both write results/reliability/; to refresh the committed docs/reliability.md instead:",
        "HER_RELIABILITY_REPORT_DIR=docs flock /tmp/her-cpu.lock .venv/bin/python -m pytest -q "
        "tests/test_reliability.py",
        "```",
        "",
        f"<!-- {_ROWS_MARK}",
        json.dumps({"rows": [asdict(r) for r in rows.values()], "soak": soak}, default=str),
        "-->",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


_SOAK: dict[str, Any] = {}
_SOAK_TEST = "tests/test_reliability.py"


def record_soak_curve(samples: list[RssSample], text: str, every_s: float) -> None:
    """Keep a thinned copy of the soak's RSS curve for the report."""
    points, next_t = [], 0.0
    for s in samples:
        if s.t >= next_t or s is samples[-1]:
            points.append((s.t, s.main / MIB, s.children / MIB))
            next_t = s.t + every_s
    _SOAK["curve"] = {"text": text, "points": points,
                      "measured": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
