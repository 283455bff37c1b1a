"""`build_app`: wires settings, engine, GenRM, cache, batcher, telemetry and routers.

Nothing happens at import. The engine loads in the background after start-up so that
/healthz answers at once and /readyz turns ready when the model is in memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from her_engines import Engine, EngineKind, build_engine, engine_class, model_fingerprint
from her_genrm import GenRM, build_genrm
from her_roleplay import PrincipleLibrary, default_library

from ._auth import require_key
from ._batcher import QueueFull
from ._cache import TieredVerdictCache, build_cache
from ._errors import BodyTooLarge, mapped_exception_classes, status_of
from ._protocol import ErrorBody, ErrorEnvelope, InfoResponse
from ._routes import api, health, metrics_router
from ._serving import JudgeService
from ._settings import ServerSettings
from ._telemetry import JudgeTelemetry
from ._transcripts import transcripts_router

log = logging.getLogger("rm_server")

ENGINE_WATCH_INTERVAL_S = 1.0


def _package_version() -> str:
    try:
        return version("her-genrm")
    except PackageNotFoundError:
        return "0+local"


def error_response(status: int, kind: str, message: str, details: object = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorEnvelope(error=ErrorBody(type=kind, message=message, details=details))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


class BodyLimitMiddleware:
    """413 for bodies over the limit, checked on Content-Length and on the bytes actually read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        if declared is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            return await self._buffered(scope, receive, send)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(f"request body is over {self.max_bytes} bytes (RM_MAX_BODY_BYTES)")
            return message

        await self.app(scope, limited_receive, send)

    async def _buffered(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A chunked body (no Content-Length): read it up to the limit first, so an oversized one is a 413
        before any route starts parsing it, then hand the bytes on."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._reject(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect notices
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "body_too_large",
                                  f"request body is over {self.max_bytes} bytes (RM_MAX_BODY_BYTES)")
        await response(scope, receive, send)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        first: dict[str, Any] = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_response(422, "invalid_request", f"{where}: {first['msg']}" if where else first["msg"],
                              details=errors)

    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        status, kind = status_of(exc)
        headers = None
        if isinstance(exc, QueueFull):
            headers = {"Retry-After": exc.retry_after_header}
        return error_response(status, kind, str(exc) or kind, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own refusals (unparseable body 400, 404, 405) in our one error shape.
        kind = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail), headers=getattr(exc, "headers", None))

    # Specific classes go to Starlette's ExceptionMiddleware (answered quietly); real bugs reach
    # InternalErrorMiddleware (500, logged with a traceback).
    for cls in mapped_exception_classes():
        app.add_exception_handler(cls, _mapped)


class InternalErrorMiddleware:
    """500 for a bug, logged with its traceback, and the connection kept: Starlette's own catch-all re-raises
    to the server after answering, which closes a keep-alive connection and loses the client's next request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            if started:
                raise  # half a response went out: only closing the connection tells the client
            await error_response(500, "internal_error", "internal error; see the server log")(scope, receive, send)


def _instrument(app: FastAPI, telemetry: JudgeTelemetry) -> None:
    @app.middleware("http")
    async def _timing(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        telemetry.observe_request(path, response.status_code, time.perf_counter() - started)
        return response


def _add_protected_docs(app: FastAPI) -> None:
    """/openapi.json and /docs behind the API key (FastAPI's own routes take no dependencies)."""
    from fastapi.openapi.docs import get_swagger_ui_html

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_key)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(require_key)])
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")


def build_app(
    settings: ServerSettings | None = None,
    *,
    engine: Engine | None = None,
    library: PrincipleLibrary | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The ASGI app. Pass `engine` to share an already loaded engine (tests, embedding).

    `on_fatal(reason)` is called when the model fails to load or the engine dies and
    `exit_on_engine_failure` is set (`her serve` then stops uvicorn and exits 1)."""
    settings = settings or ServerSettings.load()
    library = library or (PrincipleLibrary.load(settings.principles_path) if settings.principles_path
                          else default_library())
    telemetry = JudgeTelemetry(window=settings.telemetry_window)
    cache = build_cache(settings.redis_url, ttl_s=settings.cache_ttl_s, max_entries=settings.cache_max_entries,
                        on_error=telemetry.record_cache_error)
    owns_engine = engine is None
    resolved: EngineKind | None = None  # the kind of engine to build, if we build it
    if engine is None:
        kind: str = (resolved := settings.resolved_engine())
    else:
        kind = engine.kind
    if settings.batching == "auto":
        continuous = (engine or engine_class(kind)).continuous_batching
    else:
        continuous = settings.batching == "continuous"
    service = JudgeService(settings=settings, cache=cache, telemetry=telemetry, continuous_batching=continuous)
    telemetry.set_model(settings.model if engine is None else engine.model_id, kind, _package_version())

    def make_genrm(loaded: Engine) -> GenRM:
        return build_genrm(loaded, settings.model, principles=library, principle_detail=settings.principle_detail,
                           her_rm_template=settings.her_rm_template, her_rm_stage=settings.her_rm_stage)

    fatal_sent: list[str] = []

    def failed(reason: str) -> None:
        service.fail(reason)
        telemetry.set_ready(False)
        if on_fatal is not None and settings.exit_on_engine_failure and not fatal_sent:
            fatal_sent.append(reason)
            on_fatal(service.failure or reason)

    async def load_engine() -> None:
        try:
            loaded = await asyncio.to_thread(build_engine, settings, resolved)
            service.model_fingerprint = await asyncio.to_thread(model_fingerprint, settings.model)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported the same way
            log.exception("could not load the judge engine")
            failed(f"the judge model {settings.model!r} failed to load: {exc}")
            return
        service.genrm = make_genrm(loaded)
        telemetry.set_model(loaded.model_id, kind, _package_version())
        log.info("judge model %s ready", loaded.model_id)

    async def watch_engine() -> None:
        """Notice an engine that dies between requests, not only at the next request."""
        while service.state != "failed":
            telemetry.set_ready(service.ready)
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
        failed(service.failure or "the judge failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        tasks = []
        if engine is not None:
            service.model_fingerprint = model_fingerprint(engine.model_id)
            service.genrm = make_genrm(engine)
        else:
            tasks.append(asyncio.create_task(load_engine()))
        tasks.append(asyncio.create_task(watch_engine()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await service.stop()
            if owns_engine and service.genrm is not None:
                await service.genrm.engine.aclose()
            await cache.aclose()

    protect_docs = bool(settings.api_keys) and settings.docs_require_auth
    app = FastAPI(title="HER GenRM service", version=_package_version(), lifespan=lifespan,
                  description="Pairwise generative reward model for role-play (HER), with RL reward routes.",
                  **({"docs_url": None, "redoc_url": None, "openapi_url": None} if protect_docs else {}))  # type: ignore[arg-type]
    if protect_docs:
        _add_protected_docs(app)
    app.state.service = service
    app.state.library = library
    app.state.api_keys = [k.get_secret_value() for k in settings.api_keys]

    def info() -> InfoResponse:
        genrm = service.genrm
        templates = {"compact": genrm.compact.template_hash} if genrm else {}
        if genrm and genrm.her_rm_template:
            templates["her-rm"] = genrm.her_rm_template.template_hash
        return InfoResponse(
            model=genrm.model_id if genrm else settings.model,
            engine=kind,
            templates=templates,
            principle_set_hash=library.version,
            principles=len(library.principles),
            batching="continuous" if continuous else "micro",
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            cache="redis" if isinstance(cache, TieredVerdictCache) else "memory",
            auth=bool(settings.api_keys),
            version=_package_version(),
        )

    app.state.info = info
    _install_error_handlers(app)
    app.add_middleware(InternalErrorMiddleware)  # innermost, so the timing middleware sees the 500
    _instrument(app, telemetry)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.include_router(health)
    app.include_router(api)
    app.include_router(transcripts_router)
    metrics_deps = [Depends(require_key)] if settings.metrics_require_auth else []
    app.include_router(metrics_router, dependencies=metrics_deps)
    return app
