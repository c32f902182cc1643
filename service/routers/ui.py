"""The web page for people (`GET /ui`): static files shipped in `service/ui/`, same-origin, under a strict
Content-Security-Policy. Loading the page needs no key; every API call it makes carries the one the person typed.

Out of the OpenAPI document: these are not API operations, and the fuzzer's contract (`api_tests/test_fuzz.py`)
is about the API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from service.deps import State
from service.errors import NotFoundError

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
# Only the page's own scripts and styles (no inline ones, so injected markup cannot run), thumbnails from data: and
# blob: URLs, API calls to this origin only, and never inside a frame (the admin buttons cannot be clickjacked).
# form-action 'none': no form ever navigates, so nothing typed (the key above all) can end up in a URL.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


def _assets() -> dict[str, Path]:
    """The page's files by name: only these are served, so no part of a request path ever reaches the disk."""
    return {p.name: p for p in sorted(UI_DIR.iterdir()) if p.suffix in MEDIA_TYPES}


ASSETS = _assets()


def _asset(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise NotFoundError(f"no file {name!r} in the web page", "name")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


@router.get("/")
async def root() -> Response:
    """A person who opens the server's address gets the page."""
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
async def page() -> FileResponse:
    """The page."""
    return _asset("index.html")


@router.get("/ui/limits.json")
async def limits(state: State) -> JSONResponse:
    """The API's upload limits, so that the page refuses a file too large before sending it."""
    settings = state.settings
    body = {"max_image_bytes": settings.max_image_bytes, "max_body_bytes": settings.max_body_bytes,
            "max_k": settings.max_k, "max_labels": settings.max_labels}
    return JSONResponse(body, headers=SECURITY_HEADERS)


@router.get("/ui/{name}")
async def asset(name: str) -> FileResponse:
    """One of the page's scripts or styles."""
    return _asset(name)
