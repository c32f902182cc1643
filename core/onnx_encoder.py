"""ONNX Runtime inference over a bundle's encoders, three steps: preprocess (CPU) → run (ONNX) → postprocess.

Used by the service, the index builder and `eval --bundle`; it needs no torch.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
from PIL import Image

from core.bundle import MODALITIES, Bundle
from core.preprocess import preprocess_batch
from core.tokenizer import trim_to_longest

logger = logging.getLogger(__name__)

TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
DEFAULT_INPUTS = {"image": "pixel_values", "text": "input_ids"}
INPUT_DTYPES = {"image": np.float32, "text": np.int64}
INPUT_NDIM = {"image": 4, "text": 2}  # (B, 3, H, W) pixels / (B, L) token ids


class ProviderUnavailableError(RuntimeError):
    """The requested ONNX Runtime execution provider is not available in this install."""


TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer.so")


@functools.cache
def tensorrt_installed() -> bool:
    """Whether TensorRT's runtime library loads. onnxruntime-gpu lists its TensorRT provider whether or not
    TensorRT is installed; without it every session logs an "EP Error" and falls back (seen on an H100)."""
    for name in TENSORRT_LIBRARIES:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def select_providers(preferred: str = "auto") -> list[str]:
    """Execution providers to try, best first: "auto" (TensorRT when its library is installed, CUDA, CPU, as
    available), "cuda" or "cpu"."""
    available = set(ort.get_available_providers())
    if TENSORRT in available and not tensorrt_installed():
        available.discard(TENSORRT)
    if preferred == "cpu":
        return [CPU]
    if preferred == "cuda":
        if CUDA not in available:
            raise ProviderUnavailableError(
                f"CUDA was requested but onnxruntime offers only {sorted(available)}; install onnxruntime-gpu"
            )
        return [CUDA, CPU]
    if preferred == "auto":
        return [p for p in (TENSORRT, CUDA) if p in available] + [CPU]
    raise ValueError(f"providers must be 'auto', 'cuda' or 'cpu', got {preferred!r}")


def choose_variant(requested: str, providers: list[str], bundle: Bundle) -> str:
    """The encoder variant to load: `requested`, or for "auto" fp16 on a GPU provider when the bundle has it
    (fp16 halves memory traffic there; on CPU it only adds casts), else fp32."""
    if requested != "auto":
        return requested
    on_gpu = providers[0] in (TENSORRT, CUDA)
    has_fp16 = all((bundle.path / bundle.config.onnx.file(m, "fp16")).is_file() for m in MODALITIES)
    return "fp16" if on_gpu and has_fp16 else "fp32"


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class OnnxEncoder:
    """The bundle's image and text encoders as ONNX Runtime sessions."""

    def __init__(
        self,
        bundle: Bundle,
        providers: str = "auto",
        intra_op_threads: int | None = None,
        variant: str = "fp32",
        spin: bool = True,
        io_binding: bool | None = None,
    ):
        self.bundle = bundle
        self.providers = select_providers(providers)
        self.variant = variant = choose_variant(variant, self.providers, bundle)
        self.input_names = {**DEFAULT_INPUTS, **bundle.config.onnx.inputs}
        self.output_names = ["embedding", "cluster_probs"] if bundle.has_clusters else ["embedding"]
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        if not spin:  # a server shares its cores with the event loop: idle ORT threads must sleep, not spin
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {m: self._open_session(m, variant, options) for m in MODALITIES}
        # IO binding (inputs bound from host memory, outputs copied back) measured no faster than a plain run
        # on an H100 with host numpy in and out, and 5-7% slower with the fp16 encoders (docs/BENCHMARKS.md, gpu):
        # off unless asked for. It pays only when inputs already live on the device, which they never do here.
        self.io_binding = bool(io_binding)

    def _open_session(self, modality: str, variant: str, options: ort.SessionOptions) -> ort.InferenceSession:
        """An inference session over one encoder file, logging the providers it actually got."""
        path = self.bundle.onnx_path(modality, variant)
        session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        logger.info("%s encoder %s on %s", modality, path.name, session.get_providers())
        return session

    def preprocess_images(self, images: list[Image.Image]) -> np.ndarray:
        """Pixels for the image encoder: (B, 3, H, W) float32."""
        return preprocess_batch(images, self.bundle.preprocess)

    def preprocess_texts(self, texts: list[str]) -> np.ndarray:
        """Token ids for the text encoder: (B, L) int64."""
        return self.bundle.tokenizer.encode(texts)

    def run(self, modality: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """One ONNX call: (B, D) "embedding" and, for clustered bundles, (B, K) "cluster_probs"."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        inputs = np.ascontiguousarray(inputs, dtype=INPUT_DTYPES[modality])
        if inputs.ndim != INPUT_NDIM[modality]:
            raise ValueError(f"{modality} input must be {INPUT_NDIM[modality]}-D, got shape {inputs.shape}")
        if modality == "text" and self.bundle.config.onnx.text_padding == "longest":
            inputs = np.ascontiguousarray(trim_to_longest(inputs, self.bundle.tokenizer.eos_id))
        if self.io_binding:
            return self._run_bound(modality, inputs)
        feed = {self.input_names[modality]: inputs}
        values = self.sessions[modality].run(self.output_names, feed)
        return dict(zip(self.output_names, values, strict=True))

    def _run_bound(self, modality: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """`run` through IO binding: the input copied to the session's device once, outputs returned to the host."""
        session = self.sessions[modality]
        binding = session.io_binding()
        binding.bind_cpu_input(self.input_names[modality], inputs)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))

    def postprocess(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """float32 outputs with the embedding re-normalised (guards against fp16/int8 drift)."""
        processed = {name: np.asarray(value, dtype=np.float32) for name, value in outputs.items()}
        processed["embedding"] = l2_normalize(processed["embedding"])
        return processed

    def encode_images(self, images: list[Image.Image], batch_size: int = 64) -> dict[str, np.ndarray]:
        """Preprocess, run and postprocess images in batches; arrays concatenated over the batches."""
        return self._encode("image", images, self.preprocess_images, batch_size)

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> dict[str, np.ndarray]:
        """Tokenize, run and postprocess texts in batches; arrays concatenated over the batches."""
        return self._encode("text", texts, self.preprocess_texts, batch_size)

    def _encode(
        self, modality: str, items: list, preprocess: Callable[[list], np.ndarray], batch_size: int
    ) -> dict[str, np.ndarray]:
        """The three steps over `items` in chunks of `batch_size`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not items:
            return self._empty_outputs()
        chunks = [
            self.postprocess(self.run(modality, preprocess(items[start : start + batch_size])))
            for start in range(0, len(items), batch_size)
        ]
        return {name: np.concatenate([c[name] for c in chunks]) for name in self.output_names}

    def _empty_outputs(self) -> dict[str, np.ndarray]:
        """Zero-row outputs with the bundle's widths: (0, D) and (0, K)."""
        widths = {"embedding": self.bundle.embed_dim, "cluster_probs": self.bundle.num_clusters}
        return {name: np.zeros((0, widths[name]), np.float32) for name in self.output_names}
