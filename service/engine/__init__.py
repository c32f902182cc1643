"""The inference engine: the one thing routes talk to. It knows nothing of HTTP.

`Engine` owns the models (register, activate, roll back, unregister) and encoding; its parts own the rest:
`engine.collections` (items, atomic search, re-embedding after a model change) and `engine.zero_shot` (label
sets, zero-shot tagging, cluster distributions). A model lifecycle step that touches collections (activation
re-targets their re-embeds; unregistering checks none still needs the model) is one engine operation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from index.store import CollectionStore
from service.engine.collections import Collections, NewItem, Query
from service.engine.zero_shot import ZeroShot
from service.errors import PayloadTooLargeError
from service.registry import LoadedModel, ModelRegistry
from service.settings import Settings

__all__ = ["Engine", "NewItem", "Query"]
logger = logging.getLogger(__name__)


class Engine:
    """Models and encoding, with the collections and zero-shot parts built on them."""

    def __init__(self, settings: Settings, registry: ModelRegistry, store: CollectionStore):
        self.settings, self.registry = settings, registry
        self.collections = Collections(settings, registry, store, self.encode)
        self.zero_shot = ZeroShot(settings, self.collections, self.encode)
        self._lifecycle = asyncio.Lock()  # one activation / roll-back / unregistration at a time

    # -- models -------------------------------------------------------------------------------------------------
    def model(self, name: str | None = None) -> LoadedModel:
        """A model by id, alias or name; the active one when `name` is None (503 before any is active)."""
        return self.registry.get(name)

    def models(self) -> list[LoadedModel]:
        return list(self.registry.models.values())

    @property
    def active_id(self) -> str | None:
        return self.registry.active_id

    async def register(self, path: str | Path) -> LoadedModel:
        """Verify, load and smoke-test a bundle off the event loop, then register it."""
        return self.registry.register(await asyncio.to_thread(self.registry.load, path))

    async def activate(self, name: str) -> dict:
        """Hot swap: new requests use `name`; every collection re-embeds toward it (running re-embeds toward
        another model are re-targeted), in one step."""
        async with self._lifecycle:
            previous = self.registry.activate(name)
            return {"active": self.registry.active_id, "previous": previous,
                    "reembedding": self.collections.retarget(self.registry.active)}

    async def rollback(self) -> dict:
        """Re-activate the previously active model, re-targeting re-embeds as `activate` does."""
        async with self._lifecycle:
            model_id = self.registry.rollback()
            return {"active": model_id, "reembedding": self.collections.retarget(self.registry.active)}

    async def unregister(self, name: str) -> None:
        """Forget a model that is not active and that no collection still needs; its queued requests fail."""
        async with self._lifecycle:
            model = self.registry.get(name)
            self.collections.check_unused(model.model_id)
            self.registry.unregister(model.model_id)
        for batcher in model.batchers.values():
            await batcher.close()

    # -- encoding -----------------------------------------------------------------------------------------------
    async def encode(self, model: LoadedModel, modality: str, items: Sequence) -> dict[str, np.ndarray]:
        """Embeddings (and cluster probabilities) of checked images or texts, in input order, via the batcher."""
        size = self.settings.max_batch_size
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        outputs = await asyncio.gather(*(model.batchers[modality].submit(c) for c in chunks))
        return {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}

    @staticmethod
    def check_token_lengths(model: LoadedModel, texts: list[str], truncate: bool, param: str,
                            names: list[str] | None = None, hint: str = "; pass truncate=true to cut it") -> list[int]:
        """Token counts. The one rule for texts over the model's context: 413 naming the text (`param[i]`, or
        its entry of `names`), unless the caller asked to `truncate` (the tokenizer cuts at the context)."""
        counts = model.bundle.tokenizer.token_counts(texts)
        context = model.bundle.tokenizer.context_length
        too_long = next((i for i, n in enumerate(counts) if n > context), None)
        if too_long is not None and not truncate:
            where = names[too_long] if names is not None else f"{param}[{too_long}]"
            raise PayloadTooLargeError(
                f"{where} has {counts[too_long]} tokens, the model's context is {context}{hint}", where)
        return counts

    async def close(self) -> None:
        await self.collections.close()
        for model in list(self.registry.models.values()):
            for batcher in model.batchers.values():
                await batcher.close()
