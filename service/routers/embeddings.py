"""Embeddings: the OpenAI-compatible `/v1/embeddings` and the native `/v1/embed/text|image`."""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, UploadFile

from service.deps import READ, DecoderDep, EngineDep
from service.errors import BadRequestError
from service.schemas import (
    ERRORS,
    ClusterScore,
    Embedding,
    EmbeddingData,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedResponse,
    EmbedTextRequest,
    Usage,
)

router = APIRouter(prefix="/v1", tags=["embeddings"], dependencies=[READ], responses=ERRORS)


@router.post("/embeddings", response_model=EmbeddingsResponse)
async def create_embeddings(body: EmbeddingsRequest, engine: EngineDep, decoder: DecoderDep) -> EmbeddingsResponse:
    """OpenAI-compatible embeddings of texts, or of images with `"modality": "image"`."""
    model = engine.model(body.model)
    inputs = decoder.check_count([body.input] if isinstance(body.input, str) else body.input, "input")
    if body.dimensions is not None and body.dimensions != model.bundle.embed_dim:
        raise BadRequestError(f"dimensions: this model only returns {model.bundle.embed_dim}", "dimensions")
    if body.modality == "image":
        images = await decoder.images(inputs, "input", model.bundle.preprocess)
        tokens = [0] * len(images)
        embeddings = (await engine.encode(model, "image", images))["embedding"]
    else:
        texts = [decoder.check_text(t, f"input[{i}]") for i, t in enumerate(inputs)]
        tokens = engine.check_token_lengths(model, texts, truncate=False, param="input")
        embeddings = (await engine.encode(model, "text", texts))["embedding"]
    data = [EmbeddingData(index=i, embedding=_encode_vector(e, body.encoding_format))
            for i, e in enumerate(embeddings)]
    usage = Usage(prompt_tokens=sum(tokens), total_tokens=sum(tokens))
    return EmbeddingsResponse(data=data, model=model.model_id, usage=usage)


def _encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A list of floats, or base64 of the little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
    return vector.tolist()


@router.post("/embed/text", response_model=EmbedResponse, response_model_exclude_none=True)
async def embed_text(body: EmbedTextRequest, engine: EngineDep, decoder: DecoderDep) -> EmbedResponse:
    """Text embeddings, optionally with each text's top nCLIP clusters."""
    model = engine.model(body.model)
    texts = decoder.check_texts(body.texts, "texts")
    engine.check_token_lengths(model, texts, body.truncate, "texts")
    if body.clusters:
        engine.zero_shot.require_clusters(model)
    outputs = await engine.encode(model, "text", texts)
    return EmbedResponse(model=model.model_id, data=_embeddings(outputs, body.clusters, body.cluster_top_k))


@router.post("/embed/image", response_model=EmbedResponse, response_model_exclude_none=True)
async def embed_image(engine: EngineDep, decoder: DecoderDep, files: Annotated[list[UploadFile], File()],
                      model: Annotated[str | None, Form()] = None, clusters: Annotated[bool, Form()] = False,
                      cluster_top_k: Annotated[int, Form(ge=1, le=100)] = 5) -> EmbedResponse:
    """Image embeddings of one or many uploaded files (multipart field `files`)."""
    loaded = engine.model(model)
    decoder.check_count(files, "files")
    if clusters:
        engine.zero_shot.require_clusters(loaded)
    images = await decoder.images([await f.read() for f in files], "files", loaded.bundle.preprocess)
    outputs = await engine.encode(loaded, "image", images)
    return EmbedResponse(model=loaded.model_id, data=_embeddings(outputs, clusters, cluster_top_k))


def _embeddings(outputs: dict[str, np.ndarray], with_clusters: bool, top_k: int) -> list[Embedding]:
    """Response rows: the embedding, and the top clusters with the entropy when asked."""
    rows = []
    for i, vector in enumerate(outputs["embedding"]):
        row = Embedding(index=i, embedding=vector.tolist())
        if with_clusters:
            row.clusters, row.entropy = top_clusters(outputs["cluster_probs"][i], top_k)
        rows.append(row)
    return rows


def top_clusters(probs: np.ndarray, top_k: int) -> tuple[list[ClusterScore], float]:
    """The `top_k` most probable clusters of one (K,) distribution and its entropy in nats."""
    order = np.argsort(-probs, kind="stable")[:top_k]
    entropy = float(-(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum())
    return [ClusterScore(cluster=int(c), probability=float(probs[c])) for c in order], entropy
