"""Offline bulk build: embed a data set with a bundle's ONNX encoders into a collection, in batches, resumably
(items that already have a vector for the bundle's model are skipped, so a rerun after a crash continues).
Items are named by their samples' keys (relative image paths, shard member keys), normalised to pass
`check_item_id`; a sample whose key cannot name an item is skipped and counted in the bad records.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from core.bundle import Bundle, load_bundle
from core.data import CAPTIONS_JSONL, SPLIT_ALIASES, BadRecords, Sample, iter_samples
from core.onnx_encoder import OnnxEncoder
from index.collection import Collection, Item, check_item_id
from index.errors import CollectionNotFoundError, InvalidCollectionError
from index.store import CollectionStore

logger = logging.getLogger(__name__)


def build_collection(bundle_dir: str | Path, data: str | Path | list, root: str | Path, collection: str,
                     modality: str = "image", split: str | None = None, batch_size: int = 64,
                     index_factory: str | None = None, progress: bool = True, store_images: bool = False,
                     encoder: OnnxEncoder | None = None) -> dict:
    """Embed every sample of `data` (of `split`) into `collection` under `root`, created in the bundle's model
    if missing; returns a JSON-ready summary. `encoder` defaults to the bundle's fp32 encoders."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bundle = load_bundle(bundle_dir)
    encoder = encoder or OnnxEncoder(bundle)
    store = CollectionStore(root)
    started = time.perf_counter()
    try:
        target = _open_target(store, collection, modality, bundle, index_factory)
        bad = BadRecords()
        batches = _batches(_named_by_item_id(iter_samples(data, split, bad), bad), batch_size)
        bar = tqdm(total=expected_samples(data, split), unit=modality, desc=f"index {collection}",
                   disable=not progress)
        with bar:
            added, skipped = _embed_all(target, encoder, batches, _Source(data, modality, store_images), bar)
        target.flush()
        count = target.count()
    finally:
        store.close()
    seconds = time.perf_counter() - started
    return {"collection": collection, "model_id": bundle.model_id, "modality": modality, "split": split,
            "added": added, "skipped_existing": skipped, "count": count, "bad_records": bad.to_dict(),
            "seconds": round(seconds, 2), "added_per_second": round(added / seconds, 1) if seconds else None}


class _Source:
    """How a data set's samples become items: modality, where image files live, whether bytes are kept."""

    def __init__(self, data: str | Path | list, modality: str, store_images: bool):
        path = Path(data) if isinstance(data, str | Path) else None
        self.image_root = (path if path.is_dir() else path.parent).resolve() if path is not None else None
        self.modality, self.store_images = modality, store_images

    def item(self, sample: Sample) -> Item:
        """An item named by the sample's key, with captions, labels (also as top-level keys, for filters),
        split and image path in its metadata."""
        path = self.image_root / sample.key if self.image_root is not None else None
        path = path if path is not None and path.is_file() else None
        metadata = {**sample.labels, "caption": sample.texts[0], "captions": sample.texts,
                    "labels": sample.labels, "split": sample.split, "group": sample.group,
                    "image_path": str(path) if path else None}
        if self.modality == "text":
            return Item(sample.key, metadata, "text", text=sample.texts[0], image_path=metadata["image_path"])
        image = None
        if self.store_images or path is None:  # a shard member has no file to point to: keep its bytes
            image = path.read_bytes() if path else _png_bytes(sample)
        return Item(sample.key, metadata, "image", image=image, image_path=metadata["image_path"])


def _png_bytes(sample: Sample) -> bytes:
    buffer = io.BytesIO()
    sample.image.save(buffer, format="PNG")
    return buffer.getvalue()


def _open_target(store: CollectionStore, name: str, modality: str, bundle: Bundle,
                 index_factory: str | None) -> Collection:
    """The collection to fill: created in the bundle's space, or an existing one that is in it already."""
    try:
        collection = store.get(name)
    except CollectionNotFoundError:
        return store.create(name, modality, bundle.embed_dim, bundle.model_id, index_factory)
    spec = collection.spec
    if spec.modality != modality:
        raise InvalidCollectionError(f"collection {name!r} holds {spec.modality} items, not {modality}")
    if spec.model_id != bundle.model_id:
        raise InvalidCollectionError(f"collection {name!r} is in the space of model {spec.model_id!r}, the "
                                     f"bundle is {bundle.model_id!r}: build another collection or re-embed")
    if index_factory is not None and index_factory != spec.index_factory:
        raise InvalidCollectionError(f"collection {name!r} uses index_factory {spec.index_factory!r}, "
                                     f"not {index_factory!r}")
    return collection


def _embed_all(collection: Collection, encoder: OnnxEncoder, batches: Iterable[list[Sample]], source: _Source,
               bar: tqdm) -> tuple[int, int]:
    """Embed and upsert batch after batch; returns (added, skipped because already embedded)."""
    added = skipped = 0
    model_id = collection.spec.model_id
    for batch in batches:
        done = collection.ids_with_vector([s.key for s in batch], model_id)
        todo = [s for s in batch if s.key not in done]
        if todo:
            vectors = _embed(encoder, todo, source.modality)
            collection.upsert([source.item(s) for s in todo], vectors, model_id)
        added, skipped = added + len(todo), skipped + len(batch) - len(todo)
        bar.update(len(batch))
    return added, skipped


def _named_by_item_id(samples: Iterable[Sample], bad: BadRecords) -> Iterator[Sample]:
    """The samples with their keys as item ids: '.' segments and doubled slashes dropped (a shard written with
    `tar -C dir .` has keys like `./000001`); keys that still fail `check_item_id`, or that now collide with an
    earlier key, are counted in `bad` and skipped."""
    seen: set[str] = set()
    for sample in samples:
        item_id = PurePosixPath(sample.key).as_posix()
        reason = check_item_id(item_id)
        if reason is not None:
            bad.add("bad_item_id", repr(sample.key)[:80], f"item id {reason}")
        elif item_id in seen:
            bad.add("duplicate_item_id", repr(sample.key)[:80], f"item id {item_id!r} was taken by another key")
        else:
            seen.add(item_id)
            yield sample if item_id == sample.key else dataclasses.replace(sample, key=item_id)


def _batches(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _embed(encoder: OnnxEncoder, samples: list[Sample], modality: str) -> np.ndarray:
    """(N, dim) float32 L2-normalised embeddings of the samples' images or first captions."""
    if modality == "image":
        return encoder.encode_images([s.image for s in samples], batch_size=len(samples))["embedding"]
    return encoder.encode_texts([s.texts[0] for s in samples], batch_size=len(samples))["embedding"]


def expected_samples(data: str | Path | list, split: str | None) -> int | None:
    """Records of a folder data set's captions.jsonl (of `split`), read without decoding an image: the
    progress bar's total. None for CSV and WebDataset sources (the bar then shows the rate only)."""
    path = Path(data) if isinstance(data, str | Path) else None
    captions = path / CAPTIONS_JSONL if path is not None and path.is_dir() else path
    if captions is None or captions.name != CAPTIONS_JSONL or not captions.is_file():
        return None
    with captions.open("rb") as lines:
        return sum(1 for raw in lines if raw.strip() and (split is None or _record_split(raw) == split))


def _record_split(raw: bytes) -> str | None:
    """The normalised split of one captions.jsonl line (None when it has none or is unreadable)."""
    try:
        value = json.loads(raw).get("split")
    except (ValueError, AttributeError):
        return None
    name = value.strip().lower() if isinstance(value, str) else None
    return SPLIT_ALIASES.get(name, name)
