"""Turning request payloads into decoded images and checked texts, with the service's limits.

Images arrive as multipart bytes, base64 (plain or `data:image/...;base64,` URIs) or, when enabled, http(s) URLs
of allow-listed public hosts. Every failure is an InvalidInputError / PayloadTooLargeError naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import socket
import urllib.parse

import httpx
from PIL import Image

from core.preprocess import ImageDecodeError, load_image
from service.errors import BadRequestError, InvalidInputError, PayloadTooLargeError
from service.settings import Settings

DATA_URI = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)


class InputDecoder:
    """Decodes and checks inputs against the limits in `settings`."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def image_from_bytes(self, data: bytes, param: str) -> Image.Image:
        """An RGB image from encoded bytes; refuses oversize payloads and decompression bombs (from the header,
        before any pixel is decoded)."""
        if not data:
            raise InvalidInputError(f"{param}: empty image", param)
        if len(data) > self.settings.max_image_bytes:
            raise PayloadTooLargeError(
                f"{param}: image is {len(data)} bytes, the limit is {self.settings.max_image_bytes}", param)
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise InvalidInputError(f"{param}: cannot decode image: {err}", param) from err
        width, height = image.size
        if width * height > self.settings.max_image_pixels:
            raise PayloadTooLargeError(
                f"{param}: image is {width}x{height} pixels, the limit is {self.settings.max_image_pixels}", param)
        try:
            return load_image(image)
        except ImageDecodeError as err:
            raise InvalidInputError(f"{param}: {err}", param) from err

    def image_bytes_from_string(self, value: str, param: str) -> bytes:
        """Bytes of an image given as base64, a data URI, or (when enabled) an http(s) URL."""
        if not isinstance(value, str) or not value.strip():
            raise InvalidInputError(f"{param}: expected a base64 image or data URI, got an empty value", param)
        value = value.strip()
        if value.lower().startswith(("http://", "https://")):
            return self.fetch_url(value, param)
        payload = DATA_URI.sub("", value, count=1)
        if len(payload) > self.settings.max_image_bytes * 4 // 3 + 4:
            raise PayloadTooLargeError(f"{param}: image exceeds {self.settings.max_image_bytes} bytes", param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise InvalidInputError(f"{param}: invalid base64: {err}", param) from err

    def image_from_string(self, value: str, param: str) -> Image.Image:
        """A decoded image from base64 / data URI / URL."""
        return self.image_from_bytes(self.image_bytes_from_string(value, param), param)

    def check_text(self, text: object, param: str) -> str:
        """A non-empty string within the character limit."""
        if not isinstance(text, str):
            raise InvalidInputError(f"{param}: expected a string, got {type(text).__name__}", param)
        if not text.strip():
            raise InvalidInputError(f"{param}: empty text", param)
        if len(text) > self.settings.max_text_chars:
            raise PayloadTooLargeError(
                f"{param}: text has {len(text)} characters, the limit is {self.settings.max_text_chars}", param)
        return text

    def check_count(self, values: list, param: str, limit: int | None = None) -> list:
        """A non-empty list within the per-request item limit."""
        limit = limit or self.settings.max_items
        if not values:
            raise InvalidInputError(f"{param}: must not be empty", param)
        if len(values) > limit:
            raise PayloadTooLargeError(f"{param}: {len(values)} items, the limit is {limit}", param)
        return values

    def fetch_url(self, url: str, param: str) -> bytes:
        """GET an image from an allow-listed public host, with size and time limits."""
        if not self.settings.url_fetch:
            raise BadRequestError(f"{param}: image URLs are disabled on this server (XCLIP_URL_FETCH)", param)
        host, address = check_public_url(url, self.settings.url_allow_hosts, param)
        limit = self.settings.max_image_bytes
        pinned, headers, extensions = pinned_request(url, address)
        try:
            with httpx.Client(timeout=self.settings.url_timeout_s, follow_redirects=False) as client, \
                    client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                if response.status_code != 200:
                    raise InvalidInputError(f"{param}: {host} answered {response.status_code}", param)
                return _read_limited(response, limit, param)
        except httpx.HTTPError as err:
            raise InvalidInputError(f"{param}: cannot fetch {host}: {err}", param) from err


def _read_limited(response: httpx.Response, limit: int, param: str) -> bytes:
    """The body, refusing anything past `limit` bytes without reading it all."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"{param}: remote image exceeds {limit} bytes", param)
    return bytes(body)


def pinned_request(url: str, address: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """(URL, headers, httpx extensions) that connect to the already checked `address` while asking for the
    original host (Host header; TLS SNI and certificate check against the host name). Resolving the name a
    second time at connect would let a DNS answer that changed since the check (rebinding) reach a private
    address."""
    parsed = urllib.parse.urlsplit(url)
    ip_host = f"[{address}]" if ":" in address else address
    netloc = f"{ip_host}:{parsed.port}" if parsed.port else ip_host
    host_header = parsed.netloc.rsplit("@", 1)[-1]
    return (urllib.parse.urlunsplit(parsed._replace(netloc=netloc)), {"Host": host_header},
            {"sni_hostname": parsed.hostname or ""})


def check_public_url(url: str, allow_hosts: list[str], param: str) -> tuple[str, str]:
    """(host, address to connect to) if the host is allow-listed and every address it resolves to is public."""
    parsed = urllib.parse.urlsplit(url)
    host = (parsed.hostname or "").lower()
    if parsed.scheme not in ("http", "https") or not host:
        raise InvalidInputError(f"{param}: not an http(s) URL", param)
    if host not in {h.lower() for h in allow_hosts}:
        raise BadRequestError(f"{param}: host {host!r} is not in XCLIP_URL_ALLOW_HOSTS", param)
    try:
        infos = socket.getaddrinfo(host, parsed.port or (443 if parsed.scheme == "https" else 80))
    except OSError as err:
        raise InvalidInputError(f"{param}: cannot resolve {host}: {err}", param) from err
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise BadRequestError(f"{param}: {host} resolves to a non-public address", param)
    return host, infos[0][4][0]
