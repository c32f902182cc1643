"""Collections over HTTP: create, upsert (image, text, vector), search text→image, image→image, image→text,
by item id and by vector, metadata filters, get/delete, persistence across a restart, bad inputs."""

from __future__ import annotations

import base64

import pytest

from api_tests.conftest import Server
from api_tests.helpers import error_of, image_b64, png_bytes, shape_images


@pytest.fixture(scope="module")
def filled(server, shapes):
    """Collection `shapes` of every shape image (metadata: colour, shape) and `captions` of texts."""
    paths = shape_images(shapes)
    with server.client("admin-key") as admin:
        assert admin.put("/v1/collections/shapes", json={"modality": "image"}).status_code == 201
        assert admin.put("/v1/collections/captions", json={"modality": "text"}).status_code == 201
        items = [{"id": p.stem, "image": image_b64(p),
                  "metadata": {"colour": p.stem.split("-")[0], "shape": p.stem.split("-")[1]}} for p in paths]
        response = admin.post("/v1/collections/shapes/items", json={"items": items})
        assert response.json() == {"upserted": len(paths), "collection": "shapes"}, response.text
        texts = [{"id": f"t{i}", "text": f"{c} {s}", "metadata": {"colour": c}}
                 for i, (c, s) in enumerate((c, s) for c in ("red", "blue") for s in ("circle", "square"))]
        admin.post("/v1/collections/captions/items", json={"items": texts}).raise_for_status()
    return paths


def search(server, name, key="reader-key", **body):
    with server.client(key) as client:
        return client.post(f"/v1/collections/{name}/search", json=body)


def test_collection_stats(server, filled):
    with server.client("reader-key") as client:
        stats = client.get("/v1/collections/shapes").json()
        listed = client.get("/v1/collections").json()["collections"]
    assert stats["count"] == len(filled) and stats["modality"] == "image" and stats["dim"] == 32
    assert stats["model_id"].startswith("tiny-xclip")
    assert {c["name"] for c in listed} >= {"shapes", "captions"}


def test_image_to_image_search_finds_the_image_itself_first(server, filled):
    results = search(server, "shapes", image=image_b64(filled[5]), k=3).json()["results"]
    assert results[0]["id"] == filled[5].stem and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(results) == 3 and results[0]["score"] >= results[1]["score"] >= results[2]["score"]


def test_search_by_item_id_equals_search_by_its_image(server, filled):
    by_id = search(server, "shapes", id=filled[7].stem, k=5).json()["results"]
    by_image = search(server, "shapes", image=image_b64(filled[7]), k=5).json()["results"]
    assert [r["id"] for r in by_id] == [r["id"] for r in by_image]


def test_text_to_image_and_image_to_text_search(server, filled):
    text_hits = search(server, "shapes", text="red circle", k=4).json()["results"]
    image_hits = search(server, "captions", image=image_b64(filled[0]), k=2).json()["results"]
    assert len(text_hits) == 4 and all("colour" in h["metadata"] for h in text_hits)
    assert len(image_hits) == 2 and image_hits[0]["id"].startswith("t")


def test_vector_search(server, filled):
    with server.client("reader-key") as client:
        vector = client.post("/v1/embeddings", json={"input": [image_b64(filled[3])], "modality": "image",
                                                     "model": "active"}).json()["data"][0]["embedding"]
    assert search(server, "shapes", vector=vector, k=1).json()["results"][0]["id"] == filled[3].stem


@pytest.mark.parametrize("where, allowed", [
    ({"colour": "blue"}, {"blue"}),
    ({"colour": {"in": ["red", "green"]}}, {"red", "green"}),
])
def test_metadata_filter(server, filled, where, allowed):
    results = search(server, "shapes", text="a circle", k=8, filter=where).json()["results"]
    assert len(results) == 8 and {r["metadata"]["colour"] for r in results} <= allowed


def test_get_and_delete_items(server, filled):
    with server.client("writer-key") as client:
        item = client.get(f"/v1/collections/shapes/items/{filled[1].stem}").json()
        assert base64.b64decode(item["image"]) == filled[1].read_bytes()  # kept for re-embedding
        client.post("/v1/collections/shapes/items", json={"items": [
            {"id": "extra", "image": base64.b64encode(png_bytes()).decode(), "metadata": {}}]}).raise_for_status()
        assert client.delete("/v1/collections/shapes/items/extra").status_code == 204
        assert client.get("/v1/collections/shapes/items/extra").status_code == 404
        assert client.delete("/v1/collections/shapes/items/extra").status_code == 404
    hits = search(server, "shapes", image=base64.b64encode(png_bytes()).decode(), k=50).json()["results"]
    assert "extra" not in {h["id"] for h in hits}


def test_upsert_replaces_an_item(server, filled):
    with server.client("writer-key") as client:
        for colour in ("a", "b"):
            client.post("/v1/collections/captions/items", json={"items": [
                {"id": "swap", "text": "orange triangle", "metadata": {"colour": colour}}]}).raise_for_status()
        assert client.get("/v1/collections/captions/items/swap").json()["metadata"] == {"colour": "b"}
        assert client.get("/v1/collections/captions").json()["count"] == 5


@pytest.mark.parametrize("body, status, param", [
    ({"items": []}, 422, "items"),
    ({"items": [{"id": "x"}]}, 422, "items[0]"),
    ({"items": [{"id": "x", "text": "a", "image": "b"}]}, 422, "items[0]"),
    ({"items": [{"id": "x", "image": "!!!"}]}, 422, "items[0].image"),
    ({"items": [{"id": "x", "image": base64.b64encode(b"not an image").decode()}]}, 422, "items[0].image"),
    ({"items": [{"id": "x", "vector": [1.0, 2.0]}]}, 422, "items[0].vector"),
    ({"items": [{"id": "x", "text": "a", "metadata": [1]}]}, 422, "items[0].metadata"),
    ({"items": [{"id": "d", "text": "a"}, {"id": "d", "text": "b"}]}, 422, "items"),
])
def test_bad_upserts_are_refused_and_store_nothing(server, filled, body, status, param):
    with server.client("writer-key") as client:
        before = client.get("/v1/collections/shapes").json()["count"]
        response = client.post("/v1/collections/shapes/items", json=body)
        after = client.get("/v1/collections/shapes").json()["count"]
    assert response.status_code == status, response.text
    assert error_of(response)["param"].startswith(param)
    assert after == before


@pytest.mark.parametrize("name, body, status, param", [
    ("shapes", {"k": 5}, 422, "body"),
    ("shapes", {"text": "x", "id": "y"}, 422, "body"),
    ("shapes", {"text": "x", "k": 0}, 422, "k"),
    ("shapes", {"text": "x", "k": 100000}, 422, "k"),
    ("shapes", {"id": "no-such-item"}, 404, "id"),
    ("nope", {"text": "x"}, 404, "collection"),
    ("shapes", {"vector": [0.0] * 32}, 422, "vector"),
    ("shapes", {"text": "x", "filter": {"colour": {"gt": 3}}}, 422, "filter"),
])
def test_bad_searches(server, filled, name, body, status, param):
    response = search(server, name, **body)
    assert response.status_code == status, response.text
    assert error_of(response)["param"].startswith(param)


def test_bad_collection_creation(server, filled):
    with server.client("admin-key") as admin:
        assert admin.put("/v1/collections/shapes", json={}).status_code == 409
        bad = admin.put("/v1/collections/ivf", json={"index_factory": "NotAnIndex99"})
        assert bad.status_code == 422 and "NotAnIndex99" in error_of(bad)["message"]
        assert admin.put("/v1/collections/bad%20name", json={}).status_code == 422


def test_collections_survive_a_restart(tmp_path, bundles, shapes):
    server = Server(tmp_path / "state", bundles["xclip"]).start()
    try:
        paths = shape_images(shapes, 6)
        with server.client("admin-key") as admin:
            admin.put("/v1/collections/keep", json={"modality": "image"}).raise_for_status()
            admin.post("/v1/collections/keep/items", json={"items": [
                {"id": p.stem, "image": image_b64(p), "metadata": {"n": i}} for i, p in enumerate(paths)]}
            ).raise_for_status()
            before = admin.post("/v1/collections/keep/search", json={"text": "red", "k": 6}).json()
        server.process.kill()  # no graceful shutdown: acknowledged writes must still be there
        server.process.wait()
        server.start()
        with server.client("admin-key") as admin:
            after = admin.post("/v1/collections/keep/search", json={"text": "red", "k": 6}).json()
            assert admin.get("/v1/collections/keep").json()["count"] == 6
    finally:
        server.stop()
    assert [r["id"] for r in after["results"]] == [r["id"] for r in before["results"]]


def test_items_can_be_listed_page_by_page(server, filled):
    seen, after = [], ""
    with server.client("reader-key") as client:
        while after is not None:
            page = client.get("/v1/collections/shapes/items", params={"after": after, "limit": 7}).json()
            seen += page["ids"]
            after = page["next_after"]
    assert seen == sorted(seen) and set(seen) >= {p.stem for p in filled}
