"""`her serve`: run the GenRM service with uvicorn. Options are generated from `ServerSettings`."""

from __future__ import annotations

import argparse
import logging
import sys

from ._settings import ServerSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML settings file (env RM_* still wins over it)")
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default is not None else "unset"
        parser.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                            help=f"{field.description or ''} (env RM_{name.upper()}; default: {default})")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ._app import build_app

    overrides = {name: getattr(args, name) for name in ServerSettings.model_fields}
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
