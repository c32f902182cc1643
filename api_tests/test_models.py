"""Models over HTTP: list (OpenAI shape), register, activate as a hot swap under load with zero failed requests,
collections re-embedded in the background without mixing spaces, roll back, refused bundles."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest

from api_tests.conftest import Server
from api_tests.helpers import error_of, image_b64, shape_images


@pytest.fixture
def fresh(tmp_path, bundles):
    server = Server(tmp_path / "state", bundles["xclip"]).start()
    yield server
    server.stop()


def model_ids(client) -> tuple[str, list[str]]:
    body = client.get("/v1/models").json()
    return body["active"], [m["id"] for m in body["data"]]


def test_models_list_is_openai_shaped(fresh):
    with fresh.client("reader-key") as client:
        body = client.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["object"] == "model"
    assert {"id", "created", "owned_by"} <= set(body["data"][0]) and body["data"][0]["active"]


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


class Load:
    """Background callers hammering embeddings and search until stopped; records every status."""

    def __init__(self, server, image: str, callers: int = 4):
        self.server, self.image, self.statuses, self.models = server, image, [], set()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(callers)]

    def run(self, i: int) -> None:
        with self.server.client("reader-key") as client:
            while not self.stop_event.is_set():
                if i % 2:
                    r = client.post("/v1/embeddings", json={"input": ["red circle"], "model": "active"})
                else:
                    r = client.post("/v1/collections/live/search", json={"image": self.image, "k": 3})
                self.statuses.append(r.status_code)
                if r.status_code == 200:
                    self.models.add(r.json()["model"])

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for t in self.threads:
            t.join()


def test_hot_swap_under_load_drops_nothing_and_reembeds(fresh, bundles, shapes):
    paths = shape_images(shapes, 12)
    with fresh.client("admin-key") as admin:
        old_id, _ = model_ids(admin)
        admin.put("/v1/collections/live", json={"modality": "image"}).raise_for_status()
        admin.post("/v1/collections/live/items", json={"items": [
            {"id": p.stem, "image": image_b64(p), "metadata": {}} for p in paths]}).raise_for_status()
        with Load(fresh, image_b64(paths[0])) as load:
            time.sleep(1.0)
            registered = admin.post("/v1/models", json={"path": str(bundles["xclip-b"])})
            assert registered.status_code == 201, registered.text
            new_id = registered.json()["id"]
            swap = admin.post(f"/v1/models/{new_id}/activate").json()
            assert swap == {"active": new_id, "previous": old_id, "reembedding": ["live"]}
            assert wait_for(lambda: admin.get("/v1/collections/live").json()["model_id"] == new_id)
            time.sleep(1.0)
        stats = admin.get("/v1/collections/live").json()
        top = admin.post("/v1/collections/live/search", json={"image": image_b64(paths[4]), "k": 1}).json()
    assert load.statuses and set(load.statuses) == {200}, sorted(set(load.statuses))
    assert {old_id, new_id} <= load.models  # requests ran on both sides of the swap
    assert stats["count"] == 12 and stats["dim"] == 32
    assert top["model"] == new_id and top["results"][0]["id"] == paths[4].stem  # new space, self-match first


def test_new_model_vectors_differ_and_rollback_restores_the_old(fresh, bundles):
    with fresh.client("admin-key") as admin:
        before = admin.post("/v1/embeddings", json={"input": "blue square", "model": "active"}).json()
        new_id = admin.post("/v1/models", json={"path": str(bundles["xclip-b"]), "activate": True}).json()["active"]
        swapped = admin.post("/v1/embeddings", json={"input": "blue square", "model": "active"}).json()
        rolled = admin.post("/v1/models/rollback").json()
        after = admin.post("/v1/embeddings", json={"input": "blue square", "model": "active"}).json()
        pinned = admin.post("/v1/embeddings", json={"input": "blue square", "model": new_id}).json()
    assert swapped["model"] == new_id != before["model"] == rolled["active"] == after["model"]
    assert not np.allclose(before["data"][0]["embedding"], swapped["data"][0]["embedding"])
    np.testing.assert_allclose(after["data"][0]["embedding"], before["data"][0]["embedding"], atol=1e-6)
    np.testing.assert_allclose(pinned["data"][0]["embedding"], swapped["data"][0]["embedding"], atol=1e-6)


def test_tampered_or_missing_bundle_is_refused_and_the_old_model_keeps_serving(fresh, bundles, tmp_path):
    tampered = shutil.copytree(bundles["xclip-b"], tmp_path / "tampered")
    (tampered / "text_encoder.onnx").write_bytes(b"\x00" * 64)
    with fresh.client("admin-key") as admin:
        active, ids = model_ids(admin)
        for path in (tampered, tmp_path / "missing"):
            response = admin.post("/v1/models", json={"path": str(path), "activate": True})
            assert response.status_code == 422 and error_of(response)["param"] == "path", response.text
        assert model_ids(admin) == (active, ids)
        assert admin.post("/v1/embeddings", json={"input": "x", "model": "active"}).status_code == 200


def test_clip_bundle_has_no_clusters_400(fresh, bundles):
    with fresh.client("admin-key") as admin:
        clip_id = admin.post("/v1/models", json={"path": str(bundles["clip"])}).json()["id"]
        response = admin.post("/v1/clusters", json={"texts": ["x"], "model": clip_id})
        ok = admin.post("/v1/clusters", json={"texts": ["red circle"], "top_k": 3}).json()
    assert response.status_code == 400 and "no cluster head" in error_of(response)["message"]
    assert len(ok["results"][0]["clusters"]) == 3 and ok["num_clusters"] > 0


def test_activation_survives_a_restart(fresh, bundles):
    with fresh.client("admin-key") as admin:
        new_id = admin.post("/v1/models", json={"path": str(bundles["xclip-b"]), "activate": True}).json()["active"]
    fresh.restart()
    with fresh.client("reader-key") as client:
        assert model_ids(client)[0] == new_id


def test_the_active_model_cannot_be_unregistered(fresh):
    with fresh.client("admin-key") as admin:
        active, _ = model_ids(admin)
        assert admin.delete(f"/v1/models/{active}").status_code == 409


def test_deploy_command_registers_and_activates(fresh, bundles):
    from typer.testing import CliRunner

    from xclip_serve.cli import app

    base = ["deploy", "--bundle", str(bundles["xclip-b"]), "--server", fresh.base_url]
    refused = CliRunner().invoke(app, [*base, "--key", "reader-key"])
    deployed = CliRunner().invoke(app, base, env={"XCLIP_ADMIN_KEY": "admin-key"})
    with fresh.client("reader-key") as client:
        active, ids = model_ids(client)
    assert refused.exit_code == 1 and "403" in refused.output
    assert deployed.exit_code == 0, deployed.output
    assert active == json.loads(deployed.output)["active"] and len(ids) == 2


def test_text_collections_follow_the_new_model_and_vector_collections_stay_searchable(fresh, bundles):
    with fresh.client("admin-key") as admin:
        old_id, _ = model_ids(admin)
        for name, modality in (("texts", "text"), ("raw", "text")):
            admin.put(f"/v1/collections/{name}", json={"modality": modality}).raise_for_status()
        admin.post("/v1/collections/texts/items", json={"items": [
            {"id": f"t{i}", "text": t, "metadata": {}} for i, t in enumerate(["red circle", "blue square"])]}
        ).raise_for_status()
        vector = admin.post("/v1/embeddings", json={"input": "green triangle"}).json()["data"][0]["embedding"]
        admin.post("/v1/collections/raw/items", json={"items": [{"id": "v", "vector": vector, "metadata": {}}]}
                   ).raise_for_status()
        new_id = admin.post("/v1/models", json={"path": str(bundles["xclip-b"]), "activate": True}).json()["active"]
        assert wait_for(lambda: admin.get("/v1/collections/texts").json()["model_id"] == new_id)
        assert wait_for(lambda: admin.get("/v1/collections/raw").json()["reembed"] is None)
        raw = admin.get("/v1/collections/raw").json()
        hit = admin.post("/v1/collections/raw/search", json={"text": "green triangle", "k": 1}).json()
        texts = admin.post("/v1/collections/texts/search", json={"text": "red circle", "k": 1}).json()
        busy = admin.delete(f"/v1/models/{old_id}")
    assert raw["model_id"] == old_id  # raw vectors cannot be re-embedded: they stay in their space
    assert hit["model"] == old_id and hit["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert texts["model"] == new_id and texts["results"][0]["id"] == "t0"
    assert busy.status_code == 409  # the old model still serves "raw"


def test_an_inactive_unused_model_can_be_unregistered(fresh, bundles):
    with fresh.client("admin-key") as admin:
        extra = admin.post("/v1/models", json={"path": str(bundles["xclip-b"])}).json()["id"]
        assert admin.delete(f"/v1/models/{extra}").status_code == 204
        _, ids = model_ids(admin)
        gone = admin.post("/v1/embeddings", json={"input": "x", "model": extra})
    assert extra not in ids and gone.status_code == 404
