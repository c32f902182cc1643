"""Tests for the dual encoder: named configs, the served embedding (= the ONNX encoder's), end-of-text pooling,
batch/single parity."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training.encoders import ServedEncoder, output_names
from training.export import INPUT_NAMES, export_onnx
from training.model import (
    CONFIG_DIR,
    ClusterHead,
    ClusterHeadConfig,
    DualEncoder,
    VisionConfig,
    VisionTower,
    available_configs,
    create_model,
    load_config,
)

EOS = 2


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, DualEncoder]:
    torch.manual_seed(0)
    return {obj: create_model("tiny", objective=obj).eval() for obj in ("clip", "nclip", "xclip")}


def random_pixels(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_ids(eos_positions: list[int], length: int = 16, seed: int = 0) -> torch.Tensor:
    """(B, L) ids ≥ 3 with one </s> per row at the given positions."""
    ids = torch.randint(3, 512, (len(eos_positions), length), generator=torch.Generator().manual_seed(seed))
    ids[torch.arange(len(eos_positions)), torch.tensor(eos_positions)] = EOS
    return ids


# ---------------------------------------------------------------------------------------------------- configs


def test_shipped_configs_are_listed():
    assert {"tiny", "small", "base"} <= set(available_configs())


@pytest.mark.parametrize(
    "name, vision, text",
    [
        ("tiny", (16, 8, 32, 1), (16, 512, 32, 1)),
        ("small", (32, 8, 192, 6), (24, 4096, 192, 3)),
        # CLIP ViT-B/16 image tower, 12-layer text tower
        ("base", (224, 16, 768, 12), (77, 49408, 512, 12)),
    ],
)
def test_config_shapes(name, vision, text):
    cfg = load_config(name)
    assert cfg.name == name and cfg.objective == "xclip"
    v, t = cfg.vision, cfg.text
    assert (v.image_size, v.patch_size, v.width, v.layers) == vision
    assert (t.context_length, t.vocab_size, t.width, t.layers) == text


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_named_config_builds_a_model(name):
    model = create_model(name)
    cfg = model.config
    n_patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    assert model.visual.pos_embed.shape == (1, n_patches + 1, cfg.vision.width)
    assert model.text.token_embed.weight.shape == (cfg.text.vocab_size, cfg.text.width)
    assert len(model.visual.blocks) == cfg.vision.layers and len(model.text.blocks) == cfg.text.layers
    assert model.image_head.prototypes.shape == (cfg.cluster_head.num_clusters, cfg.cluster_head.bottleneck_dim)


def test_unknown_config_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"'huge'.*available.*base.*small.*tiny"):
        load_config("huge")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"objective": "clip"}, {"objective": "clip", "vocab_size": 512, "context_length": 16}),
        ({"vocab_size": 300}, {"objective": "xclip", "vocab_size": 300, "context_length": 16}),
        ({"context_length": 8, "objective": "nclip"}, {"objective": "nclip", "vocab_size": 512, "context_length": 8}),
        ({"objective": None, "vocab_size": None}, {"objective": "xclip", "vocab_size": 512, "context_length": 16}),
    ],
)
def test_overrides_apply(overrides, expected):
    cfg = load_config("tiny", **overrides)
    got = {"objective": cfg.objective, "vocab_size": cfg.text.vocab_size, "context_length": cfg.text.context_length}
    assert got == expected
    model = create_model(cfg)
    assert model.text.token_embed.num_embeddings == expected["vocab_size"]
    assert model.text.pos_embed.shape[1] == expected["context_length"]


def test_an_image_size_override_sizes_the_image_tower():
    cfg = load_config("tiny", image_size=32)
    assert (cfg.vision.image_size, cfg.vision.patch_size) == (32, 8)
    assert create_model(cfg).visual.pos_embed.shape[1] == (32 // 8) ** 2 + 1


def test_config_from_a_json_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({**json.loads((CONFIG_DIR / "tiny.json").read_text()), "embed_dim": 24}))
    cfg = load_config(str(path), objective="clip")
    assert (cfg.name, cfg.embed_dim, cfg.objective, cfg.vision.width) == ("mine", 24, "clip", 32)


def test_invalid_objective_is_rejected():
    with pytest.raises(ValueError, match="objective"):
        load_config("tiny", objective="simclr")


# ---------------------------------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("objective, dim", [("clip", 32), ("nclip", 64), ("xclip", 32)])
def test_embedding_has_the_retrieval_width_and_unit_norm(tiny_models, objective, dim):
    model = tiny_models[objective]
    assert model.config.retrieval_dim == dim
    with torch.no_grad():
        for emb in (model.encode_image(random_pixels(3)), model.encode_text(random_ids([4, 15, 1]))):
            assert emb.shape == (3, dim)
        for emb in (model.encode_image(random_pixels(3), normalize=True),
                    model.encode_text(random_ids([4, 15, 1]), normalize=True)):
            torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def onnx_outputs(model: DualEncoder, modality: str, inputs: torch.Tensor, tmp_path) -> dict[str, np.ndarray]:
    """The outputs of the tower's exported ONNX encoder (as export_bundle writes it), run by ONNX Runtime."""
    path, names = tmp_path / f"{modality}_encoder.onnx", output_names(model)
    export_onnx(ServedEncoder(model, modality).eval(), inputs[:2], path, names)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {INPUT_NAMES[modality]: inputs.numpy()})))


@pytest.mark.parametrize("objective", ["clip", "nclip", "xclip"])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_encode_is_the_onnx_served_embedding(tiny_models, objective, modality, tmp_path):
    """One definition of the embedding: `encode_*(normalize=True)` is what the exported encoder serves."""
    model = tiny_models[objective]
    inputs, encode = ((random_pixels(5), model.encode_image) if modality == "image"
                      else (random_ids([4, 15, 1, 7, 0]), model.encode_text))
    served = onnx_outputs(model, modality, inputs, tmp_path)
    with torch.no_grad():
        embedding = encode(inputs, normalize=True).numpy()
    assert np.abs(embedding - served["embedding"]).max() <= 1e-5


@pytest.mark.parametrize("modality", ["image", "text"])
def test_nclip_embedding_is_the_square_root_of_the_served_cluster_probs(tiny_models, modality, tmp_path):
    model = tiny_models["nclip"]
    inputs, encode = ((random_pixels(5), model.encode_image) if modality == "image"
                      else (random_ids([4, 15, 1, 7, 0]), model.encode_text))
    probs = onnx_outputs(model, modality, inputs, tmp_path)["cluster_probs"]
    with torch.no_grad():
        embedding = encode(inputs, normalize=True).numpy()
    assert np.abs(embedding - np.sqrt(probs)).max() <= 1e-5


def test_nclip_image_text_similarity_is_the_bhattacharyya_coefficient(tiny_models):
    """nCLIP's towers share only the clusters: √p of each side, whose image·text dot product is the
    Bhattacharyya coefficient of the two distributions."""
    model = tiny_models["nclip"]
    with torch.no_grad():
        image, text = model.served(random_pixels(2), "image"), model.served(random_ids([3, 7]), "text")
    coefficient = (image["cluster_probs"][:, None] * text["cluster_probs"][None]).sqrt().sum(-1)
    torch.testing.assert_close(image["embedding"] @ text["embedding"].t(), coefficient)


@pytest.mark.parametrize("objective", ["nclip", "xclip"])
def test_served_cluster_probs_use_the_model_temperature(objective):
    torch.manual_seed(0)
    model = create_model("tiny", objective=objective, cluster_temp=0.5).eval()
    pixels = random_pixels(3)
    with torch.no_grad():
        logits = model(pixels, random_ids([4, 15, 1]))["image_cluster_logits"]
        probs = model.served(pixels, "image")["cluster_probs"]
    torch.testing.assert_close(probs, torch.softmax(logits / 0.5, dim=-1))


def test_a_served_encoder_refuses_another_cluster_temperature(tiny_models):
    ServedEncoder(tiny_models["xclip"], "image", 0.1)  # the model's own: accepted
    with pytest.raises(ValueError, match="cluster_temp"):
        ServedEncoder(tiny_models["xclip"], "image", 0.5)


def test_the_factory_builds_from_a_saved_architecture(tiny_models):
    """Runs and bundles store the architecture as a dict; the factory rebuilds the same model from it."""
    model = create_model(tiny_models["xclip"].config.to_dict(), eos_id=5, cluster_temp=0.2)
    assert model.config == tiny_models["xclip"].config
    assert (model.text.eos_id, model.cluster_temp) == (5, 0.2)
    with pytest.raises(ValueError, match="overrides"):
        create_model(model.config, objective="clip")


def test_unnormalised_clip_embeddings_are_not_unit_norm(tiny_models):
    with torch.no_grad():
        norms = tiny_models["clip"].encode_image(random_pixels(3)).norm(dim=-1)
    assert not torch.allclose(norms, torch.ones(3), atol=1e-2)  # so the normalize=True case above tests something


@pytest.mark.parametrize(
    "objective, present, absent",
    [
        ("clip", {"logit_scale", "image_proj", "text_proj"}, {"image_head", "text_head"}),
        ("nclip", {"image_head", "text_head"}, {"logit_scale", "image_proj", "text_proj"}),
        ("xclip", {"logit_scale", "image_proj", "text_proj", "image_head", "text_head"}, set()),
    ],
)
def test_objective_decides_the_heads(tiny_models, objective, present, absent):
    model = tiny_models[objective]
    assert all(hasattr(model, name) for name in present)
    assert not any(hasattr(model, name) for name in absent)


@pytest.mark.parametrize(
    "objective, keys",
    [
        ("clip", {"image_embedding", "text_embedding", "logit_scale"}),
        ("nclip", {"image_embedding", "text_embedding", "image_cluster_feature", "text_cluster_feature",
                   "image_cluster_logits", "text_cluster_logits"}),
        ("xclip", {"image_embedding", "text_embedding", "logit_scale", "image_cluster_feature",
                   "text_cluster_feature", "image_cluster_logits", "text_cluster_logits"}),
    ],
)
def test_forward_outputs(tiny_models, objective, keys):
    with torch.no_grad():
        out = tiny_models[objective](random_pixels(2), random_ids([3, 7]))
    assert set(out) == keys
    if "image_cluster_logits" in out:
        assert out["image_cluster_logits"].shape == (2, 64)
        assert out["image_cluster_logits"].abs().max() <= 1 + 1e-5  # cosines to the prototypes


# ---------------------------------------------------------------------------------------------------- text pooling


def text_embedding(model: DualEncoder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(ids)


@pytest.mark.parametrize(
    "eos_at, changed_at, changes_embedding",
    [
        (5, [6, 7, 15], False),  # padding after </s>
        (5, [9, 10], False),
        (0, [1, 15], False),
        (14, [15], False),
        (5, [4], True),  # a token of the text itself
        (5, [0], True),
        (15, [3], True),
    ],
)
def test_text_pools_at_first_eos(tiny_models, eos_at, changed_at, changes_embedding):
    ids = random_ids([eos_at], seed=eos_at)
    changed = ids.clone()
    changed[0, changed_at] = torch.where(ids[0, changed_at] == 3, 4, 3)
    model = tiny_models["xclip"]
    differs = not torch.allclose(text_embedding(model, ids), text_embedding(model, changed), atol=1e-6)
    assert differs == changes_embedding


def test_a_second_eos_in_the_padding_is_ignored(tiny_models):
    ids = random_ids([4])
    changed = ids.clone()
    changed[0, 9] = EOS
    model = tiny_models["clip"]
    torch.testing.assert_close(text_embedding(model, changed), text_embedding(model, ids), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- batch == singles


@pytest.mark.parametrize("objective", ["clip", "nclip", "xclip"])
def test_batch_equals_one_by_one(tiny_models, objective):
    model, pixels, ids = tiny_models[objective], random_pixels(4, seed=1), random_ids([2, 15, 6, 9], seed=1)
    with torch.no_grad():
        for encode, inputs in ((model.encode_image, pixels), (model.encode_text, ids)):
            singles = torch.cat([encode(x[None]) for x in inputs])
            torch.testing.assert_close(encode(inputs), singles, atol=1e-5, rtol=0)


def test_text_without_eos_pools_at_the_last_position():
    model = create_model("tiny").eval()
    ids = torch.randint(3, 200, (1, 16))
    changed = ids.clone()
    changed[0, 10] = 3 if ids[0, 10] != 3 else 4
    with torch.no_grad():
        assert not torch.allclose(model.encode_text(ids), model.encode_text(changed))


# ---------------------------------------------------------------------------------------------------- stem and head


def test_conv_stem_reaches_the_patch_grid_and_sees_within_patches():
    cfg = VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, stem="conv")
    tower = VisionTower(cfg).eval()
    assert tower.patch_embed(random_pixels(2)).shape == (2, 32, 2, 2)
    pixels = random_pixels(1)
    moved = pixels.clone()
    moved[..., 3, 3] += 1.0  # one pixel inside the first patch
    with torch.no_grad():
        assert not torch.allclose(tower(pixels), tower(moved))


@pytest.mark.parametrize("changes, message", [
    ({"stem": "resnet"}, "vision.stem"),
    ({"stem": "conv", "patch_size": 6, "image_size": 18}, "power-of-two"),
])
def test_bad_stem_configs_are_refused(changes, message):
    cfg = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, **changes}
    with pytest.raises(ValueError, match=message):
        VisionTower(VisionConfig(**cfg))


def test_batchnorm_head_spreads_nearly_identical_samples():
    """The uniform plateau of nCLIP: features that barely differ give the same cluster scores without BatchNorm;
    with it, the batch is standardised and the scores differ by order one."""
    torch.manual_seed(0)
    features = torch.randn(1, 32).repeat(16, 1) + 1e-4 * torch.randn(16, 32)
    spreads = {}
    for batch_norm in (False, True):
        head = ClusterHead(32, ClusterHeadConfig(hidden_dim=64, bottleneck_dim=16, num_clusters=8,
                                                 batch_norm=batch_norm)).train()
        with torch.no_grad():
            _, logits = head(features)
        spreads[batch_norm] = float(logits.std(dim=0).mean())
    assert spreads[False] < 1e-3
    assert spreads[True] > 0.05
