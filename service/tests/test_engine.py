"""The engine without HTTP: batched encoding equals direct ONNX encoding, zero-shot maths, registry hot swap."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from core.onnx_encoder import OnnxEncoder
from index.store import CollectionStore
from service.engine import Engine
from service.errors import ConflictError, InvalidInputError, NotFoundError
from service.registry import ModelRegistry
from service.settings import Settings
from training.testing import draw_shape


@pytest.fixture
def engine(tmp_path, tiny_bundle):
    settings = Settings(auth_disabled=True, state_dir=tmp_path, max_batch_size=4, max_wait_ms=10)
    registry = ModelRegistry(settings)
    registry.activate(registry.register(registry.load(tiny_bundle)).model_id)
    yield Engine(settings, registry, CollectionStore(settings.collections_dir))


def images(n: int) -> list[Image.Image]:
    return [draw_shape((40 * i % 255, 90, 200), ("circle", "square", "triangle")[i % 3], 24, i % 4)
            for i in range(n)]


def test_engine_encoding_equals_direct_onnx(engine):
    model = engine.registry.active
    direct = OnnxEncoder(model.bundle).encode_images(images(10))["embedding"]

    async def main():
        outs = await asyncio.gather(*(engine.encode(model, "image", [im]) for im in images(10)))
        await engine.close()
        return np.concatenate([o["embedding"] for o in outs])

    np.testing.assert_allclose(asyncio.run(main()), direct, atol=1e-5)


def test_classify_is_softmax_of_scaled_cosines_to_ensembled_labels(engine):
    model = engine.registry.active
    labels, templates = engine.zero_shot.resolve_labels(model, ["red", "blue"], None, ["a {} shape", "{}"])

    async def main():
        out = await engine.zero_shot.classify(model, images(3), labels, templates)
        await engine.close()
        return out

    probs, cosines = asyncio.run(main())
    logits = model.bundle.logit_scale * cosines
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert len(model.label_cache) == 1  # the label embeddings are cached per model


def test_classify_prompts_default_to_the_bundles_own_templates(engine):
    model = engine.registry.active
    assert engine.zero_shot.resolve_labels(model, ["red"], None, None)[1] == list(model.bundle.config.templates)
    assert engine.zero_shot.resolve_labels(model, ["red"], None, ["the {}"])[1] == ["the {}"]  # a request's own win


@pytest.mark.parametrize("labels, label_set, templates, error", [
    (None, None, None, InvalidInputError),
    (["a"], "shape", None, InvalidInputError),
    (None, "no-such-set", None, NotFoundError),
    (["a"], None, ["no placeholder"], InvalidInputError),
])
def test_bad_label_requests(engine, labels, label_set, templates, error):
    with pytest.raises(error):
        engine.zero_shot.resolve_labels(engine.registry.active, labels, label_set, templates)


def test_registry_refuses_a_broken_bundle_and_keeps_the_active_one(engine, tmp_path, tiny_bundle):
    import shutil

    broken = shutil.copytree(tiny_bundle, tmp_path / "broken")
    (broken / "image_encoder.onnx").write_bytes(b"garbage")
    active = engine.registry.active_id
    with pytest.raises(InvalidInputError, match="refused"):
        engine.registry.load(broken)
    assert engine.registry.active_id == active
    with pytest.raises(ConflictError):
        engine.registry.rollback()  # nothing to roll back to
