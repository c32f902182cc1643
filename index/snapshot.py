"""A collection's FAISS index on disk: `index.faiss` plus the sidecar `index.json` recording the SQLite change
sequence the index reflects, its model, dim, factory and sha256. Each file is written atomically (tmp, fsync,
rename), the index before its sidecar; the checksum catches a crash between the two and any corruption."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
SIDECAR_FILE = "index.json"


def save_snapshot(directory: Path, data: np.ndarray, meta: dict) -> None:
    """Write the serialised index `data` (uint8), then its sidecar `meta` plus checksum and size."""
    _atomic_write(directory / INDEX_FILE, memoryview(data))
    sidecar = {**meta, "sha256": hashlib.sha256(data).hexdigest(), "bytes": int(data.nbytes)}
    _atomic_write(directory / SIDECAR_FILE, json.dumps(sidecar, indent=1).encode())


def load_snapshot(directory: Path) -> tuple[np.ndarray, dict] | None:
    """(index bytes, sidecar) when both files are there, readable and agree; None (logged) otherwise."""
    try:
        meta = json.loads((directory / SIDECAR_FILE).read_text())
        data = np.fromfile(directory / INDEX_FILE, dtype=np.uint8)
    except FileNotFoundError as err:
        logger.info("%s: no saved index (%s)", directory.name, Path(err.filename).name)
        return None
    except (OSError, ValueError) as err:
        logger.warning("%s: saved index unreadable: %s", directory.name, err)
        return None
    if not isinstance(meta, dict) or meta.get("sha256") != hashlib.sha256(data).hexdigest():
        logger.warning("%s: saved index does not match its sidecar's checksum", directory.name)
        return None
    return data, meta


def _atomic_write(path: Path, payload: bytes | memoryview) -> None:
    """Replace `path` with `payload` so that a crash leaves either the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        stream.write(payload)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
