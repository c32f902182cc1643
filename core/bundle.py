"""Reading a model bundle: the directory that is the contract between training, export, index and service.

A bundle holds `config.json`, `model.safetensors`, `tokenizer.json`, `preprocess.json`, `label_sets.json`,
the ONNX encoders (optionally int8 / fp16 twins) and `manifest.json`. Readers take every setting from here:
`config.json` through one typed, versioned class (`BundleConfig`) that every producer writes and every reader
reads; the context length and image size live only in `tokenizer.json` and `preprocess.json`.
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

__all__ = ["BUNDLE_FORMAT", "Bundle", "BundleConfig", "BundleError", "BundleIntegrityError", "OnnxFiles",
           "load_bundle"]

# /2: config.json as BundleConfig writes it; /1 (before): it also repeated context_length and image_size, which
# are read now only to check that they agree with tokenizer.json and preprocess.json
BUNDLE_FORMAT = "xclip-bundle/2"
READABLE_FORMATS = ("xclip-bundle/1", BUNDLE_FORMAT)
LEGACY_KEYS = ("context_length", "image_size")
OBJECTIVES = ("clip", "nclip", "xclip")
MODALITIES = ("image", "text")
VARIANTS = ("fp32", "int8", "fp16")  # fp16: for GPU execution providers
TEXT_PADDINGS = ("fixed", "longest")
FIXED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "preprocess.json", "label_sets.json")


def variant_file(fp32_name: str, variant: str) -> str:
    """File name of an encoder variant: `image_encoder.onnx` → `image_encoder.int8.onnx` (fp32: unchanged)."""
    return fp32_name if variant == "fp32" else fp32_name.removesuffix(".onnx") + f".{variant}.onnx"


@dataclasses.dataclass(frozen=True)
class OnnxFiles:
    """The encoder files and their graph interface."""

    image: str = "image_encoder.onnx"
    text: str = "text_encoder.onnx"
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)  # modality → input name
    outputs: tuple[str, ...] = ("embedding",)
    opset: int | None = None
    # "fixed": the text encoder takes ids padded to the full context. "longest": its outputs do not depend on the
    # padding after a text's end token (a causal tower pooled at that token, or pooling masked by the pad id) and
    # its graph takes any length, so a batch is cut to its longest text; the exporter sets it only after checking
    text_padding: str = "fixed"

    def file(self, modality: str, variant: str = "fp32") -> str:
        """File name of `modality`'s encoder in `variant`."""
        return variant_file(self.image if modality == "image" else self.text, variant)


@dataclasses.dataclass(frozen=True)
class BundleConfig:
    """`config.json`: what the service, index and evaluation need to run a bundle, typed; `extra` holds what
    producers record beside it (version, metrics, parity and variant reports, training settings), for people and
    benchmarks, never read to serve."""

    model_name: str
    objective: str
    embed_dim: int
    num_clusters: int
    logit_scale: float  # multiplier of cosines, already exp'd
    onnx: OnnxFiles
    logit_bias: float | None = None  # added to scaled cosines by sigmoid-loss models (SigLIP)
    cluster_temperature: float | None = None
    templates: tuple[str, ...] | None = None  # the zero-shot prompts the producer chose
    architecture: dict | None = None  # the training model's config (None for imported checkpoints)
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON object of `config.json` (`extra` at the top level, where it has always been)."""
        typed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "onnx")}
        onnx = {**dataclasses.asdict(self.onnx), "outputs": list(self.onnx.outputs)}
        typed["templates"] = list(self.templates) if self.templates is not None else None
        return {"format": BUNDLE_FORMAT, **self.extra, **typed, "onnx": onnx}

    @classmethod
    def from_dict(cls, data: object, where: str = "config.json") -> BundleConfig:
        """The typed config of a JSON object of a readable format; BundleError naming the bad key otherwise."""
        if not isinstance(data, dict):
            raise BundleError(f"{where} must hold a JSON object")
        if data.get("format") not in READABLE_FORMATS:
            raise BundleError(f"{where}: unknown bundle format {data.get('format')!r}, expected one of "
                              f"{READABLE_FORMATS}")
        typed = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        config = cls(
            model_name=_typed(data, "model_name", str, where),
            objective=_typed(data, "objective", str, where),
            embed_dim=_typed(data, "embed_dim", int, where),
            num_clusters=_typed(data, "num_clusters", int, where),
            logit_scale=float(_typed(data, "logit_scale", (int, float), where)),
            onnx=_onnx_files(data.get("onnx"), where),
            logit_bias=_optional_float(data, "logit_bias", where),
            cluster_temperature=_optional_float(data, "cluster_temperature", where),
            templates=_templates(data.get("templates"), where),
            architecture=data.get("architecture"),
            extra={k: v for k, v in data.items() if k not in typed and k not in ("format", *LEGACY_KEYS)},
        )
        config.check(where)
        return config

    def check(self, where: str = "config.json") -> None:
        """BundleError for values no reader could serve."""
        if self.objective not in OBJECTIVES:
            raise BundleError(f"{where}: unknown objective {self.objective!r}, expected one of {OBJECTIVES}")
        if self.embed_dim <= 0 or self.num_clusters < 0:
            raise BundleError(f"{where}: embed_dim must be > 0 and num_clusters >= 0")
        if not (self.logit_scale > 0):
            raise BundleError(f"{where}: logit_scale must be > 0")


def _typed(data: dict, key: str, kind, where: str):
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BundleError(f"{where}: {key!r} is missing or not {kind}")
    return value


def _optional_float(data: dict, key: str, where: str) -> float | None:
    return None if data.get(key) is None else float(_typed(data, key, (int, float), where))


def _templates(value: object, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise BundleError(f"{where}: 'templates' must be a non-empty list of strings")
    return tuple(value)


def _onnx_files(value: object, where: str) -> OnnxFiles:
    if not isinstance(value, dict) or not all(isinstance(value.get(m), str) for m in MODALITIES):
        raise BundleError(f"{where}: 'onnx' must name the 'image' and 'text' encoder files")
    inputs, outputs = value.get("inputs") or {}, value.get("outputs") or ["embedding"]
    if not isinstance(inputs, dict) or not isinstance(outputs, list):
        raise BundleError(f"{where}: 'onnx' inputs must be an object and outputs a list")
    padding = value.get("text_padding", "fixed")
    if padding not in TEXT_PADDINGS:
        raise BundleError(f"{where}: 'onnx' text_padding must be one of {TEXT_PADDINGS}")
    return OnnxFiles(image=value["image"], text=value["text"], inputs=dict(inputs), outputs=tuple(outputs),
                     opset=value.get("opset"), text_padding=padding)


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its config plus the preprocessing, tokenizer and label sets every reader shares."""

    path: Path
    config: BundleConfig
    preprocess: PreprocessConfig
    tokenizer: TextTokenizer
    label_sets: dict[str, list[str]]
    manifest_sha256: str = ""  # hash of manifest.json ("" when the bundle has none), names this exact build

    @property
    def objective(self) -> str:
        return self.config.objective

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def num_clusters(self) -> int:
        return self.config.num_clusters

    @property
    def logit_scale(self) -> float:
        """Multiplier of cosine similarities (already exp'd)."""
        return self.config.logit_scale

    @property
    def has_clusters(self) -> bool:
        return self.num_clusters > 0

    @property
    def model_id(self) -> str:
        """`<model_name>-<12 hex of the manifest hash>`: distinct for every exported build."""
        return f"{self.config.model_name}-{self.manifest_sha256[:12] or 'unverified'}"

    def onnx_path(self, modality: str, variant: str = "fp32") -> Path:
        """Path of the `modality` ("image"|"text") encoder; `variant` "int8" / "fp16" picks a reduced twin."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        name = self.config.onnx.file(modality, variant)
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
    raw = _read_json(path / "config.json")
    config = BundleConfig.from_dict(raw, f"{path}/config.json")
    _check_required_files(path, config)
    bundle = Bundle(
        path=path,
        config=config,
        preprocess=_load_part(PreprocessConfig.load, path / "preprocess.json"),
        tokenizer=_load_part(TextTokenizer.from_file, path / "tokenizer.json"),
        label_sets=_read_label_sets(path / "label_sets.json"),
        manifest_sha256=file_sha256(path / MANIFEST_NAME) if (path / MANIFEST_NAME).is_file() else "",
    )
    _check_legacy_keys(bundle, raw)
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


def _check_required_files(path: Path, config: BundleConfig) -> None:
    """Raise `BundleError` listing every required file that is absent."""
    required = (*FIXED_FILES, *(config.onnx.file(m) for m in MODALITIES))
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


def _check_legacy_keys(bundle: Bundle, raw: dict) -> None:
    """A config that still repeats the context length or image size (format /1) must agree with the tokenizer
    and preprocessing it ships with (`BundleConfig` does not keep them)."""
    actual = {"context_length": bundle.tokenizer.context_length, "image_size": bundle.preprocess.image_size}
    for key in LEGACY_KEYS:
        if key in raw and raw[key] != actual[key]:
            source = "tokenizer.json" if key == "context_length" else "preprocess.json"
            raise BundleError(f"{bundle.path}: config {key} {raw[key]} != {source}'s {actual[key]}")
