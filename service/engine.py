"""The inference engine: embeddings, zero-shot tagging, cluster distributions and collection search over the
registered models. It knows nothing of HTTP: routes translate requests into these calls and back.

Encoding goes through each model's dynamic batchers; index work (SQLite, FAISS) runs in worker threads. When the
active model changes, collections embedded by another model are re-embedded in the background; until that ends,
their searches and writes keep using the model that embedded them, so embedding spaces never mix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from core.metrics import DEFAULT_TEMPLATES, ensemble_class_embeddings
from core.preprocess import ImageDecodeError, load_image
from index.collection import Collection, Item
from index.errors import IndexStoreError
from index.store import NAME_PATTERN, CollectionStore
from service.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedError,
    from_index_error,
)
from service.registry import LoadedModel, ModelRegistry
from service.settings import Settings

logger = logging.getLogger(__name__)

LABEL_SET_NAME = NAME_PATTERN  # label sets are named like collections
REEMBED_BATCH = 64


@dataclasses.dataclass(frozen=True)
class Query:
    """One search query: exactly one of text, image, item id or raw vector."""

    text: str | None = None
    image: Image.Image | None = None
    item_id: str | None = None
    vector: np.ndarray | None = None


@dataclasses.dataclass
class NewItem:
    """An item to upsert: its source (text, image bytes, or a raw vector) and metadata."""

    id: str
    metadata: dict
    text: str | None = None
    image: bytes | None = None
    vector: np.ndarray | None = None
    decoded: Image.Image | None = None  # the image already decoded (and checked) from `image`


class Engine:
    """Models, label sets and collections behind one async API."""

    def __init__(self, settings: Settings, registry: ModelRegistry, store: CollectionStore):
        self.settings, self.registry, self.store = settings, registry, store
        self.label_sets = LabelSetStore(settings.state_dir / "label_sets.json")
        self._reembed_tasks: dict[str, asyncio.Task] = {}
        self._cluster_cache: dict = {}  # one collection's cluster probabilities (describing clusters re-reads them)

    # -- encoding -----------------------------------------------------------------------------------------------
    async def encode(self, model: LoadedModel, modality: str, items: Sequence) -> dict[str, np.ndarray]:
        """Embeddings (and cluster probabilities) of images or texts, in input order, via the batcher."""
        size = self.settings.max_batch_size
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        outputs = await asyncio.gather(*(model.batchers[modality].submit(c) for c in chunks))
        return {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}

    def check_token_lengths(self, model: LoadedModel, texts: list[str], truncate: bool, param: str) -> list[int]:
        """Token counts; a text longer than the model's context is refused unless `truncate`."""
        counts = model.bundle.tokenizer.token_counts(texts)
        context = model.bundle.tokenizer.context_length
        too_long = [i for i, n in enumerate(counts) if n > context]
        if too_long and not truncate:
            raise PayloadTooLargeError(
                f"{param}[{too_long[0]}] has {counts[too_long[0]]} tokens, the model's context is {context}; "
                "pass truncate=true to cut it", f"{param}")
        return counts

    # -- zero-shot tagging --------------------------------------------------------------------------------------
    def resolve_labels(self, model: LoadedModel, labels: list[str] | None, label_set: str | None,
                       templates: list[str] | None) -> tuple[list[str], list[str]]:
        """Labels and prompt templates: given inline, or from a named label set (the bundle's or the API's)."""
        if (labels is None) == (label_set is None):
            raise InvalidInputError("give exactly one of labels or label_set", "labels")
        if label_set is not None:
            stored = self.label_sets.get(label_set)
            if stored is not None:
                labels, templates = stored["labels"], templates or stored.get("templates")
            elif label_set in model.bundle.label_sets:
                labels = model.bundle.label_sets[label_set]
            else:
                raise NotFoundError(f"label set {label_set!r} is neither the model's nor created via the API",
                                    "label_set")
        templates = list(templates or model.bundle.config.get("templates") or DEFAULT_TEMPLATES)
        if any(t.count("{}") != 1 for t in templates):
            raise InvalidInputError("every template must contain exactly one '{}'", "templates")
        return list(labels), templates

    async def class_embeddings(self, model: LoadedModel, labels: list[str], templates: list[str]) -> np.ndarray:
        """Prompt-ensembled (C, D) label embeddings, cached per model."""
        key = (tuple(labels), tuple(templates))
        if key not in model.label_cache:
            prompts = [t.format(name) for name in labels for t in templates]
            emb = (await self.encode(model, "text", prompts))["embedding"]
            lookup = dict(zip(prompts, emb, strict=True))
            model.label_cache[key] = ensemble_class_embeddings(
                lambda texts: np.stack([lookup[t] for t in texts]), labels, templates)
        return model.label_cache[key]

    async def classify(self, model: LoadedModel, images: list[Image.Image], labels: list[str],
                       templates: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(N, C) softmax probabilities (with the model's logit scale) and cosines."""
        classes = await self.class_embeddings(model, labels, templates)
        image_emb = (await self.encode(model, "image", images))["embedding"]
        cosines = image_emb @ classes.T
        logits = model.bundle.logit_scale * cosines
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True), cosines

    # -- clusters -----------------------------------------------------------------------------------------------
    @staticmethod
    def require_clusters(model: LoadedModel) -> None:
        """A clear 400 for bundles without an nCLIP head."""
        if not model.bundle.has_clusters:
            raise UnsupportedError(
                f"model {model.model_id} was trained with the '{model.bundle.objective}' objective and has no "
                "cluster head; use an nclip or xclip bundle", "model")

    async def cluster_probs(self, model: LoadedModel, modality: str, items: Sequence) -> np.ndarray:
        """(N, K) cluster distributions of images or texts."""
        self.require_clusters(model)
        return (await self.encode(model, modality, items))["cluster_probs"]

    async def describe_cluster(self, model: LoadedModel, cluster: int, collection: str, top: int) -> list[dict]:
        """The items of `collection` most probably in `cluster`, best first, with their probabilities."""
        self.require_clusters(model)
        if not 0 <= cluster < model.bundle.num_clusters:
            raise NotFoundError(f"cluster {cluster} does not exist; the model has {model.bundle.num_clusters}",
                                "cluster")
        coll = self.collection(collection)
        ids, probs = await self._collection_clusters(model, coll)
        order = np.argsort(-probs[:, cluster], kind="stable")[:top]
        items = await self.index_call(coll.get, [ids[i] for i in order])
        return [{"id": item.id, "probability": float(probs[i, cluster]), "metadata": item.metadata}
                for i, item in zip(order, items, strict=True) if item is not None]

    async def _collection_clusters(self, model: LoadedModel, coll: Collection) -> tuple[list[str], np.ndarray]:
        """(ids, (N, K) cluster probabilities) of every item, cached until the collection changes."""
        stats = await self.index_call(coll.stats)
        key = (model.model_id, coll.spec.name, stats["seq"])
        if self._cluster_cache.get("key") != key:
            ids, chunks, after = [], [], ""
            while page := await self.index_call(coll.list_ids, after, REEMBED_BATCH):
                items = [i for i in await self.index_call(coll.get, page) if i is not None]
                chunks.append(await self.cluster_probs(model, coll.spec.modality, self._sources(items)))
                ids += [i.id for i in items]
                after = page[-1]
            probs = np.concatenate(chunks) if chunks else np.zeros((0, model.bundle.num_clusters), np.float32)
            self._cluster_cache = {"key": key, "ids": ids, "probs": probs}
        return self._cluster_cache["ids"], self._cluster_cache["probs"]

    # -- collections --------------------------------------------------------------------------------------------
    def collection(self, name: str) -> Collection:
        try:
            return self.store.get(name)
        except IndexStoreError as err:
            raise from_index_error(err, "collection") from err

    async def create_collection(self, name: str, modality: str, index_factory: str | None) -> Collection:
        """A new empty collection in the active model's space."""
        model = self.registry.active
        try:
            return await asyncio.to_thread(self.store.create, name, modality, model.bundle.embed_dim,
                                           model.model_id, index_factory)
        except IndexStoreError as err:
            raise from_index_error(err, "index_factory" if "factory" in str(err) else "collection") from err

    async def delete_collection(self, name: str) -> None:
        task = self._reembed_tasks.pop(name, None)
        if task is not None:
            task.cancel()
        await self.index_call(self.store.delete, name)

    def check_unused(self, model_id: str) -> None:
        """409 if a collection is still in `model_id`'s space (it would become unsearchable)."""
        using = [s.name for s in self.store.list() if s.model_id == model_id]
        if using:
            raise ConflictError(f"collections {using} are embedded by {model_id}; re-embed them first", "model")

    def model_of(self, coll: Collection) -> LoadedModel:
        """The model whose space the collection's searchable vectors are in; 409 if it is not loaded."""
        model = self.registry.models.get(coll.spec.model_id)
        if model is None:
            raise ConflictError(
                f"collection {coll.spec.name!r} was embedded by model {coll.spec.model_id}, which is not loaded; "
                "register that bundle again or re-embed the collection with POST .../reembed", "collection")
        return model

    async def upsert(self, name: str, items: list[NewItem]) -> int:
        """Embed and store items; durable when this returns."""
        coll = self.collection(name)
        model = self.model_of(coll)
        vectors = await self._embed_new_items(model, coll, items)
        records = [Item(id=i.id, metadata=i.metadata, kind=_kind(i), text=i.text, image=i.image) for i in items]
        await self.index_call(coll.upsert, records, vectors, model.model_id)
        return len(records)

    async def _embed_new_items(self, model: LoadedModel, coll: Collection, items: list[NewItem]) -> np.ndarray:
        """(N, D) vectors: raw vectors as given (checked), texts and images through the model."""
        vectors = np.zeros((len(items), model.bundle.embed_dim), np.float32)
        for modality in ("text", "image"):
            rows = [i for i, item in enumerate(items) if _kind(item) == modality]
            if rows:
                sources = [self._decode_source(items[i], i) for i in rows]
                vectors[rows] = (await self.encode(model, modality, sources))["embedding"]
        for i, item in enumerate(items):
            if item.vector is not None:
                vectors[i] = self.check_vector(item.vector, model.bundle.embed_dim, f"items[{i}].vector")
        return vectors

    def _decode_source(self, item: NewItem, index: int) -> str | Image.Image:
        if item.text is not None:
            return item.text
        if item.decoded is not None:
            return item.decoded
        try:
            return load_image(item.image)
        except ImageDecodeError as err:
            raise InvalidInputError(f"items[{index}].image: {err}", f"items[{index}].image") from err

    @staticmethod
    def check_vector(vector: np.ndarray, dim: int, param: str) -> np.ndarray:
        """A finite vector of the right width, L2-normalised."""
        vector = np.asarray(vector, np.float32).reshape(-1)
        if vector.shape[0] != dim or not np.isfinite(vector).all() or not np.linalg.norm(vector) > 0:
            raise InvalidInputError(f"{param}: need {dim} finite values, not all zero", param)
        return vector / np.linalg.norm(vector)

    async def search(self, name: str, query: Query, k: int, where: dict | None) -> list:
        """Nearest items of the collection to a text, image, item or vector query (in the collection's space)."""
        coll = self.collection(name)
        model = self.model_of(coll)
        vector = await self.query_vector(model, coll, query)
        hits = await self.index_call(coll.search, vector[None, :], k, where, param="filter")
        return hits[0]

    async def query_vector(self, model: LoadedModel, coll: Collection, query: Query) -> np.ndarray:
        """The (D,) query embedding in the collection's space."""
        if query.text is not None:
            return (await self.encode(model, "text", [query.text]))["embedding"][0]
        if query.image is not None:
            return (await self.encode(model, "image", [query.image]))["embedding"][0]
        if query.item_id is not None:
            return (await self.index_call(coll.vectors, [query.item_id]))[0]
        return self.check_vector(query.vector, coll.spec.dim, "vector")

    async def index_call(self, fn, *args, param: str | None = None):
        """Run an index-store call in a worker thread, translating its errors (`param`: the field to blame)."""
        try:
            return await asyncio.to_thread(fn, *args)
        except IndexStoreError as err:
            raise from_index_error(err, param) from err

    # -- re-embedding after a model change ----------------------------------------------------------------------
    def start_reembeds(self) -> list[str]:
        """Start a background re-embed for every collection not in the active model's space."""
        active = self.registry.active
        started = []
        for spec in self.store.list():
            if spec.model_id != active.model_id:
                self.start_reembed(spec.name, active)
                started.append(spec.name)
        return started

    def start_reembed(self, name: str, model: LoadedModel) -> None:
        """(Re)start re-embedding `name` into `model`'s space."""
        running = self._reembed_tasks.get(name)
        if running is not None and not running.done():
            running.cancel()
        self._reembed_tasks[name] = asyncio.get_running_loop().create_task(self._reembed(name, model))

    async def _reembed(self, name: str, model: LoadedModel) -> None:
        """Embed every item with `model` in batches, then switch the collection's index over in one step."""
        coll = self.collection(name)
        try:
            await asyncio.to_thread(coll.begin_reembed, model.model_id, model.bundle.embed_dim)
            while batch := await asyncio.to_thread(coll.pending_reembed, REEMBED_BATCH):
                if any(item.kind == "vector" for item in batch):
                    raise ConflictError(f"collection {name!r} holds raw vectors, which only their owner can "
                                        "re-embed; it stays in its model's space", "collection")
                vectors = (await self.encode(model, coll.spec.modality, self._sources(batch)))["embedding"]
                await asyncio.to_thread(coll.write_reembedded, [i.id for i in batch], vectors,
                                        [i.int_id for i in batch])  # items replaced meanwhile are skipped
            await asyncio.to_thread(coll.finish_reembed)
            logger.info("collection %s re-embedded with %s", name, model.model_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # the collection keeps serving in its old space
            logger.exception("re-embedding collection %s with %s stopped", name, model.model_id)
            if coll.reembed_progress() is not None:
                await asyncio.to_thread(coll.cancel_reembed)

    @staticmethod
    def _sources(items: list[Item]) -> list:
        """The encoder input each stored item came from."""
        return [i.text if i.kind == "text" else load_image(i.image if i.image is not None else i.image_path)
                for i in items]

    def reembed_status(self, name: str) -> dict | None:
        task = self._reembed_tasks.get(name)
        progress = self.collection(name).reembed_progress()
        if progress is None:
            return None
        return {**progress, "running": task is not None and not task.done()}

    async def close(self) -> None:
        for task in self._reembed_tasks.values():
            task.cancel()
        await asyncio.gather(*self._reembed_tasks.values(), return_exceptions=True)
        for model in list(self.registry.models.values()):
            for batcher in model.batchers.values():
                await batcher.close()


def _kind(item: NewItem) -> str:
    return "text" if item.text is not None else "image" if item.image is not None else "vector"


class LabelSetStore:
    """Label sets created through the API: {name: {"labels": [...], "templates": [...] | None}}, in a JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self.sets: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, name: str) -> dict | None:
        return self.sets.get(name)

    def put(self, name: str, labels: list[str], templates: list[str] | None) -> None:
        if not LABEL_SET_NAME.match(name):
            raise InvalidInputError(f"label set name {name!r} must match {LABEL_SET_NAME.pattern}", "name")
        self.sets[name] = {"labels": labels, "templates": templates}
        self._save()

    def delete(self, name: str) -> None:
        if self.sets.pop(name, None) is None:
            raise NotFoundError(f"label set {name!r} does not exist", "name")
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.sets, indent=2))
        os.replace(tmp, self.path)
