"""Export of a trained run to a bundle: files, torch/ONNX parity, the parity gate, integrity, INT8 twins, eval CLI."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from core import data as datasets
from core.bundle import BundleIntegrityError, load_bundle
from core.onnx_encoder import OnnxEncoder
from training import bundle_eval, export, quantize
from training.encoders import TorchEncoder, torch_encoder_from_bundle
from training.losses import NClipConfig
from training.model import CONFIG_DIR
from training.testing import draw_shape, export_run, train_run
from xclip_serve.cli import app

BUNDLE_FILES = {"config.json", "model.safetensors", "tokenizer.json", "preprocess.json", "label_sets.json",
                "image_encoder.onnx", "text_encoder.onnx", "manifest.json"}
INT8_MIN_MEAN_COSINE = 0.999  # observed ≥ 0.9999 on the tiny model, images and texts alike
INT8_MIN_COSINE = 0.99  # observed ≥ 0.9998
FP16_MIN_COSINE = 0.999  # fp16 weights and activations, run on CPU: observed ≥ 0.9999 on the small model




@pytest.fixture(scope="module")
def run_dir(shapes_data, tmp_path_factory) -> Path:
    return train_run(shapes_data, tmp_path_factory.mktemp("export") / "run", "xclip", epochs=2, max_steps=None)


@pytest.fixture(scope="module")
def bundle_dir(run_dir, shapes_data) -> Path:
    return export_run(run_dir, shapes_data, run_dir.parent / "bundle")


@pytest.fixture
def bundle_copy(bundle_dir, tmp_path) -> Path:
    """A private copy of the bundle for tests that change it."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def test_bundle_has_every_file_and_a_complete_config(bundle_dir):
    assert {p.name for p in bundle_dir.iterdir()} == BUNDLE_FILES
    bundle = load_bundle(bundle_dir)
    assert (bundle.objective, bundle.embed_dim, bundle.num_clusters) == ("xclip", 32, 64)
    assert bundle.logit_scale > 0
    assert all(bundle.config.extra["parity"][m]["passed"] for m in ("image", "text"))


def test_onnx_matches_torch_on_real_data(bundle_dir, run_dir, shapes_data):
    model, meta, tokenizer, preprocess = export.load_run(run_dir)
    torch_encoder = TorchEncoder(model, tokenizer, preprocess, NClipConfig(**meta["train"]["nclip"]).student_temp)
    onnx_encoder = OnnxEncoder(load_bundle(bundle_dir), providers="cpu")
    samples, _ = datasets.load_samples(str(shapes_data))
    images, texts = [s.image for s in samples], [t for s in samples for t in s.texts]
    for encode in ("encode_images", "encode_texts"):
        inputs = images if encode == "encode_images" else texts
        expected, got = getattr(torch_encoder, encode)(inputs), getattr(onnx_encoder, encode)(inputs)
        assert set(got) == {"embedding", "cluster_probs"}
        for name in got:
            assert np.abs(got[name] - expected[name]).max() <= 1e-4, (encode, name)


def test_bundle_failing_parity_is_not_written(run_dir, shapes_data, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)
    out = tmp_path / "bundle"
    with pytest.raises(export.ExportParityError):
        export_run(run_dir, shapes_data, out)
    assert not out.exists() and not (tmp_path / ".bundle.partial").exists()


def test_export_refuses_to_overwrite_unless_asked(run_dir, shapes_data, bundle_copy):
    (bundle_copy / "stale.txt").write_text("left by a previous export")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_run(run_dir, shapes_data, bundle_copy)
    export_run(run_dir, shapes_data, bundle_copy, overwrite=True)
    assert {p.name for p in bundle_copy.iterdir()} == BUNDLE_FILES


@pytest.mark.parametrize("tamper, message", [
    (lambda b: _flip_byte(b / "text_encoder.onnx"), "altered: text_encoder.onnx"),
    (lambda b: (b / "extra.onnx").write_bytes(b"\0"), "unexpected: extra.onnx"),
    (lambda b: (b / "label_sets.json").unlink(), "missing: label_sets.json"),
])
def test_tampered_bundle_is_refused(bundle_copy, tamper, message):
    tamper(bundle_copy)
    with pytest.raises(BundleIntegrityError, match=message):
        load_bundle(bundle_copy)


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_bundle_holds_no_pickle(bundle_dir, run_dir):
    for path in bundle_dir.iterdir():
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".onnx":
            onnx.checker.check_model(onnx.load(str(path)))
        else:
            assert path.name == "model.safetensors", f"unexpected file kind {path.name}"
            header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
            json.loads(path.read_bytes()[8:8 + header_len])
    weights = load_file(bundle_dir / "model.safetensors")
    trained = export.load_run(run_dir)[0].state_dict()
    assert weights.keys() == trained.keys()
    assert all(bool((weights[k] == trained[k]).all()) for k in weights)


def test_conv_stem_and_batchnorm_head_export_with_parity(shapes_data, tmp_path):
    """The small config's convolutional stem and BatchNorm cluster head go through ONNX within the parity bound."""
    arch = json.loads((CONFIG_DIR / "tiny.json").read_text())
    arch["vision"]["stem"], arch["cluster_head"]["batch_norm"] = "conv", True
    (tmp_path / "tiny-conv.json").write_text(json.dumps(arch))
    run = train_run(shapes_data, tmp_path / "run", "xclip", model=str(tmp_path / "tiny-conv.json"))
    bundle = load_bundle(export_run(run, shapes_data, tmp_path / "bundle"))
    assert bundle.config.architecture["vision"]["stem"] == "conv"
    assert all(bundle.config.extra["parity"][m]["passed"] for m in ("image", "text"))
    torch_encoder = torch_encoder_from_bundle(bundle.path)
    onnx_encoder = OnnxEncoder(bundle, providers="cpu")
    images = [s.image for s in datasets.load_samples(str(shapes_data))[0]]
    expected, got = torch_encoder.encode_images(images), onnx_encoder.encode_images(images)
    for name in got:
        assert np.abs(got[name] - expected[name]).max() <= 1e-4, name


def test_a_run_at_another_image_size_exports_a_bundle_that_preprocesses_to_it(shapes_data, tmp_path):
    run = train_run(shapes_data, tmp_path / "run", "clip", image_size=24)  # tiny's own: 16
    bundle = load_bundle(export_run(run, shapes_data, tmp_path / "bundle"))
    assert bundle.preprocess.image_size == bundle.config.architecture["vision"]["image_size"] == 24
    images = [draw_shape((220, 30, 30), "circle", 24, 0), draw_shape((30, 60, 220), "square", 24, 1)]
    assert OnnxEncoder(bundle, providers="cpu").encode_images(images)["embedding"].shape == (2, 32)


@pytest.mark.parametrize("objective", ["clip", "nclip"])
def test_objective_decides_the_outputs(objective, shapes_data, tmp_path):
    bundle = load_bundle(export_run(train_run(shapes_data, tmp_path / "run", objective), shapes_data,
                                    tmp_path / "bundle"))
    outputs = {m: [o.name for o in ort.InferenceSession(str(bundle.onnx_path(m)), providers=["CPUExecutionProvider"]).get_outputs()]
               for m in ("image", "text")}
    encoded = OnnxEncoder(bundle, providers="cpu").encode_texts(["red circle", "blue square"])
    if objective == "clip":
        assert bundle.num_clusters == 0 and outputs == {"image": ["embedding"], "text": ["embedding"]}
        assert set(encoded) == {"embedding"}
    else:
        assert bundle.num_clusters > 0 and all(names == ["embedding", "cluster_probs"] for names in outputs.values())
        np.testing.assert_allclose(encoded["cluster_probs"].sum(axis=1), 1.0, atol=1e-5)


def test_int8_variant_is_close_to_fp32_and_verifies(bundle_copy, shapes_data):
    report = quantize.add_int8_variant(bundle_copy, str(shapes_data))
    bundle = load_bundle(bundle_copy)
    assert bundle.config.extra["int8"] == json.loads(json.dumps(report))
    for modality in ("image", "text"):
        assert bundle.onnx_path(modality, "int8").is_file()
        assert report["bytes"][modality]["int8"] < report["bytes"][modality]["fp32"]
        assert report["cosine"][modality]["mean"] >= INT8_MIN_MEAN_COSINE, report["cosine"]
        assert report["cosine"][modality]["min"] >= INT8_MIN_COSINE, report["cosine"]
    assert report["inputs"]["source"] == "data:test"
    assert {"zeroshot/colour/top1", "zeroshot/shape/top1"} <= set(report["zeroshot_top1"])
    encoded = OnnxEncoder(bundle, providers="cpu", variant="int8").encode_texts(["red circle"])
    assert encoded["embedding"].shape == (1, bundle.embed_dim)


def test_int8_variant_without_data_uses_random_inputs(bundle_copy):
    report = quantize.add_int8_variant(bundle_copy, None)
    assert report["inputs"]["source"] == "random" and "zeroshot_top1" not in report
    assert min(c["mean"] for c in report["cosine"].values()) >= INT8_MIN_MEAN_COSINE
    load_bundle(bundle_copy)


def test_fp16_variant_for_gpus_is_close_to_fp32_and_verifies(bundle_copy, shapes_data):
    report = quantize.add_fp16_variant(bundle_copy, str(shapes_data))
    bundle = load_bundle(bundle_copy)
    assert bundle.config.extra["fp16"] == json.loads(json.dumps(report))
    for modality in ("image", "text"):
        # observed 0.66 on the tiny model (graph overhead); weights are half the size
        assert report["bytes"][modality]["fp16"] < 0.75 * report["bytes"][modality]["fp32"]
        assert report["cosine"][modality]["min"] >= FP16_MIN_COSINE, report["cosine"]
    encoded = OnnxEncoder(bundle, providers="cpu", variant="fp16").encode_images([draw_shape((200, 0, 0),
                                                                                             "circle", 24, 0)])
    assert encoded["embedding"].dtype == np.float32 and encoded["embedding"].shape == (1, bundle.embed_dim)


def test_failed_int8_run_leaves_the_fp32_bundle_intact(bundle_copy, monkeypatch):
    def broken_report(*args):
        raise RuntimeError("measurement failed")

    monkeypatch.setattr(quantize, "variant_report", broken_report)
    with pytest.raises(RuntimeError, match="measurement failed"):
        quantize.add_int8_variant(bundle_copy, None)
    assert {p.name for p in bundle_copy.iterdir()} == BUNDLE_FILES
    load_bundle(bundle_copy)


def test_eval_cli_writes_metrics(bundle_dir, shapes_data, tmp_path):
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(app, ["eval", "--bundle", str(bundle_dir), "--data", str(shapes_data),
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert 0.0 <= metrics["zeroshot/colour/top1"] <= 1.0
    assert {"retrieval/t2i_r1", "retrieval/i2t_r1"} <= set(metrics)


def test_eval_splits_retrieval_by_words_the_training_captions_never_had(bundle_dir, shapes_data, tmp_path):
    data = tmp_path / "shapes"
    shutil.copytree(shapes_data, data)
    rows = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]
    test_groups = sorted({r["group"] for r in rows if r["split"] == "test"})
    for row in rows:  # one held-out group's query names a colour no training caption has
        if row["group"] == test_groups[0]:
            row["text"] = ["purple " + row["text"][0].split()[1], *row["text"][1:]]
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = bundle_eval.evaluate_bundle(bundle_dir, str(data), split="test")
    assert metrics["retrieval_novel_words/queries"] == 1
    assert metrics["retrieval_seen_words/queries"] == len(test_groups) - 1
    n_seen = len(test_groups) - 1  # the whole is the two sides weighted by their queries
    assert metrics["retrieval/t2i_r5"] == pytest.approx(
        (n_seen * metrics["retrieval_seen_words/t2i_r5"] + metrics["retrieval_novel_words/t2i_r5"]) / len(test_groups))


def test_the_bundle_records_its_training_templates_and_eval_uses_them(shapes_data, tmp_path, monkeypatch):
    run = train_run(shapes_data, tmp_path / "run", "clip", templates=["a {} icon", "{}, drawn"])
    bundle = export_run(run, shapes_data, tmp_path / "bundle")
    assert load_bundle(bundle).config.templates == ("a {} icon", "{}, drawn")
    used = []
    monkeypatch.setattr(bundle_eval, "evaluate", lambda *args, **kwargs: used.append(list(args[5])) or {})
    bundle_eval.evaluate_bundle(bundle, str(shapes_data))
    bundle_eval.evaluate_bundle(bundle, str(shapes_data), templates=["the {}"])
    assert used == [["a {} icon", "{}, drawn"], ["the {}"]]


def test_eval_cli_refuses_a_template_without_one_placeholder(bundle_dir, shapes_data):
    result = CliRunner().invoke(app, ["eval", "--bundle", str(bundle_dir), "--data", str(shapes_data),
                                      "--template", "no placeholder"])
    assert result.exit_code == 2 and "exactly one '{}'" in result.output


def test_a_causal_text_tower_takes_batches_cut_to_their_longest_text(bundle_dir, run_dir):
    """The export checks that what follows a text's end token does not matter, then marks the bundle
    `text_padding: longest`; the served embeddings of a mixed-length batch equal the full-context ones."""
    bundle = load_bundle(bundle_dir)
    assert bundle.config.onnx.text_padding == "longest"
    assert bundle.config.extra["parity"]["text"]["padding"]["passed"]
    texts = ["red circle", "a blue square that is a blue square icon", "x"]
    ids = bundle.tokenizer.encode(texts)
    served = OnnxEncoder(bundle, providers="cpu").encode_texts(texts)["embedding"]
    full = ort.InferenceSession(str(bundle.onnx_path("text")), providers=["CPUExecutionProvider"]).run(
        ["embedding"], {"input_ids": ids})[0]
    np.testing.assert_allclose(served, full, atol=1e-5)
    reference = torch_encoder_from_bundle(bundle_dir).encode_texts(texts)["embedding"]
    np.testing.assert_allclose(served, reference, atol=1e-4)
