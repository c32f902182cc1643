"""Routes for existing clients, exactly as in the wire contracts: clip-retrieval's back end (`/knn-service`,
`/metadata`, `/indices-list`) and Weaviate's multi2vec-clip inference container (`/vectorize`, `/meta`,
`/.well-known/live|ready`). clip-retrieval's client posts JSON without a content type (browsers' `fetch` as
text/plain): the request gate (service.app) marks these bodies as JSON whatever their type. Neither client sends
an auth header: with API keys on, these routes need a key unless XCLIP_OPEN_COMPAT names them (the start-up log
warns)."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Response

from service.deps import DecoderDep, EngineDep
from service.engine import Query
from service.errors import InvalidInputError
from service.schemas import ERRORS, KnnRequest, MetadataRequest, VectorizeRequest

KNN_ERRORS = {code: ERRORS[code] for code in (400, 401, 403, 404, 409, 413, 422, 429, 503, 504)}
WEAVIATE_ERRORS = {code: {"description": ERRORS[code]["description"], "content": {"application/json": {
    "schema": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}
    for code in (400, 401, 403, 413, 422, 429, 503, 504)}
# what the GET routes answer besides success: without a key 401 (unless XCLIP_OPEN_COMPAT names them); no model 503
KEY_ERRORS = {code: ERRORS[code] for code in (401, 403)}
WEAVIATE_KEY_ERRORS = {code: WEAVIATE_ERRORS[code] for code in (401, 403)}
WEAVIATE_GET_ERRORS = {code: WEAVIATE_ERRORS[code] for code in (401, 403, 503)}

clip_retrieval = APIRouter(tags=["compat: clip-retrieval"])
weaviate = APIRouter(tags=["compat: weaviate"])
DEDUP_COSINE = 0.98  # results this similar to a higher-ranked one count as duplicates


@clip_retrieval.get("/indices-list", responses=KEY_ERRORS)
async def indices_list(engine: EngineDep) -> list[str]:
    """Collection names."""
    return engine.collections.names()


@clip_retrieval.post("/knn-service", responses=KNN_ERRORS)
async def knn_service(body: KnnRequest, engine: EngineDep, decoder: DecoderDep) -> list[dict]:
    """Nearest items to a text, image, image URL or embedding: id, similarity and metadata, best first."""
    coll = engine.collections.for_modality(body.indice_name, body.modality)
    name = coll.spec.name
    query = await _knn_query(body, engine, name, decoder)
    k = min(max(body.num_result_ids, body.num_images), engine.settings.max_k)
    hits = (await engine.collections.search(name, query, k, None)).hits
    if body.deduplicate:
        hits = await _deduplicate(engine, name, hits)
    shown = await engine.collections.items(name, [h.id for h in hits[: body.num_images]])
    return [_knn_row(h, shown[rank] if rank < len(shown) else None) for rank, h in enumerate(hits)]


async def _knn_query(body: KnnRequest, engine, name: str, decoder) -> Query:
    """The one query the request carries (clip-retrieval sends every key, the unused ones null): its text is
    truncated at the model's context, as clip-retrieval's own back end does."""
    if body.text:
        return Query(text=decoder.check_text(body.text, "text"))
    if body.image or body.image_url:
        param = "image" if body.image else "image_url"
        size = engine.collections.preprocess(name)
        return Query(image=await decoder.image(body.image or body.image_url, param, size))
    if body.embedding_input:
        return Query(vector=np.asarray(body.embedding_input, np.float32))
    raise InvalidInputError("give one of text, image, image_url or embedding_input", "text")


async def _deduplicate(engine, name: str, hits: list) -> list:
    """Drop hits whose embedding is near-identical to a higher-ranked hit's."""
    if len(hits) < 2:
        return hits
    vectors = await engine.collections.vectors(name, [h.id for h in hits])
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


@clip_retrieval.post("/metadata", responses=KNN_ERRORS)
async def metadata(body: MetadataRequest, engine: EngineDep) -> list[dict]:
    """Metadata of items by the integer ids `/knn-service` returned."""
    items = await engine.collections.items_by_int_ids(body.indice_name, body.ids)
    return [{"id": int_id, "metadata": {**item.metadata, "id": item.id}}
            for int_id, item in zip(body.ids, items, strict=True) if item is not None]


@weaviate.get("/.well-known/live", status_code=204, responses=WEAVIATE_KEY_ERRORS)
async def live() -> Response:
    return Response(status_code=204)


@weaviate.get("/.well-known/ready", status_code=204, responses=WEAVIATE_GET_ERRORS)
async def ready(engine: EngineDep) -> Response:
    engine.model()  # 503 until a model is active
    return Response(status_code=204)


@weaviate.get("/meta", responses=WEAVIATE_GET_ERRORS)
async def meta(engine: EngineDep) -> dict:
    """The active model, as Weaviate shows it to users."""
    model = engine.model()
    return {"model": model.describe(model.model_id), "server": "xclip-serve"}


@weaviate.post("/vectorize", responses=WEAVIATE_ERRORS)
async def vectorize(body: VectorizeRequest, engine: EngineDep, decoder: DecoderDep) -> dict:
    """Text and image vectors, L2-normalised, in input order; texts over the model's context are truncated
    (Weaviate cannot ask for it, and vectorizes whole documents)."""
    model = engine.model()
    texts = [decoder.check_text(t, f"texts[{i}]") for i, t in enumerate(body.texts or [])]
    for values, param in ((texts, "texts"), (body.images or [], "images")):
        if len(values) > engine.settings.max_items:
            decoder.check_count(values, param)
    images = await decoder.images(body.images or [], "images", model.bundle.preprocess)
    text_vectors = (await engine.encode(model, "text", texts))["embedding"].tolist() if texts else []
    image_vectors = (await engine.encode(model, "image", images))["embedding"].tolist() if images else []
    return {"textVectors": text_vectors, "imageVectors": image_vectors}
