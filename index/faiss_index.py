"""The FAISS side of a collection: one model's vectors in an index built from a `faiss.index_factory` string
(inner product metric), under the store's int64 ids, searched through id selectors.

Choosing `index_factory` (vectors are L2-normalised, so scores are cosines). Figures from docs/BENCHMARKS.md
("search": 128-d, 2 cores, one query per call, recall@10 against exact search):
- "Flat" (the default): exact, no training, real deletes. Right up to ~100k vectors: its cost is linear in N
  (3.5 ms a query at 100k, 36 ms at 1M; so ~0.1 ms for the demo's few thousand emoji).
- "HNSW32": a graph, the fastest approximate index (1M: recall 0.968 in 0.44 ms with efSearch 64), no
  training; but slow to build (~4 min per 1M vectors on 2 cores), the largest (~0.8 GB per 1M), and it cannot
  remove vectors: deletes become tombstones excluded at search time, compacted past COMPACT_FRACTION.
- "IVF4096,Flat" (nlist ≈ 4·√N): inverted lists over a k-means (1M: recall 0.955 in 0.68 ms with nprobe 64),
  ~3x faster to build, real deletes. It trains once 39·nlist vectors exist; until then an exact stand-in
  serves. "IVF4096,SQ8" keeps 1 byte per dimension: a quarter of the memory, nprobe 96 for the same recall.
Tune `efSearch` / `nprobe` (search_params) on your own embeddings: uniform random vectors need far more.
The store maps its int64 ids itself (IVF natively, the others through `IndexIDMap2`), so factory strings must
not start with "IDMap".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import faiss
import numpy as np

from index.errors import InvalidCollectionError
from index.gpu import GPU_FAMILIES, GpuReplica

logger = logging.getLogger(__name__)

DEFAULT_INDEX_FACTORY = "Flat"
RECOMMENDED_FACTORIES = ("Flat", "HNSW32", "IVF1024,Flat", "IVF4096,Flat", "IVF4096,SQ8")
# Defaults from bench/search.py (docs/BENCHMARKS.md, "search"): recall@10 >= 0.95 on the realistic mixture at
# 1M vectors with HNSW32 and IVF4096,Flat (and at 100k with IVF1024,Flat). FAISS's own (16 / 1) are far lower.
DEFAULT_SEARCH_PARAMS = {"flat": {}, "sq": {}, "hnsw": {"efSearch": 64}, "ivf": {"nprobe": 64}}
FAMILY_CLASSES = (("flat", faiss.IndexFlat), ("hnsw", faiss.IndexHNSW), ("ivf", faiss.IndexIVF),
                  ("sq", faiss.IndexScalarQuantizer))
POINTS_PER_CENTROID = 39  # FAISS k-means warns below 39 training points per centroid
TRAIN_POINTS_PER_CENTROID = 64  # training sample cap: k-means time is linear in it (FAISS caps at 256)
MIN_TRAIN_OTHER = 1000  # non-IVF indexes that need training (SQ value ranges, PCA)
MAX_TRAIN_OTHER = 200_000
TRAIN_SEED = 1234
MAX_DIM = 65_536
MAX_MODEL_ID_LENGTH = 256
SERIAL_QUERIES_MAX = 4  # searches of this many queries or fewer run on the calling thread only (see search)
COMPACT_FRACTION = 0.2  # HNSW: rebuild once tombstones are more than this fraction of the index


def new_faiss_index(factory: str, dim: int) -> faiss.Index:
    """`faiss.index_factory(dim, factory, inner product)`; InvalidCollectionError naming the string."""
    if not isinstance(factory, str) or not factory.strip():
        raise InvalidCollectionError(f"index_factory must be a non-empty string, got {factory!r}")
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except (RuntimeError, TypeError) as err:
        reason = str(err).strip().splitlines()[-1]
        message = f"index_factory {factory!r} cannot be built for dim {dim}: {reason}"
        raise InvalidCollectionError(message) from err


def check_model(model_id: str, dim: int) -> None:
    """InvalidCollectionError unless `model_id` is a non-empty string and `dim` a positive integer."""
    if not isinstance(model_id, str) or not 1 <= len(model_id) <= MAX_MODEL_ID_LENGTH:
        raise InvalidCollectionError(f"model_id must be a string of 1-{MAX_MODEL_ID_LENGTH} characters, "
                                     f"got {model_id!r}")
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_DIM:
        raise InvalidCollectionError(f"dim must be an integer in 1..{MAX_DIM}, got {dim!r}")


def index_family(factory: str, dim: int) -> str:
    """"flat" | "hnsw" | "ivf" | "sq": the family of a factory string the store can serve."""
    return _checked_family(new_faiss_index(factory, dim), factory)


def _checked_family(index: faiss.Index, factory: str) -> str:
    """The family of a freshly built index, refusing types that cannot be searched through an id selector."""
    core = _core(index)
    for family, kind in FAMILY_CLASSES:
        if isinstance(core, kind):  # an IDMap from the string itself matches none: the store adds its own
            return family
    raise InvalidCollectionError(
        f"index_factory {factory!r} builds {type(core).__name__}, which the store cannot serve; use Flat, "
        "HNSW<M>, IVF<nlist>,<Flat|SQ8|PQ<m>> or SQ8, optionally after PCA/OPQ (the store adds the id map)"
    )


def _core(index: faiss.Index) -> faiss.Index:
    """The index under any pre-transform (PCA, OPQ), downcast to its concrete class."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def _with_ids(index: faiss.Index, family: str | None) -> faiss.Index:
    """`index` able to hold arbitrary int64 ids. IVF stores them in its lists (and removes by them); the
    others get an IndexIDMap2, whose removal is right only for indexes that renumber on removal (Flat, SQ).
    IVF must not be wrapped: it does not renumber, so IndexIDMap2's id table would go out of step."""
    family = family or _checked_family(index, "")
    return index if family == "ivf" else faiss.IndexIDMap2(index)


def _inverted_list_ids(ivf: faiss.IndexIVF) -> np.ndarray:
    """Every id stored in an IVF index's inverted lists."""
    lists = ivf.invlists
    parts = [np.empty(0, dtype=np.int64)]
    for number in range(lists.nlist):
        size = lists.list_size(number)
        if size:
            pointer = lists.get_ids(number)
            parts.append(faiss.rev_swig_ptr(pointer, size).astype(np.int64))  # a copy
            lists.release_ids(number, pointer)
    return np.concatenate(parts)


def resolve_search_params(family: str, given: dict | None) -> dict:
    """The family's default search parameters overridden by `given`; InvalidCollectionError if bad."""
    params = dict(DEFAULT_SEARCH_PARAMS[family])
    if given is not None and not isinstance(given, dict):
        raise InvalidCollectionError(f"search_params must be a JSON object, got {given!r}")
    for key, value in (given or {}).items():
        if key not in params:
            known = ", ".join(sorted(params)) or "none"
            raise InvalidCollectionError(f"search_params key {key!r} does not apply to {family} indexes "
                                         f"(known: {known})")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidCollectionError(f"search_params[{key!r}] must be a positive integer, got {value!r}")
        params[key] = value
    return params


def min_train_size(index: faiss.Index) -> int:
    """Vectors needed before training an untrained index is worthwhile (k-means wants 39 per centroid)."""
    centroids = _centroids(index)
    return POINTS_PER_CENTROID * centroids if centroids else MIN_TRAIN_OTHER


def train_sample_size(index: faiss.Index) -> int:
    """The most vectors an index is trained on (a seeded random sample of them beyond that)."""
    centroids = _centroids(index)
    return TRAIN_POINTS_PER_CENTROID * centroids if centroids else MAX_TRAIN_OTHER


def _centroids(index: faiss.Index) -> int:
    """The largest k-means an index's training runs: IVF's nlist, or an IVF-PQ's 2^nbits; 0 without IVF."""
    core = _core(index)
    if not isinstance(core, faiss.IndexIVF):
        return 0
    pq = getattr(core, "pq", None)  # IVF-PQ also trains 2^nbits centroids per sub-quantizer
    return max(core.nlist, pq.ksub if pq is not None else 0)


def exact_search(queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of `queries` (Q, d) over `vectors` (N, d) named by `ids` (N,), shaped like a
    FAISS result: (Q, k) scores and ids, padded with -inf / -1 when N < k."""
    scores = queries @ vectors.T  # (Q, N)
    top = min(k, len(ids))
    distances = np.full((len(queries), k), -np.inf, dtype=np.float32)
    labels = np.full((len(queries), k), -1, dtype=np.int64)
    if top == 0:
        return distances, labels
    unordered = np.argpartition(-scores, top - 1, axis=1)[:, :top]  # (Q, top) the best, in no order
    unordered_scores = np.take_along_axis(scores, unordered, axis=1)
    order = np.argsort(-unordered_scores, axis=1, kind="stable")
    distances[:, :top] = np.take_along_axis(unordered_scores, order, axis=1)
    labels[:, :top] = ids[np.take_along_axis(unordered, order, axis=1)]
    return distances, labels


@contextmanager
def _calling_thread_only() -> Iterator[None]:
    """Let FAISS use no OpenMP workers for the calling thread's searches (the setting is per thread). Waking a
    sleeping worker for one query cost ~8 ms on the 2-vCPU benchmark VM, 15x the 0.5 ms an HNSW search of 1M
    vectors takes; a service gets its parallelism from concurrent requests instead."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


class VectorIndex:
    """One model's vectors under int64 ids: the factory's index, or an exact stand-in until it can be trained.

    Invariant the store keeps: the vector of an (int id, model) pair never changes (a replaced item gets a new
    int id), so the index is fully described by the set of ids it holds and is caught up by set differences.
    """

    def __init__(self, factory: str, dim: int, search_params: dict | None = None,
                 index: faiss.Index | None = None, standin: bool = False):
        probe = new_faiss_index(factory, dim)
        self.factory, self.dim = factory, dim
        self.family = _checked_family(probe, factory)
        self.search_params = resolve_search_params(self.family, search_params)
        self.min_train = 0 if probe.is_trained else min_train_size(probe)
        self.index = index if index is not None else _with_ids(probe, self.family)
        self.standin = standin
        self.tombstones: set[int] = set()  # HNSW only: ids still in the graph whose items were deleted
        self._excluded: tuple | None = None  # cached (IDSelectorNot, IDSelectorBatch) over the tombstones
        self.gpu: GpuReplica | None = None  # set by the store when FAISS searches on a GPU (index/gpu.py)
        self.version = 0  # bumped by every write, so a GPU replica knows when to re-copy

    @classmethod
    def build(cls, factory: str, dim: int, search_params: dict | None, ids: np.ndarray,
              vectors: np.ndarray) -> VectorIndex:
        """An index holding `vectors` (N, dim) under `ids` (N,), trained on them if its type needs it and N
        suffices, else an exact stand-in."""
        built = cls(factory, dim, search_params)
        if not built.index.is_trained:
            if len(ids) >= built.min_train:
                built._train(vectors)
            else:
                built._become_standin(len(ids))
        built.add(ids, vectors)
        return built

    def _train(self, vectors: np.ndarray) -> None:
        limit = train_sample_size(self.index)
        if len(vectors) > limit:
            rows = np.sort(np.random.default_rng(TRAIN_SEED).choice(len(vectors), limit, replace=False))
            vectors = vectors[rows]  # (limit, dim) seeded sample
        started = time.perf_counter()
        self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))
        logger.info("trained %s on %d vectors in %.1f s", self.factory, len(vectors),
                    time.perf_counter() - started)

    @classmethod
    def from_bytes(cls, data: np.ndarray, factory: str, dim: int, search_params: dict | None,
                   standin: bool) -> VectorIndex:
        """An index read back from `serialize()`'s bytes; ValueError when they hold something else."""
        index = faiss.deserialize_index(data)
        expected = faiss.IndexIDMap2 if standin else type(_with_ids(new_faiss_index(factory, dim), None))
        if not isinstance(index, expected) or index.d != dim:
            raise ValueError(f"saved index is {type(index).__name__} of dim {index.d}, "
                             f"expected {expected.__name__} of dim {dim}")
        return cls(factory, dim, search_params, index=index, standin=standin)

    def serialize(self) -> np.ndarray:
        """The whole index as a uint8 array (FAISS's own format; no pickle)."""
        return faiss.serialize_index(self.index)

    def _become_standin(self, available: int) -> None:
        logger.info("%s needs %d vectors to train, has %d: exact search until then", self.factory,
                    self.min_train, available)
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self.standin = True

    @property
    def ntotal(self) -> int:
        """Vectors in the index, tombstones included."""
        return self.index.ntotal

    @property
    def live_count(self) -> int:
        """Vectors a search can return."""
        return self.index.ntotal - len(self.tombstones)

    @property
    def exact(self) -> bool:
        """True when searches are exhaustive (Flat or the stand-in), so id filtering loses nothing."""
        mapped = isinstance(self.index, faiss.IndexIDMap2)
        return mapped and isinstance(faiss.downcast_index(self.index.index), faiss.IndexFlat)

    def ready_to_train(self) -> bool:
        """True when the stand-in now holds enough vectors to train the real index."""
        return self.standin and self.live_count >= self.min_train

    def needs_compaction(self) -> bool:
        """True when tombstones make up more than COMPACT_FRACTION of the index."""
        return len(self.tombstones) > COMPACT_FRACTION * max(self.ntotal, 1)

    def ids(self) -> np.ndarray:
        """Every id in the index, tombstones included (int64)."""
        if isinstance(self.index, faiss.IndexIDMap2):
            return faiss.vector_to_array(self.index.id_map).astype(np.int64, copy=False)
        return _inverted_list_ids(faiss.extract_index_ivf(self.index))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add `vectors` (N, dim) float32 under `ids` (N,) int64."""
        if len(ids):
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            self.index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
            self.version += 1

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids from search: physically where the type supports it, as tombstones for HNSW."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        if self.family == "hnsw" and not self.standin:
            self.tombstones.update(ids.tolist())
            self._excluded = None
        else:
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
            self.version += 1

    def catch_up(self, live_ids: np.ndarray,
                 fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
        """Make the index hold exactly `live_ids`: add the missing ones (`fetch(ids)` → (ids, vectors)) and
        remove the others. Returns (added, removed)."""
        present = self.ids()
        missing = np.setdiff1d(live_ids, present)
        stale = np.setdiff1d(present, live_ids)
        if self.tombstones:
            stale = stale[~np.isin(stale, np.fromiter(self.tombstones, np.int64, len(self.tombstones)))]
        if len(missing):
            self.add(*fetch(missing))
        self.remove(stale)
        return len(missing), len(stale)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               budget: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search of (Q, dim) queries → (Q, k) scores and ids (-1 padded), only over `allowed` ids when
        given, never over tombstones; `budget` multiplies efSearch / nprobe (retries of short results)."""
        if self._on_gpu(allowed):
            nprobe = self.search_params["nprobe"] * budget if self.family == "ivf" and not self.standin else None
            return self.gpu.search(self.index, self.version, queries, k, nprobe)
        selector = self._selector(allowed)  # kept alive in this frame while FAISS uses it
        params = self._parameters(selector, k, budget)
        if len(queries) > SERIAL_QUERIES_MAX:
            return self.index.search(queries, k, params=params)
        with _calling_thread_only():
            return self.index.search(queries, k, params=params)

    def _on_gpu(self, allowed: np.ndarray | None) -> bool:
        """GPU replicas serve unfiltered searches of Flat/IVF indexes without tombstones."""
        family = "flat" if self.standin else self.family
        return (self.gpu is not None and allowed is None and not self.tombstones and family in GPU_FAMILIES
                and self.index.ntotal > 0)

    def _selector(self, allowed: np.ndarray | None) -> faiss.IDSelector | None:
        if allowed is not None:
            return faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
        if not self.tombstones:
            return None
        if self._excluded is None:
            batch = faiss.IDSelectorBatch(np.fromiter(self.tombstones, np.int64, len(self.tombstones)))
            self._excluded = (faiss.IDSelectorNot(batch), batch)  # IDSelectorNot does not own `batch`
        return self._excluded[0]

    def _parameters(self, selector: faiss.IDSelector | None, k: int, budget: int) -> faiss.SearchParameters:
        """Search parameters of this index type: efSearch (at least k) for HNSW, nprobe for IVF."""
        family = "flat" if self.standin else self.family
        if family == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.search_params["efSearch"], k) * budget
        elif family == "ivf":
            params = faiss.SearchParametersIVF()
            params.nprobe = self.search_params["nprobe"] * budget
        else:
            params = faiss.SearchParameters()
        params.sel = selector
        return params
