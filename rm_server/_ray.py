"""`her serve --replicas N`: the same FastAPI app as a Ray Serve application.

    her serve --replicas 2                        # local Ray cluster, 2 replicas behind one HTTP proxy
    her serve --replicas 1 --max-replicas 4       # autoscaling between 1 and 4 replicas
    RM_RAY_ADDRESS=auto her serve --replicas 8    # join a running cluster (`ray start --head` ...)

One replica = one `build_app(settings, engine=...)`, i.e. one judge engine (a vLLM engine spans
`RM_TENSOR_PARALLEL_SIZE` GPUs inside its replica). The replica loads its model in the constructor, so
Serve sends it traffic only once the model is in memory; `check_health` fails once the engine died,
and Serve replaces the replica. Verdicts are shared through `RM_REDIS_URL` (without it every replica
keeps its own in-process cache).

Routing: Ray Serve's HTTP proxy cannot read a request body before choosing a replica, so "same context,
same replica" rides on a header: the `ConsistentHashRouter` of Ray Serve (experimental in 2.60) maps the
`x-session-id` header onto a consistent-hash ring of replicas (falling back to the next replicas on the
ring when that one is full). `RewardClient` sends a hash of the context there; requests without the
header are spread at random. `RM_RAY_ROUTING=power-of-two` selects Serve's default router instead.

Scaling: a fixed `replicas`, or autoscaling between `replicas` and `max_replicas` on Serve's queue
depth (requests queued or running per replica, target `target_ongoing_requests`).

Settings of this mode live here (`RaySettings`, env `RM_RAY_*`, or the CLI flags `--replicas`,
`--max-replicas`, `--ray-address`); the server settings (`ServerSettings`, env `RM_*`) are loaded once
by the launcher and shipped to every replica as they are, so all replicas run the same configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from her_engines import Engine, engine_class
from her_genrm import AFFINITY_HEADER

from ._settings import ServerSettings

log = logging.getLogger("rm_server.ray")

ENV_PREFIX = "RM_RAY_"
DEPLOYMENT_NAME = "HerJudge"
CONSISTENT_HASH_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


class RaySettings(BaseSettings):
    """Ray Serve settings of `her serve --replicas` (env `RM_RAY_*`; CLI flags win)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", use_attribute_docstrings=True)

    replicas: int = Field(1, ge=1)
    """Replicas (one judge engine each); with max_replicas: the autoscaling minimum."""
    max_replicas: int | None = Field(None, ge=1)
    """Autoscale between `replicas` and this many replicas on queue depth. Unset: fixed `replicas`."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Autoscaling target: HTTP requests queued or running per replica."""
    upscale_delay_s: float = Field(30.0, ge=0)
    """How long the queue must stay over target before a replica is added."""
    downscale_delay_s: float = Field(300.0, ge=0)
    """How long the queue must stay under target before a replica is removed."""
    max_ongoing_requests: int = Field(64, ge=1)
    """HTTP requests one replica takes at once (its own queue, RM_MAX_QUEUE, bounds the pairs)."""
    max_queued_requests: int = Field(-1, ge=-1)
    """Requests waiting in the proxy for a free replica before it answers 503; -1: no bound."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs Ray reserves per replica."""
    num_gpus: float | None = Field(None, ge=0)
    """GPUs Ray reserves per replica; unset: RM_TENSOR_PARALLEL_SIZE where CUDA is available, else 0."""
    routing: Literal["context", "power-of-two"] = "context"
    """context: same `x-session-id` header (RewardClient: hash of the context) -> same replica;
    power-of-two: Serve's default, the less loaded of two random replicas."""
    address: str | None = None
    """Ray cluster to join ("auto": the one `ray start` runs here; "ray://host:10001"); unset: start a
    local one."""
    num_cpus_local: int | None = Field(None, ge=1)
    """CPUs of the local cluster started when `address` is unset; unset: all of the machine's."""
    app_name: str = "her-genrm"
    """Serve application name."""
    health_check_period_s: float = Field(10.0, gt=0)
    """How often Serve asks each replica whether its engine still works."""
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0)
    """How long a replica being removed may finish its requests."""

    @model_validator(mode="after")
    def _check_range(self) -> RaySettings:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas={self.max_replicas} is below replicas={self.replicas}")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None and self.max_replicas > self.replicas

    @classmethod
    def load(cls, **overrides: Any) -> RaySettings:
        return cls(**{k: v for k, v in overrides.items() if v is not None})


@contextlib.contextmanager
def without_ray_env() -> Iterator[None]:
    """Hide RM_RAY_* from `ServerSettings.load`, which refuses RM_ variables it does not know."""
    hidden = {k: os.environ.pop(k) for k in list(os.environ) if k.upper().startswith(ENV_PREFIX)}
    try:
        yield
    finally:
        os.environ.update(hidden)


def resolved_num_gpus(settings: ServerSettings, ray_settings: RaySettings) -> float:
    if ray_settings.num_gpus is not None:
        return ray_settings.num_gpus
    return engine_class(settings.resolved_engine()).gpus_needed(settings)


# --------------------------------------------------------------------------- the replica

from ray import serve  # noqa: E402 - this module is only imported in Ray mode

REPLICA_HEADER = "x-her-replica"


class ReplicaHeader:
    """Names the replica that answered in every response (`x-her-replica`), for operators and tests."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]
            await send(message)

        await self.app(scope, receive, send_named)


@serve.ingress()  # the app is built in each replica (`__serve_build_asgi_app__`), not pickled
class HerJudge:
    """One replica: one judge engine and the full rm_server app in front of it."""

    async def __init__(self, settings: ServerSettings) -> None:  # type: ignore[misc]  # Serve awaits it
        from her_engines import build_engine

        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._settings = settings
        self._app: Any = None
        started = time.monotonic()
        # Loaded here, before Serve routes anything to this replica (the plain server loads it in the
        # background and answers 503 meanwhile; behind Serve a loading replica would just get requests).
        engine = await asyncio.to_thread(build_engine, settings, settings.resolved_engine())
        self._engine: Engine | None = engine
        log.info("replica ready: %s in %.1f s", engine.model_id, time.monotonic() - started)

    def __serve_build_asgi_app__(self) -> Any:
        from ._app import build_app

        self._app = build_app(self._settings, engine=self._engine)
        self._app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return self._app

    async def check_health(self) -> None:
        """Serve replaces a replica whose check fails (the plain server's /healthz turns 503 instead)."""
        service = self._app.state.service if self._app is not None else None
        if service is not None and (service.failure is not None or service.state == "failed"):
            raise RuntimeError(f"judge engine failed: {service.failure}")

    async def __del__(self) -> None:
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            await engine.aclose()


def deployment_options(settings: ServerSettings, ray_settings: RaySettings) -> dict[str, Any]:
    """`Deployment.options(...)` for `ray_settings`."""
    from ray.serve.config import RequestRouterConfig

    rs = ray_settings
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": rs.num_cpus, "num_gpus": resolved_num_gpus(settings, rs)},
        "max_ongoing_requests": rs.max_ongoing_requests,
        "max_queued_requests": rs.max_queued_requests,
        "health_check_period_s": rs.health_check_period_s,
        "graceful_shutdown_timeout_s": rs.graceful_shutdown_timeout_s,
    }
    if rs.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": rs.replicas,
            "initial_replicas": rs.replicas,
            "max_replicas": rs.max_replicas,
            "target_ongoing_requests": rs.target_ongoing_requests,
            "upscale_delay_s": rs.upscale_delay_s,
            "downscale_delay_s": rs.downscale_delay_s,
        }
    else:
        options["num_replicas"] = rs.replicas
    if rs.routing == "context":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=CONSISTENT_HASH_ROUTER,  # type: ignore[arg-type]  # Serve imports the path
            request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": 2},
        )
    return options


def build_application(settings: ServerSettings, ray_settings: RaySettings) -> Any:
    """The Serve application (`serve.run(build_application(...))`)."""
    deployment = serve.deployment(HerJudge)
    return deployment.options(**deployment_options(settings, ray_settings)).bind(settings)  # type: ignore[attr-defined]


def connect(ray_settings: RaySettings) -> None:
    """Join the cluster at `address`, or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if ray_settings.address:
        ray.init(address=ray_settings.address, log_to_driver=False)
    else:
        ray.init(num_cpus=ray_settings.num_cpus_local, include_dashboard=False, log_to_driver=False)


def start(settings: ServerSettings, ray_settings: RaySettings, *, init_ray: bool = True) -> str:
    """Connect to (or start) Ray, start Serve's HTTP proxy on settings.host:port and deploy the app;
    returns once every replica has loaded its model. Returns the base URL."""
    if init_ray:
        connect(ray_settings)
    serve.start(http_options={"host": settings.host, "port": settings.port}, proxy_location="HeadOnly")
    serve.run(build_application(settings, ray_settings), name=ray_settings.app_name, route_prefix="/",
              blocking=False)
    return f"http://{settings.host}:{settings.port}"


def stop(ray_settings: RaySettings, *, shutdown_ray: bool = True) -> None:
    """Delete the app; on a cluster we started (`shutdown_ray`), stop Serve and Ray too."""
    import ray

    with contextlib.suppress(Exception):
        serve.delete(ray_settings.app_name)
    if shutdown_ray:
        with contextlib.suppress(Exception):
            serve.shutdown()
        if ray.is_initialized():
            ray.shutdown()


def replica_actor_names(app_name: str = "her-genrm") -> list[str]:
    """Names of this app's live replica actors (namespace "serve")."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{DEPLOYMENT_NAME}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == "serve" and a["name"].startswith(prefix))


def running_replicas(app_name: str = "her-genrm") -> int:
    """Replicas Serve reports RUNNING for the judge deployment."""
    app = serve.status().applications.get(app_name)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return 0
    states: dict[Any, int] = dict(app.deployments[DEPLOYMENT_NAME].replica_states)  # ReplicaState is a str enum
    return int(states.get("RUNNING", 0))


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def serve_forever(settings: ServerSettings, ray_settings: RaySettings) -> int:
    """`her serve --replicas N`: deploy, print where, block until Ctrl-C / SIGTERM, tear down."""
    scaling = (f"autoscaling {ray_settings.replicas}..{ray_settings.max_replicas} replicas "
               f"(target {ray_settings.target_ongoing_requests:g} requests in flight per replica)"
               if ray_settings.autoscaling else f"{ray_settings.replicas} replica(s)")
    cache = settings.redis_url or "per-replica in-process LRU (set RM_REDIS_URL to share verdicts)"
    where = ray_settings.address or f"local cluster ({ray_settings.num_cpus_local or os.cpu_count()} CPUs)"
    print(f"rm_server on Ray Serve: {scaling} on {where}; {settings.resolved_engine()} engine, model "
          f"{settings.model}; routing {ray_settings.routing}; cache {cache}", flush=True)
    started = time.monotonic()
    connect(ray_settings)
    # ray.init installs a SIGTERM handler that aborts the process on the spot; an orchestrator's SIGTERM
    # must instead remove the app (replicas close their engines) and stop the cluster we started.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        url = start(settings, ray_settings, init_ray=False)
        print(f"listening on {url} after {time.monotonic() - started:.0f} s (all replicas loaded; "
              f"docs {url}/docs); Ctrl-C stops", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        print("rm_server on Ray Serve: stopping", flush=True)
        stop(ray_settings, shutdown_ray=not ray_settings.address)
    return 0


__all__ = [
    "AFFINITY_HEADER",
    "DEPLOYMENT_NAME",
    "REPLICA_HEADER",
    "HerJudge",
    "RaySettings",
    "build_application",
    "deployment_options",
    "replica_actor_names",
    "running_replicas",
    "serve_forever",
    "start",
    "stop",
    "without_ray_env",
]
