"""Zero-shot tagging and clusters over HTTP, and the compat routes exactly as `../shared/compat.md` states them:
clip-retrieval's back end and Weaviate's multi2vec-clip contract."""

from __future__ import annotations

import numpy as np
import pytest

from api_tests.conftest import Server
from api_tests.helpers import error_of, image_b64, shape_images

LABELS = ["red", "green", "blue", "orange"]


def classify(server, **body):
    with server.client("reader-key") as client:
        return client.post("/v1/classify", json=body)


def test_classify_probabilities_and_cosines(server, shapes):
    paths = shape_images(shapes, 3)
    body = classify(server, images=[image_b64(p) for p in paths], labels=LABELS, top_k=None).json()
    for result in body["results"]:
        probs = [x["probability"] for x in result["labels"]]
        assert sorted(x["label"] for x in result["labels"]) == sorted(LABELS)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and probs == sorted(probs, reverse=True)
        assert all(-1 <= x["cosine"] <= 1 for x in result["labels"])


def test_probabilities_are_the_softmax_of_scaled_cosines(server, shapes, bundles):
    from core.bundle import load_bundle

    scale = load_bundle(bundles["xclip"]).logit_scale
    result = classify(server, images=[image_b64(shape_images(shapes, 1)[0])], labels=LABELS,
                      top_k=None).json()["results"][0]["labels"]
    logits = scale * np.asarray([x["cosine"] for x in result])
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose([x["probability"] for x in result], expected, atol=1e-5)


def test_top_k_and_multi_label(server, shapes):
    image = image_b64(shape_images(shapes, 1)[0])
    top2 = classify(server, images=[image], labels=LABELS, top_k=2).json()["results"][0]["labels"]
    multi = classify(server, images=[image], labels=LABELS, multi_label=True, threshold=0.2,
                     top_k=None).json()["results"][0]["labels"]
    assert len(top2) == 2
    assert all(x["probability"] >= 0.2 for x in multi)


def test_label_sets_from_the_bundle_and_from_the_api_and_multipart(server, shapes):
    path = shape_images(shapes, 1)[0]
    with server.client("writer-key") as client:
        client.put("/v1/label-sets/colours", json={"labels": LABELS, "templates": ["a {} shape"]}).raise_for_status()
        by_api_set = client.post("/v1/classify", json={"images": [image_b64(path)], "label_set": "colours"}).json()
        by_bundle_set = client.post("/v1/classify", json={"images": [image_b64(path)], "label_set": "shape"}).json()
        inline = client.post("/v1/classify", json={"images": [image_b64(path)], "labels": LABELS,
                                                   "templates": ["a {} shape"]}).json()
        multipart = client.post("/v1/classify", files=[("files", (path.name, path.read_bytes(), "image/png"))],
                                data={"labels": LABELS, "templates": '["a {} shape"]'}).json()
    assert {x["label"] for x in by_bundle_set["results"][0]["labels"]} == {"circle", "square", "triangle"}
    assert by_api_set["results"] == inline["results"] == multipart["results"]


@pytest.mark.parametrize("body, status, param", [
    ({"images": [], "labels": ["a"]}, 422, "images"),
    ({"images": ["eA=="], "labels": ["a"]}, 422, "images[0]"),
    ({"images": ["eA=="]}, 422, "labels"),
    ({"images": ["eA=="], "label_set": "nope"}, 404, "label_set"),
    ({"images": ["eA=="], "labels": ["a"], "templates": ["no placeholder"]}, 422, "templates"),
    ({"images": ["eA=="], "labels": ["a"], "top_k": 0}, 422, "top_k"),
    ({"images": ["eA=="], "labels": ["a"], "colour": "red"}, 422, "colour"),
])
def test_bad_classify_requests(server, body, status, param):
    response = classify(server, **body)
    assert response.status_code == status, response.text
    assert error_of(response)["param"].startswith(param)


def test_cluster_distributions_and_cluster_descriptions(server, shapes):
    paths = shape_images(shapes, 6)
    with server.client("admin-key") as admin:
        admin.put("/v1/collections/for-clusters", json={"modality": "image"}).raise_for_status()
        admin.post("/v1/collections/for-clusters/items", json={"items": [
            {"id": p.stem, "image": image_b64(p), "metadata": {"file": p.name}} for p in paths]}).raise_for_status()
        dist = admin.post("/v1/clusters", json={"images": [image_b64(paths[0])], "top_k": 4}).json()
        top_cluster = dist["results"][0]["clusters"][0]["cluster"]
        described = admin.get(f"/v1/clusters/{top_cluster}", params={"collection": "for-clusters", "top": 3}).json()
        missing = admin.get("/v1/clusters/99999", params={"collection": "for-clusters"})
    probs = [c["probability"] for c in dist["results"][0]["clusters"]]
    assert len(probs) == 4 and probs == sorted(probs, reverse=True) and dist["results"][0]["entropy"] >= 0
    described_probs = [i["probability"] for i in described["items"]]
    assert len(described_probs) == 3 and described_probs == sorted(described_probs, reverse=True)
    # paths[0] is in the collection, so the cluster's best item is at least as probably in it as paths[0] is
    assert described_probs[0] >= dist["results"][0]["clusters"][0]["probability"] - 1e-6
    assert missing.status_code == 404


# -- clip-retrieval ----------------------------------------------------------------------------------------------
CLIENT_DEFAULTS = {"text": None, "image": None, "image_url": None, "embedding_input": None,
                   "deduplicate": True, "use_safety_model": True, "use_violence_detector": True,
                   "aesthetic_score": "", "aesthetic_weight": "", "use_mclip": False}


@pytest.fixture(scope="module")
def compat_server(tmp_path_factory, bundles, shapes):
    """Keys on, both compat groups opened explicitly by setting (as documented)."""
    server = Server(tmp_path_factory.mktemp("compat") / "state", bundles["xclip"],
                    {"XCLIP_OPEN_COMPAT": '["clip-retrieval", "weaviate"]'}).start()
    paths = shape_images(shapes, 12)
    with server.client("admin-key") as admin:
        admin.put("/v1/collections/emoji", json={"modality": "image"}).raise_for_status()
        admin.post("/v1/collections/emoji/items", json={"items": [
            {"id": p.stem, "image": image_b64(p), "metadata": {"caption": p.stem, "url": f"/img/{p.name}"}}
            for p in paths]}).raise_for_status()
    yield server
    server.stop()


def test_indices_list(compat_server):
    with compat_server.client(None) as client:
        assert "emoji" in client.get("/indices-list").json()


def test_knn_service_as_clip_client_calls_it(compat_server, shapes):
    body = {**CLIENT_DEFAULTS, "text": "red circle", "modality": "image", "num_images": 3,
            "num_result_ids": 6, "indice_name": "emoji", "deduplicate": False}
    with compat_server.client(None) as client:
        rows = client.post("/knn-service", json=body).json()
        ids = [r["id"] for r in rows[:3]]
        meta = client.post("/metadata", json={"ids": ids, "indice_name": "emoji"}).json()
    assert len(rows) == 6 and all(isinstance(r["id"], int) and isinstance(r["similarity"], float) for r in rows)
    assert all("caption" in r and "url" in r and "image" in r for r in rows[:3])
    assert all(set(r) == {"id", "similarity"} for r in rows[3:])
    assert [m["id"] for m in meta] == ids and meta[0]["metadata"]["caption"] == rows[0]["caption"]


def test_knn_service_image_query_and_deduplicate(compat_server, shapes):
    image = image_b64(shape_images(shapes, 1)[0])
    body = {**CLIENT_DEFAULTS, "image": image, "modality": "image", "num_images": 12, "num_result_ids": 12,
            "indice_name": "emoji"}
    with compat_server.client(None) as client:
        deduped = client.post("/knn-service", json=body).json()
        everything = client.post("/knn-service", json={**body, "deduplicate": False}).json()
    assert deduped[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert len(deduped) <= len(everything) == 12


def test_weaviate_contract(compat_server, shapes):
    image = image_b64(shape_images(shapes, 1)[0])
    with compat_server.client(None) as client:
        live, ready = client.get("/.well-known/live"), client.get("/.well-known/ready")
        meta = client.get("/meta").json()
        vectors = client.post("/vectorize", json={"texts": ["red circle", "blue square"], "images": [image]}).json()
        only_texts = client.post("/vectorize", json={"texts": ["x"]}).json()
        bad = client.post("/vectorize", json={"images": ["%%%"]})
    assert live.status_code == ready.status_code == 204 and live.content == b""
    assert isinstance(meta, dict) and meta
    assert len(vectors["textVectors"]) == 2 and len(vectors["imageVectors"]) == 1
    np.testing.assert_allclose(np.linalg.norm(vectors["textVectors"], axis=1), 1, atol=1e-5)
    assert only_texts["imageVectors"] == []
    assert bad.status_code == 422 and set(bad.json()) == {"error"} and "images[0]" in bad.json()["error"]


def test_compat_routes_need_a_key_unless_opened(server):
    with server.client(None) as client:
        assert client.post("/vectorize", json={"texts": ["x"]}).status_code == 401
        assert client.get("/indices-list").status_code == 401
    with server.client("reader-key") as client:
        assert client.post("/vectorize", json={"texts": ["x"]}).status_code == 200
