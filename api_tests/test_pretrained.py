"""Serving an imported checkpoint, black box: `xclip-serve import DIR --output B` then `xclip-serve serve --bundle B`
answers embeddings and zero-shot tags equal to transformers' own on the same raw inputs (a transformers CLIP, a
SigLIP and an OpenCLIP directory)."""

from __future__ import annotations

import base64
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from api_tests.conftest import Server
from training.importer import parity_image_files, photographs
from training.pretrained import load_pretrained
from training.random_checkpoints import save_clip, save_open_clip, save_siglip

LABELS = ["a photo of a cat", "a red heart", "a fox face", "the sun"]  # within tiny SigLIP's 16 tokens
MAKERS = {"clip": save_clip, "siglip": save_siglip, "open_clip": save_open_clip}


@pytest.fixture(scope="module", params=list(MAKERS))
def served(request, tmp_path_factory):
    """(kind, checkpoint dir, image files, running server) for a checkpoint imported through the CLI."""
    root = tmp_path_factory.mktemp(f"pretrained-{request.param}")
    src = MAKERS[request.param](root / "checkpoint")
    bundle = root / "bundle"
    done = subprocess.run([sys.executable, "-m", "xclip_serve.cli", "import", str(src), "--output", str(bundle)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"bundle: {bundle.resolve()}" in done.stdout
    server = Server(root / "state", bundle).start()
    yield request.param, src, [*photographs(), *parity_image_files(root / "images", seed=3)], server
    server.stop()


@torch.no_grad()
def transformers_outputs(src, texts: list[str], image_path):
    """transformers' normalised text and image embeddings and its per-image label probabilities."""
    from transformers.image_utils import load_image

    pretrained = load_pretrained(src)
    pixels = pretrained.reference_images([load_image(str(image_path))])
    out = pretrained.model(**pretrained.reference_text(texts), pixel_values=pixels)
    logits = out.logits_per_image[0]
    probs = torch.sigmoid(logits) if pretrained.kind == "siglip" else logits.softmax(dim=-1)
    return F.normalize(out.text_embeds, dim=-1).numpy(), F.normalize(out.image_embeds, dim=-1).numpy(), probs.numpy()


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_classify_with_inline_labels_ranks_as_transformers_zero_shot(served):
    _, src, images, server = served
    for image in images[:3]:
        with server.client() as client:
            response = client.post("/v1/classify", json={"images": [b64(image)], "labels": LABELS,
                                                         "templates": ["{}"], "top_k": len(LABELS)})
        assert response.status_code == 200, response.text
        tags = response.json()["results"][0]["labels"]
        _, _, probs = transformers_outputs(src, LABELS, image)
        assert [t["label"] for t in tags] == [LABELS[i] for i in np.argsort(-probs, kind="stable")]
        np.testing.assert_allclose([t["probability"] for t in tags], np.sort(probs)[::-1], atol=1e-4)


def test_embeddings_equal_transformers_for_raw_text_and_image(served):
    _, src, images, server = served
    with server.client() as client:
        texts = client.post("/v1/embeddings", json={"input": LABELS})
        image = client.post("/v1/embeddings", json={"input": [b64(images[0])], "modality": "image"})
    assert texts.status_code == 200 and image.status_code == 200, (texts.text, image.text)
    ref_text, ref_image, _ = transformers_outputs(src, LABELS, images[0])
    np.testing.assert_allclose([d["embedding"] for d in texts.json()["data"]], ref_text, atol=1e-4)
    np.testing.assert_allclose([d["embedding"] for d in image.json()["data"]], ref_image, atol=1e-4)


def test_an_imported_model_indexes_and_searches_like_a_trained_one(served):
    """Every route works on the imported bundle: a collection built from its embeddings finds an image by itself."""
    _, _, images, server = served
    with server.client() as client:
        created = client.put("/v1/collections/photos", json={"modality": "image"})
        assert created.status_code in (200, 201), created.text
        items = [{"id": f"img{i}", "image": b64(p)} for i, p in enumerate(images)]
        assert client.post("/v1/collections/photos/items", json={"items": items}).status_code == 200
        hits = client.post("/v1/collections/photos/search", json={"image": b64(images[2]), "k": 1}).json()
    assert hits["results"][0]["id"] == "img2"


def test_import_refuses_a_directory_that_is_no_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    done = subprocess.run([sys.executable, "-m", "xclip_serve.cli", "import", str(tmp_path / "ckpt"), "--output",
                           str(tmp_path / "bundle")], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and "model.safetensors" in done.stderr and not (tmp_path / "bundle").exists()


def test_import_records_the_templates_given_and_refuses_a_bad_one(tmp_path):
    src = save_clip(tmp_path / "ckpt")
    command = [sys.executable, "-m", "xclip_serve.cli", "import", str(src), "--output", str(tmp_path / "bundle")]
    bad = subprocess.run([*command, "--template", "a photo"], capture_output=True, text=True, timeout=300,
                         check=False)
    assert bad.returncode == 2 and "--template" in bad.stderr and not (tmp_path / "bundle").exists()
    done = subprocess.run([*command, "--template", "a photo of a {}.", "--template", "a drawing of a {}."],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    from core.bundle import load_bundle

    assert load_bundle(tmp_path / "bundle").config.templates == ("a photo of a {}.", "a drawing of a {}.")
