"""Reliability under hostile and unlucky input, against the real server: one bad request never fails another,
searches never mix embedding spaces at a switch-over, clip-retrieval's own client works unmodified, decoding is
bounded in memory, anonymous bodies are refused before they are read, and every writable id is addressable."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import random
import socket
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from PIL import Image

from api_tests.conftest import Server
from api_tests.helpers import error_of, image_b64, png_bytes, shape_images

DEADLINE_S = 120
POISON = "\ud800x"  # a lone UTF-16 surrogate: legal in a JSON escape, not valid Unicode


def wait_until(condition, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def fill(client: httpx.Client, name: str, shapes: Path, modality: str = "image") -> list[str]:
    """A collection of the shape images (or their names as texts); their ids."""
    assert client.put(f"/v1/collections/{name}", json={"modality": modality}).status_code == 201
    paths = shape_images(shapes)
    items = [{"id": p.stem, "image": image_b64(p)} if modality == "image" else
             {"id": p.stem, "text": p.stem.replace("-", " ")} for p in paths]
    assert client.post(f"/v1/collections/{name}/items", json={"items": items}).status_code == 200
    return [p.stem for p in paths]


# -- 1. one bad request never fails another ---------------------------------------------------------------------
def test_a_poisoned_caller_fails_alone_while_valid_callers_all_succeed(server):
    """One caller sends a lone surrogate every few ms while 16 callers embed valid texts through the same
    dynamic batcher: every valid request answers 200, every poisoned one 422 naming its field."""
    statuses, poisoned, stop = [], [], threading.Event()

    def valid(worker: int) -> None:
        with server.client("reader-key") as client:
            for i in range(15):
                r = client.post("/v1/embeddings", json={"input": [f"a red circle {worker} {i}", "a blue square"]})
                statuses.append(r.status_code)

    def poison() -> None:
        with server.client("reader-key") as client:
            while not stop.is_set():
                r = client.post("/v1/embeddings", content=json.dumps({"input": ["fine", POISON]}),
                                headers={"content-type": "application/json"})
                poisoned.append((r.status_code, error_of(r)["param"]))
                time.sleep(0.005)

    poisoner = threading.Thread(target=poison)
    poisoner.start()
    workers = [threading.Thread(target=valid, args=(w,)) for w in range(16)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    poisoner.join()
    assert statuses == [200] * 16 * 15
    assert poisoned and set(poisoned) == {(422, "input[1]")}


@pytest.mark.parametrize("method, path, body, param", [
    ("post", "/v1/embeddings", {"input": POISON}, "input"),
    ("post", "/v1/embed/text", {"texts": ["ok", POISON]}, "texts[1]"),
    ("post", "/v1/clusters", {"texts": [POISON]}, "texts[0]"),
    ("post", "/v1/classify", {"images": ["x"], "labels": ["cat", POISON]}, "labels[1]"),
    ("post", "/v1/classify", {"images": ["x"], "labels": ["cat"], "templates": [POISON + " {}"]}, "templates[0]"),
    ("put", "/v1/label-sets/poisoned", {"labels": [POISON]}, "labels[0]"),
    ("post", "/v1/collections/reliable/search", {"text": POISON}, "text"),
    ("post", "/v1/collections/reliable/items", {"items": [{"id": "p", "text": POISON}]}, "items[0].text"),
    ("post", "/v1/collections/reliable/items", {"items": [{"id": POISON, "text": "x"}]}, "items[0].id"),
    ("post", "/v1/collections/reliable/items",
     {"items": [{"id": "p", "text": "x", "metadata": {"caption": POISON}}]}, "items[0].metadata.caption"),
    ("post", "/knn-service", {"text": POISON, "indice_name": "reliable", "modality": "text"}, "text"),
    ("post", "/vectorize", {"texts": [POISON]}, "texts[0]"),
])
def test_a_lone_surrogate_is_a_422_naming_its_field_on_every_route(server, shapes, method, path, body, param):
    with server.client() as client:
        if client.get("/v1/collections/reliable").status_code == 404:
            fill(client, "reliable", shapes, "text")
        before = client.get("/v1/collections/reliable").json()["count"]
        response = getattr(client, method)(path, content=json.dumps(body), headers={"content-type":
                                                                                  "application/json"})
        assert response.status_code == 422, response.text
        message = response.json()["error"] if path == "/vectorize" else error_of(response)
        if path != "/vectorize":
            assert message["param"] == param
        assert client.get("/v1/collections/reliable").json()["count"] == before


# -- 2. searches never mix embedding spaces ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_spaces(tmp_path_factory, bundles):
    """A server with two bundles of equal width (two seeds): two embedding spaces a search could mix."""
    server = Server(tmp_path_factory.mktemp("spaces") / "state", bundles["xclip"]).start()
    yield server
    server.stop()


def test_by_id_searches_find_the_item_itself_across_many_switch_overs(two_spaces, bundles, shapes):
    with two_spaces.client() as admin:
        first = admin.get("/v1/models").json()["active"]
        second = admin.post("/v1/models", json={"path": str(bundles["xclip-b"])}).json()["id"]
        ids = fill(admin, "switching", shapes)
    wrong, answered, stop = [], [], threading.Event()

    def search_by_id(seed: int) -> None:
        rng = random.Random(seed)
        with two_spaces.client("reader-key") as client:
            while not stop.is_set():
                item = rng.choice(ids)
                r = client.post("/v1/collections/switching/search", json={"id": item, "k": 3})
                assert r.status_code == 200, r.text
                answered.append(r.json()["model"])
                own = [h["score"] for h in r.json()["results"] if h["id"] == item]
                if not own or own[0] < 0.999:  # (identical images tie with it: the item itself, not top-1)
                    wrong.append((item, r.json()))

    searchers = [threading.Thread(target=search_by_id, args=(s,)) for s in range(4)]
    for t in searchers:
        t.start()
    try:
        with two_spaces.client() as admin:
            for target in [second, first] * 4:
                assert admin.post(f"/v1/models/{target}/activate").status_code == 200
                wait_until(lambda t=target: admin.get("/v1/collections/switching").json()["model_id"] == t,
                           f"the collection to switch to {target}")
    finally:
        stop.set()
        for t in searchers:
            t.join()
    assert not wrong, wrong[:3]
    assert {first, second} <= set(answered)  # searches ran in both spaces


# -- 3. clip-retrieval's own client -----------------------------------------------------------------------------
def load_clip_client():
    """clip-retrieval's `clip_client.py`, loaded by path: its package `__init__` imports the Flask back end."""
    package = importlib.util.find_spec("clip_retrieval")
    path = Path(package.submodule_search_locations[0]) / "clip_client.py"
    spec = importlib.util.spec_from_file_location("clip_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def open_knn(tmp_path_factory, bundles, shapes):
    """A server whose clip-retrieval routes are open (the client sends no key), with an image collection."""
    server = Server(tmp_path_factory.mktemp("knn") / "state", bundles["xclip"],
                    {"XCLIP_OPEN_COMPAT": '["clip-retrieval"]'}).start()
    with server.client() as admin:
        fill(admin, "shapes", shapes)
    yield server
    server.stop()


def test_clip_retrieval_client_queries_by_text_image_and_embedding(open_knn, shapes):
    clip_client = load_clip_client()
    client = clip_client.ClipClient(url=f"{open_knn.base_url}/knn-service", indice_name="shapes", num_images=5,
                                    modality=clip_client.Modality.IMAGE)
    by_text = client.query(text="a red circle")
    path = shape_images(shapes)[0]
    by_image = client.query(image=str(path))
    with open_knn.client() as admin:
        vector = admin.post("/v1/embeddings", json={"input": "a red circle"}).json()["data"][0]["embedding"]
    by_vector = client.query(embedding_input=vector)
    for results in (by_text, by_image, by_vector):
        assert isinstance(results, list) and 1 <= len(results) <= 5, results
        assert all(isinstance(r["id"], int) and isinstance(r["similarity"], float) for r in results)
        assert all("image" in r for r in results)  # the kept bytes, as clip-retrieval's front end shows them
    assert by_text == by_vector  # the same query, embedded by the server or given
    assert by_image[0]["similarity"] == pytest.approx(1.0, abs=1e-4)  # the image itself comes first


@pytest.mark.parametrize("content_type", [None, "text/plain;charset=UTF-8", "application/x-www-form-urlencoded"])
def test_compat_bodies_parse_as_json_whatever_their_content_type(open_knn, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    body = json.dumps({"text": "a red circle", "indice_name": "shapes", "modality": "image", "num_images": 2,
                       "num_result_ids": 2})
    knn = httpx.post(f"{open_knn.base_url}/knn-service", content=body, headers=headers)
    assert knn.status_code == 200, knn.text
    ids = [row["id"] for row in knn.json()]
    meta = httpx.post(f"{open_knn.base_url}/metadata", headers=headers,
                      content=json.dumps({"ids": ids, "indice_name": "shapes"}))
    assert meta.status_code == 200 and [row["id"] for row in meta.json()] == ids


def test_knn_without_a_query_is_a_422_naming_the_field(open_knn):
    response = httpx.post(f"{open_knn.base_url}/knn-service", content=json.dumps(
        {"text": None, "image": None, "image_url": None, "embedding_input": None, "indice_name": "shapes"}))
    assert response.status_code == 422 and error_of(response)["param"] == "text"


# -- 4. decoding is bounded; anonymous bodies are refused before they are read -----------------------------------
def big_png(side: int) -> bytes:
    """A PNG small on the wire (one colour compresses to almost nothing) but large decoded."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 200).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def test_decoded_pixels_are_budgeted_per_request_and_in_flight(tmp_path_factory, bundles):
    server = Server(tmp_path_factory.mktemp("pixels") / "state", bundles["xclip"]).start()
    try:
        big = base64.b64encode(big_png(6000)).decode()  # 36 M pixels each, ~40 KB on the wire
        with server.client("reader-key", timeout=120) as client:
            client.post("/v1/embeddings", json={"input": [base64.b64encode(png_bytes()).decode()],
                                                "modality": "image"})
            baseline = rss_mb(server.process.pid)
            refused = client.post("/v1/embeddings", json={"input": [big] * 16, "modality": "image"})
            assert refused.status_code == 413 and error_of(refused)["param"] == "input"
            assert rss_mb(server.process.pid) < baseline + 100  # refused from the headers, nothing decoded

        statuses = []

        def burst() -> None:
            with server.client("reader-key", timeout=120) as client:
                r = client.post("/v1/embeddings", json={"input": [big] * 2, "modality": "image"})
                statuses.append(r.status_code)

        threads = [threading.Thread(target=burst) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(statuses) <= {200, 429} and 200 in statuses, statuses
        # at most 200 M pixels decode at once (a few images of ~36 MB, decoded one by one per request)
        assert rss_mb(server.process.pid) < baseline + 1200
        assert httpx.get(f"{server.base_url}/healthz").status_code == 200
    finally:
        server.stop()


def test_an_anonymous_body_is_refused_before_it_is_read(server):
    """The server answers 401 having read only the headers: the 32 MB body is never sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 32000000\r\n\r\n{\"input\": [")
        reply = sock.recv(65536).decode("latin-1")
    assert reply.startswith("HTTP/1.1 401"), reply[:200]


def test_a_chunked_body_over_the_limit_is_a_413(server):
    def chunks():
        for _ in range(40):
            yield b"x" * (1024 * 1024)

    with server.client("reader-key") as client:
        response = client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and error_of(response)["param"] == "body"


def test_a_pixel_bomb_is_a_413_and_a_corrupt_image_names_no_python_object(server):
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, "PNG")
    bomb = bytearray(buf.getvalue())
    bomb[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width and height: 30,000² declared pixels
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")  # the IHDR chunk's CRC
    with server.client("reader-key") as client:
        r = client.post("/v1/embeddings", json={"input": [base64.b64encode(bytes(bomb)).decode()],
                                                "modality": "image"})
        assert r.status_code == 413 and error_of(r)["param"] == "input[0]", r.text
        r = client.post("/v1/embeddings", json={"input": [base64.b64encode(b"not an image").decode()],
                                                "modality": "image"})
    assert r.status_code == 422 and "object at 0x" not in error_of(r)["message"], r.text


# -- 5. every id that can be written is addressable ---------------------------------------------------------------
@pytest.mark.parametrize("item_id", ["images/1f600.png", "a b", "50%", "q?x=1#y", "ünï/cødé", "a//b"])
def test_ids_with_slashes_and_reserved_characters_can_be_fetched_and_deleted(server, item_id):
    with server.client() as client:
        if client.get("/v1/collections/ids").status_code == 404:
            client.put("/v1/collections/ids", json={"modality": "text"})
        assert client.post("/v1/collections/ids/items",
                           json={"items": [{"id": item_id, "text": "x"}]}).status_code == 200
        encoded = quote(item_id, safe="")
        got = client.get(f"/v1/collections/ids/items/{encoded}")
        assert got.status_code == 200 and got.json()["id"] == item_id, got.text
        assert client.delete(f"/v1/collections/ids/items/{encoded}").status_code == 204
        assert client.get(f"/v1/collections/ids/items/{encoded}").status_code == 404


@pytest.mark.parametrize("item_id", ["a\x00b", "tab\there", "..", "a/../b", "./a", " padded"])
def test_ids_that_could_not_be_addressed_are_refused_at_write(server, item_id):
    with server.client() as client:
        if client.get("/v1/collections/ids").status_code == 404:
            client.put("/v1/collections/ids", json={"modality": "text"})
        before = client.get("/v1/collections/ids").json()["count"]
        r = client.post("/v1/collections/ids/items", json={"items": [{"id": "fine", "text": "x"},
                                                                    {"id": item_id, "text": "y"}]})
        assert r.status_code == 422 and error_of(r)["param"].startswith("items"), r.text
        assert client.get("/v1/collections/ids").json()["count"] == before


def test_items_written_by_index_build_can_be_fetched_and_deleted(tmp_path_factory, bundles, shapes):
    from typer.testing import CliRunner

    from xclip_serve.cli import app

    state = tmp_path_factory.mktemp("built") / "state"
    result = CliRunner().invoke(app, ["index", "build", "--bundle", str(bundles["xclip"]), "--data", str(shapes),
                                      "--collection", "built", "--root", str(state / "collections")])
    assert result.exit_code == 0, result.output
    server = Server(state, bundles["xclip"]).start()
    try:
        with server.client() as client:
            ids = client.get("/v1/collections/built/items", params={"limit": 5}).json()["ids"]
            assert any("/" in i for i in ids), ids
            for item_id in ids:
                assert client.get(f"/v1/collections/built/items/{item_id}").json()["id"] == item_id
                assert client.delete(f"/v1/collections/built/items/{item_id}").status_code == 204
    finally:
        server.stop()


# -- 6, 7, 9: filters, templates, metadata depth ------------------------------------------------------------------
def test_large_filters_are_answered_and_over_the_limit_refused(server, shapes):
    with server.client() as client:
        if client.get("/v1/collections/reliable").status_code == 404:
            fill(client, "reliable", shapes, "text")
        ids = client.get("/v1/collections/reliable/items").json()["ids"]
        client.post("/v1/collections/reliable/items", json={"items": [
            {"id": i, "text": i.replace("-", " "), "metadata": {"n": n}} for n, i in enumerate(ids)]})
        wide = {"n": {"in": list(range(1, 2000, 2))}}  # 1,000 values: the odd ones
        r = client.post("/v1/collections/reliable/search", json={"text": "circle", "k": 100, "filter": wide})
        assert r.status_code == 200 and {h["metadata"]["n"] % 2 for h in r.json()["results"]} == {1}
        many_keys = {f"k{i}": {"in": list(range(1000))} for i in range(40)}
        assert client.post("/v1/collections/reliable/search",
                           json={"text": "x", "filter": many_keys}).status_code == 200
        too_many = {f"k{i}": 1 for i in range(5000)}
        r = client.post("/v1/collections/reliable/search", json={"text": "x", "filter": too_many})
        assert r.status_code == 422 and error_of(r)["param"] == "filter"


@pytest.mark.parametrize("template", ["{x} {}", "{} {", "}{}", "{0}", "{}{}", "no placeholder", "{:>5}"])
def test_bad_templates_are_refused_on_every_path(server, template):
    png = base64.b64encode(png_bytes()).decode()
    with server.client() as client:
        r = client.post("/v1/classify", json={"images": [png], "labels": ["a"], "templates": [template]})
        assert r.status_code == 422 and error_of(r)["param"] == "templates", r.text
        r = client.put("/v1/label-sets/bad", json={"labels": ["a"], "templates": ["a {}", template]})
        assert r.status_code == 422 and error_of(r)["param"] == "templates", r.text
        assert client.post("/v1/classify", json={"images": [png], "label_set": "bad"}).status_code == 404


def test_a_label_set_stored_with_a_bad_template_is_a_422_not_a_500(tmp_path_factory, bundles):
    state = tmp_path_factory.mktemp("labels") / "state"
    state.mkdir(parents=True)
    (state / "label_sets.json").write_text(json.dumps({"old": {"labels": ["a", "b"], "templates": ["{x} {}"]}}))
    server = Server(state, bundles["xclip"]).start()
    try:
        with server.client() as client:
            r = client.post("/v1/classify", json={"images": [base64.b64encode(png_bytes()).decode()],
                                                  "label_set": "old"})
        assert r.status_code == 422 and error_of(r)["param"] == "label_set", r.text
    finally:
        server.stop()


def test_metadata_nested_too_deep_is_refused_at_write(server):
    deep: dict = {}
    for _ in range(300):
        deep = {"d": deep}
    with server.client() as client:
        if client.get("/v1/collections/ids").status_code == 404:
            client.put("/v1/collections/ids", json={"modality": "text"})
        r = client.post("/v1/collections/ids/items", json={"items": [{"id": "deep", "text": "x", "metadata": deep}]})
        assert r.status_code == 422 and error_of(r)["param"].startswith("items"), r.text
        assert client.get("/v1/collections/ids/items/deep").status_code == 404


# -- 12. one status per failure, and the same for every route ---------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/embed/text", "/v1/classify", "/v1/clusters",
                                  "/v1/collections/reliable/search", "/vectorize", "/knn-service"])
def test_malformed_json_is_a_400_on_every_route(server, path):
    with server.client() as client:
        r = client.post(path, content=b'{"input": [', headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


def test_text_over_the_context_follows_one_rule(server, shapes):
    long_text = " ".join(["circle"] * 500)
    with server.client() as client:
        if client.get("/v1/collections/reliable").status_code == 404:
            fill(client, "reliable", shapes, "text")
        for path, body, param in [("/v1/embeddings", {"input": long_text}, "input[0]"),
                                  ("/v1/embed/text", {"texts": [long_text]}, "texts[0]"),
                                  ("/v1/collections/reliable/search", {"text": long_text}, "text"),
                                  ("/v1/collections/reliable/items", {"items": [{"id": "long", "text": long_text}]},
                                   "items[0].text")]:
            r = client.post(path, json=body)
            assert r.status_code == 413 and error_of(r)["param"] == param, (path, r.text)
        assert client.post("/v1/collections/reliable/search", json={"text": long_text,
                                                                    "truncate": True}).status_code == 200
        assert client.post("/v1/embed/text", json={"texts": [long_text], "truncate": True}).status_code == 200
