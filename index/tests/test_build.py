"""Offline bulk build with the tiny bundle: what it stores, resuming after a crash, and the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from core.bundle import load_bundle
from core.data import load_samples
from index.build import build_collection, expected_samples
from index.errors import InvalidCollectionError
from index.store import CollectionStore
from xclip_serve.cli import app

SAMPLES = 48  # 4 colours x 3 shapes x 4 variants


class FlakyEncoder:
    """The bundle's encoder, failing on its `fail_on`-th call (a crash mid-build); counts what it embedded."""

    def __init__(self, encoder, fail_on: int | None = None):
        self.encoder, self.fail_on, self.calls, self.embedded = encoder, fail_on, 0, 0

    def encode_images(self, images, batch_size=64):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("encoder crashed")
        self.embedded += len(images)
        return self.encoder.encode_images(images, batch_size)

    def encode_texts(self, texts, batch_size=256):
        self.embedded += len(texts)
        return self.encoder.encode_texts(texts, batch_size)


def test_build_stores_items_that_find_themselves(tmp_path, tiny_bundle, shapes_data, encoder):
    summary = build_collection(tiny_bundle, shapes_data, tmp_path, "shapes", batch_size=16, progress=False,
                               encoder=encoder)
    assert (summary["added"], summary["count"], summary["model_id"]) == (SAMPLES, SAMPLES,
                                                                         load_bundle(tiny_bundle).model_id)
    store = CollectionStore(tmp_path)
    collection = store.get("shapes")
    item = collection.get(["images/red-circle-0.png"])[0]
    assert item.metadata["colour"] == "red" and item.metadata["caption"] == "red circle"
    assert item.image is None and (shapes_data / "images/red-circle-0.png").samefile(item.image_path)
    samples, _ = load_samples(shapes_data)
    query = encoder.encode_images([samples[5].image])["embedding"]
    hit = collection.search(query, 1, where={"shape": samples[5].labels["shape"]})[0][0]
    assert hit.id == samples[5].key and hit.score == pytest.approx(1.0, abs=1e-5)
    store.close()


def test_build_text_collection_of_one_split_with_image_bytes(tmp_path, tiny_bundle, shapes_data, encoder):
    summary = build_collection(tiny_bundle, shapes_data, tmp_path, "captions", modality="text", split="train",
                               progress=False, encoder=encoder)
    train = len(load_samples(shapes_data, "train")[0])
    assert summary["count"] == train == expected_samples(shapes_data, "train")
    build_collection(tiny_bundle, shapes_data, tmp_path, "pictures", split="test", store_images=True,
                     progress=False, encoder=encoder)
    store = CollectionStore(tmp_path)
    captions, pictures = store.get("captions"), store.get("pictures")
    assert captions.get(["images/red-circle-0.png"])[0].text == "red circle"
    key = load_samples(shapes_data, "test")[0][0].key
    assert pictures.get([key])[0].image == (shapes_data / key).read_bytes()
    store.close()


def test_rerun_after_a_crash_embeds_only_what_is_missing(tmp_path, tiny_bundle, shapes_data, encoder):
    crashing = FlakyEncoder(encoder, fail_on=3)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        build_collection(tiny_bundle, shapes_data, tmp_path, "shapes", batch_size=8, progress=False,
                         encoder=crashing)
    store = CollectionStore(tmp_path)
    assert store.get("shapes").count() == 16  # the two batches before the crash are kept
    store.close()
    resumed = FlakyEncoder(encoder)
    summary = build_collection(tiny_bundle, shapes_data, tmp_path, "shapes", batch_size=8, progress=False,
                               encoder=resumed)
    assert (summary["added"], summary["skipped_existing"], summary["count"]) == (32, 16, SAMPLES)
    assert resumed.embedded == 32
    again = build_collection(tiny_bundle, shapes_data, tmp_path, "shapes", progress=False, encoder=resumed)
    assert (again["added"], again["count"], resumed.embedded) == (0, SAMPLES, 32)


def test_build_refuses_a_collection_of_another_model(tmp_path, tiny_bundle, shapes_data, encoder):
    store = CollectionStore(tmp_path)
    store.create("shapes", "image", load_bundle(tiny_bundle).embed_dim, "another-model")
    store.close()
    with pytest.raises(InvalidCollectionError, match="'another-model'"):
        build_collection(tiny_bundle, shapes_data, tmp_path, "shapes", progress=False, encoder=encoder)


def test_cli_builds_and_reports(tmp_path, tiny_bundle, shapes_data):
    runner = CliRunner()
    args = ["index", "build", "--bundle", str(tiny_bundle), "--data", str(shapes_data),
            "--collection", "emoji", "--root", str(tmp_path), "--index-factory", "HNSW32",
            "--batch-size", "20"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["count"] == SAMPLES
    stats = runner.invoke(app, ["index", "stats", "--root", str(tmp_path), "--collection", "emoji"])
    assert json.loads(stats.output)["index_factory"] == "HNSW32"
    missing = runner.invoke(app, ["index", "stats", "--root", str(tmp_path), "--collection", "nope"])
    assert missing.exit_code != 0 and "'nope' does not exist" in missing.output


def test_expected_samples_is_none_without_a_captions_file(tmp_path):
    assert expected_samples(tmp_path, None) is None
    assert expected_samples([str(tmp_path / "a.tar")], None) is None
