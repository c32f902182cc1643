"""Offline bulk build with the tiny bundle: what it stores, resuming after a crash, and the CLI."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
from typer.testing import CliRunner

from core.bundle import load_bundle
from core.data import load_samples
from index.build import build_collection, expected_samples
from index.collection import check_item_id
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


def test_build_skips_and_counts_files_whose_names_cannot_be_item_ids(tmp_path, tiny_bundle, shapes_data, encoder):
    data = tmp_path / "odd"
    (data / "images").mkdir(parents=True)
    names = ["images/plain.png", "images/" + "x" * 251 + ".png", "images/tab\there.png", "images/ inner ok.png"]
    for name in names:
        shutil.copy(shapes_data / "images/red-circle-0.png", data / name)
    (data / "captions.jsonl").write_text("".join(json.dumps({"image": n, "text": ["red circle"]}) + "\n"
                                                 for n in names))
    summary = build_collection(tiny_bundle, data, tmp_path / "root", "odd", progress=False, encoder=encoder)
    assert summary["bad_records"]["by_reason"] == {"bad_item_id": 2}
    store = CollectionStore(tmp_path / "root")
    assert store.get("odd").list_ids() == ["images/ inner ok.png", "images/plain.png"]
    store.close()


def shard_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def test_build_normalises_dot_segments_of_shard_keys(tmp_path, tiny_bundle, shapes_data, encoder):
    """`tar -C dir .` writes members as ./KEY.png: their items are named KEY; one that then collides with
    another key is skipped and counted."""
    png = (shapes_data / "images/red-circle-0.png").read_bytes()
    keys = ["./a", "b/./c", "a", "d/../e", "./f"]
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for key in keys:
            tar.addfile(*shard_member(f"{key}.png", png))
            tar.addfile(*shard_member(f"{key}.txt", b"red circle"))
    summary = build_collection(tiny_bundle, [str(tmp_path / "shard.tar")], tmp_path / "root", "shard",
                               progress=False, encoder=encoder)
    assert summary["bad_records"]["by_reason"] == {"duplicate_item_id": 1, "bad_item_id": 1}
    store = CollectionStore(tmp_path / "root")
    ids = store.get("shard").list_ids()
    assert ids == ["a", "b/c", "f"] and all(check_item_id(i) is None for i in ids)
    store.close()
