"""Reading a model bundle: the directory that is the contract between training, export, index and service.

A bundle holds `config.json`, `model.safetensors`, `tokenizer.json`, `preprocess.json`, `label_sets.json`,
the ONNX encoders (optionally int8 twins) and `manifest.json`. Readers take every setting from here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from core.manifest import MANIFEST_NAME, BundleError, BundleIntegrityError, file_sha256, verify_manifest
from core.preprocess import PreprocessConfig
from core.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["BUNDLE_FORMAT", "Bundle", "BundleError", "BundleIntegrityError", "load_bundle"]

BUNDLE_FORMAT = "xclip-bundle/1"
OBJECTIVES = ("clip", "nclip", "xclip")
MODALITIES = ("image", "text")
VARIANTS = ("fp32", "int8", "fp16")  # fp16: for GPU execution providers
CONFIG_KEYS = {
    "model_name": str,
    "objective": str,
    "embed_dim": int,
    "num_clusters": int,
    "logit_scale": (int, float),
    "context_length": int,
    "image_size": int,
    "onnx": dict,
}
FIXED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "preprocess.json", "label_sets.json")


def variant_file(fp32_name: str, variant: str) -> str:
    """File name of an encoder variant: `image_encoder.onnx` → `image_encoder.int8.onnx` (fp32: unchanged)."""
    return fp32_name if variant == "fp32" else fp32_name.removesuffix(".onnx") + f".{variant}.onnx"


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its config plus the preprocessing, tokenizer and label sets every reader shares."""

    path: Path
    config: dict
    preprocess: PreprocessConfig
    tokenizer: TextTokenizer
    label_sets: dict[str, list[str]]
    manifest_sha256: str = ""  # hash of manifest.json ("" when the bundle has none), names this exact build

    @property
    def objective(self) -> str:
        return self.config["objective"]

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def num_clusters(self) -> int:
        return int(self.config["num_clusters"])

    @property
    def logit_scale(self) -> float:
        """Multiplier of cosine similarities (already exp'd)."""
        return float(self.config["logit_scale"])

    @property
    def has_clusters(self) -> bool:
        return self.num_clusters > 0

    @property
    def model_id(self) -> str:
        """`<model_name>-<12 hex of the manifest hash>`: distinct for every exported build."""
        return f"{self.config['model_name']}-{self.manifest_sha256[:12] or 'unverified'}"

    def onnx_path(self, modality: str, variant: str = "fp32") -> Path:
        """Path of the `modality` ("image"|"text") encoder; `variant` "int8" / "fp16" picks a reduced twin."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        name = variant_file(self.config["onnx"][modality], variant)
        path = self.path / name
        if not path.is_file():
            raise BundleError(f"bundle {self.path} has no {variant} {modality} encoder ({name})")
        return path


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Load a bundle directory, verifying its manifest first unless `verify=False`."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist")
    if verify:
        verify_manifest(path)
    config = _read_json(path / "config.json")
    _validate_config(config, path)
    _check_required_files(path, config)
    bundle = Bundle(
        path=path,
        config=config,
        preprocess=_load_part(PreprocessConfig.load, path / "preprocess.json"),
        tokenizer=_load_part(TextTokenizer.from_file, path / "tokenizer.json"),
        label_sets=_read_label_sets(path / "label_sets.json"),
        manifest_sha256=file_sha256(path / MANIFEST_NAME) if (path / MANIFEST_NAME).is_file() else "",
    )
    _check_consistency(bundle)
    logger.info("loaded bundle %s (%s, dim %d)", bundle.model_id, bundle.objective, bundle.embed_dim)
    return bundle


def _read_json(path: Path) -> object:
    """Parse a JSON file of the bundle, translating failures into `BundleError`."""
    if not path.is_file():
        raise BundleError(f"bundle {path.parent} is missing {path.name}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: invalid JSON: {err}") from err


def _load_part(loader: Callable[[Path], T], path: Path) -> T:
    """Run `loader(path)`, translating any parse failure into `BundleError`."""
    try:
        return loader(path)
    except Exception as err:  # tokenizers raises bare Exception on a malformed file
        raise BundleError(f"{path}: cannot load: {err}") from err


def _validate_config(config: object, path: Path) -> None:
    """Refuse a config of another format, an unknown objective, or missing/mistyped keys."""
    if not isinstance(config, dict):
        raise BundleError(f"{path}/config.json must hold a JSON object")
    if config.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{path}: unknown bundle format {config.get('format')!r}, expected {BUNDLE_FORMAT!r}"
        )
    if config.get("objective") not in OBJECTIVES:
        raise BundleError(
            f"{path}: unknown objective {config.get('objective')!r}, expected one of {OBJECTIVES}"
        )
    for key, kind in CONFIG_KEYS.items():
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise BundleError(f"{path}/config.json: {key!r} is missing or not {kind}")
    if config["embed_dim"] <= 0 or config["num_clusters"] < 0:
        raise BundleError(f"{path}/config.json: embed_dim must be > 0 and num_clusters >= 0")
    if not all(isinstance(config["onnx"].get(m), str) for m in MODALITIES):
        raise BundleError(f"{path}/config.json: 'onnx' must name the 'image' and 'text' encoder files")


def _check_required_files(path: Path, config: dict) -> None:
    """Raise `BundleError` listing every required file that is absent."""
    required = (*FIXED_FILES, *(config["onnx"][m] for m in MODALITIES))
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise BundleError(f"bundle {path} is missing {', '.join(missing)}")


def _read_label_sets(path: Path) -> dict[str, list[str]]:
    """`label_sets.json`: {name: [label, ...]}."""
    label_sets = _read_json(path)
    valid = isinstance(label_sets, dict) and all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in label_sets.values()
    )
    if not valid:
        raise BundleError(f"{path}: must map label set names to lists of strings")
    return label_sets


def _check_consistency(bundle: Bundle) -> None:
    """The config must agree with the tokenizer and preprocessing it ships with."""
    if bundle.tokenizer.context_length != bundle.config["context_length"]:
        raise BundleError(
            f"{bundle.path}: config context_length {bundle.config['context_length']} != "
            f"tokenizer.json's {bundle.tokenizer.context_length}"
        )
    if bundle.preprocess.image_size != bundle.config["image_size"]:
        raise BundleError(
            f"{bundle.path}: config image_size {bundle.config['image_size']} != "
            f"preprocess.json's {bundle.preprocess.image_size}"
        )
