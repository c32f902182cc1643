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
from starlette.routing import Match

from index.store import CollectionStore
from service import __version__
from service.auth import KeyChecker
from service.body import check_surrogates, validation_error
from service.deps import KEY_SCOPES, READ, AppState
from service.engine import Engine
from service.errors import (
    ERROR_TABLE,
    BadRequestError,
    PayloadTooLargeError,
    ServiceError,
    openai_body,
    status_of,
)
from service.inputs import InputDecoder
from service.logs import configure_logging, request_id
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry
from service.routers import classify, collections, compat, embeddings, models, ops, ui
from service.settings import Settings

logger = logging.getLogger(__name__)
WEAVIATE_PATHS = ("/vectorize", "/meta", "/.well-known/")
COMPAT_PATHS = {"clip-retrieval": ("/knn-service", "/metadata", "/indices-list"), "weaviate": WEAVIATE_PATHS}
COMPAT_JSON_PATHS = ("/knn-service", "/metadata", "/vectorize")  # bodies parsed as JSON whatever the type


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
    for router in (embeddings.router, classify.router, collections.router, models.router, ops.router, ui.router):
        app.include_router(router)
    open_compat = _open_compat(settings)
    for name, router in (("clip-retrieval", compat.clip_retrieval), ("weaviate", compat.weaviate)):
        app.include_router(router, dependencies=[] if name in open_compat else [READ])


def _open_compat(settings: Settings) -> list[str]:
    """The compat route groups reachable without a key."""
    return ["clip-retrieval", "weaviate"] if settings.auth_disabled else list(settings.open_compat)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    """Open the collection store and the registry, restore or register the start-up model; close on exit."""
    settings: Settings = app.state.settings
    configure_logging(settings.log_level, settings.log_json)
    state = _build_state(settings)
    app.state.xclip = state
    _warn_about_open_routes(settings)
    logger.info("web page: http://%s:%d/ui", settings.host, settings.port)
    state.engine.collections.resume_reembeds()
    try:
        yield
    finally:
        await state.engine.close()
        state.engine.collections.store.close()


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
    open_paths = tuple(p for name in _open_compat(settings) for p in COMPAT_PATHS[name])
    app.add_middleware(RequestGate, max_bytes=settings.max_body_bytes, open_paths=open_paths)
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


class RequestGate:
    """What every request passes before a route sees it, in this order:
    1. the body limit by Content-Length (413);
    2. for a request with a body, a valid API key (401) before a byte of the body is read, so that an anonymous
       caller cannot make the server read and parse 32 MiB (scopes are checked by the routes);
    3. the body read whole, counted against the limit (413, chunked bodies too);
    4. a JSON body checked for lone UTF-16 surrogates (422 naming the field);
    5. the compat routes' bodies marked as JSON whatever their content type (their clients send none, or
       text/plain)."""

    def __init__(self, app, max_bytes: int, open_paths: tuple[str, ...]):
        self.app, self.max_bytes, self.open_paths = app, max_bytes, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        try:
            self._admit(scope)
            body = await self._read_body(receive)
            if _is_json(scope):
                check_surrogates(body)
        except ServiceError as err:
            _match_route(scope)  # so that the refusal is counted under its route
            return await _send_error(scope, send, err)
        await self.app(scope, _replay(body, receive), send)

    def _admit(self, scope) -> None:
        """The length and key checks; compat routes' bodies are marked as JSON (in place: the outer middleware
        reads the matched route from this same scope)."""
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise self._too_large()
        path = scope["path"]
        if not under(path, self.open_paths):
            authorization = headers.get(b"authorization", b"").decode("latin-1") or None
            scope[KEY_SCOPES] = scope["app"].state.xclip.keys.scopes_of(authorization)
        if path.startswith(COMPAT_JSON_PATHS):
            rest = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"] = [*rest, (b"content-type", b"application/json")]

    async def _read_body(self, receive) -> bytes:
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _too_large(self) -> ServiceError:
        return PayloadTooLargeError(f"request body exceeds {self.max_bytes} bytes (XCLIP_MAX_BODY_BYTES)", "body")


def _match_route(scope) -> None:
    """Record the route a refused request was for (the router never saw it), for its metrics label."""
    routes = _leaf_routes(scope["app"].router.routes)
    route = next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)
    if route is not None:
        scope["route"] = route


def under(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `path` is one of `prefixes` or below one: `/meta` is not a prefix of clip-retrieval's
    `/metadata`."""
    return any(path == p or path.startswith(p if p.endswith("/") else f"{p}/") for p in prefixes)


def _allowed_methods(routes, scope) -> str:
    """A 405's `Allow`: the methods of the most specific path template the request's path matches (Starlette
    names those of the first route that matches only, GET for both `/v1/models/{model_id}` and
    `/v1/models/rollback`)."""
    matching = [r for r in _leaf_routes(routes) if r.matches(scope)[0] != Match.NONE]
    fewest = min((r.path.count("{") for r in matching), default=0)
    return ", ".join(sorted({m for r in matching if r.path.count("{") == fewest for m in r.methods or ()}))


def _leaf_routes(routes):
    """The routes of `routes`, those of included routers in their place."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from _leaf_routes(inner.routes) if inner is not None else (route,)


def _is_json(scope) -> bool:
    content_type = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
    return content_type in (b"", b"application/json", b"text/plain") or content_type.endswith(b"+json")


def _replay(body: bytes, receive):
    """A receive callable that hands the app the body already read, then passes through (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(scope, send, error: ServiceError) -> None:
    response = error_response(scope.get("path", ""), error)
    await response({"type": "http", **scope}, None, send)


# -- errors -----------------------------------------------------------------------------------------------------------
def error_response(path: str, error: ServiceError) -> JSONResponse:
    """The error in the caller's contract: Weaviate's `{"error": msg}` on its routes, OpenAI's shape elsewhere."""
    status, _ = status_of(error)
    body = {"error": error.message} if under(path, WEAVIATE_PATHS) else openai_body(error)
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
        if err.status_code == 405:
            error.headers = {**error.headers, "Allow": _allowed_methods(request.app.router.routes, request.scope)}
        return error_response(request.url.path, error)


def _from_validation(err: RequestValidationError) -> ServiceError:
    """A 422 naming the first invalid field (`input`, `items[0].id`, ...); malformed JSON is a 400."""
    return validation_error(err.errors())


def _from_http(err: StarletteHTTPException) -> ServiceError:
    """Starlette's own errors (unknown route, wrong method) in the one error shape."""
    if err.status_code == 400 and err.__cause__ is not None:  # FastAPI's body parser failed (JSON nested too deep)
        return BadRequestError(f"body: {err.detail}: {err.__cause__}", "body")
    for cls, (status, _) in ERROR_TABLE.items():
        if status == err.status_code:
            return cls(str(err.detail), headers=err.headers)  # e.g. a 405's Allow (RFC 9110)
    return BadRequestError(str(err.detail), headers=err.headers)
