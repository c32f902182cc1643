"""Payload builders shared by the API tests."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image


def image_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def png_bytes(colour=(220, 30, 30), size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def shape_images(shapes: Path, n: int | None = None) -> list[Path]:
    return sorted((shapes / "images").glob("*.png"))[:n]


def error_of(response) -> dict:
    """The OpenAI-shaped error body, asserting its shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]
