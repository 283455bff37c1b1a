"""`her serve`: run the GenRM service (rm_server) with uvicorn. Flags are generated from `ServerSettings`.

`her serve --replicas N` (also --max-replicas, --ray-address, or any RM_RAY_* setting) runs the same app
on Ray Serve instead: N replicas, one judge engine each, behind Serve's HTTP proxy on the same host and
port (see `rm_server._ray`)."""

from __future__ import annotations

import argparse
import logging
import sys

from rm_server import ServerSettings

from ._flags import add_model_arguments, default_text, model_values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML settings file (env RM_* still wins over it)")
    add_model_arguments(parser, ServerSettings,
                        note=lambda name, field: f"env RM_{name.upper()}; default: {default_text(field)}")
    ray = parser.add_argument_group("scale-out on Ray Serve (needs `pip install 'ray[serve]'`)")
    ray.add_argument("--replicas", type=int, default=None, metavar="N",
                     help="run N replicas of the app on Ray Serve (one judge engine each) instead of one "
                          "uvicorn process; with --max-replicas the autoscaling minimum (env RM_RAY_REPLICAS)")
    ray.add_argument("--max-replicas", type=int, default=None, metavar="M",
                     help="autoscale between --replicas and M replicas on queue depth (env RM_RAY_MAX_REPLICAS)")
    ray.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="Ray cluster to join, e.g. auto; unset: start a local one (env RM_RAY_ADDRESS)")


def _wants_ray(args: argparse.Namespace) -> bool:
    import os

    return any(getattr(args, name, None) is not None for name in ("replicas", "max_replicas", "ray_address")) \
        or any(k.upper().startswith("RM_RAY_") for k in os.environ)


def run_on_ray(args: argparse.Namespace) -> int:
    try:
        from rm_server._ray import RaySettings, serve_forever, without_ray_env
    except ImportError as exc:
        print(f"her serve --replicas needs Ray Serve: pip install 'ray[serve]' ({exc})", file=sys.stderr)
        return 2
    ray_settings = RaySettings.load(replicas=args.replicas, max_replicas=args.max_replicas,
                                    address=args.ray_address)
    overrides = model_values(args, ServerSettings)
    with without_ray_env():
        settings = ServerSettings.load(args.config, **overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    return serve_forever(settings, ray_settings)


def run(args: argparse.Namespace) -> int:
    if _wants_ray(args):
        return run_on_ray(args)
    import uvicorn

    from rm_server import build_app

    overrides = model_values(args, ServerSettings)
    settings = ServerSettings.load(args.config, **overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    auth = "on" if settings.api_keys else "off (set RM_API_KEYS to require Bearer keys)"
    cache = settings.redis_url or "in-process LRU (set RM_REDIS_URL for Redis)"
    url = f"http://{settings.host}:{settings.port}"
    print(f"rm_server: {settings.resolved_engine()} engine, model {settings.model}; cache {cache}; auth {auth}\n"
          f"listening on {url}  (docs {url}/docs, metrics {url}/metrics)\n"
          f"try: curl -s {url}/v1/judge -H 'Content-Type: application/json' "
          "-d '{\"context\": \"User: Hello!\", \"a\": \"Hi there.\", \"b\": \":\"}'", flush=True)
    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def stop_on_fatal(reason: str) -> None:
        fatal.append(reason)
        if server is not None:
            server.should_exit = True

    app = build_app(settings, on_fatal=stop_on_fatal)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level=settings.log_level))
    server.run()
    if fatal:
        print(f"rm_server: exiting with status 1: {fatal[0]}", file=sys.stderr, flush=True)
        return 1
    return 0
