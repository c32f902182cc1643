"""Fixtures: random unit vectors, a tiny bundle trained this session on the shapes data set, and "real"
vectors (its embeddings of the shapes' images and captions, spread with small noise to thousands)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.bundle import load_bundle
from core.data import load_samples
from core.onnx_encoder import OnnxEncoder, l2_normalize
from index.collection import Item
from index.store import CollectionStore
from training.testing import make_tiny_bundle

REAL_COPIES = 25  # noisy copies of each of the 192 shape embeddings: 4,800 base vectors
REAL_NOISE = 0.05  # per-dimension standard deviation of the noise added to unit vectors


def random_unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 Gaussian vectors scaled to unit length (uniform on the sphere)."""
    rng = np.random.default_rng(seed)
    return l2_normalize(rng.standard_normal((n, dim)).astype(np.float32))


def noisy_copies(vectors: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """`copies` noisy unit copies of every row: (len(vectors) * copies, dim) float32."""
    rng = np.random.default_rng(seed)
    repeated = np.repeat(vectors, copies, axis=0)
    return l2_normalize(repeated + REAL_NOISE * rng.standard_normal(repeated.shape).astype(np.float32))


def vector_items(n: int, metadata=None) -> list[Item]:
    """Items "0".."n-1" of kind "vector"; `metadata(i)` gives each one's metadata (default {"n": i})."""
    return [Item(str(i), metadata(i) if metadata else {"n": i}, "vector") for i in range(n)]


@pytest.fixture()
def store(tmp_path) -> CollectionStore:
    store = CollectionStore(tmp_path / "collections")
    yield store
    store.close()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A `tiny` xCLIP bundle trained for two steps; its data set lies beside it in `shapes/`."""
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"), "xclip")


@pytest.fixture(scope="session")
def shapes_data(tiny_bundle) -> Path:
    return tiny_bundle.parent / "shapes"


@pytest.fixture(scope="session")
def encoder(tiny_bundle) -> OnnxEncoder:
    return OnnxEncoder(load_bundle(tiny_bundle), providers="cpu")


@pytest.fixture(scope="session")
def real_vectors(encoder, shapes_data) -> tuple[np.ndarray, np.ndarray]:
    """(base (4800, 32), queries (200, 32)): noisy copies of the shapes' image and caption embeddings; the
    queries are other noisy copies of the caption embeddings."""
    samples, _ = load_samples(shapes_data)
    images = encoder.encode_images([s.image for s in samples])["embedding"]
    captions = encoder.encode_texts([t for s in samples for t in s.texts])["embedding"]
    base = noisy_copies(np.concatenate([images, captions]), REAL_COPIES, seed=1)
    queries = noisy_copies(captions, 2, seed=2)[:200]
    return base, queries
