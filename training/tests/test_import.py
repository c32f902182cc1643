"""Importing pretrained checkpoints: tiny random CLIP and SigLIP models written by transformers' `save_pretrained`
in this session, imported into bundles, and compared with transformers itself from raw strings and image files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessor

from core.bundle import load_bundle
from core.onnx_encoder import OnnxEncoder
from core.preprocess import PreprocessConfig, load_image, preprocess_batch
from training.export import ExportParityError
from training.importer import SYNTHETIC_SIZES, import_checkpoint, parity_image_files, photographs
from training.pretrained import CheckpointError, detect_format, load_pretrained
from training.random_checkpoints import save_clip, save_open_clip, save_siglip

TEXTS = ["a photo of a cat.", "Red HEART!!", "  the   fox's face ", "café 🦊", "grinning sun " * 30, ""]
MAKERS = {"clip": lambda d: save_clip(d), "clip-eos": lambda d: save_clip(d, legacy_eos=False),
          "siglip": lambda d: save_siglip(d), "open_clip": lambda d: save_open_clip(d)}


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict:
    """kind → (checkpoint dir, bundle dir), each imported once."""
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for kind, make in MAKERS.items():
        src = make(root / kind)
        out[kind] = (src, import_checkpoint(src, root / f"bundle-{kind}"))
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    files = [*parity_image_files(tmp_path_factory.mktemp("images"), seed=7), *photographs()]
    assert len(files) == len(SYNTHETIC_SIZES) + 1  # a real photograph among them
    return files


@torch.no_grad()
def reference(src, texts, image_files) -> tuple[np.ndarray, np.ndarray, torch.nn.Module]:
    """transformers' own normalised embeddings of raw texts and image files (its processor, its model)."""
    from transformers.image_utils import load_image as hf_load

    pretrained = load_pretrained(src)
    model = pretrained.model
    text = model.get_text_features(**pretrained.reference_text(texts)).pooler_output
    pixels = pretrained.reference_images([hf_load(str(p)) for p in image_files])
    image = model.get_image_features(pixel_values=pixels).pooler_output
    return F.normalize(text, dim=-1).numpy(), F.normalize(image, dim=-1).numpy(), model


@pytest.mark.parametrize("kind", list(MAKERS))
def test_the_bundle_embeds_raw_inputs_as_transformers_does(imported, images, kind):
    src, bundle_dir = imported[kind]
    encoder = OnnxEncoder(load_bundle(bundle_dir), providers="cpu")
    ref_text, ref_image, _ = reference(src, TEXTS, images)
    np.testing.assert_allclose(encoder.encode_texts(TEXTS)["embedding"], ref_text, atol=1e-4)
    ours = encoder.encode_images([load_image(p) for p in images])["embedding"]
    np.testing.assert_allclose(ours, ref_image, atol=1e-4)
    singles = np.concatenate([encoder.encode_images([load_image(p)])["embedding"] for p in images])
    np.testing.assert_allclose(singles, ours, atol=1e-5)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_the_config_carries_the_models_own_scale_and_bias(imported, kind):
    src, bundle_dir = imported[kind]
    bundle = load_bundle(bundle_dir)
    model = load_pretrained(src).model
    assert bundle.objective == "clip" and bundle.num_clusters == 0
    assert bundle.logit_scale == pytest.approx(float(model.logit_scale.exp()))
    if kind == "siglip":  # attends to its padding: texts stay padded to the full context
        assert bundle.config.logit_bias == pytest.approx(float(model.logit_bias))
        assert (bundle.preprocess.resize_mode, bundle.tokenizer.context_length) == ("squash", 16)
        assert bundle.config.onnx.text_padding == "fixed"
    else:  # causal, pooled at the end token: a batch is cut to its longest text
        assert bundle.config.logit_bias is None
        assert (bundle.preprocess.resize_mode, bundle.tokenizer.context_length) == ("resize_center_crop", 77)
        assert bundle.config.onnx.text_padding == "longest"
    parity = bundle.config.extra["parity"]
    assert parity["end_to_end"]["passed"] and parity["image"]["passed"] and parity["text"]["passed"]


def test_zero_shot_probabilities_are_the_models_own(imported, images):
    """softmax over labels for CLIP, each label's sigmoid(scale·cos + bias) for SigLIP: as transformers' forward."""
    from service.engine.zero_shot import label_probabilities

    labels = ["a photo of a cat", "a red heart", "a fox face"]
    for kind in ("clip", "siglip"):
        src, bundle_dir = imported[kind]
        bundle = load_bundle(bundle_dir)
        encoder = OnnxEncoder(bundle, providers="cpu")
        cosines = encoder.encode_images([load_image(images[0])])["embedding"] @ \
            encoder.encode_texts(labels)["embedding"].T
        probs = label_probabilities(cosines, bundle.logit_scale, bundle.config.logit_bias)
        pretrained = load_pretrained(src)
        from transformers.image_utils import load_image as hf_load
        with torch.no_grad():
            out = pretrained.model(**pretrained.reference_text(labels),
                                   pixel_values=pretrained.reference_images([hf_load(str(images[0]))]))
        logits = out.logits_per_image
        expected = torch.sigmoid(logits) if kind == "siglip" else logits.softmax(dim=-1)
        np.testing.assert_allclose(probs, expected.numpy(), atol=1e-4)


def test_a_bundle_that_fails_parity_is_not_written(tmp_path, monkeypatch):
    """Preprocessing that does not match the checkpoint's processor (a wrong mean) fails the end-to-end gate."""
    import dataclasses

    import training.pretrained as pretrained_module

    src = save_clip(tmp_path / "clip")
    real = pretrained_module._preprocess_of
    monkeypatch.setattr(pretrained_module, "_preprocess_of",
                        lambda processor: dataclasses.replace(real(processor), mean=(0.5, 0.5, 0.5)))
    with pytest.raises(ExportParityError, match="reference"):
        import_checkpoint(src, tmp_path / "bundle")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]


class Boom:
    """Unpickling this runs code: it would create the file the test checks for."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pt"])
def test_pickled_weights_are_refused_and_never_loaded(tmp_path, name):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / name).write_bytes(pickle.dumps(Boom(str(tmp_path / "pwned"))))
    if name.startswith("open_clip"):
        (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    with pytest.raises(CheckpointError, match="never loaded.*safetensors"):
        import_checkpoint(src, tmp_path / "bundle")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "bundle").exists()


def check_refused(tmp_path, files: dict, match: str) -> None:
    src = tmp_path / "ckpt"
    src.mkdir()
    for name, content in files.items():
        (src / name).write_text(content)
    with pytest.raises(CheckpointError, match=match):
        detect_format(src)


def test_an_unknown_directory_is_refused_naming_the_files_expected(tmp_path):
    check_refused(tmp_path, {"notes.txt": "hi"}, "preprocessor_config.json.*open_clip_model.safetensors")


def test_another_transformers_model_is_refused_naming_its_type(tmp_path):
    check_refused(tmp_path, {"config.json": json.dumps({"model_type": "bert"}), "model.safetensors": ""},
                  "'bert'")


def test_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        detect_format(tmp_path / "absent")


def test_siglip_tokenizer_as_one_pipeline_equals_the_sentencepiece_one(imported):
    src, bundle_dir = imported["siglip"]
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(src)
    bundle = load_bundle(bundle_dir)
    texts = [*TEXTS, "A-B_C (d) [e] {f}", "tab\there\nnewline", "ＦＵＬＬ width", "ünï cödé", "x </s>"]
    expected = slow(texts, padding="max_length", truncation=True, max_length=16).input_ids
    np.testing.assert_array_equal(bundle.tokenizer.encode(texts), np.asarray(expected))


@pytest.mark.parametrize("size", [(640, 480), (333, 517), (225, 224), (31, 200), (1600, 1203)])
@pytest.mark.parametrize("crop,short", [(32, 32), (224, 256), (24, 28)])
def test_resize_center_crop_equals_clip_image_processor(size, crop, short):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    config = PreprocessConfig(image_size=crop, resize_mode="resize_center_crop", resize_size=short,
                              mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                              reducing_gap=None)
    processor = CLIPImageProcessor(size={"shortest_edge": short}, crop_size={"height": crop, "width": crop})
    expected = processor(images=[image], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(preprocess_batch([image], config), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_an_imported_bundle_takes_an_int8_twin(imported, tmp_path, kind):
    """`import --int8`: the quantiser's graph preparation copes with each imported architecture."""
    import shutil

    from training.quantize import add_variant

    bundle_dir = shutil.copytree(imported[kind][1], tmp_path / "bundle")
    report = add_variant(bundle_dir, None, "int8")
    bundle = load_bundle(bundle_dir)
    assert bundle.onnx_path("image", "int8").is_file() and report["cosine"]["image"]["mean"] > 0.9
