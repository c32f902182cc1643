"""Collection and store behaviour: items in and out, replacement, deletion (Flat removal, HNSW tombstones and
compaction) and the errors bad inputs get, each naming what was wrong."""

from __future__ import annotations

import re

import numpy as np
import pytest

from index import collection as collection_module
from index.collection import MAX_ID_LENGTH, MAX_METADATA_DEPTH, Item, check_item_id
from index.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    InvalidCollectionError,
    ItemNotFoundError,
)
from index.faiss_index import DEFAULT_INDEX_FACTORY, DEFAULT_SEARCH_PARAMS
from index.store import CollectionStore
from index.tests.conftest import random_unit, vector_items

FACTORIES = ["Flat", "HNSW32", "IVF8,Flat"]


def sources() -> list[Item]:
    return [Item("img", {"caption": "a red circle", "tags": ["a", "b"]}, "image", image=b"\x89PNG...",
                 image_path="images/red.png"),
            Item("path-only", {}, "image", image_path="https://example.com/x.png"),
            Item("vec", {"n": 1}, "vector")]


def test_items_round_trip_with_their_sources(store):
    collection = store.create("c", "image", 8, "m")
    vectors = random_unit(3, 8)
    collection.upsert(sources(), vectors, "m")
    got = collection.get(["vec", "nope", "img"])
    assert got[1] is None
    assert (got[0].kind, got[0].metadata) == ("vector", {"n": 1})
    assert (got[2].image, got[2].image_path) == (b"\x89PNG...", "images/red.png")
    assert got[2].metadata["tags"] == ["a", "b"]
    assert collection.get_by_int_ids([got[2].int_id, 10**9]) == [got[2], None]
    np.testing.assert_array_equal(collection.vectors(["vec", "img"]), vectors[[2, 0]])
    assert collection.count() == 3 and collection.spec.index_factory == DEFAULT_INDEX_FACTORY


def test_vectors_of_an_unknown_id_names_it(store):
    collection = store.create("c", "image", 8, "m")
    collection.upsert(vector_items(2), random_unit(2, 8), "m")
    with pytest.raises(ItemNotFoundError, match="'missing'"):
        collection.vectors(["0", "missing", "also-missing"])


@pytest.mark.parametrize("factory", FACTORIES)
def test_upsert_replaces_vector_metadata_and_int_id(store, factory):
    collection = store.create("c", "image", 16, "m", factory)
    base = random_unit(400, 16, seed=1)
    collection.upsert(vector_items(400), base, "m")
    old_int_id = collection.get(["7"])[0].int_id
    replacement = random_unit(1, 16, seed=2)
    collection.upsert([Item("7", {"n": "new"}, "vector")], replacement, "m")
    assert collection.count() == 400
    new = collection.get(["7"])[0]
    assert new.metadata == {"n": "new"} and new.int_id != old_int_id
    assert collection.search(replacement, 1)[0][0].id == "7"
    assert "7" not in {h.id for h in collection.search(base[7:8], 10)[0]}  # the old vector is gone
    assert collection.get_by_int_ids([old_int_id]) == [None]
    collection.upsert(vector_items(400)[100:150], random_unit(50, 16, seed=4), "m")
    assert_scores_match_stored_vectors(collection, base[:20])


@pytest.mark.parametrize(("factory", "removes", "tombstones"), [
    ("Flat", 0, 0), ("IVF8,Flat", 0, 0),
    ("HNSW32", 30, 30),  # 30 of 400 = 7.5%: tombstones, below the compaction threshold (20%)
    ("HNSW32", 100, 0),  # 25%: compacted into a fresh graph
])
def test_delete(store, factory, removes, tombstones):
    collection = store.create("c", "image", 16, "m", factory)
    base = random_unit(400, 16, seed=3)
    collection.upsert(vector_items(400), base, "m")
    doomed = [str(i) for i in range(removes)] if removes else ["5", "6"]
    assert collection.delete([*doomed, "not-there"]) == len(doomed)
    stats = collection.stats()
    assert (stats["count"], stats["tombstones"]) == (400 - len(doomed), tombstones)
    assert stats["index_ntotal"] == stats["count"] + tombstones
    hits = collection.search(base[: len(doomed)], 10)
    assert not {h.id for row in hits for h in row} & set(doomed)
    assert [len(row) for row in hits] == [10] * len(doomed)
    assert collection.get(doomed[:1]) == [None]
    assert_scores_match_stored_vectors(collection, base[200:210])


def assert_scores_match_stored_vectors(collection, queries: np.ndarray) -> None:
    """Every hit's score is the query's inner product with the vector stored under the hit's id: FAISS ids and
    SQLite ids are in step."""
    for query, row in zip(queries, collection.search(queries, 10), strict=True):
        stored = collection.vectors([h.id for h in row])
        np.testing.assert_allclose([h.score for h in row], stored @ query, rtol=1e-5, atol=1e-6)


def test_search_returns_fewer_hits_than_k_only_when_the_collection_is_smaller(store):
    collection = store.create("c", "image", 8, "m", "HNSW32")
    collection.upsert(vector_items(5), random_unit(5, 8), "m")
    hits = collection.search(random_unit(3, 8, seed=9), 10)
    assert [len(row) for row in hits] == [5, 5, 5]
    assert all(row[0].score >= row[-1].score for row in hits)
    assert store.create("empty", "text", 8, "m").search(random_unit(1, 8), 3) == [[]]


def test_store_lists_reopens_and_deletes(tmp_path):
    store = CollectionStore(tmp_path)
    store.create("b", "text", 8, "m", "HNSW32")
    store.create("a", "image", 8, "m")
    store.close()
    store = CollectionStore(tmp_path)
    specs = store.list()
    assert [s.name for s in specs] == ["a", "b"]
    assert specs[1].search_params == DEFAULT_SEARCH_PARAMS["hnsw"]
    deleted = store.get("a")
    store.delete("a")
    assert not (tmp_path / "a").exists() and [s.name for s in store.list()] == ["b"]
    with pytest.raises(CollectionNotFoundError, match="'a'"):
        deleted.search(random_unit(1, 8), 1)  # a reference held across the delete
    store.close()


# ------------------------------------------------------------------------------------------- bad inputs


def create(**overrides):
    args = {"name": "c2", "modality": "image", "dim": 16, "model_id": "m", **overrides}
    return lambda store, collection: store.create(**args)


def upsert(items=None, vectors=None, model_id="m"):
    items = items if items is not None else vector_items(2)
    vectors = vectors if vectors is not None else random_unit(len(items), 16)
    return lambda store, collection: collection.upsert(items, vectors, model_id)


NAN = np.full((1, 16), np.nan, dtype=np.float32)
BAD_CALLS = [  # (what is wrong, the call, the error, a fragment its message must hold)
    ("name with a space", create(name="bad name"), InvalidCollectionError, "'bad name'"),
    ("name too long", create(name="x" * 65), InvalidCollectionError, "'xxxx"),
    ("name starting with a dot", create(name=".hidden"), InvalidCollectionError, "'.hidden'"),
    ("name taken", create(name="c"), CollectionExistsError, "'c'"),
    ("unknown modality", create(modality="audio"), InvalidCollectionError, "'audio'"),
    ("zero dim", create(dim=0), InvalidCollectionError, "dim"),
    ("empty model id", create(model_id=""), InvalidCollectionError, "model_id"),
    ("unparsable factory", create(index_factory="Bogus12"), InvalidCollectionError, "'Bogus12'"),
    ("unsupported factory", create(index_factory="PQ8"), InvalidCollectionError, "'PQ8'"),
    ("factory with an id map", create(index_factory="IDMap,Flat"), InvalidCollectionError, "'IDMap,Flat'"),
    ("factory impossible at dim", create(index_factory="IVF8,PQ7"), InvalidCollectionError, "'IVF8,PQ7'"),
    ("search param of another type", create(search_params={"nprobe": 4}), InvalidCollectionError, "'nprobe'"),
    ("non-positive search param", create(index_factory="HNSW32", search_params={"efSearch": 0}),
     InvalidCollectionError, "'efSearch'"),
    ("unknown collection", lambda store, c: store.get("nope"), CollectionNotFoundError, "'nope'"),
    ("duplicate ids", upsert(items=[*vector_items(1), *vector_items(1)]), InvalidCollectionError, "'0'"),
    ("float64 vectors", upsert(vectors=random_unit(2, 16).astype(np.float64)), InvalidCollectionError,
     "float32"),
    ("wrong dim", upsert(vectors=random_unit(2, 8)), InvalidCollectionError, "(2, 16)"),
    ("one vector short", upsert(vectors=random_unit(1, 16)), InvalidCollectionError, "(2, 16)"),
    ("NaN", upsert(items=vector_items(1), vectors=NAN), InvalidCollectionError, "NaN"),
    ("other model", upsert(model_id="other"), InvalidCollectionError, "'other'"),
    ("metadata not an object", upsert(items=[Item("x", ["a"], "vector")]), InvalidCollectionError, "'x'"),
    ("metadata not JSON", upsert(items=[Item("x", {"f": {1, 2}}, "vector")]), InvalidCollectionError, "'x'"),
    ("metadata NaN", upsert(items=[Item("x", {"f": float("nan")}, "vector")]), InvalidCollectionError, "'x'"),
    ("metadata infinite, nested", upsert(items=[Item("x", {"f": [{"g": float("-inf")}]}, "vector")]),
     InvalidCollectionError, "'x'"),
    ("text item in an image collection", upsert(items=[Item("t", {}, "text", text="hi")]),
     InvalidCollectionError, "'text'"),
    ("image item without a source", upsert(items=[Item("i", {}, "image")]), InvalidCollectionError, "'i'"),
    ("empty id", upsert(items=[Item("", {}, "vector")]), InvalidCollectionError, "''"),
    ("id too long", upsert(items=[Item("y" * 257, {}, "vector")]), InvalidCollectionError, "256"),
    ("no items", upsert(items=[], vectors=random_unit(1, 16)), InvalidCollectionError, "non-empty"),
    ("queries of another dim", lambda s, c: c.search(random_unit(1, 8), 3), InvalidCollectionError, "16"),
    ("1-D query", lambda s, c: c.search(random_unit(1, 16)[0], 3), InvalidCollectionError, "shape"),
    ("k of 0", lambda s, c: c.search(random_unit(1, 16), 0), InvalidCollectionError, "k must"),
    ("ids not strings", lambda s, c: c.get([1]), InvalidCollectionError, "1"),
]


@pytest.mark.parametrize(("call", "error", "fragment"), [case[1:] for case in BAD_CALLS],
                         ids=[case[0] for case in BAD_CALLS])
def test_bad_input_raises_naming_the_problem(store, call, error, fragment):
    collection = store.create("c", "image", 16, "m")
    with pytest.raises(error) as raised:
        call(store, collection)
    assert fragment in str(raised.value)
    assert collection.count() == 0  # nothing was half-written


# ------------------------------------------------------------------------------------------- item ids


ID_CASES = [  # (item id, a fragment of why it is refused; None: accepted)
    ("a", None),
    ("images/1f600.png", None),  # what `index build` writes: paths relative to the data set
    ("x" * MAX_ID_LENGTH, None),
    ("inner space/and more", None),
    ("...", None),
    (".hidden/a..b/c.", None),
    ("/leading/and/trailing/", None),
    ("é😀", None),
    ("%2e%2e/a?b#c", None),  # percent-encoding and query characters are the HTTP client's business
    ("", "1-256 characters"),
    ("x" * (MAX_ID_LENGTH + 1), "1-256 characters"),
    (1, "string"),
    (None, "string"),
    (b"bytes", "string"),
    ("nul\x00", "control character"),
    ("line\nbreak", "control character"),
    ("tab\tinside", "control character"),
    ("del\x7f", "control character"),
    (" leading", "whitespace"),
    ("trailing ", "whitespace"),
    ("no-break space\u00a0", "whitespace"),
    (".", "'.' or '..' path segment"),
    ("..", "'.' or '..' path segment"),
    ("a/./b", "'.' or '..' path segment"),
    ("../up", "'.' or '..' path segment"),
    ("down/..", "'.' or '..' path segment"),
]


@pytest.mark.parametrize(("item_id", "reason"), ID_CASES, ids=[repr(case[0])[:24] for case in ID_CASES])
def test_item_id_rules(item_id, reason):
    refused = check_item_id(item_id)
    assert refused is None if reason is None else reason in refused


@pytest.mark.parametrize("bad_id", ["a/../b", " padded", "nul\x00", "z" * 10_000])
def test_upsert_refuses_a_batch_with_one_bad_id_storing_none_of_it(store, bad_id):
    collection = store.create("c", "image", 16, "m")
    collection.upsert(vector_items(2), random_unit(2, 16), "m")
    batch = [Item("0", {"n": "changed"}, "vector"), Item("new", {}, "vector"), Item(bad_id, {}, "vector")]
    with pytest.raises(InvalidCollectionError, match=re.escape(repr(bad_id)[:40])) as raised:
        collection.upsert(batch, random_unit(3, 16), "m")
    assert len(str(raised.value)) < 300  # a huge id is shown truncated
    assert collection.count() == 2
    assert collection.get(["0"])[0].metadata == {"n": 0} and collection.get(["new"]) == [None]


def test_an_item_stored_before_the_id_rules_can_still_be_read_and_deleted(store, monkeypatch):
    collection = store.create("c", "image", 16, "m")
    with monkeypatch.context() as before_the_rules:
        before_the_rules.setattr(collection_module, "check_item_id", lambda item_id: None)
        collection.upsert([Item("./old", {"n": 1}, "vector")], random_unit(1, 16), "m")
    assert collection.get(["./old"])[0].metadata == {"n": 1}
    assert collection.delete(["./old"]) == 1 and collection.count() == 0


# ------------------------------------------------------------------------------------------- metadata depth


def nested(depth: int) -> dict:
    """Metadata `depth` JSON containers deep, objects and lists alternating: {"a": [{"a": [... "leaf"]}]}."""
    value = "leaf"
    for level in reversed(range(depth)):
        value = {"a": value} if level % 2 == 0 else [value]
    return value


def test_metadata_nested_to_the_limit_round_trips_and_deeper_is_refused(store):
    collection = store.create("c", "image", 16, "m")
    collection.upsert(vector_items(2), random_unit(2, 16), "m")
    collection.upsert([Item("deepest", nested(MAX_METADATA_DEPTH), "vector")], random_unit(1, 16), "m")
    assert collection.get(["deepest"])[0].metadata == nested(MAX_METADATA_DEPTH)
    for depth in (MAX_METADATA_DEPTH + 1, 300, 5000):
        batch = [Item("0", {"n": "changed"}, "vector"), Item("too-deep", nested(depth), "vector")]
        with pytest.raises(InvalidCollectionError, match=f"'too-deep'.* {MAX_METADATA_DEPTH} levels"):
            collection.upsert(batch, random_unit(2, 16), "m")
    assert collection.count() == 3
    assert collection.get(["0"])[0].metadata == {"n": 0} and collection.get(["too-deep"]) == [None]
