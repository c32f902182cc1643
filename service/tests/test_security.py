"""Settings validation, API-key scopes, input limits and the URL-fetch guard."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from core.preprocess import PreprocessConfig
from service.auth import KeyChecker, parse_keys
from service.errors import (
    AuthenticationError,
    BadRequestError,
    InvalidInputError,
    PayloadTooLargeError,
    PermissionDeniedError,
    status_of,
)
from service.inputs import InputDecoder, check_public_url, pinned_request
from service.settings import Settings

KEYS = json.dumps({"reader": ["read"], "writer": ["write"], "boss": ["admin"]})


def png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_settings_refuse_to_start_without_keys_unless_auth_is_explicitly_off(monkeypatch):
    monkeypatch.delenv("XCLIP_API_KEYS", raising=False)
    with pytest.raises(ValidationError, match="no API keys configured"):
        Settings()
    assert Settings(auth_disabled=True).auth_disabled


@pytest.mark.parametrize("keys, message", [
    ('{"k": ["superuser"]}', "scopes must be"),
    ('["k"]', "JSON object"),
    ("k=read", "must be JSON"),
])
def test_bad_key_configuration_fails_fast(keys, message):
    with pytest.raises(ValidationError, match=message):
        Settings(api_keys=keys)


def test_a_bad_key_is_named_by_its_position_never_by_the_key():
    with pytest.raises(ValueError, match="XCLIP_API_KEYS: key 2: scopes must be") as info:
        parse_keys('{"good-key": ["read"], "s3cret-key": ["superuser"]}', "XCLIP_API_KEYS")
    assert "s3cr" not in str(info.value)


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("XCLIP_API_KEYS", KEYS)
    monkeypatch.setenv("XCLIP_PORT", "9123")
    settings = Settings()
    assert settings.port == 9123 and settings.key_scopes()["writer"] == {"read", "write"}


@pytest.mark.parametrize("header, scope, error", [
    (None, "read", AuthenticationError),
    ("Bearer nope", "read", AuthenticationError),
    ("Basic reader", "read", AuthenticationError),
    ("Bearer reader", "write", PermissionDeniedError),
    ("Bearer writer", "admin", PermissionDeniedError),
    ("Bearer reader", "read", None),
    ("Bearer writer", "read", None),
    ("Bearer boss", "admin", None),
])
def test_scopes(header, scope, error):
    checker = KeyChecker(Settings(api_keys=KEYS).key_scopes())
    if error is None:
        checker.require(header, scope)
    else:
        with pytest.raises(error):
            checker.require(header, scope)


def test_auth_errors_map_to_401_and_403():
    assert status_of(AuthenticationError("x"))[0] == 401
    assert status_of(PermissionDeniedError("x"))[0] == 403


@pytest.fixture
def decoder():
    return InputDecoder(Settings(auth_disabled=True, max_image_bytes=4096, max_image_pixels=64 * 64,
                                 max_text_chars=20, max_items=3))


def decode(decoder: InputDecoder, source: str | bytes, param: str):
    """One image through the service's decode path (header checks, then a worker thread)."""
    return asyncio.run(decoder.image(source, param, PreprocessConfig(image_size=8)))


def test_images_decode_from_base64_and_data_uris(decoder):
    raw = base64.b64encode(png()).decode()
    assert decode(decoder, raw, "image").size == (8, 8)
    assert decode(decoder, "data:image/png;base64," + raw, "image").size == (8, 8)


@pytest.mark.parametrize("value, error, fragment", [
    ("not base64!!", InvalidInputError, "invalid base64"),
    (base64.b64encode(b"GIF89a-truncated").decode(), InvalidInputError, "cannot decode"),
    ("", InvalidInputError, "empty"),
    ("https://example.com/cat.png", BadRequestError, "disabled"),
])
def test_bad_images_name_the_field(decoder, value, error, fragment):
    with pytest.raises(error, match=fragment) as info:
        decode(decoder, value, "input[2]")
    assert info.value.param == "input[2]"


def test_decompression_bomb_is_refused_from_the_header(decoder):
    with pytest.raises(PayloadTooLargeError, match="pixels"):
        decode(decoder, png((100, 100)), "files[0]")


def test_oversize_image_bytes_are_refused(decoder):
    with pytest.raises(PayloadTooLargeError, match="bytes"):
        decode(decoder, b"\x89PNG" + b"0" * 5000, "files[0]")


def test_text_and_count_limits(decoder):
    with pytest.raises(PayloadTooLargeError, match="characters"):
        decoder.check_text("x" * 21, "texts[0]")
    with pytest.raises(InvalidInputError, match="empty"):
        decoder.check_text("  ", "texts[0]")
    with pytest.raises(InvalidInputError, match="must not be empty"):
        decoder.check_count([], "texts")
    with pytest.raises(PayloadTooLargeError, match="limit is 3"):
        decoder.check_count([1, 2, 3, 4], "texts")


@pytest.mark.parametrize("url, allow, fragment", [
    ("http://127.0.0.1/x.png", ["127.0.0.1"], "non-public"),
    ("http://localhost/x.png", ["localhost"], "non-public"),
    ("http://10.0.0.8/x.png", ["10.0.0.8"], "non-public"),
    ("http://169.254.169.254/latest", ["169.254.169.254"], "non-public"),
    ("http://example.com/x.png", ["other.org"], "not in XCLIP_URL_ALLOW_HOSTS"),
    ("ftp://example.com/x.png", ["example.com"], "not an http"),
])
def test_url_guard_refuses_private_and_unlisted_hosts(url, allow, fragment):
    with pytest.raises((BadRequestError, InvalidInputError), match=fragment):
        check_public_url(url, allow, "image")


def public_then_private(addresses: list[str]):
    """A getaddrinfo that answers each address in turn: a DNS name rebound between check and connect."""
    answers = iter(addresses)

    def getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    return getaddrinfo


def test_url_fetch_connects_to_the_checked_address_not_a_rebound_one(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", public_then_private(["93.184.216.34", "127.0.0.1"]))
    seen = {}

    class Response:
        status_code = 200

        def iter_bytes(self):
            yield b"png"

    @contextlib.contextmanager
    def stream(client, method, url, **kwargs):
        seen.update(url=url, follow_redirects=client.follow_redirects, **kwargs)
        yield Response()

    monkeypatch.setattr(httpx.Client, "stream", stream)
    decoder = InputDecoder(Settings(url_fetch=True, url_allow_hosts=["images.example.com"], auth_disabled=True))
    assert decoder.fetch_url("https://images.example.com/cat.png?s=1", "image") == b"png"
    assert seen["url"] == "https://93.184.216.34/cat.png?s=1"
    assert seen["headers"] == {"Host": "images.example.com"}
    assert seen["extensions"] == {"sni_hostname": "images.example.com"}
    assert seen["follow_redirects"] is False


@pytest.mark.parametrize("url, address, expected, host", [
    ("http://a.example:8080/x.png", "93.184.216.34", "http://93.184.216.34:8080/x.png", "a.example:8080"),
    ("https://a.example/x.png", "2606:2800:220:1::1", "https://[2606:2800:220:1::1]/x.png", "a.example"),
])
def test_pinned_request_keeps_port_path_and_host(url, address, expected, host):
    pinned, headers, extensions = pinned_request(url, address)
    assert (pinned, headers["Host"], extensions["sni_hostname"]) == (expected, host, "a.example")
