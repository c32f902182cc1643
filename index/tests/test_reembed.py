"""Re-embedding a collection into another model's space: searches stay in the old space until the swap, items
written meanwhile are pending or counted, and the swap gives the new model and dimension."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from index.collection import Collection, Item
from index.errors import InvalidCollectionError, ReembedStateError
from index.store import CollectionStore
from index.tests.conftest import random_unit

OLD_DIM, NEW_DIM = 16, 24
PROJECTION = np.random.default_rng(7).standard_normal((OLD_DIM, NEW_DIM)).astype(np.float32)


def new_model(vectors: np.ndarray) -> np.ndarray:
    """The stand-in "model b": a fixed projection of the old vectors, renormalised."""
    projected = vectors @ PROJECTION
    return projected / np.linalg.norm(projected, axis=1, keepdims=True)


def text_items(ids) -> list[Item]:
    return [Item(str(i), {"n": int(i)}, "text", text=f"item {i}") for i in ids]


@pytest.fixture()
def collection(store) -> Collection:
    collection = store.create("c", "text", OLD_DIM, "a", "HNSW32")
    collection.upsert(text_items(range(300)), random_unit(300, OLD_DIM, seed=1), "a")
    return collection


def reembed_pending(collection: Collection, batch: int = 64) -> int:
    """What the service's background thread does: embed the pending items' sources in the target model."""
    written = 0
    while pending := collection.pending_reembed(batch):
        old = collection.vectors([item.id for item in pending])  # the fake "model b" embeds the old vector
        ids, int_ids = [item.id for item in pending], [item.int_id for item in pending]
        collection.write_reembedded(ids, new_model(old), int_ids)
        written += len(pending)
    return written


def test_reembed_flow(store, collection):
    old_queries = random_unit(5, OLD_DIM, seed=2)
    collection.begin_reembed("b", NEW_DIM)
    assert collection.reembed_progress() == {"target_model_id": "b", "dim": NEW_DIM, "done": 0, "total": 300}
    first = collection.pending_reembed(10)
    assert [item.text for item in first[:2]] == ["item 0", "item 1"]  # sources come back for embedding
    late_old = random_unit(1, OLD_DIM, seed=3)
    collection.upsert(text_items([300]), late_old, "a")  # old model: searchable now, pending like the rest
    collection.upsert(text_items([301]), new_model(random_unit(1, OLD_DIM, seed=4)), "b")  # stored for b only
    assert reembed_pending(collection) == 301
    assert collection.search(late_old, 1)[0][0].id == "300"  # still the old space ...
    assert "301" not in {h.id for h in collection.search(late_old, 400)[0]}  # ... where 301 has no vector
    with pytest.raises(InvalidCollectionError, match="16"):
        collection.search(random_unit(1, NEW_DIM), 5)
    collection.finish_reembed()
    assert (collection.spec.model_id, collection.spec.dim) == ("b", NEW_DIM)
    assert collection.reembed_progress() is None
    best = collection.search(new_model(old_queries), 1)[0][0].id
    assert best == best_in_new_space(collection, old_queries)
    assert collection.vectors(["0"]).shape == (1, NEW_DIM)
    assert collection.stats()["index_ntotal"] == 302
    store.close()
    reopened = CollectionStore(store.root).get("c")
    assert (reopened.spec.model_id, reopened.spec.dim) == ("b", NEW_DIM)
    assert reopened.stats()["index_ntotal"] == 302


def best_in_new_space(collection: Collection, old_queries: np.ndarray) -> str:
    """The exact best item of the first query in the new space, from the stored vectors."""
    ids = [str(i) for i in range(302)]
    return ids[int(np.argmax(collection.vectors(ids) @ new_model(old_queries)[0]))]


def test_finish_refuses_while_items_are_pending(collection):
    collection.begin_reembed("b", NEW_DIM)
    reembed_pending(collection)
    collection.upsert([Item("late", {}, "text", text="late")], random_unit(1, OLD_DIM), "a")
    with pytest.raises(ReembedStateError, match="1 items"):
        collection.finish_reembed()
    assert collection.spec.model_id == "a"


def test_vectors_for_replaced_items_are_not_written(collection):
    collection.begin_reembed("b", NEW_DIM)
    pending = collection.pending_reembed(1)
    collection.upsert(text_items([pending[0].id]), random_unit(1, OLD_DIM, seed=5), "a")  # replaced meanwhile
    collection.write_reembedded([pending[0].id], new_model(random_unit(1, OLD_DIM)), [pending[0].int_id])
    assert collection.reembed_progress()["done"] == 0
    assert [item.id for item in collection.pending_reembed(300)].count(pending[0].id) == 1


def test_searches_serve_the_old_index_while_the_new_one_builds(collection, monkeypatch):
    """finish_reembed builds off the lock: searches and writes go on, and writes made then are kept."""
    collection.begin_reembed("b", NEW_DIM)
    reembed_pending(collection)
    building, release = threading.Event(), threading.Event()
    build = Collection._build_index

    def slow_build(self, *args):
        building.set()
        assert release.wait(10)
        return build(self, *args)

    monkeypatch.setattr(Collection, "_build_index", slow_build)
    finisher = threading.Thread(target=collection.finish_reembed)
    finisher.start()
    assert building.wait(10)
    assert len(collection.search(random_unit(1, OLD_DIM), 3)[0]) == 3  # the old space, not blocked
    late = new_model(random_unit(1, OLD_DIM, seed=6))
    collection.upsert(text_items([999]), late, "b")
    collection.delete(["0"])
    release.set()
    finisher.join(10)
    assert collection.spec.model_id == "b"
    assert collection.search(late, 1)[0][0].id == "999"
    assert "0" not in {h.id for h in collection.search(collection.vectors(["1"]), 300)[0]}


@pytest.mark.parametrize(("call", "error", "fragment"), [
    (lambda c: c.begin_reembed("a", OLD_DIM), ReembedStateError, "'a' already"),
    (lambda c: (c.begin_reembed("b", 24), c.begin_reembed("z", 24)), ReembedStateError, "'b'"),
    (lambda c: c.finish_reembed(), ReembedStateError, "not being re-embedded"),
    (lambda c: c.write_reembedded(["0"], random_unit(1, NEW_DIM)), ReembedStateError, "not being"),
    (lambda c: c.begin_reembed("b", 0), InvalidCollectionError, "dim"),
    (lambda c: (c.begin_reembed("b", NEW_DIM), c.write_reembedded(["0"], random_unit(1, OLD_DIM))),
     InvalidCollectionError, "(1, 24)"),
    (lambda c: c.upsert(text_items([1]), random_unit(1, OLD_DIM), "b"), InvalidCollectionError, "'b'"),
])
def test_reembed_misuse(collection, call, error, fragment):
    with pytest.raises(error) as raised:
        call(collection)
    assert fragment in str(raised.value)


def test_target_dim_must_suit_the_index_type(store):
    collection = store.create("pq", "text", 16, "a", "IVF4,PQ8")
    with pytest.raises(InvalidCollectionError, match="'IVF4,PQ8'"):
        collection.begin_reembed("b", 12)  # PQ8 needs a dimension divisible by 8


def test_cancel_drops_the_target_vectors(collection):
    collection.begin_reembed("b", NEW_DIM)
    reembed_pending(collection)
    collection.cancel_reembed()
    assert collection.reembed_progress() is None
    collection.begin_reembed("b", NEW_DIM)
    assert collection.reembed_progress()["done"] == 0
