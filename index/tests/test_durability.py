"""Durability and recovery: SQLite is the truth, the index file a cache. Whatever happens to the index file,
or when the process stops between the SQLite commit and the index update, a reopened collection answers the
same."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from index.snapshot import INDEX_FILE, SIDECAR_FILE
from index.store import CollectionStore
from index.tests.conftest import random_unit, vector_items

QUERIES = random_unit(30, 16, seed=11)


def fill(store: CollectionStore, factory: str):
    """A collection with inserts, replacements and deletes, flushed after the first batch only."""
    collection = store.create("c", "image", 16, "m", factory)
    collection.upsert(vector_items(600), random_unit(600, 16, seed=1), "m")
    collection.flush()
    collection.upsert(vector_items(650)[590:], random_unit(60, 16, seed=2), "m")  # 10 replaced, 50 new
    collection.delete([str(i) for i in range(0, 600, 20)])
    return collection


def answers(collection) -> list[list[tuple[str, float]]]:
    return [[(h.id, round(h.score, 5)) for h in row] for row in collection.search(QUERIES, 10)]


def corrupt(directory: Path) -> None:
    data = bytearray((directory / INDEX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / INDEX_FILE).write_bytes(bytes(data))


DAMAGES = {  # what happens to the collection directory between close and reopen
    "none": lambda d: None,
    "index file deleted": lambda d: (d / INDEX_FILE).unlink(),
    "sidecar deleted": lambda d: (d / SIDECAR_FILE).unlink(),
    "index file corrupted": corrupt,
    "index file truncated": lambda d: (d / INDEX_FILE).write_bytes((d / INDEX_FILE).read_bytes()[:100]),
    "sidecar not JSON": lambda d: (d / SIDECAR_FILE).write_text("{"),
}
EXPECTED_LOG = {"none": None, "index file deleted": "no saved index", "sidecar deleted": "no saved index",
                "index file corrupted": "checksum", "index file truncated": "checksum",
                "sidecar not JSON": "unreadable"}


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF8,Flat"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_reopen_after_index_file_damage_answers_the_same(tmp_path, caplog, factory, damage):
    store = CollectionStore(tmp_path)
    before = answers(fill(store, factory))
    store.close()
    DAMAGES[damage](tmp_path / "c")
    with caplog.at_level(logging.INFO, logger="index"):
        reopened = CollectionStore(tmp_path)
    assert answers(reopened.get("c")) == before
    if EXPECTED_LOG[damage]:
        assert EXPECTED_LOG[damage] in caplog.text and "built" in caplog.text  # rebuilt from SQLite
    assert reopened.get("c").stats()["count"] == 620
    reopened.close()


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF8,Flat"])
def test_writes_committed_but_never_flushed_are_recovered(tmp_path, caplog, factory):
    """A process stopping right after SQLite commits (the index file is older): reopening catches up."""
    store = CollectionStore(tmp_path)
    live = fill(store, factory)  # never closed: the file on disk reflects the first batch only
    with caplog.at_level(logging.INFO, logger="index"):
        second = CollectionStore(tmp_path)
    assert "catching up" in caplog.text
    assert answers(second.get("c")) == answers(live)
    tombstones = 30 + 10 if factory == "HNSW32" else 0  # deleted items and the replaced items' old int ids
    assert second.get("c").stats()["tombstones"] == live.stats()["tombstones"] == tombstones
    second.close()
    store.close()


def test_stale_snapshot_with_matching_checksum_is_caught_up(tmp_path):
    """An older, intact index file and sidecar (e.g. restored from a backup) behind SQLite's sequence."""
    store = CollectionStore(tmp_path)
    collection = store.create("c", "image", 16, "m", "HNSW32")
    collection.upsert(vector_items(300), random_unit(300, 16, seed=4), "m")
    collection.flush()
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in (INDEX_FILE, SIDECAR_FILE):
        shutil.copy(tmp_path / "c" / name, saved / name)
    collection.delete(["1", "2"])
    collection.upsert([*vector_items(310)][300:], random_unit(10, 16, seed=5), "m")
    before = answers(collection)
    store.close()
    for name in (INDEX_FILE, SIDECAR_FILE):
        shutil.copy(saved / name, tmp_path / "c" / name)
    reopened = CollectionStore(tmp_path)
    assert answers(reopened.get("c")) == before
    assert reopened.get("c").stats()["tombstones"] == 2
    reopened.close()


def test_flush_is_atomic_and_skipped_when_unchanged(tmp_path):
    store = CollectionStore(tmp_path)
    collection = store.create("c", "image", 16, "m")
    collection.upsert(vector_items(10), random_unit(10, 16), "m")
    collection.flush()
    written = (tmp_path / "c" / INDEX_FILE).stat().st_mtime_ns
    collection.flush()
    assert (tmp_path / "c" / INDEX_FILE).stat().st_mtime_ns == written
    assert not list((tmp_path / "c").glob("*.tmp"))
    store.close()


def test_interrupted_create_and_delete_leave_no_collection(tmp_path):
    (tmp_path / ".creating-x-1234").mkdir()
    (tmp_path / ".deleting-y-1234").mkdir()
    store = CollectionStore(tmp_path)
    assert store.list() == [] and sorted(p.name for p in tmp_path.iterdir()) == []
    store.close()


def test_broken_collection_does_not_stop_the_others(tmp_path):
    store = CollectionStore(tmp_path)
    store.create("good", "image", 8, "m").upsert(vector_items(3), random_unit(3, 8), "m")
    store.create("bad", "image", 8, "m")
    store.close()
    (tmp_path / "bad" / "items.sqlite").write_bytes(b"not a database" * 100)
    store = CollectionStore(tmp_path)
    assert [s.name for s in store.list()] == ["good"]
    with pytest.raises(Exception, match="'bad' could not be opened"):
        store.get("bad")
    np.testing.assert_array_equal(store.get("good").vectors(["0"]).shape, (1, 8))
    store.close()
