"""Tests for loading bundles: a valid fake bundle loads; tampering, missing files and bad configs are refused.

`make_bundle` is also used by the ONNX encoder tests to wrap tiny ONNX graphs.
"""

import json
from pathlib import Path

import pytest

from core.bundle import Bundle, BundleConfig, BundleError, BundleIntegrityError, load_bundle
from core.manifest import write_manifest
from core.preprocess import PreprocessConfig
from core.tokenizer import train_tokenizer

LABEL_SETS = {"category": ["smileys", "animals", "food"], "color": ["red", "green"]}
CORPUS = ["grinning face", "red apple", "green apple", "smiling cat", "dog face"] * 4


def make_config(objective="clip", embed_dim=8, num_clusters=0) -> dict:
    """A config.json as the exporter writes it (format /2: no copy of the context length or image size)."""
    return {
        "format": "xclip-bundle/2",
        "version": "0.1.0",
        "model_name": "tiny-test",
        "objective": objective,
        "embed_dim": embed_dim,
        "num_clusters": num_clusters,
        "logit_scale": 100.0,
        "architecture": {"width": 4},
        "data_fingerprint": "abc",
        "metrics": {},
        "created": "2024-01-01T00:00:00+00:00",
        "onnx": {
            "image": "image_encoder.onnx",
            "text": "text_encoder.onnx",
            "inputs": {"image": "pixel_values", "text": "input_ids"},
            "outputs": ["embedding", "cluster_probs"],
        },
    }


def make_bundle(root: Path, onnx_files: dict[str, bytes] | None = None, context_length: int = 10,
                image_size: int = 16, **config_overrides) -> Path:
    """Write a complete bundle directory (manifest included) under `root`; returns its path."""
    config = make_config(**config_overrides)
    bundle_dir = Path(root) / "bundle"
    bundle_dir.mkdir(parents=True)
    (bundle_dir / "config.json").write_text(json.dumps(config))
    (bundle_dir / "model.safetensors").write_bytes(b"\0" * 64)
    (bundle_dir / "label_sets.json").write_text(json.dumps(LABEL_SETS))
    PreprocessConfig(image_size=image_size).save(bundle_dir / "preprocess.json")
    train_tokenizer(CORPUS, vocab_size=300, context_length=context_length).save(
        bundle_dir / "tokenizer.json"
    )
    files = onnx_files or {"image_encoder.onnx": b"not really onnx", "text_encoder.onnx": b"nor this"}
    for name, data in files.items():
        (bundle_dir / name).write_bytes(data)
    write_manifest(bundle_dir)
    return bundle_dir


def rewrite_config(bundle_dir: Path, **changes) -> None:
    """Edit config.json and re-sign the manifest, as a buggy exporter would."""
    config = json.loads((bundle_dir / "config.json").read_text())
    config.update(changes)
    (bundle_dir / "config.json").write_text(json.dumps(config))
    write_manifest(bundle_dir)


def test_load_reads_every_part(tmp_path):
    bundle = load_bundle(make_bundle(tmp_path, objective="xclip", num_clusters=5))
    assert isinstance(bundle, Bundle)
    assert (bundle.objective, bundle.embed_dim, bundle.num_clusters) == ("xclip", 8, 5)
    assert bundle.has_clusters and bundle.logit_scale == 100.0
    assert bundle.preprocess.image_size == 16
    assert bundle.tokenizer.context_length == 10
    assert bundle.label_sets == LABEL_SETS
    assert bundle.model_id.startswith("tiny-test-") and len(bundle.model_id) == len("tiny-test-") + 12
    assert bundle.onnx_path("image") == bundle.path / "image_encoder.onnx"


def test_clip_bundle_has_no_clusters(tmp_path):
    assert not load_bundle(make_bundle(tmp_path)).has_clusters


def test_model_id_changes_with_content(tmp_path):
    first = load_bundle(make_bundle(tmp_path / "a"))
    second = load_bundle(make_bundle(tmp_path / "b", embed_dim=16))
    assert first.model_id != second.model_id


def test_int8_variant(tmp_path):
    files = {"image_encoder.onnx": b"a", "text_encoder.onnx": b"b", "image_encoder.int8.onnx": b"c"}
    bundle = load_bundle(make_bundle(tmp_path, onnx_files=files))
    assert bundle.onnx_path("image", "int8").name == "image_encoder.int8.onnx"
    with pytest.raises(BundleError, match="int8 text encoder"):
        bundle.onnx_path("text", "int8")


def test_tampered_byte_is_refused_naming_the_file(tmp_path):
    bundle_dir = make_bundle(tmp_path)
    data = bytearray((bundle_dir / "text_encoder.onnx").read_bytes())
    data[0] ^= 0xFF
    (bundle_dir / "text_encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"altered: text_encoder\.onnx"):
        load_bundle(bundle_dir)
    assert load_bundle(bundle_dir, verify=False).embed_dim == 8  # explicit opt-out still loads


def test_removed_file_is_refused(tmp_path):
    bundle_dir = make_bundle(tmp_path)
    (bundle_dir / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"missing: tokenizer\.json"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match=r"missing tokenizer\.json"):
        load_bundle(bundle_dir, verify=False)


def test_missing_directory(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": "xclip-bundle/3"}, "unknown bundle format"),
        ({"objective": "siglip"}, "unknown objective"),
        ({"embed_dim": "8"}, "'embed_dim' is missing"),
        ({"logit_scale": 0}, "logit_scale must be > 0"),
        ({"templates": ["ok {}", 3]}, "'templates' must be"),
        ({"onnx": {"image": "image_encoder.onnx"}}, "'onnx' must name"),
        ({"format": "xclip-bundle/1", "context_length": 77}, "context_length 77"),
        ({"format": "xclip-bundle/1", "image_size": 224}, "image_size 224"),
    ],
)
def test_bad_config_is_refused(tmp_path, changes, message):
    bundle_dir = make_bundle(tmp_path)
    rewrite_config(bundle_dir, **changes)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir)


def test_bundle_errors_are_value_errors():
    assert issubclass(BundleError, ValueError) and issubclass(BundleIntegrityError, BundleError)


def test_a_format_1_bundle_still_loads_and_its_repeated_sizes_are_checked_not_kept(tmp_path):
    bundle_dir = make_bundle(tmp_path)
    rewrite_config(bundle_dir, format="xclip-bundle/1", context_length=10, image_size=16)
    bundle = load_bundle(bundle_dir)
    assert bundle.tokenizer.context_length == 10 and bundle.preprocess.image_size == 16
    assert "context_length" not in bundle.config.to_dict() and "image_size" not in bundle.config.extra


def test_the_typed_config_round_trips_through_json(tmp_path):
    bundle = load_bundle(make_bundle(tmp_path, objective="xclip", num_clusters=5))
    again = BundleConfig.from_dict(json.loads(json.dumps(bundle.config.to_dict())))
    assert again == bundle.config
    assert again.to_dict()["format"] == "xclip-bundle/2" and again.extra["data_fingerprint"] == "abc"
    assert again.onnx.file("image", "int8") == "image_encoder.int8.onnx"
