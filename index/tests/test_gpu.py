"""The FAISS GPU branch, on CPU: device resolution and its errors, and the replica path driven through a stand-in
for `index_cpu_to_gpu` (a CPU clone) so routing, refresh-after-write and fallbacks are exercised without a GPU."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from index import gpu
from index.collection import Item
from index.store import CollectionStore


def unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("requested, expected", [("cpu", "cpu"), ("auto", "cpu")])
def test_without_a_gpu_auto_and_cpu_search_on_the_cpu(requested, expected, monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)  # faiss-cpu, or faiss-gpu on no GPU
    assert gpu.gpu_count() == 0
    assert gpu.resolve_device(requested) == expected


def test_asking_for_a_gpu_without_one_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    with pytest.raises(gpu.GpuUnavailableError, match="faiss-gpu-cu12"):
        CollectionStore(tmp_path, faiss_device="gpu")
    with pytest.raises(ValueError, match="must be one of"):
        gpu.resolve_device("tpu")


class FakeGpu:
    """Stands in for faiss-gpu: a 'GPU copy' is a CPU clone; counts the copies."""

    def __init__(self, monkeypatch):
        self.copies = 0
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
        monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", self.copy, raising=False)
        monkeypatch.setattr(faiss, "GpuParameterSpace", lambda: faiss.ParameterSpace(), raising=False)

    def copy(self, resources, device, index):
        self.copies += 1
        return faiss.clone_index(index)


def fill(store: CollectionStore, name: str, factory: str, vectors: np.ndarray):
    coll = store.create(name, "text", vectors.shape[1], "m", factory)
    coll.upsert([Item(id=f"i{i}", metadata={"even": i % 2 == 0}, kind="text", text=f"t{i}")
                 for i in range(len(vectors))], vectors, "m")
    return coll


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_gpu_replica_answers_like_the_cpu_index_and_is_refreshed_after_writes(tmp_path, monkeypatch, factory):
    vectors, queries = unit(400), unit(5, seed=1)
    cpu_hits = fill(CollectionStore(tmp_path / "cpu"), "c", factory, vectors).search(queries, 10)
    fake = FakeGpu(monkeypatch)
    coll = fill(CollectionStore(tmp_path / "gpu", faiss_device="gpu"), "c", factory, vectors)
    gpu_hits = coll.search(queries, 10)
    assert [[h.id for h in row] for row in gpu_hits] == [[h.id for h in row] for row in cpu_hits]
    assert fake.copies == 1
    coll.search(queries, 10)
    assert fake.copies == 1  # no write, no re-copy
    coll.delete(["i0"])
    assert "i0" not in {h.id for row in coll.search(vectors[:1], 5) for h in row}
    assert fake.copies == 2


def test_filtered_and_hnsw_searches_stay_on_the_cpu(tmp_path, monkeypatch):
    fake = FakeGpu(monkeypatch)
    store = CollectionStore(tmp_path, faiss_device="auto")
    flat, hnsw = fill(store, "flat", "Flat", unit(200)), fill(store, "hnsw", "HNSW32", unit(200))
    filtered = flat.search(unit(2, seed=3), 5, where={"even": True})
    hnsw.search(unit(2, seed=3), 5)
    assert fake.copies == 0
    assert all(h.metadata["even"] for row in filtered for h in row)
