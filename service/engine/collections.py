"""Collections in the engine: create and delete, item writes and reads, search, and re-embedding.

Every operation that pairs a model with a collection's index is atomic with respect to a switch-over: a query is
embedded with the model whose space the collection is in, and the search refuses (and is retried) if the
collection moved to another space meanwhile; a by-id search reads the item's vector and searches under one lock.
When the active model changes, every collection re-embeds toward it in the background; until that ends, its
searches and writes keep using the model that embedded it, so embedding spaces never mix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
from PIL import Image

from core.preprocess import ImageDecodeError, PreprocessConfig, load_image
from index.collection import Collection, CollectionSpec, Hit, Item
from index.errors import IndexStoreError, InvalidCollectionError, SpaceChangedError
from index.store import CollectionStore
from service.errors import ConflictError, InvalidInputError, NotFoundError, ServiceError, from_index_error
from service.registry import LoadedModel, ModelRegistry
from service.settings import Settings

logger = logging.getLogger(__name__)

REEMBED_BATCH = 64
SWITCH_RETRIES = 5  # a switch-over between embedding a query and searching it: embed again with the new model

EncodeFn = Callable[[LoadedModel, str, Sequence], Awaitable[dict[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class Query:
    """One search query: exactly one of text, image, item id or raw vector."""

    text: str | None = None
    image: Image.Image | None = None
    item_id: str | None = None
    vector: np.ndarray | None = None


@dataclasses.dataclass
class NewItem:
    """An item to upsert: its source (text, image bytes with the decoded image, or a raw vector) and metadata."""

    id: str
    metadata: dict
    text: str | None = None
    image: bytes | None = None
    vector: np.ndarray | None = None
    decoded: Image.Image | None = None  # the image already decoded (and checked) from `image`

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "image" if self.image is not None else "vector"


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Hits and the model whose space they (and the query) are in."""

    model_id: str
    hits: list[Hit]


class Collections:
    """The collection store behind async, model-aware operations."""

    def __init__(self, settings: Settings, registry: ModelRegistry, store: CollectionStore, encode: EncodeFn):
        self.settings, self.registry, self.store, self.encode = settings, registry, store, encode
        self._reembed_tasks: dict[str, asyncio.Task] = {}
        self._reembed_targets: dict[str, str | None] = {}  # where each task is taking its collection (None: back)

    # -- collections --------------------------------------------------------------------------------------------
    def get(self, name: str) -> Collection:
        """The open collection; 404 naming it."""
        try:
            return self.store.get(name)
        except IndexStoreError as err:
            raise from_index_error(err, "collection") from err

    def specs(self) -> list[CollectionSpec]:
        return self.store.list()

    def names(self) -> list[str]:
        return [spec.name for spec in self.store.list()]

    def for_modality(self, name: str, modality: str) -> Collection:
        """`name`, or its `name-<modality>` twin when `name` holds the other modality (clip-retrieval's
        `modality` picks the side of one index)."""
        coll = self.get(name)
        if coll.spec.modality == modality:
            return coll
        twin = f"{name}-{modality}"
        if twin in self.names():
            return self.get(twin)
        raise InvalidInputError(f"collection {name!r} holds {coll.spec.modality} items and there is no "
                                f"{twin!r}", "modality")

    def info(self, name: str) -> dict:
        """A collection's stats plus its re-embedding status."""
        return {**self.get(name).stats(), "reembed": self.reembed_status(name)}

    async def create(self, name: str, modality: str, index_factory: str | None) -> dict:
        """A new empty collection in the active model's space."""
        model = self.registry.active
        try:
            await asyncio.to_thread(self.store.create, name, modality, model.bundle.embed_dim, model.model_id,
                                    index_factory)
        except IndexStoreError as err:
            raise from_index_error(err, "index_factory" if "factory" in str(err) else "collection") from err
        return self.info(name)

    async def delete(self, name: str) -> None:
        self.get(name)
        task = self._reembed_tasks.pop(name, None)
        if task is not None:
            task.cancel()
        await self.index_call(self.store.delete, name)

    def check_unused(self, model_id: str) -> None:
        """409 if a collection is in `model_id`'s space or re-embedding into it."""
        using = [s.name for s in self.store.list() if s.model_id == model_id or self._heading(s.name) == model_id]
        if using:
            raise ConflictError(f"collections {using} are embedded by {model_id} (or re-embedding into it); "
                                "re-embed them first", "model")

    def model_of(self, coll: Collection) -> LoadedModel:
        """The model whose space the collection's searchable vectors are in; 409 if it is not loaded."""
        model = self.registry.models.get(coll.spec.model_id)
        if model is None:
            raise ConflictError(
                f"collection {coll.spec.name!r} was embedded by model {coll.spec.model_id}, which is not loaded; "
                "register that bundle again or re-embed the collection with POST .../reembed", "collection")
        return model

    def preprocess(self, name: str) -> PreprocessConfig:
        """Image preprocessing of the model that embeds the collection's queries and items now."""
        return self.model_of(self.get(name)).bundle.preprocess

    # -- items --------------------------------------------------------------------------------------------------
    async def upsert(self, name: str, items: list[NewItem]) -> int:
        """Embed and store items; durable when this returns. A switch-over while embedding embeds again."""
        records = [Item(id=i.id, metadata=i.metadata, kind=i.kind, text=i.text, image=i.image) for i in items]
        for attempt in range(SWITCH_RETRIES):
            coll = self.get(name)
            model = self.model_of(coll)
            vectors = await self._embed_new_items(model, items)
            try:
                await asyncio.to_thread(coll.upsert, records, vectors, model.model_id)
                break
            except InvalidCollectionError as err:  # bad input, or the collection left `model`'s space meanwhile
                if coll.spec.model_id == model.model_id or attempt == SWITCH_RETRIES - 1:
                    raise from_index_error(err, "items") from err
        return len(records)

    async def _embed_new_items(self, model: LoadedModel, items: list[NewItem]) -> np.ndarray:
        """(N, D) vectors: raw vectors as given (checked), texts and images through the model."""
        vectors = np.zeros((len(items), model.bundle.embed_dim), np.float32)
        for modality in ("text", "image"):
            rows = [i for i, item in enumerate(items) if item.kind == modality]
            if rows:
                sources = [items[i].text if modality == "text" else items[i].decoded for i in rows]
                vectors[rows] = (await self.encode(model, modality, sources))["embedding"]
        for i, item in enumerate(items):
            if item.vector is not None:
                vectors[i] = check_vector(item.vector, model.bundle.embed_dim, f"items[{i}].vector")
        return vectors

    async def item(self, name: str, item_id: str) -> Item | None:
        return (await self.index_call(self.get(name).get, [item_id], param="id"))[0]

    async def items(self, name: str, ids: list[str]) -> list[Item | None]:
        return await self.index_call(self.get(name).get, ids, param="ids")

    async def items_by_int_ids(self, name: str, int_ids: list[int]) -> list[Item | None]:
        return await self.index_call(self.get(name).get_by_int_ids, int_ids, param="ids")

    async def list_ids(self, name: str, after: str, limit: int) -> list[str]:
        return await self.index_call(self.get(name).list_ids, after, limit, param="after")

    async def delete_items(self, name: str, ids: list[str]) -> int:
        """Delete items by id; how many existed."""
        return await self.index_call(self.get(name).delete, ids, param="ids")

    async def vectors(self, name: str, ids: list[str]) -> np.ndarray:
        return await self.index_call(self.get(name).vectors, ids, param="ids")

    # -- search -------------------------------------------------------------------------------------------------
    async def search(self, name: str, query: Query, k: int, where: dict | None,
                     model_name: str | None = None) -> SearchResult:
        """Nearest items to a text, image, item or vector query, embedded and searched in one space."""
        for _ in range(SWITCH_RETRIES):
            coll = self.get(name)
            model = self._check_model(coll, model_name)
            try:
                return await self._search_once(coll, model, query, k, where)
            except SpaceChangedError:
                logger.info("collection %s switched space during a search; embedding the query again", name)
        raise ConflictError(f"collection {name!r} kept switching models during the search; retry", "collection")

    def _check_model(self, coll: Collection, model_name: str | None) -> LoadedModel:
        model = self.model_of(coll)
        if model_name is not None and self.registry.get(model_name).model_id != model.model_id:
            raise ConflictError(f"collection {coll.spec.name!r} is embedded by {model.model_id}, not "
                                f"{model_name}", "model")
        return model

    async def _search_once(self, coll: Collection, model: LoadedModel, query: Query, k: int,
                           where: dict | None) -> SearchResult:
        if query.item_id is not None:
            try:
                model_id, hits = await self.index_call(coll.search_like, [query.item_id], k, where,
                                                       param="filter")
            except NotFoundError as err:
                raise NotFoundError(err.message, "id") from err
            return SearchResult(model_id, hits[0])
        if query.vector is not None:
            spec = coll.spec
            vector = check_vector(query.vector, spec.dim, "vector")
            hits = await self.index_call(coll.search, vector[None, :], k, where, spec.model_id, param="filter")
            return SearchResult(spec.model_id, hits[0])
        modality, source = ("text", query.text) if query.text is not None else ("image", query.image)
        vector = (await self.encode(model, modality, [source]))["embedding"]
        hits = await self.index_call(coll.search, vector, k, where, model.model_id, param="filter")
        return SearchResult(model.model_id, hits[0])

    async def index_call(self, fn, *args, param: str | None = None):
        """Run an index-store call in a worker thread, translating its errors (`param`: the field to blame);
        a switch-over (SpaceChangedError) passes through for the caller to retry."""
        try:
            return await asyncio.to_thread(fn, *args)
        except SpaceChangedError:
            raise
        except IndexStoreError as err:
            raise from_index_error(err, param) from err

    # -- reading every item (cluster descriptions) --------------------------------------------------------------
    async def source_pages(self, coll: Collection, size: int = REEMBED_BATCH):
        """(ids, encoder inputs) of every item, a page at a time, decoded off the event loop."""
        after = ""
        while page := await self.index_call(coll.list_ids, after, size):
            items = [i for i in await self.index_call(coll.get, page) if i is not None]
            yield [i.id for i in items], await asyncio.to_thread(stored_sources, items)
            after = page[-1]

    # -- re-embedding after a model change ----------------------------------------------------------------------
    def retarget(self, active: LoadedModel) -> list[str]:
        """Leave every collection in, or re-embedding toward, `active`'s space: start or re-target re-embeds,
        stop those heading elsewhere for collections already there. The collections re-embedding toward it."""
        moving = []
        for spec in self.store.list():
            heading = self._heading(spec.name)
            if spec.model_id == active.model_id:
                if heading is not None:
                    self._restart(spec.name, None)
                continue
            if heading != active.model_id or not self._running(spec.name):
                self._restart(spec.name, active)
            moving.append(spec.name)
        return moving

    def resume_reembeds(self) -> list[str]:
        """Restart the re-embeds a previous process left unfinished (their target is persisted)."""
        resumed = []
        for spec in self.store.list():
            heading = self._persisted_target(self.get(spec.name))
            if heading is not None and heading in self.registry.models:
                self._restart(spec.name, self.registry.models[heading])
                resumed.append(spec.name)
        return resumed

    def start_reembed(self, name: str) -> dict:
        """(Re)start re-embedding `name` into the active model's space (POST .../reembed)."""
        active = self.registry.active
        coll = self.get(name)
        if coll.spec.model_id == active.model_id and self._heading(name) is None:
            raise ConflictError(f"collection {name!r} is in the active model's space already", "collection")
        self._restart(name, active if coll.spec.model_id != active.model_id else None)
        return self.info(name)

    def _heading(self, name: str) -> str | None:
        """The model a collection is being re-embedded into: a running task's target (it may not have recorded
        it in the collection yet), else the one the collection records (also after a restart), or None."""
        if self._running(name):
            return self._reembed_targets.get(name)
        return self._persisted_target(self.get(name))

    @staticmethod
    def _persisted_target(coll: Collection) -> str | None:
        progress = coll.reembed_progress()
        return progress["target_model_id"] if progress else None

    def _running(self, name: str) -> bool:
        task = self._reembed_tasks.get(name)
        return task is not None and not task.done()

    def _restart(self, name: str, model: LoadedModel | None) -> None:
        """Cancel the collection's re-embed task and start one toward `model` (None: just abandon the target)."""
        previous = self._reembed_tasks.get(name)
        if previous is not None and not previous.done():
            previous.cancel()
        loop = asyncio.get_running_loop()
        self._reembed_targets[name] = model.model_id if model is not None else None
        self._reembed_tasks[name] = loop.create_task(self._reembed(name, model, previous))

    async def _reembed(self, name: str, model: LoadedModel | None, previous: asyncio.Task | None) -> None:
        """Wait for the task it replaces, drop a target other than `model`, then embed every item with `model`
        in batches and switch the collection's index over in one step."""
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        coll = self.get(name)
        target = model.model_id if model is not None else None
        try:
            heading = self._persisted_target(coll)
            if heading is not None and heading != target:
                await asyncio.to_thread(coll.cancel_reembed, heading)
            if model is not None:
                await self._reembed_into(coll, model)
        except asyncio.CancelledError:
            raise
        except Exception:  # the collection keeps serving in its old space
            logger.exception("re-embedding collection %s with %s stopped", name, target)
            if target is not None and self._persisted_target(coll) == target:
                await asyncio.to_thread(coll.cancel_reembed, target)

    async def _reembed_into(self, coll: Collection, model: LoadedModel) -> None:
        name, model_id = coll.spec.name, model.model_id
        await asyncio.to_thread(coll.begin_reembed, model_id, model.bundle.embed_dim)
        while batch := await asyncio.to_thread(coll.pending_reembed, REEMBED_BATCH):
            if any(item.kind == "vector" for item in batch):
                raise ConflictError(f"collection {name!r} holds raw vectors, which only their owner can "
                                    "re-embed; it stays in its model's space", "collection")
            sources = await asyncio.to_thread(stored_sources, batch)
            vectors = (await self.encode(model, coll.spec.modality, sources))["embedding"]
            # items replaced meanwhile are skipped; a write after a re-target is refused
            await asyncio.to_thread(coll.write_reembedded, [i.id for i in batch], vectors,
                                    [i.int_id for i in batch], model_id)
        await asyncio.to_thread(coll.finish_reembed, model_id)
        logger.info("collection %s re-embedded with %s", name, model_id)

    def reembed_status(self, name: str) -> dict | None:
        progress = self.get(name).reembed_progress()
        if progress is None:
            return None
        return {**progress, "running": self._running(name)}

    async def close(self) -> None:
        for task in self._reembed_tasks.values():
            task.cancel()
        await asyncio.gather(*self._reembed_tasks.values(), return_exceptions=True)


def stored_sources(items: list[Item]) -> list:
    """The encoder input each stored item came from (blocking: images are decoded)."""
    try:
        return [i.text if i.kind == "text" else load_image(i.image if i.image is not None else i.image_path)
                for i in items]
    except ImageDecodeError as err:
        raise ServiceError(f"a stored image no longer decodes: {err}") from err


def check_vector(vector: np.ndarray, dim: int, param: str) -> np.ndarray:
    """A finite vector of the right width, L2-normalised."""
    vector = np.asarray(vector, np.float32).reshape(-1)
    if vector.shape[0] != dim or not np.isfinite(vector).all() or not np.linalg.norm(vector) > 0:
        raise InvalidInputError(f"{param}: need {dim} finite values, not all zero", param)
    return vector / np.linalg.norm(vector)
