"""Turning request payloads into decoded images and checked texts, with the service's limits.

Images arrive as multipart bytes, base64 (plain or `data:image/...;base64,` URIs) or, when enabled, http(s) URLs
of allow-listed public hosts; they are decoded in worker threads under pixel budgets. Every failure is an
InvalidInputError / PayloadTooLargeError / OverloadedError naming the field.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ctypes
import functools
import io
import ipaddress
import re
import socket
import urllib.parse
from collections.abc import Sequence

import httpx
from PIL import Image

from core.data import has_surrogates
from core.preprocess import ImageDecodeError, PreprocessConfig, decode_for_model
from service.errors import BadRequestError, InvalidInputError, OverloadedError, PayloadTooLargeError
from service.settings import Settings

DATA_URI = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)
OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
TRIM_AFTER_PIXELS = 20_000_000  # a decode spike this large is worth handing memory back for


class InputDecoder:
    """Decodes and checks inputs against the limits in `settings`.

    Image decoding runs in worker threads, never on the event loop, under two budgets of decoded pixels read
    from each image's header before any pixel is decoded: per request (`max_request_pixels`, 413 beyond) and
    across the requests decoding at once (`max_inflight_pixels`, 429 beyond). Images are decoded no larger than
    the model needs (`core.preprocess.decode_for_model`), so what waits for a batch is small."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._inflight_pixels = 0  # touched on the event loop only
        self._peak_since_trim = 0

    async def images(self, sources: Sequence[str | bytes], param: str, preprocess: PreprocessConfig) -> list[Image.Image]:
        """Decoded RGB images from base64 / data URIs / URLs (str) or encoded bytes; errors name `param[i]`."""
        return [image for _, image in await self.images_with_bytes(sources, param, preprocess)]

    async def image(self, source: str | bytes, param: str, preprocess: PreprocessConfig) -> Image.Image:
        """One decoded image; errors name `param`."""
        return (await self.images_with_bytes([source], param, preprocess, names=[param]))[0][1]

    async def images_with_bytes(self, sources: Sequence[str | bytes], param: str, preprocess: PreprocessConfig,
                                names: list[str] | None = None) -> list[tuple[bytes, Image.Image]]:
        """(encoded bytes, decoded image) per source, for callers that keep the bytes (collection items);
        `names` are the fields errors name (default `param[i]`)."""
        names = names or [f"{param}[{i}]" for i in range(len(sources))]
        opened = await asyncio.to_thread(self._open_all, list(sources), names)
        pixels = sum(image.size[0] * image.size[1] for _, image in opened)
        self._check_request_pixels(pixels, param)
        with self._reserve(pixels, param):
            return await asyncio.to_thread(self._decode_all, opened, names, preprocess)

    def _open_all(self, sources: list, names: list[str]) -> list[tuple[bytes, Image.Image]]:
        """Bytes and header-opened images (no pixel decoded yet)."""
        opened = []
        for source, name in zip(sources, names, strict=True):
            data = source if isinstance(source, bytes) else self.image_bytes_from_string(source, name)
            opened.append((data, self.open_image(data, name)))
        return opened

    def _decode_all(self, opened: list, names: list[str], preprocess: PreprocessConfig) -> list[tuple[bytes, Image.Image]]:
        return [(data, self.decode(image, name, preprocess))
                for (data, image), name in zip(opened, names, strict=True)]

    def _check_request_pixels(self, pixels: int, param: str) -> None:
        limit = self.settings.max_request_pixels
        if pixels > limit:
            raise PayloadTooLargeError(f"{param}: the images of this request hold {pixels} decoded pixels, the "
                                       f"limit per request is {limit} (XCLIP_MAX_REQUEST_PIXELS)", param)

    @contextlib.contextmanager
    def _reserve(self, pixels: int, param: str):
        """Hold `pixels` of the in-flight decode budget; 429 when the server is decoding too much already."""
        limit = self.settings.max_inflight_pixels
        if self._inflight_pixels and self._inflight_pixels + pixels > limit:
            raise OverloadedError(f"{param}: the server is decoding {self._inflight_pixels} pixels of other "
                                  f"requests (limit {limit}); retry shortly", param, headers={"Retry-After": "1"})
        self._inflight_pixels += pixels
        self._peak_since_trim = max(self._peak_since_trim, self._inflight_pixels)
        try:
            yield
        finally:
            self._inflight_pixels -= pixels
            if not self._inflight_pixels and self._peak_since_trim >= TRIM_AFTER_PIXELS:
                self._peak_since_trim = 0
                asyncio.get_running_loop().run_in_executor(None, release_free_memory)  # walks the heap: off-loop

    def open_image(self, data: bytes, param: str) -> Image.Image:
        """The image opened from its header; refuses oversize payloads and decompression bombs (413) and what
        is not an image (422) before any pixel is decoded."""
        if not data:
            raise InvalidInputError(f"{param}: empty image", param)
        if len(data) > self.settings.max_image_bytes:
            raise PayloadTooLargeError(
                f"{param}: image is {len(data)} bytes, the limit is {self.settings.max_image_bytes}", param)
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as err:
            raise PayloadTooLargeError(f"{param}: image has too many pixels ({_pillow_message(err)}); the "
                                       f"limit is {self.settings.max_image_pixels}", param) from err
        except (OSError, SyntaxError, ValueError) as err:
            raise InvalidInputError(f"{param}: cannot decode image: {_pillow_message(err)}", param) from err
        width, height = image.size
        if width * height > self.settings.max_image_pixels:
            raise PayloadTooLargeError(
                f"{param}: image is {width}x{height} pixels, the limit is {self.settings.max_image_pixels}", param)
        return image

    def decode(self, image: Image.Image, param: str, preprocess: PreprocessConfig) -> Image.Image:
        """RGB pixels of an opened image, reduced for the model's input as `preprocess` allows (blocking: call
        off-loop)."""
        try:
            return decode_for_model(image, preprocess)
        except ImageDecodeError as err:
            raise InvalidInputError(f"{param}: {_pillow_message(err)}", param) from err

    def image_bytes_from_string(self, value: str, param: str) -> bytes:
        """Bytes of an image given as base64, a data URI, or (when enabled) an http(s) URL (blocking)."""
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

    def check_text(self, text: object, param: str) -> str:
        """A non-empty string of valid Unicode (no lone surrogate) within the character limit."""
        if not isinstance(text, str):
            raise InvalidInputError(f"{param}: expected a string, got {type(text).__name__}", param)
        if not text.strip():
            raise InvalidInputError(f"{param}: empty text", param)
        if len(text) > self.settings.max_text_chars:
            raise PayloadTooLargeError(
                f"{param}: text has {len(text)} characters, the limit is {self.settings.max_text_chars}", param)
        if not text.isascii() and has_surrogates(text):
            raise InvalidInputError(f"{param}: text contains a lone UTF-16 surrogate, which is not valid "
                                    "Unicode", param)
        return text

    def check_texts(self, texts: list, param: str) -> list[str]:
        """`check_count` and `check_text` of each."""
        return [self.check_text(t, f"{param}[{i}]") for i, t in enumerate(self.check_count(texts, param))]

    def check_count(self, values: list, param: str, limit: int | None = None) -> list:
        """A non-empty list within the per-request item limit."""
        limit = limit or self.settings.max_items
        if not values:
            raise InvalidInputError(f"{param}: must not be empty", param)
        if len(values) > limit:
            raise PayloadTooLargeError(f"{param}: {len(values)} items, the limit is {limit}", param)
        return values

    def fetch_url(self, url: str, param: str) -> bytes:
        """GET an image from an allow-listed public host, with size and time limits (blocking: the async
        routes call it in a worker thread through `images`)."""
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


def _pillow_message(err: Exception) -> str:
    """Pillow's message without the object reprs it embeds (`<_io.BytesIO object at 0x...>`)."""
    message = OBJECT_REPR.sub("the data", str(err))
    return message.replace("cannot identify image file the data", "not a recognised image format")


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_free_memory() -> None:
    """Hand freed heap back to the OS after a decode spike (glibc keeps it otherwise); a no-op elsewhere."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


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
