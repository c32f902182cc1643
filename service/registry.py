"""The models the server knows: registered bundles loaded into ONNX Runtime, the active one, and its history.

Activation swaps one reference: a request holds the `LoadedModel` it started with, so in-flight requests finish on
the old model while new ones get the new one. Registration verifies the manifest and runs a smoke inference before
anything changes; a bundle that fails either is refused and nothing else is touched. The registry's state (paths,
active model, history) is a small JSON file, so a restart serves the same model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from core.bundle import Bundle, BundleError, load_bundle
from core.onnx_encoder import OnnxEncoder
from service.batcher import BatchStats, DynamicBatcher
from service.errors import ConflictError, InvalidInputError, NotFoundError, UnavailableError
from service.settings import Settings

logger = logging.getLogger(__name__)

ACTIVE_ALIASES = ("active", "default")


@dataclasses.dataclass
class LoadedModel:
    """One bundle ready to serve: its encoder, a batcher per modality, and its label-embedding cache."""

    bundle: Bundle
    encoder: OnnxEncoder
    batchers: dict[str, DynamicBatcher]
    registered_at: float
    label_cache: dict[tuple, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    def describe(self, active_id: str | None) -> dict:
        """What `GET /v1/models/{id}` shows."""
        bundle = self.bundle
        return {"id": self.model_id, "model_name": bundle.config.model_name, "objective": bundle.objective,
                "embed_dim": bundle.embed_dim, "num_clusters": bundle.num_clusters,
                "context_length": bundle.tokenizer.context_length, "image_size": bundle.preprocess.image_size,
                "path": str(self.bundle.path), "registered_at": self.registered_at,
                "label_sets": sorted(self.bundle.label_sets), "active": self.model_id == active_id,
                "providers": self.encoder.sessions["image"].get_providers()}


class ModelRegistry:
    """Registered models by id, the active one, and the activation history for roll-back."""

    def __init__(self, settings: Settings, on_batch=None):
        self.settings = settings
        self.on_batch = on_batch
        self.models: dict[str, LoadedModel] = {}
        self.active_id: str | None = None
        self.history: list[str] = []  # previously active ids, most recent last
        self._lock = threading.Lock()
        self._state_path = settings.state_dir / "models.json"

    # -- loading ------------------------------------------------------------------------------------------------
    def load(self, path: str | Path) -> LoadedModel:
        """Verify, load and smoke-test a bundle (no registry change); InvalidInputError when it is refused."""
        try:
            bundle = load_bundle(Path(path))
            encoder = OnnxEncoder(bundle, providers=self.settings.providers,
                                  intra_op_threads=self.settings.intra_op_threads, variant=self.settings.variant,
                                  spin=False)
            _smoke_test(encoder)
        except (BundleError, OSError, ValueError, RuntimeError) as err:
            raise InvalidInputError(f"bundle {path} refused: {err}", "path") from err
        except Exception as err:  # onnxruntime raises its own exception types on a broken graph
            raise InvalidInputError(f"bundle {path} refused: smoke inference failed: {err}", "path") from err
        return LoadedModel(bundle, encoder, self._batchers(encoder), time.time())

    def _batchers(self, encoder: OnnxEncoder) -> dict[str, DynamicBatcher]:
        """One dynamic batcher per modality, running preprocess → run → postprocess in a worker thread."""
        s = self.settings
        steps = {"image": encoder.preprocess_images, "text": encoder.preprocess_texts}

        def batch_fn(modality):
            return lambda items: encoder.postprocess(encoder.run(modality, steps[modality](items)))

        return {m: DynamicBatcher(f"{encoder.bundle.model_id}/{m}", batch_fn(m), s.max_batch_size, s.max_wait_ms,
                                  s.max_queue, s.request_timeout_s, on_batch=self._on_batch(m))
                for m in ("image", "text")}

    def _on_batch(self, modality: str):
        def record(stats: BatchStats) -> None:
            if self.on_batch is not None:
                self.on_batch(modality, stats)
        return record

    # -- registry -----------------------------------------------------------------------------------------------
    def register(self, model: LoadedModel) -> LoadedModel:
        """Add a loaded model (idempotent for the same build) and persist the state."""
        with self._lock:
            existing = self.models.get(model.model_id)
            if existing is not None:
                return existing
            self.models[model.model_id] = model
            self._save()
        logger.info("registered model %s from %s", model.model_id, model.bundle.path)
        return model

    def activate(self, model_id: str) -> str | None:
        """Make `model_id` the active model; returns the previously active id."""
        with self._lock:
            model_id = self._resolve_id(model_id)
            previous = self.active_id
            if previous == model_id:
                return previous
            if previous is not None:
                self.history.append(previous)
            self.active_id = model_id
            self._save()
        logger.info("activated model %s (previous %s)", model_id, previous)
        return previous

    def rollback(self) -> str:
        """Re-activate the model that was active before the current one."""
        with self._lock:
            while self.history and self.history[-1] not in self.models:
                self.history.pop()
            if not self.history:
                raise ConflictError("no previous model to roll back to", "model")
            self.active_id = self.history.pop()
            self._save()
        logger.info("rolled back to model %s", self.active_id)
        return self.active_id

    def unregister(self, model_id: str) -> LoadedModel:
        """Forget a model that is not active."""
        with self._lock:
            model_id = self._resolve_id(model_id)
            if model_id == self.active_id:
                raise ConflictError(f"model {model_id} is active; activate another one first", "model")
            model = self.models.pop(model_id)
            self.history = [h for h in self.history if h != model_id]
            self._save()
        return model

    @property
    def active(self) -> LoadedModel:
        """The active model; UnavailableError (503) before any model is active."""
        model = self.models.get(self.active_id) if self.active_id else None
        if model is None:
            raise UnavailableError("no model is active; register and activate a bundle via /v1/models")
        return model

    def get(self, name: str | None) -> LoadedModel:
        """A model by id, alias ("active", "default"), or model name (the active one if its name matches)."""
        if name is None or name in ACTIVE_ALIASES:
            return self.active
        with self._lock:
            return self.models[self._resolve_id(name)]

    def _resolve_id(self, name: str) -> str:
        if name in self.models:
            return name
        if name in ACTIVE_ALIASES and self.active_id:
            return self.active_id
        named = [m for m in self.models.values() if m.bundle.config.model_name == name]
        if named:
            active = [m for m in named if m.model_id == self.active_id]
            return (active or sorted(named, key=lambda m: m.registered_at))[-1].model_id
        raise NotFoundError(f"model {name!r} is not registered; GET /v1/models lists them", "model")

    # -- persistence --------------------------------------------------------------------------------------------
    def _save(self) -> None:
        """Write the registry state atomically (called with the lock held)."""
        state = {"models": {mid: str(m.bundle.path.resolve()) for mid, m in self.models.items()},
                 "active": self.active_id, "history": self.history}
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self._state_path)

    def restore(self) -> None:
        """Re-load the models of the saved state; a bundle that no longer loads is logged and skipped."""
        if not self._state_path.is_file():
            return
        state = json.loads(self._state_path.read_text())
        for model_id, path in state.get("models", {}).items():
            try:
                self.register(self.load(path))
            except InvalidInputError as err:
                logger.error("could not restore model %s: %s", model_id, err.message)
        active = state.get("active")
        self.history = [h for h in state.get("history", []) if h in self.models]
        if active in self.models:
            self.active_id = active


def _smoke_test(encoder: OnnxEncoder) -> None:
    """One image and one text through the encoders: finite, unit-norm embeddings of the declared width."""
    size = encoder.bundle.preprocess.image_size
    image = Image.new("RGB", (size, size), (128, 128, 128))
    for name, out in (("image", encoder.encode_images([image])), ("text", encoder.encode_texts(["a test"]))):
        embedding = out["embedding"]
        if embedding.shape != (1, encoder.bundle.embed_dim) or not np.isfinite(embedding).all():
            raise ValueError(f"{name} encoder gave shape {embedding.shape} or non-finite values")
