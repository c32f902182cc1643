"""Request bodies, read the same way on every route: malformed JSON is a 400, a lone UTF-16 surrogate (legal in
a JSON escape, not valid Unicode, and fatal to the tokenizer) a 422 naming its field, and a pydantic error a 422
naming the first invalid field."""

from __future__ import annotations

import json
import re

from fastapi import Request

from core.data import has_surrogates
from service.errors import BadRequestError, InvalidInputError, ServiceError

SURROGATE_ESCAPE = re.compile(rb"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})")


async def read_json(request: Request) -> object:
    """The body parsed as JSON whatever its content type; BadRequestError (400) naming `body` when it is not."""
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError) as err:
        raise BadRequestError(f"body: invalid JSON: {err}", "body") from err


def check_surrogates(body: bytes) -> None:
    """422 naming the field when a JSON body holds a lone surrogate escape (`"\\ud800x"`). A byte scan finds
    the rare body with an unpaired escape; only that body is parsed here to name the field."""
    if not _has_lone_escape(body):
        return
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return  # not JSON: the route reports that
    path = _surrogate_path(data)
    if path is not None:
        raise InvalidInputError(f"{path}: contains a lone UTF-16 surrogate, which is not valid Unicode", path)


def _has_lone_escape(body: bytes) -> bool:
    """True if some `\\uD800`-`\\uDFFF` escape is not half of a high-low pair."""
    escapes = [m for m in SURROGATE_ESCAPE.finditer(body) if len(m.group(1)) % 2]  # odd: not an escaped "\\"
    i = 0
    while i < len(escapes):
        this, following = escapes[i], escapes[i + 1] if i + 1 < len(escapes) else None
        paired = (this.group(2)[1:2].lower() in b"89ab" and following is not None
                  and following.start() == this.end() and len(following.group(1)) == 1
                  and following.group(2)[1:2].lower() in b"cdef")
        if not paired:
            return True
        i += 2
    return False


def _surrogate_path(data: object) -> str | None:
    """The dotted path (`input[2]`, `items[0].metadata.caption`) of the first string or key with a lone
    surrogate; iterative, so any depth is fine."""
    stack = [(data, "body")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if has_surrogates(value):
                return path
        elif isinstance(value, dict):
            for key, child in value.items():
                if has_surrogates(key):
                    return path
                stack.append((child, key if path == "body" else f"{path}.{key}"))
        elif isinstance(value, list):
            stack.extend((child, f"{'' if path == 'body' else path}[{i}]") for i, child in enumerate(value))
    return None


def validation_error(errors: list[dict]) -> ServiceError:
    """A 422 naming the first invalid field (`input`, `items[0].id`, ...); malformed JSON is a 400."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return BadRequestError(f"body: invalid JSON: {detail}".rstrip(": "), "body")
    param = field_path(first.get("loc", ()))
    return InvalidInputError(f"{param}: {first.get('msg', 'invalid')}", param)


def field_path(loc) -> str:
    """`("body", "items", 0, "id")` → `items[0].id`."""
    path = ""
    for part in loc:
        if part in ("body", "query", "path", "header"):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"
