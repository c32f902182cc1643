"""Zero-shot tagging, label sets and nCLIP cluster distributions in the engine.

Labels and prompt templates are validated here, once, whatever path they arrive by (inline, a label set created
through the API, the bundle's own): one template check (`core.metrics.check_templates`) and one text check.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from core.metrics import DEFAULT_TEMPLATES, check_templates, ensemble_class_embeddings
from index.collection import Collection
from index.store import NAME_PATTERN
from service.engine.collections import Collections, EncodeFn
from service.errors import InvalidInputError, NotFoundError, UnsupportedError
from service.registry import LoadedModel
from service.settings import Settings

logger = logging.getLogger(__name__)

LABEL_SET_NAME = NAME_PATTERN  # label sets are named like collections


def checked_templates(templates: Sequence[str], param: str = "templates") -> list[str]:
    """Prompt templates, each with exactly one "{}" and no stray brace; 422 naming `param` otherwise."""
    try:
        return list(check_templates(templates))
    except ValueError as err:
        raise InvalidInputError(f"{param}: {err}", param) from err


class ZeroShot:
    """Label sets, zero-shot classification and cluster distributions over the engine's models."""

    def __init__(self, settings: Settings, collections: Collections, encode: EncodeFn):
        self.settings, self.collections, self.encode = settings, collections, encode
        self.label_sets = LabelSetStore(settings.state_dir / "label_sets.json")
        self._cluster_cache: dict = {}  # one collection's cluster probabilities (describing clusters re-reads them)

    # -- labels -------------------------------------------------------------------------------------------------
    def resolve_labels(self, model: LoadedModel, labels: list[str] | None, label_set: str | None,
                       templates: list[str] | None) -> tuple[list[str], list[str]]:
        """Labels and prompt templates: given inline, or from a named label set (the bundle's or the API's)."""
        if (labels is None) == (label_set is None):
            raise InvalidInputError("give exactly one of labels or label_set", "labels")
        param = "templates"
        if label_set is not None:
            stored = self.label_sets.get(label_set)
            if stored is not None:
                labels = stored["labels"]
                if not templates and stored.get("templates"):
                    templates, param = stored["templates"], "label_set"
            elif label_set in model.bundle.label_sets:
                labels = model.bundle.label_sets[label_set]
            else:
                raise NotFoundError(f"label set {label_set!r} is neither the model's nor created via the API",
                                    "label_set")
        templates = templates or model.bundle.config.templates or DEFAULT_TEMPLATES
        return list(labels), checked_templates(templates, param)

    async def class_embeddings(self, model: LoadedModel, labels: list[str], templates: list[str]) -> np.ndarray:
        """Prompt-ensembled (C, D) label embeddings, cached per model."""
        key = (tuple(labels), tuple(templates))
        if key not in model.label_cache:
            prompts = self.prompts(labels, templates)
            emb = (await self.encode(model, "text", prompts))["embedding"]
            lookup = dict(zip(prompts, emb, strict=True))
            model.label_cache[key] = ensemble_class_embeddings(
                lambda texts: np.stack([lookup[t] for t in texts]), labels, templates)
        return model.label_cache[key]

    @staticmethod
    def prompts(labels: list[str], templates: list[str]) -> list[str]:
        """Every label in every template, label-major (for checking their token lengths)."""
        return [t.format(name) for name in labels for t in templates]

    async def classify(self, model: LoadedModel, images: list[Image.Image], labels: list[str],
                       templates: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(N, C) label probabilities as the model defines them (`label_probabilities`) and cosines."""
        classes = await self.class_embeddings(model, labels, templates)
        image_emb = (await self.encode(model, "image", images))["embedding"]
        cosines = image_emb @ classes.T
        return label_probabilities(cosines, model.bundle.logit_scale, model.bundle.config.logit_bias), cosines

    def put_label_set(self, name: str, labels: list[str], templates: list[str] | None) -> None:
        """Create or replace a label set; its templates are checked now, not at each later classify."""
        self.label_sets.put(name, labels, None if templates is None else checked_templates(templates))

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
        coll = self.collections.get(collection)
        ids, probs = await self._collection_clusters(model, coll)
        order = np.argsort(-probs[:, cluster], kind="stable")[:top]
        items = await self.collections.items(collection, [ids[i] for i in order])
        return [{"id": item.id, "probability": float(probs[i, cluster]), "metadata": item.metadata}
                for i, item in zip(order, items, strict=True) if item is not None]

    async def _collection_clusters(self, model: LoadedModel, coll: Collection) -> tuple[list[str], np.ndarray]:
        """(ids, (N, K) cluster probabilities) of every item, cached until the collection changes."""
        stats = await self.collections.index_call(coll.stats)
        key = (model.model_id, coll.spec.name, stats["seq"])
        if self._cluster_cache.get("key") != key:
            ids, chunks = [], []
            async for page_ids, sources in self.collections.source_pages(coll):
                chunks.append(await self.cluster_probs(model, coll.spec.modality, sources))
                ids += page_ids
            probs = np.concatenate(chunks) if chunks else np.zeros((0, model.bundle.num_clusters), np.float32)
            self._cluster_cache = {"key": key, "ids": ids, "probs": probs}
        return self._cluster_cache["ids"], self._cluster_cache["probs"]


def label_probabilities(cosines: np.ndarray, logit_scale: float, logit_bias: float | None) -> np.ndarray:
    """(N, C) probabilities of labels from image–label cosines: a softmax over the labels of the scaled cosines
    (CLIP's contrastive loss), or, for a sigmoid-loss model with a logit bias (SigLIP), each label's own
    sigmoid(scale · cos + bias), independent of the other labels."""
    logits = logit_scale * cosines.astype(np.float64)
    if logit_bias is not None:
        return (1.0 / (1.0 + np.exp(-(logits + logit_bias)))).astype(np.float32)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


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
