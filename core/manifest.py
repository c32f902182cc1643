"""Bundle integrity: `manifest.json` lists every file of a bundle with its SHA-256 and size.

The exporter writes it last; every reader verifies it first, so a truncated copy or an edited file is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "xclip-bundle/1"
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A model bundle cannot be used: missing directory or file, or an invalid config."""


class BundleIntegrityError(BundleError):
    """A bundle's files do not match its manifest."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _bundle_files(bundle_dir: Path) -> list[str]:
    """Relative POSIX paths of every file under `bundle_dir` except the manifest, sorted."""
    paths = (p for p in bundle_dir.rglob("*") if p.is_file())
    return sorted(
        rel for rel in (p.relative_to(bundle_dir).as_posix() for p in paths) if rel != MANIFEST_NAME
    )


def write_manifest(bundle_dir: str | Path) -> dict:
    """Hash every file of the bundle into `manifest.json`; returns the manifest."""
    bundle_dir = Path(bundle_dir)
    files = {}
    for rel in _bundle_files(bundle_dir):
        path = bundle_dir / rel
        files[rel] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    (bundle_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("wrote manifest of %d files in %s", len(files), bundle_dir)
    return manifest


def read_manifest(bundle_dir: str | Path) -> dict:
    """Parse `manifest.json`, raising `BundleIntegrityError` when it is absent or malformed."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BundleIntegrityError(f"{bundle_dir}: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleIntegrityError(f"{path}: unreadable manifest: {err}") from err
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise BundleIntegrityError(f"{path}: not an {MANIFEST_FORMAT} manifest")
    return manifest


def _is_altered(path: Path, entry: dict) -> bool:
    """True when the file's size or hash differs from its manifest entry (size first: it is free)."""
    return path.stat().st_size != entry.get("bytes") or file_sha256(path) != entry.get("sha256")


def verify_manifest(bundle_dir: str | Path) -> None:
    """Check every file against `manifest.json`; raise `BundleIntegrityError` naming each mismatch."""
    bundle_dir = Path(bundle_dir)
    listed = read_manifest(bundle_dir)["files"]
    present = set(_bundle_files(bundle_dir))
    missing = sorted(set(listed) - present)
    unexpected = sorted(present - set(listed))
    altered = sorted(rel for rel in present & set(listed) if _is_altered(bundle_dir / rel, listed[rel]))
    problems = [
        f"{kind}: {', '.join(names)}"
        for kind, names in (("missing", missing), ("altered", altered), ("unexpected", unexpected))
        if names
    ]
    if problems:
        raise BundleIntegrityError(f"bundle {bundle_dir} does not match its manifest; " + "; ".join(problems))
