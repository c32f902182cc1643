"""FastAPI dependencies over the typed app state: the engine, the input decoder, and scope checks.

All are `async def`: FastAPI runs plain `def` dependencies in its thread pool, a thread hop each per request."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import KeyChecker
from service.engine import Engine
from service.inputs import InputDecoder
from service.metrics import ServiceMetrics
from service.settings import Settings


@dataclasses.dataclass
class AppState:
    """Everything a route may use, stored on `app.state.xclip`."""

    settings: Settings
    engine: Engine
    decoder: InputDecoder
    keys: KeyChecker
    metrics: ServiceMetrics


async def get_state(request: Request) -> AppState:
    return request.app.state.xclip


State = Annotated[AppState, Depends(get_state)]


async def get_engine(request: Request) -> Engine:
    return request.app.state.xclip.engine


async def get_decoder(request: Request) -> InputDecoder:
    return request.app.state.xclip.decoder


EngineDep = Annotated[Engine, Depends(get_engine)]
DecoderDep = Annotated[InputDecoder, Depends(get_decoder)]


KEY_SCOPES = "xclip.key_scopes"  # ASGI scope entry: the scopes the request gate found for the request's key
# declares the API key to OpenAPI as a bearer scheme; the check itself is KeyChecker's (401 / 403 in our shape)
BEARER = HTTPBearer(auto_error=False, scheme_name="apiKey",
                    description="An API key: `Authorization: Bearer <key>` (docs/SERVICE.md, API keys)")


def require(scope: str):
    """A dependency that lets the request through only with a key holding `scope`."""

    async def check(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        request.app.state.xclip.keys.require(request.headers.get("authorization"), scope,
                                             request.scope.get(KEY_SCOPES))

    return Depends(check)


READ, WRITE, ADMIN = require("read"), require("write"), require("admin")
