"""Collections: create, list, stats, delete; items upsert/get/delete; search by text, image, item or vector.

Item ids may hold `/` (`index build` writes `images/1f600.png`): the item routes match the rest of the path as
the id, so `/items/images/1f600.png` and `/items/images%2F1f600.png` both address it."""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Response

from service.deps import ADMIN, READ, WRITE, DecoderDep, EngineDep
from service.engine import NewItem
from service.engine import Query as SearchQuery
from service.errors import InvalidInputError, NotFoundError
from service.schemas import (
    ERRORS,
    CreateCollectionRequest,
    DeleteItemsRequest,
    SearchHit,
    SearchRequest,
    SearchResponse,
    UpsertRequest,
)

router = APIRouter(prefix="/v1/collections", tags=["collections"], responses=ERRORS)


@router.put("/{name}", status_code=201, dependencies=[ADMIN])
async def create_collection(name: str, body: CreateCollectionRequest, engine: EngineDep) -> dict:
    """Create an empty collection in the active model's embedding space."""
    return await engine.collections.create(name, body.modality, body.index_factory)


@router.get("", dependencies=[READ])
async def list_collections(engine: EngineDep) -> dict:
    """Every collection with its stats."""
    return {"collections": [engine.collections.info(name) for name in engine.collections.names()]}


@router.get("/{name}", dependencies=[READ])
async def get_collection(name: str, engine: EngineDep) -> dict:
    """One collection's stats: items, index type, model, re-embedding progress."""
    return engine.collections.info(name)


@router.delete("/{name}", status_code=204, dependencies=[ADMIN])
async def delete_collection(name: str, engine: EngineDep) -> Response:
    """Delete a collection and everything in it."""
    await engine.collections.delete(name)
    return Response(status_code=204)


@router.post("/{name}/reembed", status_code=202, dependencies=[ADMIN])
async def reembed_collection(name: str, engine: EngineDep) -> dict:
    """Re-embed the collection with the active model in the background; progress in its stats."""
    return engine.collections.start_reembed(name)


@router.post("/{name}/items", dependencies=[WRITE])
async def upsert_items(name: str, body: UpsertRequest, engine: EngineDep, decoder: DecoderDep) -> dict:
    """Insert or replace items (text, image or raw vector each, with metadata); durable when answered."""
    decoder.check_count(body.items, "items")
    if len({item.id for item in body.items}) != len(body.items):
        raise InvalidInputError("items: ids must be unique within one request", "items")
    items = await _new_items(body.items, engine, name, decoder)
    count = await engine.collections.upsert(name, items)
    return {"upserted": count, "collection": name}


async def _new_items(items_in: list, engine, name: str, decoder) -> list[NewItem]:
    """Checked texts, decoded images (refused before anything is stored; their bytes kept for re-embedding)
    and raw vectors."""
    images = [i for i, item in enumerate(items_in) if item.image is not None]
    decoded = {}
    if images:
        size = engine.collections.preprocess(name)
        pairs = await decoder.images_with_bytes([items_in[i].image for i in images], "items", size,
                                                names=[f"items[{i}].image" for i in images])
        decoded = dict(zip(images, pairs, strict=True))
    items = []
    for i, item in enumerate(items_in):
        if item.text is not None:
            items.append(NewItem(item.id, item.metadata, text=decoder.check_text(item.text, f"items[{i}].text")))
        elif i in decoded:
            items.append(NewItem(item.id, item.metadata, image=decoded[i][0], decoded=decoded[i][1]))
        else:
            items.append(NewItem(item.id, item.metadata, vector=np.asarray(item.vector, np.float32)))
    rows = [i for i, it in enumerate(items) if it.text is not None]
    if rows:
        model = engine.collections.model_of(engine.collections.get(name))
        engine.check_token_lengths(model, [items[i].text for i in rows], False, "items",
                                   [f"items[{i}].text" for i in rows])
    return items


@router.get("/{name}/items", dependencies=[READ])
async def list_items(name: str, engine: EngineDep, after: str = "",
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
    """Item ids in id order, a page at a time: pass the last id as `after` for the next page."""
    ids = await engine.collections.list_ids(name, after, limit)
    return {"ids": ids, "next_after": ids[-1] if len(ids) == limit else None}


@router.post("/{name}/items/delete", dependencies=[WRITE])
async def delete_items(name: str, body: DeleteItemsRequest, engine: EngineDep, decoder: DecoderDep) -> dict:
    """Delete many items; unknown ids are ignored and not counted."""
    decoder.check_count(body.ids, "ids")
    deleted = await engine.collections.delete_items(name, body.ids)
    return {"deleted": deleted, "collection": name}


@router.get("/{name}/items/{item_id:path}", dependencies=[READ])
async def get_item(name: str, item_id: str, engine: EngineDep) -> dict:
    """One item: metadata, kind, text, and the image as base64 when it was uploaded."""
    item = await engine.collections.item(name, item_id)
    if item is None:
        raise NotFoundError(f"item {item_id!r} is not in collection {name!r}", "id")
    image = base64.b64encode(item.image).decode() if item.image is not None else None
    return {"id": item.id, "kind": item.kind, "metadata": item.metadata, "text": item.text, "image": image,
            "image_path": item.image_path}


@router.delete("/{name}/items/{item_id:path}", status_code=204, dependencies=[WRITE])
async def delete_item(name: str, item_id: str, engine: EngineDep) -> Response:
    """Delete one item."""
    if await engine.collections.delete_items(name, [item_id]) == 0:
        raise NotFoundError(f"item {item_id!r} is not in collection {name!r}", "id")
    return Response(status_code=204)


@router.post("/{name}/search", response_model=SearchResponse, dependencies=[READ])
async def search(name: str, body: SearchRequest, engine: EngineDep, decoder: DecoderDep) -> SearchResponse:
    """Nearest items to a text, image, stored item or vector, optionally filtered by metadata."""
    if body.k > engine.settings.max_k:
        raise InvalidInputError(f"k: at most {engine.settings.max_k}", "k")
    query = await _query(body, engine, name, decoder)
    result = await engine.collections.search(name, query, body.k, body.filter, body.model)
    hits = [SearchHit(id=h.id, score=h.score, metadata=h.metadata) for h in result.hits]
    return SearchResponse(collection=name, model=result.model_id, results=hits)


async def _query(body: SearchRequest, engine, name: str, decoder) -> SearchQuery:
    """The checked query: text within the context, image decoded, or id / vector as given."""
    if body.text is not None:
        text = decoder.check_text(body.text, "text")
        model = engine.collections.model_of(engine.collections.get(name))
        engine.check_token_lengths(model, [text], body.truncate, "text", ["text"])
        return SearchQuery(text=text)
    if body.image is not None:
        return SearchQuery(image=await decoder.image(body.image, "image", engine.collections.preprocess(name)))
    if body.id is not None:
        return SearchQuery(item_id=body.id)
    return SearchQuery(vector=np.asarray(body.vector, np.float32))
