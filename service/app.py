"""The FastAPI application: wiring of settings, engine, routers, middleware and the one exception handler."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from index.store import CollectionStore
from service import __version__
from service.auth import KeyChecker
from service.deps import READ, AppState
from service.engine import Engine
from service.errors import (
    ERROR_TABLE,
    BadRequestError,
    InvalidInputError,
    PayloadTooLargeError,
    ServiceError,
    openai_body,
    status_of,
)
from service.inputs import InputDecoder
from service.logs import configure_logging, request_id
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry
from service.routers import classify, collections, compat, embeddings, models, ops
from service.settings import Settings

logger = logging.getLogger(__name__)
WEAVIATE_PATHS = ("/vectorize", "/meta", "/.well-known/")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for `settings` (read from the environment when None)."""
    settings = settings or Settings()
    app = FastAPI(title="xclip-serve", version=__version__, lifespan=_lifespan,
                  description="Embeddings, zero-shot tagging, cluster distributions and cross-modal search "
                              "over CLIP / nCLIP / xCLIP ONNX bundles.")
    app.state.settings = settings
    _add_routers(app, settings)
    _add_middleware(app, settings)
    _add_error_handlers(app)
    return app


def _add_routers(app: FastAPI, settings: Settings) -> None:
    for router in (embeddings.router, classify.router, collections.router, models.router, ops.router):
        app.include_router(router)
    open_compat = settings.auth_disabled and ["clip-retrieval", "weaviate"] or settings.open_compat
    for name, router in (("clip-retrieval", compat.clip_retrieval), ("weaviate", compat.weaviate)):
        app.include_router(router, dependencies=[] if name in open_compat else [READ])


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    """Open the collection store and the registry, restore or register the start-up model; close on exit."""
    settings: Settings = app.state.settings
    configure_logging(settings.log_level, settings.log_json)
    state = _build_state(settings)
    app.state.xclip = state
    _warn_about_open_routes(settings)
    try:
        yield
    finally:
        await state.engine.close()
        state.engine.store.close()


def _build_state(settings: Settings) -> AppState:
    metrics = ServiceMetrics()
    registry = ModelRegistry(settings, on_batch=metrics.observe_batch)
    registry.restore()
    if settings.bundle is not None:
        model = registry.register(registry.load(settings.bundle))
        if registry.active_id is None or not (settings.state_dir / "models.json").is_file():
            registry.activate(model.model_id)
        elif registry.active_id != model.model_id:
            logger.info("start-up bundle %s registered; %s stays active (activate it via the API)",
                        model.model_id, registry.active_id)
    store = CollectionStore(settings.collections_dir, settings.faiss_device)
    engine = Engine(settings, registry, store)
    metrics.add_gauges(lambda: _queue_depths(registry),
                       lambda: [(s.name, store.get(s.name).count()) for s in store.list()])
    keys = KeyChecker(settings.key_scopes(), enabled=not settings.auth_disabled)
    return AppState(settings, engine, InputDecoder(settings), keys, metrics)


def _queue_depths(registry: ModelRegistry):
    return [(mid, modality, b.queue_depth) for mid, m in list(registry.models.items())
            for modality, b in m.batchers.items()]


def _warn_about_open_routes(settings: Settings) -> None:
    if settings.auth_disabled:
        logger.warning("AUTH IS DISABLED (XCLIP_AUTH_DISABLED=true): every route, including admin ones, is open "
                       "to anyone who can reach %s:%d", settings.host, settings.port)
    elif settings.open_compat:
        logger.warning("compat routes open without an API key: %s (XCLIP_OPEN_COMPAT)", settings.open_compat)


# -- middleware -------------------------------------------------------------------------------------------------------
def _add_middleware(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                       allow_headers=["*"])
    app.add_middleware(ObserveMiddleware)


class ObserveMiddleware:
    """Request id in and out (X-Request-ID), one log line and per-route metrics per request, and a logged 500
    for a bug instead of a dropped connection. Plain ASGI: Starlette's BaseHTTPMiddleware costs ~1 ms a request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex[:16]
        token, start, status = request_id.set(rid), time.perf_counter(), [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # a bug, not bad input: log it with the request id, answer 500, keep serving
            logger.exception("unhandled error on %s", scope["path"])
            if not status[0]:
                await _send_error(scope, send_with_id, ServiceError("internal error; see the server log"))
        finally:
            self._observe(scope, status[0] or 500, time.perf_counter() - start)
            request_id.reset(token)

    @staticmethod
    def _observe(scope, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        scope["app"].state.xclip.metrics.observe_request(route, scope["method"], status, seconds)
        logger.info("%s %s %d %.1fms", scope["method"], scope["path"], status, seconds * 1000,
                    extra={"route": route, "status": status})


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`, by Content-Length or by counting a streamed body."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(scope, send, self._too_large())
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _send_error(scope, send, self._too_large())

    def _too_large(self) -> ServiceError:
        return PayloadTooLargeError(f"request body exceeds {self.max_bytes} bytes (XCLIP_MAX_BODY_BYTES)", "body")


class _BodyTooLarge(Exception):
    pass


async def _send_error(scope, send, error: ServiceError) -> None:
    response = error_response(scope.get("path", ""), error)
    await response({"type": "http", **scope}, None, send)


# -- errors -----------------------------------------------------------------------------------------------------------
def error_response(path: str, error: ServiceError) -> JSONResponse:
    """The error in the caller's contract: Weaviate's `{"error": msg}` on its routes, OpenAI's shape elsewhere."""
    status, _ = status_of(error)
    body = {"error": error.message} if path.startswith(WEAVIATE_PATHS) else openai_body(error)
    return JSONResponse(body, status_code=status, headers=error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, err: ServiceError):
        return error_response(request.url.path, err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return error_response(request.url.path, _from_validation(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        error = _from_http(err)
        return error_response(request.url.path, error)


def _from_validation(err: RequestValidationError) -> ServiceError:
    """A 422 naming the first invalid field (`input`, `items.0.id`, ...)."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or "body"
    return InvalidInputError(f"{param}: {first.get('msg', 'invalid')}", param)


def _from_http(err: StarletteHTTPException) -> ServiceError:
    """Starlette's own errors (unknown route, wrong method) in the one error shape."""
    for cls, (status, _) in ERROR_TABLE.items():
        if status == err.status_code:
            return cls(str(err.detail))
    return BadRequestError(str(err.detail))
