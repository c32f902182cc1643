"""Tests for bundle manifests: hashes match hashlib, and each kind of tampering is named in the error."""

import hashlib
import json

import pytest

from core.manifest import BundleIntegrityError, verify_manifest, write_manifest


@pytest.fixture
def bundle_dir(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 5000)  # > one 1 MiB hashing chunk
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "extra.txt").write_text("hello")
    write_manifest(tmp_path)
    return tmp_path


def test_manifest_lists_every_file_with_hash_and_size(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["format"] == "xclip-bundle/1"
    assert list(manifest["files"]) == ["config.json", "model.bin", "sub/extra.txt"]
    data = (bundle_dir / "model.bin").read_bytes()
    assert manifest["files"]["model.bin"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_untouched_bundle_verifies(bundle_dir):
    verify_manifest(bundle_dir)


def check_rejected(bundle_dir, expected: str):
    with pytest.raises(BundleIntegrityError, match=expected):
        verify_manifest(bundle_dir)


def test_altered_file_is_named(bundle_dir):
    data = bytearray((bundle_dir / "model.bin").read_bytes())
    data[123_456] ^= 1  # same size, one bit flipped
    (bundle_dir / "model.bin").write_bytes(bytes(data))
    check_rejected(bundle_dir, r"altered: model\.bin")


def test_missing_file_is_named(bundle_dir):
    (bundle_dir / "sub" / "extra.txt").unlink()
    check_rejected(bundle_dir, r"missing: sub/extra\.txt")


def test_unexpected_file_is_named(bundle_dir):
    (bundle_dir / "evil.onnx").write_bytes(b"x")
    check_rejected(bundle_dir, r"unexpected: evil\.onnx")


def test_missing_manifest_is_an_error(bundle_dir):
    (bundle_dir / "manifest.json").unlink()
    check_rejected(bundle_dir, "manifest.json is missing")


def test_every_problem_is_reported_together(bundle_dir):
    (bundle_dir / "config.json").write_text('{"a": 2}')
    (bundle_dir / "model.bin").unlink()
    (bundle_dir / "new.txt").write_text("n")
    with pytest.raises(BundleIntegrityError) as err:
        verify_manifest(bundle_dir)
    assert "missing: model.bin" in str(err.value)
    assert "altered: config.json" in str(err.value)
    assert "unexpected: new.txt" in str(err.value)


def test_integrity_error_is_a_value_error():
    assert issubclass(BundleIntegrityError, ValueError)
