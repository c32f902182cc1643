"""Request and response models of the HTTP API. Unknown fields are rejected on every `/v1` request."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from index.faiss_index import RECOMMENDED_FACTORIES

EXAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAFAAH/iZk9HQAAAABJRU5ErkJggg=="


class Strict(BaseModel):
    """A `/v1` request body: unknown fields and values of the wrong JSON type (`0` for a boolean, `"5"` or `5.0`
    for an integer) are refused as the document says, not coerced. Multipart forms, whose values are all
    strings, are validated with `strict=False`."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorBody(BaseModel):
    """Every error, in OpenAI's shape (Weaviate's routes answer `{"error": message}`)."""

    error: ErrorDetail


_ERROR_MEANINGS = {
    400: "Bad request: malformed JSON, or a request the model cannot serve",
    401: "Missing or invalid API key",
    403: "The API key lacks the scope this route needs",
    404: "Unknown model, collection, item, label set or cluster",
    409: "Conflict with the current state (e.g. a collection in another model's space)",
    413: "Too large: body, image bytes or pixels, item count, or text over the model's context",
    422: "Invalid input; `param` names the field",
    429: "Overloaded (queue or decode budget full); retry after Retry-After",
    503: "No model is active yet",
    504: "Inference timed out",
}
# the statuses any route may answer, documented once for the OpenAPI document
ERRORS: dict[int | str, dict] = {code: {"model": ErrorBody, "description": text}
                                 for code, text in _ERROR_MEANINGS.items()}


def one_of(*fields: str) -> dict:
    """JSON-schema extra: exactly one of `fields` is given (not null)."""
    return {"oneOf": [{"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in fields]}


# -- OpenAI embeddings --------------------------------------------------------------------------------------------
class EmbeddingsRequest(Strict):
    """OpenAI's embeddings request plus the `modality` extension for images."""

    input: str | list[str] = Field(examples=[["a cat face", "a red heart"]], min_length=1)
    model: str = Field("active", examples=["active"])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    modality: Literal["text", "image"] = "text"


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


# -- native embeddings --------------------------------------------------------------------------------------------
class ClusterScore(BaseModel):
    cluster: int
    probability: float


class Embedding(BaseModel):
    index: int
    embedding: list[float]
    clusters: list[ClusterScore] | None = None
    entropy: float | None = None


class EmbedResponse(BaseModel):
    model: str
    data: list[Embedding]


class EmbedTextRequest(Strict):
    texts: list[str] = Field(examples=[["a cat face", "a red heart"]], min_length=1)
    model: str | None = None
    clusters: bool = Field(False, description="Also return the top nCLIP clusters of each text.")
    cluster_top_k: int = Field(5, ge=1, le=100)
    truncate: bool = Field(False, description="Cut texts longer than the model's context instead of refusing.")


# -- classify -----------------------------------------------------------------------------------------------------
class ClassifyOptions(Strict):
    """What to tag against and how (the multipart form's fields)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=one_of("labels", "label_set"))
    labels: list[str] | None = Field(None, examples=[["animal", "food", "flag"]], min_length=1)
    label_set: str | None = Field(None, examples=[None])
    templates: list[str] | None = Field(None, min_length=1,
                                       description="Prompt templates with one '{}' each, ensembled.")
    top_k: int | None = Field(5, ge=1)
    multi_label: bool = Field(False, description="Return every label whose probability ≥ threshold.")
    threshold: float = Field(0.1, ge=0, le=1)
    model: str | None = None


class ClassifyRequest(ClassifyOptions):
    """Zero-shot tagging of base64 images against inline labels or a named label set."""

    images: list[str] = Field(examples=[[EXAMPLE_PNG]], description="base64 or data: URIs", min_length=1)


class LabelScore(BaseModel):
    label: str
    probability: float
    cosine: float


class Classification(BaseModel):
    index: int
    labels: list[LabelScore]


class ClassifyResponse(BaseModel):
    model: str
    results: list[Classification]


class LabelSetRequest(Strict):
    labels: list[str] = Field(examples=[["cat", "dog", "pizza"]], min_length=1)
    templates: list[str] | None = Field(None, min_length=1, examples=[["a photo of a {}."]])


# -- clusters -----------------------------------------------------------------------------------------------------
class ClustersRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=one_of("texts", "images"))
    texts: list[str] | None = Field(None, examples=[["a cat face"]], min_length=1)
    images: list[str] | None = Field(None, description="base64 or data: URIs", min_length=1)
    top_k: int = Field(5, ge=1, le=100)
    model: str | None = None

    @model_validator(mode="after")
    def _one_modality(self) -> ClustersRequest:
        if (self.texts is None) == (self.images is None):
            raise ValueError("give exactly one of texts or images")
        return self


class ClusterResult(BaseModel):
    index: int
    clusters: list[ClusterScore]
    entropy: float


class ClustersResponse(BaseModel):
    model: str
    num_clusters: int
    results: list[ClusterResult]


# -- collections --------------------------------------------------------------------------------------------------
class CreateCollectionRequest(Strict):
    modality: Literal["image", "text"] = Field("image", description="What items are embedded from.")
    index_factory: str | None = Field(None, examples=list(RECOMMENDED_FACTORIES),
                                      description="A faiss.index_factory string; default Flat (exact). HNSW32 "
                                                  "or IVF4096,Flat for 100k+ items (docs/BENCHMARKS.md).")


class ItemIn(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=one_of("text", "image", "vector"))
    id: str = Field(min_length=1, max_length=256, examples=["cat-1"],
                    description="Printable, no control characters, no '.' or '..' path segment (docs/SERVICE.md)")
    text: str | None = None
    image: str | None = Field(None, description="base64 or data: URI")
    vector: list[float] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict, examples=[{"caption": "a cat", "category": "animal"}])

    @model_validator(mode="after")
    def _one_source(self) -> ItemIn:
        if sum(v is not None for v in (self.text, self.image, self.vector)) != 1:
            raise ValueError("give exactly one of text, image or vector")
        return self


class UpsertRequest(Strict):
    items: list[ItemIn] = Field(min_length=1)


class DeleteItemsRequest(Strict):
    ids: list[str] = Field(min_length=1)


class SearchRequest(Strict):
    """Exactly one query: text, image, the id of a stored item, or a raw vector."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=one_of("text", "image", "id", "vector"))
    text: str | None = Field(None, examples=["a smiling face"])
    image: str | None = None
    id: str | None = None
    vector: list[float] | None = None
    k: int = Field(10, ge=1)
    filter: dict[str, Any] | None = Field(None, examples=[{"category": "animal"}],
                                          description='Metadata equality {"key": value} or {"key": {"in": [...]}}')
    model: str | None = Field(None, description="Must be the collection's model if given.")
    truncate: bool = Field(False, description="Cut a text query longer than the model's context instead of "
                                              "refusing it.")

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if sum(v is not None for v in (self.text, self.image, self.id, self.vector)) != 1:
            raise ValueError("give exactly one of text, image, id or vector")
        return self


class SearchHit(BaseModel):
    id: str
    score: float
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    collection: str
    model: str
    results: list[SearchHit]


# -- models -------------------------------------------------------------------------------------------------------
class RegisterModelRequest(Strict):
    path: str = Field(examples=["bundles/xclip"], description="A bundle directory on the server.")
    activate: bool = False


# -- compat: clip-retrieval and Weaviate (their clients send exactly these keys) -------------------------------------
class KnnRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str | None = None
    image: str | None = None
    image_url: str | None = None
    embedding_input: list[float] | None = None
    modality: Literal["image", "text"] = "image"
    num_images: int = Field(40, ge=1)
    num_result_ids: int = Field(3000, ge=1)
    indice_name: str
    deduplicate: bool = True
    use_safety_model: bool = False
    use_violence_detector: bool = False
    use_mclip: bool = False
    aesthetic_score: int | str | None = ""
    aesthetic_weight: float | str | None = ""


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ids: list[int]
    indice_name: str


class VectorizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    texts: list[str] | None = None
    images: list[str] | None = None
