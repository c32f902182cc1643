"""Routes for existing clients, exactly as in the wire contracts: clip-retrieval's back end (`/knn-service`,
`/metadata`, `/indices-list`) and Weaviate's multi2vec-clip inference container (`/vectorize`, `/meta`,
`/.well-known/live|ready`). Neither client sends an auth header: with API keys on, these routes need a key unless
XCLIP_OPEN_COMPAT names them (the start-up log warns)."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Response

from service.deps import DecoderDep, EngineDep, State
from service.engine import Query
from service.errors import NotFoundError
from service.schemas import KnnRequest, MetadataRequest, VectorizeRequest

clip_retrieval = APIRouter(tags=["compat: clip-retrieval"])
weaviate = APIRouter(tags=["compat: weaviate"])
DEDUP_COSINE = 0.98  # results this similar to a higher-ranked one count as duplicates


@clip_retrieval.get("/indices-list")
async def indices_list(engine: EngineDep) -> list[str]:
    """Collection names."""
    return [spec.name for spec in engine.store.list()]


def _collection_for(engine, name: str, modality: str):
    """The collection `name`, or its `name-<modality>` twin when `name` holds the other modality."""
    coll = engine.collection(name)
    if coll.spec.modality == modality:
        return coll
    twin = f"{name}-{modality}"
    if twin in {s.name for s in engine.store.list()}:
        return engine.collection(twin)
    raise NotFoundError(f"collection {name!r} holds {coll.spec.modality} items and there is no {twin!r}",
                        "modality")


@clip_retrieval.post("/knn-service")
async def knn_service(body: KnnRequest, engine: EngineDep, decoder: DecoderDep) -> list[dict]:
    """Nearest items to a text, image, image URL or embedding: id, similarity and metadata, best first."""
    coll = _collection_for(engine, body.indice_name, body.modality)
    query = Query(
        text=decoder.check_text(body.text, "text") if body.text else None,
        image=decoder.image_from_string(body.image or body.image_url, "image")
        if (body.image or body.image_url) else None,
        vector=np.asarray(body.embedding_input, np.float32) if body.embedding_input else None,
    )
    if query.text is None and query.image is None and query.vector is None:
        raise NotFoundError("give one of text, image, image_url or embedding_input", "text") from None
    k = min(max(body.num_result_ids, body.num_images), engine.settings.max_k)
    hits = await engine.search(coll.spec.name, query, k, None)
    if body.deduplicate:
        hits = await _deduplicate(engine, coll, hits)
    shown = await engine.index_call(coll.get, [h.id for h in hits[: body.num_images]])  # one read, off the loop
    return [_knn_row(h, shown[rank] if rank < len(shown) else None) for rank, h in enumerate(hits)]


async def _deduplicate(engine, coll, hits: list) -> list:
    """Drop hits whose embedding is near-identical to a higher-ranked hit's."""
    if len(hits) < 2:
        return hits
    vectors = await engine.index_call(coll.vectors, [h.id for h in hits])
    kept: list[int] = []
    for i in range(len(hits)):
        if not kept or (vectors[kept] @ vectors[i]).max() < DEDUP_COSINE:
            kept.append(i)
    return [hits[i] for i in kept]


def _knn_row(hit, item) -> dict:
    """id and similarity; for the first `num_images` hits (`item` given) also the metadata and image."""
    row = {"id": hit.int_id, "similarity": hit.score}
    if item is not None:
        row = {**hit.metadata, **row}
        if item.image is not None:
            row["image"] = base64.b64encode(item.image).decode()
    return row


@clip_retrieval.post("/metadata")
async def metadata(body: MetadataRequest, engine: EngineDep) -> list[dict]:
    """Metadata of items by the integer ids `/knn-service` returned."""
    coll = engine.collection(body.indice_name)
    items = await engine.index_call(coll.get_by_int_ids, body.ids)
    return [{"id": int_id, "metadata": {**item.metadata, "id": item.id}}
            for int_id, item in zip(body.ids, items, strict=True) if item is not None]


@weaviate.get("/.well-known/live", status_code=204)
async def live() -> Response:
    return Response(status_code=204)


@weaviate.get("/.well-known/ready", status_code=204)
async def ready(engine: EngineDep) -> Response:
    engine.registry.active  # noqa: B018 (503 until a model is active)
    return Response(status_code=204)


@weaviate.get("/meta")
async def meta(state: State) -> dict:
    """The active model, as Weaviate shows it to users."""
    model = state.engine.registry.active
    return {"model": model.describe(model.model_id), "server": "xclip-serve"}


@weaviate.post("/vectorize")
async def vectorize(body: VectorizeRequest, engine: EngineDep, decoder: DecoderDep) -> dict:
    """Text and image vectors, L2-normalised, in input order."""
    model = engine.registry.active
    texts = [decoder.check_text(t, f"texts[{i}]") for i, t in enumerate(body.texts or [])]
    images = [decoder.image_from_string(v, f"images[{i}]") for i, v in enumerate(body.images or [])]
    for values, param in ((texts, "texts"), (images, "images")):
        if len(values) > engine.settings.max_items:
            decoder.check_count(values, param)
    engine.check_token_lengths(model, texts, truncate=True, param="texts")
    text_vectors = (await engine.encode(model, "text", texts))["embedding"].tolist() if texts else []
    image_vectors = (await engine.encode(model, "image", images))["embedding"].tolist() if images else []
    return {"textVectors": text_vectors, "imageVectors": image_vectors}
