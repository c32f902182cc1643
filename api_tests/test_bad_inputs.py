"""A corpus of awkward inputs against every route that takes images or texts: what Pillow decodes (CMYK, 16-bit,
palette, animated GIF, WebP, TIFF, BMP, ICO, EXIF-rotated, 1×1, 10000×10) is embedded, unit-norm; what is broken
or hostile (empty, truncated, corrupt, SVG, decompression bombs, bad base64, a 1 MB text, a lone surrogate, JSON
nested 10,000 deep, huge filters, bad prompt templates) is a 4xx JSON error naming the field. Then the server is
still up and every item stored before the corpus is still there, unchanged.

NUL characters in a text are accepted: U+0000 is a Unicode scalar value like any other, the tokenizer reads it,
and refusing it would refuse texts extracted from binary formats that clients send as they are."""

from __future__ import annotations

import base64
import functools
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from api_tests.helpers import error_of, png_bytes

LABELS = ["red", "blue"]
KEPT = {"kept": [{"id": f"kept-{i}", "image": base64.b64encode(png_bytes((40 * i, 90, 200))).decode(),
                  "metadata": {"n": i}} for i in range(3)],
        "kept-text": [{"id": f"kept/{i}", "text": f"stored text {i}", "metadata": {"n": i}} for i in range(3)]}
KNN = {"indice_name": "kept", "modality": "image", "num_images": 2, "num_result_ids": 2}


# -- the corpus --------------------------------------------------------------------------------------------------
def picture(size=(48, 32)) -> Image.Image:
    """An RGB image that no rotation or flip maps onto itself: a gradient with a block in one corner."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image.paste((230, 40, 40), (0, 0, size[0] // 3, size[1] // 3))
    return image


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    """PNG bytes of `image` whose EXIF asks viewers to rotate it (6: 90° clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, "PNG", exif=exif.tobytes())


def declared_png(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header declares `width`×`height` pixels (its data stops short)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4000))
            + chunk(b"IEND", b""))


def corrupted(data: bytes) -> bytes:
    """`data` with its middle third inverted (chunk CRCs and compressed streams no longer check out)."""
    third = len(data) // 3
    return data[:third] + bytes(b ^ 0xFF for b in data[third:2 * third]) + data[2 * third:]


def animated_gif() -> bytes:
    frames = [picture(), picture().rotate(180)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit_png() -> bytes:
    return encoded(Image.fromarray((np.arange(32 * 32, dtype=np.uint16) * 60).reshape(32, 32)), "PNG")


@functools.cache
def images() -> dict[str, bytes | str]:
    """Name → image payload: bytes of a file (base64-encoded for the JSON routes), or a str sent as it is."""
    png = encoded(picture(), "PNG")
    return {
        # decodable: 200
        "cmyk-jpeg": encoded(picture().convert("CMYK"), "JPEG"),
        "16-bit-png": sixteen_bit_png(),
        "palette-png": encoded(picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
        "animated-gif": animated_gif(),
        "webp": encoded(picture(), "WEBP"),
        "tiff": encoded(picture(), "TIFF"),
        "bmp": encoded(picture(), "BMP"),
        "ico": encoded(picture((32, 32)), "ICO", sizes=[(32, 32)]),
        "exif-rotated": with_orientation(picture(), 6),
        "1x1": encoded(Image.new("RGB", (1, 1), (9, 200, 9)), "PNG"),
        "10000x10": encoded(picture((10000, 10)), "PNG"),
        # broken or hostile: 4xx
        "zero-bytes": b"",
        "truncated": png[: len(png) // 2],
        "corrupt": corrupted(png),
        "not-an-image": bytes(range(256)) * 4,
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>',
        "bomb-declared-30000x30000": declared_png(30000, 30000),
        "bomb-compressed-10000x10000": encoded(Image.new("1", (10000, 10000)), "PNG"),  # 12 kB, 100 M pixels
        "invalid-base64": "iVBORw0KGgo*not base64*",
        "wrong-data-uri-mime": "data:text/plain;base64," + base64.b64encode(png).decode(),
    }


IMAGE_STATUS = {"zero-bytes": 422, "truncated": 422, "corrupt": 422, "not-an-image": 422, "svg": 422,
                "bomb-declared-30000x30000": 413, "bomb-compressed-10000x10000": 413, "invalid-base64": 422,
                "wrong-data-uri-mime": 422}  # any other: 200
# clip-retrieval's web front end sends "" for the query keys it does not use, so /knn-service reads an empty
# image as no image: the request carries no query, and the error names the first query field
NAMED_INSTEAD = {("knn-service", "zero-bytes"): "text"}
TEXTS = {
    "nul": ("a\x00b", 200),
    "one-megabyte": ("x" * 1_000_000, 413),
    "lone-surrogate": ("\ud800x", 422),
    "blank": ("   ", 422),
}


# -- the routes ----------------------------------------------------------------------------------------------------
def as_b64(value: bytes | str) -> str:
    return value if isinstance(value, str) else base64.b64encode(value).decode()


def as_file(value: bytes | str) -> list:
    data = value.encode() if isinstance(value, str) else value
    return [("files", ("upload", data, "application/octet-stream"))]


# route → (request for one image: method, path, body (dict: JSON) or (files, form fields), field errors name)
IMAGE_ROUTES = {
    "embeddings": lambda v, case: (
        "/v1/embeddings", {"input": [as_b64(v)], "model": "active", "modality": "image"}, "input[0]"),
    "embed-image": lambda v, case: ("/v1/embed/image", (as_file(v), {}), "files[0]"),
    "classify": lambda v, case: ("/v1/classify", {"images": [as_b64(v)], "labels": LABELS}, "images[0]"),
    "classify-multipart": lambda v, case: ("/v1/classify", (as_file(v), {"labels": LABELS}), "files[0]"),
    "clusters": lambda v, case: ("/v1/clusters", {"images": [as_b64(v)]}, "images[0]"),
    "upsert": lambda v, case: (
        "/v1/collections/kept/items", {"items": [{"id": f"corpus-{case}", "image": as_b64(v)}]}, "items[0].image"),
    "search": lambda v, case: ("/v1/collections/kept/search", {"image": as_b64(v), "k": 2}, "image"),
    "knn-service": lambda v, case: ("/knn-service", {"image": as_b64(v), **KNN}, "image"),
    "vectorize": lambda v, case: ("/vectorize", {"images": [as_b64(v)]}, "images[0]"),
}
TEXT_ROUTES = {
    "embeddings": lambda t, case: ("/v1/embeddings", {"input": [t], "model": "active"}, "input[0]"),
    "embed-text": lambda t, case: ("/v1/embed/text", {"texts": [t]}, "texts[0]"),
    "classify-labels": lambda t, case: (
        "/v1/classify", {"images": [as_b64(png_bytes())], "labels": [t]}, "labels[0]"),
    "clusters": lambda t, case: ("/v1/clusters", {"texts": [t]}, "texts[0]"),
    "upsert": lambda t, case: (
        "/v1/collections/kept-text/items", {"items": [{"id": f"corpus-{case}", "text": t}]}, "items[0].text"),
    "search": lambda t, case: ("/v1/collections/kept/search", {"text": t, "k": 2}, "text"),
    "knn-service": lambda t, case: ("/knn-service", {"text": t, **KNN}, "text"),
    "vectorize": lambda t, case: ("/vectorize", {"texts": [t]}, "texts[0]"),
}
# where a route answers an embedding of its one input
EMBEDDING_OF = {"/v1/embeddings": lambda body: body["data"][0]["embedding"],
                "/v1/embed/image": lambda body: body["data"][0]["embedding"],
                "/v1/embed/text": lambda body: body["data"][0]["embedding"],
                "/vectorize": lambda body: (body["imageVectors"] or body["textVectors"])[0]}


def send(client, path: str, body):
    """POST a JSON body (serialised here, ASCII-only, so that a lone surrogate travels as its escape) or a
    multipart form (files, fields)."""
    if isinstance(body, tuple):
        files, fields = body
        return client.post(path, files=files, data=fields)
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def check(server, path: str, body, status: int, param: str | None):
    """The route answers `status`; an error is JSON naming `param` (OpenAI's shape, or Weaviate's `{"error":
    message}` on /vectorize); a success with an embedding has a unit-norm one."""
    with server.client("admin-key") as client:
        response = send(client, path, body)
    assert response.status_code == status, response.text[:500]
    if status >= 400 and path == "/vectorize":
        message = response.json()["error"]
        assert message.startswith(f"{param}:"), message
    elif status >= 400:
        assert error_of(response)["param"] == param, response.text[:500]
    elif path in EMBEDDING_OF:
        assert np.linalg.norm(EMBEDDING_OF[path](response.json())) == pytest.approx(1.0, abs=1e-4)
    return response


@pytest.fixture(scope="module")
def kept(server):
    """Collections `kept` (images) and `kept-text` (texts) with items written before the corpus."""
    with server.client("admin-key") as admin:
        for name, items in KEPT.items():
            admin.put(f"/v1/collections/{name}", json={"modality": "text" if "text" in name else "image"})
            admin.post(f"/v1/collections/{name}/items", json={"items": items}).raise_for_status()
    return KEPT


@pytest.mark.parametrize("case", list(images()))
@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_image_corpus(server, kept, route, case):
    path, body, param = IMAGE_ROUTES[route](images()[case], case)
    check(server, path, body, IMAGE_STATUS.get(case, 200), NAMED_INSTEAD.get((route, case), param))


@pytest.mark.parametrize("case", list(TEXTS))
@pytest.mark.parametrize("route", list(TEXT_ROUTES))
def test_text_corpus(server, kept, route, case):
    text, status = TEXTS[case]
    path, body, param = TEXT_ROUTES[route](text, case)
    check(server, path, body, status, param)


DEEP = "[" * 10_000 + "]" * 10_000
JSON_PATHS = ["/v1/embeddings", "/v1/embed/text", "/v1/classify", "/v1/clusters", "/v1/collections/kept/items",
              "/v1/collections/kept/search", "/knn-service", "/vectorize"]


@pytest.mark.parametrize("path", JSON_PATHS)
def test_json_nested_10000_deep_is_a_400_naming_the_body(server, kept, path):
    with server.client("admin-key") as client:
        response = client.post(path, content=DEEP, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text[:500]
    body = response.json()
    assert body["error"].startswith("body:") if path == "/vectorize" else body["error"]["param"] == "body"


@pytest.mark.parametrize("where", [
    {"n": {"in": list(range(10_001))}},
    {f"key-{i}": i for i in range(5_000)},
    {"n": {"in": [[[["nested"]]]]}},
    {"n": {"gt": 1}},
    {"": 1},
])
def test_huge_or_malformed_filters_are_a_422_naming_filter(server, kept, where):
    check(server, "/v1/collections/kept/search", {"text": "red", "filter": where}, 422, "filter")


BAD_TEMPLATES = ["{x} {}", "{} {", "}{}", "{0}", "no placeholder", "{}{}"]


@pytest.mark.parametrize("template", BAD_TEMPLATES)
@pytest.mark.parametrize("route", ["classify", "classify-multipart", "label-set"])
def test_bad_prompt_templates_are_a_422_naming_templates(server, kept, route, template):
    image = png_bytes()
    path, body = {
        "classify": ("/v1/classify", {"images": [as_b64(image)], "labels": LABELS, "templates": [template]}),
        "classify-multipart": ("/v1/classify", (as_file(image), {"labels": LABELS,
                                                                 "templates": json.dumps([template])})),
        "label-set": ("/v1/label-sets/corpus", {"labels": LABELS, "templates": [template]}),
    }[route]
    if route == "label-set":
        with server.client("admin-key") as client:
            response = client.put(path, json=body)
        assert response.status_code == 422 and error_of(response)["param"] == "templates", response.text
    else:
        check(server, path, body, 422, "templates")


def test_exif_rotation_is_applied_before_embedding(server):
    """An image tagged "rotate 90° clockwise" embeds as the same pixels already rotated, not as they are stored."""
    def embed(data: bytes) -> np.ndarray:
        body = {"input": [as_b64(data)], "model": "active", "modality": "image"}
        return np.asarray(check(server, "/v1/embeddings", body, 200, None).json()["data"][0]["embedding"])

    tagged = embed(with_orientation(picture(), 6))
    rotated = embed(encoded(picture().transpose(Image.Transpose.ROTATE_270), "PNG"))
    as_stored = embed(encoded(picture(), "PNG"))
    np.testing.assert_allclose(tagged, rotated, atol=1e-5)
    assert not np.allclose(tagged, as_stored, atol=1e-3)


def test_after_the_corpus_the_server_is_up_and_nothing_stored_was_lost(server, kept):
    """Runs last (pytest keeps the file's order): every item written before is there, unchanged, and the
    collections hold nothing but those and the corpus's decodable inputs."""
    assert server.process.poll() is None
    with server.client("admin-key") as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        for name, items in KEPT.items():
            ids = client.get(f"/v1/collections/{name}/items", params={"limit": 1000}).json()["ids"]
            assert client.get(f"/v1/collections/{name}").json()["count"] == len(ids)
            assert {item["id"] for item in items} <= set(ids)
            assert all(i.startswith("kept") or i.removeprefix("corpus-") in images() | TEXTS for i in ids)
            refused = {f"corpus-{case}" for case in IMAGE_STATUS} | {f"corpus-{c}" for c, (_, s) in TEXTS.items()
                                                                   if s != 200}
            assert not refused & set(ids)
            for item in items:
                stored = client.get(f"/v1/collections/{name}/items/{item['id']}").json()
                assert stored["metadata"] == item["metadata"]
                assert stored["image"] == item.get("image") and stored["text"] == item.get("text")
