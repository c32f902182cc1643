"""One search collection: items, metadata and vectors in SQLite (the source of truth), searched through a
FAISS index kept in step with it, and re-embedding into another model's space.

Writes commit to SQLite first (an acknowledged write is durable), then update FAISS; the index file on disk is
a cache, caught up from SQLite at open (see `snapshot`). One lock per collection serialises writes and
searches; index rebuilds (training, compaction, the end of a re-embed) run off the lock and are caught up
under it.

What an upsert accepts: ids by `check_item_id` (1-MAX_ID_LENGTH (256) characters, no control characters, no
leading or trailing whitespace, no '.' or '..' path segment: the service puts ids in URL paths); metadata a JSON
object at most MAX_METADATA_DEPTH (16) objects/lists deep, with finite numbers only (`_metadata_json`).
Anything else is refused with InvalidCollectionError before any of the batch is stored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
from pathlib import Path

import numpy as np

from index.db import ItemsDB
from index.errors import (
    CollectionNotFoundError,
    InvalidCollectionError,
    ItemNotFoundError,
    ReembedStateError,
    SpaceChangedError,
)
from index.faiss_index import VectorIndex, check_model, exact_search, index_family
from index.filters import where_clause
from index.gpu import GpuReplica
from index.snapshot import load_snapshot, save_snapshot

logger = logging.getLogger(__name__)

DB_FILE = "items.sqlite"
KINDS = ("image", "text", "vector")
MAX_ID_LENGTH = 256
MAX_METADATA_DEPTH = 16  # objects/lists, the metadata object itself included: {"a": [1]} is 2 deep
MAX_K = 10_000
EXACT_CANDIDATES_MAX = 10_000  # a filter this selective is searched exactly over its candidates' vectors
SHORT_RESULT_RETRIES = (4, 16)  # efSearch / nprobe multipliers tried when an approximate search is short
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")


@dataclasses.dataclass(frozen=True)
class CollectionSpec:
    """What a collection is: its items' modality, embedding space (model, dim) and FAISS index type."""

    name: str
    modality: str  # "image" | "text": what items are embedded from ("vector" items count as this modality)
    dim: int
    index_factory: str
    model_id: str  # the model whose embedding space the searchable vectors are in
    created_at: float
    search_params: dict  # e.g. {"efSearch": 128} (HNSW) or {"nprobe": 32} (IVF), defaults filled in


@dataclasses.dataclass
class Item:
    """One stored item: its external id, metadata and the source it was embedded from."""

    id: str  # external id, see `check_item_id`
    metadata: dict  # a JSON object
    kind: str  # "image" | "text" | "vector"
    text: str | None = None
    image: bytes | None = None  # kept so that the collection can be re-embedded
    image_path: str | None = None  # or a path/URL (bulk builds keep paths)
    int_id: int | None = None  # the int64 FAISS id currently assigned (filled by the store)


@dataclasses.dataclass
class Hit:
    """One search result; score is the inner product (the cosine, for L2-normalised vectors)."""

    id: str
    int_id: int
    score: float
    metadata: dict


class Collection:
    """A collection directory opened: SQLite plus the FAISS index of the current model's vectors."""

    def __init__(self, directory: str | Path, gpu_search: bool = False):
        self.directory = Path(directory)
        self._gpu = GpuReplica() if gpu_search else None  # GPU copy for unfiltered searches (index/gpu.py)
        self._db = ItemsDB(self.directory / DB_FILE)
        self._reader = ItemsDB(self.directory / DB_FILE)  # snapshot reads for builds that run off the lock
        self._lock = threading.RLock()
        self._rebuild_lock = threading.Lock()  # one index rebuild at a time
        self._flush_lock = threading.Lock()
        self._spec = CollectionSpec(**self._db.setting("spec"))
        self._target: dict | None = self._db.setting("reembed")  # {"model_id", "dim"} while a re-embed runs
        self._flushed: tuple[int, VectorIndex | None] = (-1, None)  # (seq, index) last written to disk
        self._index = self._open_index()
        self.flush()

    @staticmethod
    def initialise(directory: Path, spec: CollectionSpec) -> None:
        """Create `directory` with a new, empty collection database."""
        directory.mkdir(parents=True)
        ItemsDB.create(directory / DB_FILE, dataclasses.asdict(spec))

    @property
    def spec(self) -> CollectionSpec:
        return self._spec

    @property
    def _index(self) -> VectorIndex:
        return self._vector_index

    @_index.setter
    def _index(self, index: VectorIndex) -> None:
        """Every index this collection serves from gets its GPU replica (when FAISS searches on a GPU)."""
        index.gpu = self._gpu
        self._vector_index = index

    def count(self) -> int:
        """Number of items (searchable or not yet embedded in the current model)."""
        return self._db.count()

    # ------------------------------------------------------------------------------------------ writes

    def upsert(self, items: list[Item], vectors: np.ndarray, model_id: str) -> None:
        """Insert or replace items with their (N, dim) float32 vectors in `model_id`'s space: the current
        model's, or a running re-embed's target (then the vector is stored for that model only)."""
        rows = _item_rows(items, self._spec.modality)
        with self._lock:
            dim = self._dim_of(model_id)
            vectors = _checked_vectors(vectors, len(rows), dim, "vectors")
            old, new = self._db.replace_items(rows, vectors, model_id, self._spec.model_id)
            # committed: the write is durable; the index follows
            self._index.remove(old)
            if model_id == self._spec.model_id:
                self._index.add(new, vectors)
        self._maintain()

    def delete(self, ids: list[str]) -> int:
        """Delete items by id; returns how many existed. Durable before it returns."""
        ids = _checked_ids(ids)
        with self._lock:
            deleted, old = self._db.delete_items(ids, self._spec.model_id)
            self._index.remove(old)
        self._maintain()
        return deleted

    def _dim_of(self, model_id: str) -> int:
        """The dimension of `model_id`'s vectors, if the collection takes them now."""
        if model_id == self._spec.model_id:
            return self._spec.dim
        if self._target and model_id == self._target["model_id"]:
            return self._target["dim"]
        running = f" or {self._target['model_id']!r} (re-embed target)" if self._target else ""
        raise InvalidCollectionError(f"collection {self._spec.name!r} takes vectors of model "
                                     f"{self._spec.model_id!r}{running}, not {model_id!r}")

    # ------------------------------------------------------------------------------------------ reads

    def get(self, ids: list[str]) -> list[Item | None]:
        """Items in the order of `ids`, None for unknown ids; with their text / image bytes."""
        rows = self._db.items_by_id(_checked_ids(ids))
        return [_item_from_row(rows[i]) if i in rows else None for i in ids]

    def list_ids(self, after: str = "", limit: int = 1000) -> list[str]:
        """Item ids in id order, `limit` of them after `after` (page through with the last id)."""
        if limit < 1:
            raise InvalidCollectionError(f"limit must be >= 1, got {limit}")
        return self._db.item_ids(after, limit)

    def get_by_int_ids(self, int_ids: list[int]) -> list[Item | None]:
        """Items by FAISS id, in order, None for unknown ones."""
        if not all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in int_ids):
            raise InvalidCollectionError("int_ids must be integers")
        rows = self._db.items_by_int_id([int(i) for i in int_ids])
        return [_item_from_row(rows[int(i)]) if int(i) in rows else None for i in int_ids]

    def ids_with_vector(self, ids: list[str], model_id: str | None = None) -> set[str]:
        """The ids among `ids` that have a vector for `model_id` (default: the current model)."""
        return self._db.ids_with_vector(_checked_ids(ids), model_id or self._spec.model_id)

    def vectors(self, ids: list[str]) -> np.ndarray:
        """(N, dim) stored vectors of the current model, in order; ItemNotFoundError names a missing id."""
        ids = _checked_ids(ids)
        with self._lock:
            spec = self._spec
            found, matrix = self._db.vectors_by_id(ids, spec.model_id, spec.dim)
        row_of = {item_id: row for row, item_id in enumerate(found)}
        missing = next((i for i in ids if i not in row_of), None)
        if missing is not None:
            raise ItemNotFoundError(f"item {missing!r} is not in collection {spec.name!r} "
                                    f"(or has no vector for model {spec.model_id!r})")
        return matrix[[row_of[i] for i in ids]]

    def search(self, queries: np.ndarray, k: int, where: dict | None = None,
               model_id: str | None = None) -> list[list[Hit]]:
        """Top-k hits per query row (Q, dim) float32, best first, optionally only items matching `where`
        ({"key": value} / {"key": {"in": [...]}}, ANDed; limits in `index.filters`); fewer than k only when
        fewer items qualify.
        With `model_id` (the model that embedded the queries), SpaceChangedError if the collection is no longer
        in that model's space: checked under the lock the search holds, so spaces never mix."""
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise InvalidCollectionError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
        clause = where_clause(where)
        with self._lock:
            if model_id is not None and model_id != self._spec.model_id:
                raise SpaceChangedError(f"collection {self._spec.name!r} is now in model "
                                        f"{self._spec.model_id!r}'s space, not {model_id!r}'s")
            queries = _checked_vectors(queries, None, self._spec.dim, "queries")
            allowed = None if clause is None else self._db.candidates(*clause, self._spec.model_id)
            distances, labels = self._search(queries, k, allowed)
            return self._hits(distances, labels)

    def search_like(self, ids: list[str], k: int, where: dict | None = None) -> tuple[str, list[list[Hit]]]:
        """(model id, hits) for stored items' own vectors as queries, read and searched under one lock hold."""
        with self._lock:
            queries = self.vectors(ids)
            return self._spec.model_id, self.search(queries, k, where)

    def _search(self, queries: np.ndarray, k: int,
                allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) scores and int ids: exact over few filter candidates, else FAISS, retried wider if short."""
        index = self._index
        if allowed is not None and not index.exact and len(allowed) <= EXACT_CANDIDATES_MAX:
            ids, matrix = self._db.vectors_by_int_id(allowed, self._spec.model_id, self._spec.dim)
            return exact_search(queries, ids, matrix, k)
        distances, labels = index.search(queries, k, allowed)
        wanted = min(k, index.live_count if allowed is None else len(allowed))
        for budget in () if index.exact else SHORT_RESULT_RETRIES:
            short = (labels >= 0).sum(axis=1) < wanted  # (Q,) rows that came back with too few hits
            if not short.any():
                break
            distances[short], labels[short] = index.search(queries[short], k, allowed, budget=budget)
        return distances, labels

    def _hits(self, distances: np.ndarray, labels: np.ndarray) -> list[list[Hit]]:
        rows = self._db.hit_rows(np.unique(labels[labels >= 0]))
        metadata = {int_id: json.loads(meta) for int_id, (_, meta) in rows.items()}
        return [[Hit(rows[i][0], i, float(score), dict(metadata[i]))
                 for score, i in zip(row_scores.tolist(), row_ids.tolist(), strict=True) if i in rows]
                for row_scores, row_ids in zip(distances, labels, strict=True)]

    def stats(self) -> dict:
        """Spec, sizes, tombstones and re-embed progress, JSON-ready."""
        with self._lock:
            spec, index = self._spec, self._index
            return {"name": spec.name, "modality": spec.modality, "dim": spec.dim,
                    "index_factory": spec.index_factory, "search_params": spec.search_params,
                    "model_id": spec.model_id, "count": self._db.count(), "index_ntotal": index.ntotal,
                    "tombstones": len(index.tombstones), "trained": not index.standin,
                    "reembed": self.reembed_progress(), "created_at": spec.created_at, "seq": self._db.seq()}

    # ------------------------------------------------------------------------------------------ re-embedding

    def begin_reembed(self, model_id: str, dim: int) -> None:
        """Start moving the collection into `model_id`'s space (dim may differ); idempotent per target."""
        check_model(model_id, dim)
        with self._lock:
            target = {"model_id": model_id, "dim": dim}
            if self._target == target:
                return
            if self._target is not None:
                raise ReembedStateError(f"collection {self._spec.name!r} is being re-embedded into "
                                        f"{self._target['model_id']!r} already")
            if model_id == self._spec.model_id:
                raise ReembedStateError(f"collection {self._spec.name!r} is in model {model_id!r} already")
            index_family(self._spec.index_factory, dim)  # the index type must exist at the new dim
            self._db.set_setting("reembed", target)
            self._target = target
        logger.info("collection %s: re-embedding from %s into %s (dim %d)", self._spec.name,
                    self._spec.model_id, model_id, dim)

    def pending_reembed(self, limit: int) -> list[Item]:
        """Up to `limit` items with no vector for the re-embed target yet (none when no re-embed runs)."""
        with self._lock:
            if self._target is None:
                return []
            return [_item_from_row(row) for row in self._db.pending(self._target["model_id"], limit)]

    def write_reembedded(self, ids: list[str], vectors: np.ndarray, int_ids: list[int] | None = None,
                         model_id: str | None = None) -> None:
        """Store target-model vectors (N, target dim) for items; ids deleted since are skipped, and so are
        items replaced since when `int_ids` (from `pending_reembed`) are given: they are pending again.
        With `model_id`, ReembedStateError unless the target is still that model (a re-targeted re-embed's
        late write is refused, not stored as the new target's)."""
        ids = _checked_ids(ids)
        with self._lock:
            target = self._require_target(model_id)
            vectors = _checked_vectors(vectors, len(ids), target["dim"], "vectors")
            if int_ids is not None and len(int_ids) != len(ids):
                raise InvalidCollectionError(f"int_ids has {len(int_ids)} entries for {len(ids)} ids")
            self._db.write_vectors(ids, vectors, target["model_id"], int_ids)

    def reembed_progress(self) -> dict | None:
        """{"target_model_id", "dim", "done", "total"} while a re-embed runs, else None."""
        with self._lock:
            if self._target is None:
                return None
            done = self._db.count_with_vector(self._target["model_id"])
            return {"target_model_id": self._target["model_id"], "dim": self._target["dim"], "done": done,
                    "total": self._db.count()}

    def finish_reembed(self, model_id: str | None = None) -> None:
        """Swap in an index of the target vectors (built off the lock) and make the target the collection's
        model; ReembedStateError while items are pending (or, with `model_id`, when the target is another
        model). Searches use the old index until the swap."""
        with self._rebuild_lock:
            with self._lock:
                target = self._require_target(model_id)
                self._require_nothing_pending(target)
            fresh = self._build_index(self._reader, target["model_id"], target["dim"])
            with self._lock:
                if self._target != target:
                    raise ReembedStateError(f"collection {self._spec.name!r}: the re-embed was re-targeted")
                self._require_nothing_pending(target)
                self._catch_up(fresh, target["model_id"])
                spec = dataclasses.replace(self._spec, model_id=target["model_id"], dim=target["dim"])
                self._db.complete_reembed(dataclasses.asdict(spec))
                self._spec, self._target, self._index = spec, None, fresh
        logger.info("collection %s: now in model %s (dim %d)", spec.name, spec.model_id, spec.dim)
        self.flush()

    def cancel_reembed(self, model_id: str | None = None) -> None:
        """Abandon a running re-embed (only if its target is `model_id`, when given), dropping the target
        vectors written so far."""
        with self._lock:
            target = self._require_target(model_id)
            self._db.cancel_reembed(target["model_id"])
            self._target = None

    def _require_target(self, model_id: str | None = None) -> dict:
        if self._target is None:
            raise ReembedStateError(f"collection {self._spec.name!r} is not being re-embedded")
        if model_id is not None and self._target["model_id"] != model_id:
            raise ReembedStateError(f"collection {self._spec.name!r} is being re-embedded into "
                                    f"{self._target['model_id']!r}, not {model_id!r}")
        return self._target

    def _require_nothing_pending(self, target: dict) -> None:
        pending = self._db.count() - self._db.count_with_vector(target["model_id"])
        if pending:
            raise ReembedStateError(f"collection {self._spec.name!r}: {pending} items still have no vector "
                                    f"for {target['model_id']!r}")

    # ------------------------------------------------------------------------------------------ index upkeep

    def _open_index(self) -> VectorIndex:
        """The saved index if sound and of the current model, else one rebuilt from SQLite; caught up."""
        spec = self._spec
        index, saved_seq = self._load_saved()
        if index is None:
            index = self._build_index(self._db, spec.model_id, spec.dim)
        elif saved_seq != self._db.seq():
            logger.info("collection %s: saved index reflects change %d of %d, catching up from SQLite",
                        spec.name, saved_seq, self._db.seq())
        else:
            self._flushed = (saved_seq, index)
        self._catch_up(index, spec.model_id)
        return index

    def _load_saved(self) -> tuple[VectorIndex | None, int]:
        """(index, the change sequence it reflects) from disk, or (None, -1) when it cannot be used."""
        spec = self._spec
        snapshot = load_snapshot(self.directory)
        if snapshot is None:
            return None, -1
        data, meta = snapshot
        saved = {key: meta.get(key) for key in ("model_id", "dim", "index_factory")}
        if saved != {"model_id": spec.model_id, "dim": spec.dim, "index_factory": spec.index_factory}:
            logger.warning("collection %s: saved index is of %s, not of the spec", spec.name, saved)
            return None, -1
        try:
            index = VectorIndex.from_bytes(data, spec.index_factory, spec.dim, spec.search_params,
                                           bool(meta.get("standin")))
        except (RuntimeError, ValueError) as err:
            logger.warning("collection %s: saved index unreadable: %s", spec.name, err)
            return None, -1
        return index, int(meta.get("seq", -1))

    def _build_index(self, db: ItemsDB, model_id: str, dim: int) -> VectorIndex:
        """A fresh index of every `model_id` vector in `db`."""
        started = time.perf_counter()
        ids, matrix = db.model_vectors(model_id, dim)
        index = VectorIndex.build(self._spec.index_factory, dim, self._spec.search_params, ids, matrix)
        logger.info("collection %s: built %s index of %d vectors (%s) in %.1f s", self._spec.name,
                    self._spec.index_factory, len(ids), model_id, time.perf_counter() - started)
        return index

    def _catch_up(self, index: VectorIndex, model_id: str) -> None:
        """Bring `index` to SQLite's current set of `model_id` vectors (caller holds the lock)."""
        def fetch(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return self._db.vectors_by_int_id(ids, model_id, index.dim)

        added, removed = index.catch_up(self._db.live_int_ids(model_id), fetch)
        if added or removed:
            logger.info("collection %s: index caught up with SQLite (+%d, -%d)", self._spec.name, added,
                        removed)

    def _maintain(self) -> None:
        """After a write: train the real index once the stand-in has enough vectors; compact tombstones."""
        if self._index.ready_to_train():
            self._rebuild("enough vectors to train")
        elif self._index.needs_compaction():
            self._rebuild(f"{len(self._index.tombstones)} tombstones")

    def _rebuild(self, reason: str) -> None:
        """Build a fresh index off the lock, then catch it up and swap it in; skipped if one is running."""
        if not self._rebuild_lock.acquire(blocking=False):
            return
        try:
            logger.info("collection %s: rebuilding the index (%s)", self._spec.name, reason)
            model_id, dim = self._spec.model_id, self._spec.dim
            fresh = self._build_index(self._reader, model_id, dim)
            with self._lock:
                self._catch_up(fresh, model_id)
                self._index = fresh
        finally:
            self._rebuild_lock.release()
        self.flush()

    def flush(self) -> None:
        """Write the index to disk (atomically) with the change sequence it reflects; no-op if unchanged."""
        with self._flush_lock:
            with self._lock:
                seq, index = self._db.seq(), self._index
                if self._flushed[0] == seq and self._flushed[1] is index:
                    return
                data = index.serialize()
            spec = self._spec
            meta = {"seq": seq, "model_id": spec.model_id, "dim": spec.dim,
                    "index_factory": spec.index_factory, "standin": index.standin, "ntotal": index.ntotal}
            save_snapshot(self.directory, data, meta)
            self._flushed = (seq, index)

    def close(self) -> None:
        """Flush the index and close the database (waits for a running rebuild); later calls raise
        CollectionNotFoundError."""
        with self._rebuild_lock:
            self.flush()
            with self._lock:
                self._db.close()
                self._reader.close()
                self._db = self._reader = _Closed(self._spec.name)


class _Closed:
    """The database of a closed (or deleted) collection: any use raises CollectionNotFoundError."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attribute: str):
        raise CollectionNotFoundError(f"collection {self.name!r} is closed or was deleted")


# ---------------------------------------------------------------------------------------------- validation


def check_item_id(item_id: object) -> str | None:
    """Why `item_id` cannot name a new item (a phrase to follow the id in a message), or None when it can.

    The service puts ids in URL paths (`/items/{id}`, slashes allowed): HTTP clients resolve '.' and '..'
    segments away and may trim whitespace, so such ids could be stored but never addressed."""
    if not isinstance(item_id, str):
        return f"must be a string, not {type(item_id).__name__}"
    if not 1 <= len(item_id) <= MAX_ID_LENGTH:
        return f"must have 1-{MAX_ID_LENGTH} characters"
    if _CONTROL_CHARACTER.search(item_id):
        return "must not contain control characters (U+0000-U+001F, U+007F)"
    if item_id[0].isspace() or item_id[-1].isspace():
        return "must not start or end with whitespace"
    if any(segment in (".", "..") for segment in item_id.split("/")):
        return "must not have a '.' or '..' path segment"
    return None


def _new_item_id(item_id: object) -> str:
    """`item_id` if it may name a new item, else InvalidCollectionError naming it and the rule it breaks."""
    reason = check_item_id(item_id)
    if reason is not None:
        raise InvalidCollectionError(f"item id {_shown(item_id)} {reason}")
    return item_id


def _checked_ids(ids: list[str]) -> list[str]:
    """`ids` to look up, else InvalidCollectionError naming the first bad one. Only the shape is checked, not
    `check_item_id`: an item stored before those rules must stay readable and deletable."""
    if not isinstance(ids, list | tuple):
        raise InvalidCollectionError(f"ids must be a list of strings, got {type(ids).__name__}")
    for item_id in ids:
        if not isinstance(item_id, str) or not 1 <= len(item_id) <= MAX_ID_LENGTH:
            raise InvalidCollectionError(f"item id {_shown(item_id)} must be a string of 1-{MAX_ID_LENGTH} "
                                         "characters")
    return list(ids)


def _shown(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to about `limit` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _checked_vectors(vectors: object, rows: int | None, dim: int, what: str) -> np.ndarray:
    """`vectors` as a contiguous (rows, dim) float32 array of finite values, else InvalidCollectionError."""
    if not isinstance(vectors, np.ndarray) or vectors.dtype != np.float32:
        kind = vectors.dtype if isinstance(vectors, np.ndarray) else type(vectors).__name__
        raise InvalidCollectionError(f"{what} must be a float32 numpy array, got {kind}")
    expected = (rows if rows is not None else max(len(vectors), 1), dim)
    if vectors.ndim != 2 or vectors.shape != expected:
        shown = f"({rows}, {dim})" if rows is not None else f"(Q >= 1, {dim})"
        raise InvalidCollectionError(f"{what} must have shape {shown}, got {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise InvalidCollectionError(f"{what} contain NaN or infinite values")
    return np.ascontiguousarray(vectors)


def _item_rows(items: list[Item], modality: str) -> list[tuple]:
    """Validated database rows (id, kind, metadata JSON, text, image, image_path) of an upsert's items."""
    if not isinstance(items, list | tuple) or not items:
        raise InvalidCollectionError("items must be a non-empty list of Item")
    rows = [_item_row(item, modality) for item in items]
    ids = [row[0] for row in rows]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise InvalidCollectionError(f"item id {duplicate!r} appears more than once in one upsert")
    return rows


def _item_row(item: Item, modality: str) -> tuple:
    """One item as a row; its kind must be the collection's modality or "vector" and carry that source."""
    if not isinstance(item, Item):
        raise InvalidCollectionError(f"items must be Item instances, got {type(item).__name__}")
    _new_item_id(item.id)
    if item.kind not in (modality, "vector"):
        raise InvalidCollectionError(f"item {item.id!r}: kind {item.kind!r} does not fit a {modality} "
                                     f"collection (expected {modality!r} or 'vector')")
    _check_sources(item)
    image = bytes(item.image) if item.image is not None else None
    return item.id, item.kind, _metadata_json(item), item.text, image, item.image_path


def _check_sources(item: Item) -> None:
    """Source fields of the right types, and the one its kind is embedded from present."""
    if not (item.image is None or isinstance(item.image, bytes | bytearray | memoryview)):
        raise InvalidCollectionError(f"item {item.id!r}: image must be bytes, "
                                     f"got {type(item.image).__name__}")
    for name in ("text", "image_path"):
        if not isinstance(getattr(item, name), str | None):
            raise InvalidCollectionError(f"item {item.id!r}: {name} must be a string")
    if item.kind == "image" and not item.image and not item.image_path:
        raise InvalidCollectionError(f"item {item.id!r}: an image item needs image bytes or image_path")
    if item.kind == "text" and not item.text:
        raise InvalidCollectionError(f"item {item.id!r}: a text item needs its text")


def _metadata_json(item: Item) -> str:
    """The item's metadata as JSON text: an object at most MAX_METADATA_DEPTH deep, with finite numbers."""
    if not isinstance(item.metadata, dict):
        raise InvalidCollectionError(f"item {item.id!r}: metadata must be a JSON object, "
                                     f"got {type(item.metadata).__name__}")
    # Deeper metadata would store fine and then fail to come back out: the service's JSON encoder (pydantic)
    # stops at ~255 levels, Python's json at ~1,000 (where json.dumps would also raise RecursionError here).
    if _nests_deeper(item.metadata, MAX_METADATA_DEPTH):
        raise InvalidCollectionError(f"item {item.id!r}: metadata nests deeper than {MAX_METADATA_DEPTH} levels "
                                     "of objects and lists")
    try:
        return json.dumps(item.metadata, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InvalidCollectionError(f"item {item.id!r}: metadata is not JSON-serialisable: {err}") from err


def _nests_deeper(value: object, levels: int) -> bool:
    """Whether `value` nests objects/lists more than `levels` deep; the walk stops one level past the limit, so
    any input (even a cyclic one) is measured in bounded recursion."""
    if isinstance(value, dict):
        children = value.values()
    elif isinstance(value, list | tuple):
        children = value
    else:
        return False
    return levels == 0 or any(_nests_deeper(child, levels - 1) for child in children)


def _item_from_row(row) -> Item:
    return Item(id=row["id"], metadata=json.loads(row["metadata"]), kind=row["kind"], text=row["text"],
                image=row["image"], image_path=row["image_path"], int_id=row["int_id"])
