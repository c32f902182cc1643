"""FAISS on the GPU when a faiss-gpu build and a GPU are there (`XCLIP_FAISS_DEVICE`, set through
`CollectionStore(..., faiss_device=...)`).

The CPU index stays the one that is written, persisted and searched with filters or tombstones; unfiltered searches
of Flat and IVF indexes run on a GPU replica (`index_cpu_to_gpu`), re-copied after writes. FAISS has no GPU HNSW,
so HNSW collections always search on the CPU.
"""

from __future__ import annotations

import logging
import threading

import faiss
import numpy as np

from index.errors import IndexStoreError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")
GPU_FAMILIES = ("flat", "ivf")


class GpuUnavailableError(IndexStoreError):
    """A GPU was asked for but this FAISS build or machine has none."""


def gpu_count() -> int:
    """GPUs this FAISS build can use (0 for faiss-cpu)."""
    return int(getattr(faiss, "get_num_gpus", lambda: 0)())


def resolve_device(requested: str) -> str:
    """"cpu" or "gpu": "auto" takes a GPU when there is one; "gpu" without one is a clear error."""
    if requested not in DEVICES:
        raise ValueError(f"faiss device must be one of {DEVICES}, got {requested!r}")
    available = gpu_count()
    if requested == "gpu" and available == 0:
        raise GpuUnavailableError("a GPU was requested for FAISS (XCLIP_FAISS_DEVICE=gpu) but this FAISS has "
                                  "none: install faiss-gpu-cu12 (pip install '.[gpu]') or, on CUDA 13, faiss-gpu-cu13-cuvs "
                                  "(pip install '.[gpu-cu13]') on a machine with a GPU")
    device = "gpu" if requested == "gpu" or (requested == "auto" and available > 0) else "cpu"
    logger.info("FAISS searches on the %s (%d GPUs visible)", device, available)
    return device


class GpuReplica:
    """A GPU copy of one CPU index, refreshed when the CPU index's version changes."""

    def __init__(self, device: int = 0):
        self.device = device
        self._resources = faiss.StandardGpuResources()
        self._replica, self._version = None, None
        self._lock = threading.Lock()

    def search(self, index: faiss.Index, version: int, queries: np.ndarray, k: int,
               nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) scores and ids from the GPU replica of `index` at `version`."""
        with self._lock:
            if self._version != version:
                self._replica = faiss.index_cpu_to_gpu(self._resources, self.device, index)
                self._version = version
            replica = self._replica
        if nprobe is not None:
            faiss.GpuParameterSpace().set_index_parameter(replica, "nprobe", nprobe)
        return replica.search(queries, k)
