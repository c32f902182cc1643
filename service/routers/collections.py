"""Collections: create, list, stats, delete; items upsert/get/delete; search by text, image, item or vector."""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Response

from service.deps import ADMIN, READ, WRITE, DecoderDep, EngineDep
from service.engine import NewItem
from service.engine import Query as SearchQuery
from service.errors import ConflictError, InvalidInputError, NotFoundError
from service.schemas import (
    CreateCollectionRequest,
    DeleteItemsRequest,
    SearchHit,
    SearchRequest,
    SearchResponse,
    UpsertRequest,
)

router = APIRouter(prefix="/v1/collections", tags=["collections"])


def _info(engine, name: str) -> dict:
    """A collection's stats plus its re-embedding status."""
    coll = engine.collection(name)
    return {**coll.stats(), "reembed": engine.reembed_status(name)}


@router.put("/{name}", status_code=201, dependencies=[ADMIN])
async def create_collection(name: str, body: CreateCollectionRequest, engine: EngineDep) -> dict:
    """Create an empty collection in the active model's embedding space."""
    await engine.create_collection(name, body.modality, body.index_factory)
    return _info(engine, name)


@router.get("", dependencies=[READ])
async def list_collections(engine: EngineDep) -> dict:
    """Every collection with its stats."""
    return {"collections": [_info(engine, spec.name) for spec in engine.store.list()]}


@router.get("/{name}", dependencies=[READ])
async def get_collection(name: str, engine: EngineDep) -> dict:
    """One collection's stats: items, index type, model, re-embedding progress."""
    return _info(engine, name)


@router.delete("/{name}", status_code=204, dependencies=[ADMIN])
async def delete_collection(name: str, engine: EngineDep) -> Response:
    """Delete a collection and everything in it."""
    engine.collection(name)
    await engine.delete_collection(name)
    return Response(status_code=204)


@router.post("/{name}/reembed", status_code=202, dependencies=[ADMIN])
async def reembed_collection(name: str, engine: EngineDep) -> dict:
    """Re-embed the collection with the active model in the background; progress in its stats."""
    engine.collection(name)
    engine.start_reembed(name, engine.registry.active)
    return _info(engine, name)


@router.post("/{name}/items", dependencies=[WRITE])
async def upsert_items(name: str, body: UpsertRequest, engine: EngineDep, decoder: DecoderDep) -> dict:
    """Insert or replace items (text, image or raw vector each, with metadata); durable when answered."""
    decoder.check_count(body.items, "items")
    if len({item.id for item in body.items}) != len(body.items):
        raise InvalidInputError("items: ids must be unique within one request", "items")
    items = [_new_item(item, i, decoder) for i, item in enumerate(body.items)]
    count = await engine.upsert(name, items)
    return {"upserted": count, "collection": name}


def _new_item(item, index: int, decoder) -> NewItem:
    """Decode and check one item's source; images keep their bytes for re-embedding."""
    param = f"items[{index}]"
    if item.text is not None:
        return NewItem(item.id, item.metadata, text=decoder.check_text(item.text, f"{param}.text"))
    if item.image is not None:
        data = decoder.image_bytes_from_string(item.image, f"{param}.image")
        decoded = decoder.image_from_bytes(data, f"{param}.image")  # refuse undecodable images before storing
        return NewItem(item.id, item.metadata, image=data, decoded=decoded)
    return NewItem(item.id, item.metadata, vector=np.asarray(item.vector, np.float32))


@router.get("/{name}/items", dependencies=[READ])
async def list_items(name: str, engine: EngineDep, after: str = "",
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
    """Item ids in id order, a page at a time: pass the last id as `after` for the next page."""
    ids = await engine.index_call(engine.collection(name).list_ids, after, limit)
    return {"ids": ids, "next_after": ids[-1] if len(ids) == limit else None}


@router.get("/{name}/items/{item_id}", dependencies=[READ])
async def get_item(name: str, item_id: str, engine: EngineDep) -> dict:
    """One item: metadata, kind, text, and the image as base64 when it was uploaded."""
    item = (await engine.index_call(engine.collection(name).get, [item_id]))[0]
    if item is None:
        raise NotFoundError(f"item {item_id!r} is not in collection {name!r}", "id")
    image = base64.b64encode(item.image).decode() if item.image is not None else None
    return {"id": item.id, "kind": item.kind, "metadata": item.metadata, "text": item.text, "image": image,
            "image_path": item.image_path}


@router.delete("/{name}/items/{item_id}", status_code=204, dependencies=[WRITE])
async def delete_item(name: str, item_id: str, engine: EngineDep) -> Response:
    """Delete one item."""
    if await engine.index_call(engine.collection(name).delete, [item_id]) == 0:
        raise NotFoundError(f"item {item_id!r} is not in collection {name!r}", "id")
    return Response(status_code=204)


@router.post("/{name}/items/delete", dependencies=[WRITE])
async def delete_items(name: str, body: DeleteItemsRequest, engine: EngineDep, decoder: DecoderDep) -> dict:
    """Delete many items; unknown ids are ignored and not counted."""
    decoder.check_count(body.ids, "ids")
    deleted = await engine.index_call(engine.collection(name).delete, body.ids)
    return {"deleted": deleted, "collection": name}


@router.post("/{name}/search", response_model=SearchResponse, dependencies=[READ])
async def search(name: str, body: SearchRequest, engine: EngineDep, decoder: DecoderDep) -> SearchResponse:
    """Nearest items to a text, image, stored item or vector, optionally filtered by metadata."""
    if body.k > engine.settings.max_k:
        raise InvalidInputError(f"k: at most {engine.settings.max_k}", "k")
    coll = engine.collection(name)
    if body.model is not None and engine.registry.get(body.model).model_id != coll.spec.model_id:
        raise ConflictError(f"collection {name!r} is embedded by {coll.spec.model_id}, not {body.model}", "model")
    query = SearchQuery(
        text=decoder.check_text(body.text, "text") if body.text is not None else None,
        image=decoder.image_from_string(body.image, "image") if body.image is not None else None,
        item_id=body.id,
        vector=np.asarray(body.vector, np.float32) if body.vector is not None else None,
    )
    hits = await engine.search(name, query, body.k, body.filter)
    results = [SearchHit(id=h.id, score=h.score, metadata=h.metadata) for h in hits]
    return SearchResponse(collection=name, model=coll.spec.model_id, results=results)
