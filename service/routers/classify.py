"""Zero-shot tagging (`/v1/classify`, JSON or multipart), cluster distributions (`/v1/clusters`) and label sets."""

from __future__ import annotations

import json

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError

from service.body import read_json, validation_error
from service.deps import READ, WRITE, DecoderDep, EngineDep
from service.errors import InvalidInputError
from service.routers.embeddings import top_clusters
from service.schemas import (
    ERRORS,
    Classification,
    ClassifyOptions,
    ClassifyRequest,
    ClassifyResponse,
    ClusterResult,
    ClustersRequest,
    ClustersResponse,
    LabelScore,
    LabelSetRequest,
)

router = APIRouter(prefix="/v1", tags=["classify"], responses=ERRORS)

MULTIPART_DOC = {
    "requestBody": {"content": {
        "application/json": {"schema": ClassifyRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "labels": {"type": "array", "items": {"type": "string"}},
            "label_set": {"type": "string"}, "top_k": {"type": "integer"},
            "multi_label": {"type": "boolean"}, "threshold": {"type": "number"}, "model": {"type": "string"}}}},
    }, "required": True}}


@router.post("/classify", response_model=ClassifyResponse, dependencies=[READ], openapi_extra=MULTIPART_DOC)
async def classify(request: Request, engine: EngineDep, decoder: DecoderDep) -> ClassifyResponse:
    """Zero-shot tags for images: each label's probability (softmax; sigmoid for SigLIP) and cosine, top_k or above a
    threshold."""
    body, sources, param = await _read_classify(request, decoder)
    model = engine.model(body.model)
    labels, templates = engine.zero_shot.resolve_labels(model, body.labels, body.label_set, body.templates)
    labels = decoder.check_texts(decoder.check_count(labels, "labels", engine.settings.max_labels), "labels")
    _check_prompt_lengths(engine, model, labels, templates)
    images = await decoder.images(sources, param, model.bundle.preprocess)
    probs, cosines = await engine.zero_shot.classify(model, images, labels, templates)
    results = [Classification(index=i, labels=_pick(labels, probs[i], cosines[i], body))
               for i in range(len(images))]
    return ClassifyResponse(model=model.model_id, results=results)


def _check_prompt_lengths(engine, model, labels: list[str], templates: list[str]) -> None:
    """Every label in every template within the model's context (413 naming the label otherwise)."""
    prompts = engine.zero_shot.prompts(labels, templates)  # label-major
    names = [f"labels[{i // len(templates)}]" for i in range(len(prompts))]
    engine.check_token_lengths(model, prompts, False, "labels", names, hint=" (the label in its prompt template)")


def _pick(labels: list[str], probs: np.ndarray, cosines: np.ndarray, body: ClassifyOptions) -> list[LabelScore]:
    """Labels best first: the top_k, or in multi-label mode those with probability ≥ threshold."""
    order = np.argsort(-probs, kind="stable")
    if body.multi_label:
        order = [c for c in order if probs[c] >= body.threshold]
    if body.top_k is not None:
        order = order[: body.top_k]
    return [LabelScore(label=labels[c], probability=float(probs[c]), cosine=float(cosines[c])) for c in order]


async def _read_classify(request: Request, decoder) -> tuple[ClassifyOptions, list, str]:
    """The request from a JSON body (base64 images) or a multipart form (`files` plus fields), its image
    sources (decoded after the cheaper checks) and their field name."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        files = form.getlist("files")
        fields = {k: _form_value(k, form.getlist(k)) for k in form if k != "files"}
        body = _validate(ClassifyOptions, fields, strict=False)  # form values are strings: "5", "true"
        decoder.check_count(files, "files")
        sources = [await f.read() if hasattr(f, "read") else _not_a_file(i) for i, f in enumerate(files)]
        return body, sources, "files"
    body = _validate(ClassifyRequest, await read_json(request))
    decoder.check_count(body.images, "images")
    return body, body.images, "images"


def _form_value(key: str, values: list):
    """Form fields: `labels`/`templates` may repeat or hold a JSON list; the rest are single values."""
    if key in ("labels", "templates"):
        if len(values) == 1 and isinstance(values[0], str) and values[0].startswith("["):
            try:
                return json.loads(values[0])
            except ValueError as err:
                raise InvalidInputError(f"{key}: invalid JSON list: {err}", key) from err
        return list(values)
    return values[-1]


def _not_a_file(index: int):
    raise InvalidInputError(f"files[{index}]: expected an uploaded file", f"files[{index}]")


def _validate(model, payload, strict: bool | None = None):
    """pydantic validation with the first error's field named, as a 422."""
    try:
        return model.model_validate(payload, strict=strict)
    except ValidationError as err:
        raise validation_error(err.errors()) from err


@router.post("/clusters", response_model=ClustersResponse, dependencies=[READ])
async def clusters(body: ClustersRequest, engine: EngineDep, decoder: DecoderDep) -> ClustersResponse:
    """The top-k nCLIP clusters of each image or text, with probabilities and the entropy."""
    model = engine.model(body.model)
    engine.zero_shot.require_clusters(model)
    if body.texts is not None:
        texts = decoder.check_texts(body.texts, "texts")
        engine.check_token_lengths(model, texts, False, "texts")
        probs = await engine.zero_shot.cluster_probs(model, "text", texts)
    else:
        images = await decoder.images(decoder.check_count(body.images, "images"), "images",
                                      model.bundle.preprocess)
        probs = await engine.zero_shot.cluster_probs(model, "image", images)
    results = [ClusterResult(index=i, **dict(zip(("clusters", "entropy"), top_clusters(p, body.top_k),
                                                 strict=True))) for i, p in enumerate(probs)]
    return ClustersResponse(model=model.model_id, num_clusters=model.bundle.num_clusters, results=results)


@router.get("/clusters/{cluster}", dependencies=[READ])
async def describe_cluster(cluster: int, engine: EngineDep,
                           collection: str = Query(..., description="Collection whose items describe it"),
                           top: int = Query(10, ge=1, le=100), model: str | None = None) -> dict:
    """Cluster `cluster` described by the collection's items most probably in it."""
    loaded = engine.model(model)
    items = await engine.zero_shot.describe_cluster(loaded, cluster, collection, top)
    return {"model": loaded.model_id, "cluster": cluster, "collection": collection, "items": items}


@router.get("/label-sets", dependencies=[READ])
async def list_label_sets(engine: EngineDep) -> dict:
    """Label sets created through the API and those of the active model's bundle."""
    bundle_sets = engine.model().bundle.label_sets if engine.active_id else {}
    return {"api": engine.zero_shot.label_sets.sets,
            "model": {name: {"labels": labels} for name, labels in bundle_sets.items()}}


@router.put("/label-sets/{name}", status_code=201, dependencies=[WRITE])
async def put_label_set(name: str, body: LabelSetRequest, engine: EngineDep, decoder: DecoderDep) -> dict:
    """Create or replace a named label set (and its prompt templates)."""
    labels = decoder.check_texts(decoder.check_count(body.labels, "labels", engine.settings.max_labels), "labels")
    engine.zero_shot.put_label_set(name, labels, body.templates)
    return {"name": name, "labels": labels, "templates": body.templates}


@router.delete("/label-sets/{name}", status_code=204, dependencies=[WRITE])
async def delete_label_set(name: str, engine: EngineDep) -> Response:
    """Delete a label set created through the API."""
    engine.zero_shot.label_sets.delete(name)
    return Response(status_code=204)
