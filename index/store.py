"""A directory of collections, one sub-directory each: create, open (recovering every index), list, delete.

Creation and deletion go through hidden temporary names and a rename, so a crash never leaves a half-made or
half-deleted collection under its real name; leftovers are removed at the next open.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

from index.collection import DB_FILE, Collection, CollectionSpec
from index.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    IndexStoreError,
    InvalidCollectionError,
)
from index.faiss_index import DEFAULT_INDEX_FACTORY, check_model, index_family, resolve_search_params
from index.gpu import resolve_device

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MODALITIES = ("image", "text")
LEFTOVER_PREFIXES = (".creating-", ".deleting-")


class CollectionStore:
    """Every collection under `root`, opened at start-up; thread-safe."""

    def __init__(self, root: str | Path, faiss_device: str = "cpu"):
        self.root = Path(root)
        self.gpu_search = resolve_device(faiss_device) == "gpu"  # GpuUnavailableError when asked but absent
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self._broken: dict[str, str] = {}  # name -> why it could not be opened
        for directory in sorted(self.root.iterdir()):
            self._open(directory)
        logger.info("opened %d collections under %s", len(self._collections), self.root)

    def _open(self, directory: Path) -> None:
        """Open one sub-directory as a collection; leftovers of interrupted creates/deletes are removed."""
        if directory.name.startswith(LEFTOVER_PREFIXES):
            logger.warning("removing %s, left by an interrupted create or delete", directory)
            shutil.rmtree(directory, ignore_errors=True)
            return
        named = directory.is_dir() and NAME_PATTERN.match(directory.name)
        if not named or not (directory / DB_FILE).is_file():
            return
        try:
            self._collections[directory.name] = Collection(directory, self.gpu_search)
        except Exception as err:  # one broken collection must not keep the others from serving
            logger.exception("collection %s could not be opened", directory.name)
            self._broken[directory.name] = f"{type(err).__name__}: {err}"

    def create(self, name: str, modality: str, dim: int, model_id: str, index_factory: str | None = None,
               search_params: dict | None = None) -> Collection:
        """Create an empty collection; InvalidCollectionError for a bad name, modality, dim or index type."""
        spec = _new_spec(name, modality, dim, model_id, index_factory, search_params)
        with self._lock:
            if name in self._collections or name in self._broken or (self.root / name).exists():
                raise CollectionExistsError(f"collection {name!r} exists already")
            staging = self.root / f".creating-{name}-{uuid.uuid4().hex[:8]}"
            Collection.initialise(staging, spec)
            staging.rename(self.root / name)
            collection = self._collections[name] = Collection(self.root / name, self.gpu_search)
        logger.info("created collection %s (%s, dim %d, %s, %s)", name, modality, dim, spec.index_factory,
                    model_id)
        return collection

    def get(self, name: str) -> Collection:
        """The open collection `name`; CollectionNotFoundError when there is none."""
        with self._lock:
            if name in self._collections:
                return self._collections[name]
            if name in self._broken:
                raise IndexStoreError(f"collection {name!r} could not be opened: {self._broken[name]}")
        raise CollectionNotFoundError(f"collection {name!r} does not exist")

    def list(self) -> list[CollectionSpec]:
        """Specs of the open collections, by name."""
        with self._lock:
            return [self._collections[name].spec for name in sorted(self._collections)]

    def delete(self, name: str) -> None:
        """Close a collection and remove its directory."""
        with self._lock:
            collection = self._collections.pop(name, None)
            if collection is None and self._broken.pop(name, None) is None:
                raise CollectionNotFoundError(f"collection {name!r} does not exist")
            if collection is not None:
                collection.close()
            doomed = self.root / f".deleting-{name}-{uuid.uuid4().hex[:8]}"
            (self.root / name).rename(doomed)
        shutil.rmtree(doomed)
        logger.info("deleted collection %s", name)

    def close(self) -> None:
        """Flush and close every collection."""
        with self._lock:
            for collection in self._collections.values():
                collection.close()
            self._collections.clear()


def _new_spec(name: str, modality: str, dim: int, model_id: str, index_factory: str | None,
              search_params: dict | None) -> CollectionSpec:
    """A validated spec with the index type's default search parameters filled in."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidCollectionError(f"collection name {name!r} must match {NAME_PATTERN.pattern}")
    if modality not in MODALITIES:
        raise InvalidCollectionError(f"modality must be one of {MODALITIES}, got {modality!r}")
    check_model(model_id, dim)
    factory = DEFAULT_INDEX_FACTORY if index_factory is None else index_factory
    params = resolve_search_params(index_family(factory, dim), search_params)
    return CollectionSpec(name=name, modality=modality, dim=dim, index_factory=factory, model_id=model_id,
                          created_at=time.time(), search_params=params)
