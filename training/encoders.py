"""Wrappers over a model's served outputs (`DualEncoder.served`): the module the ONNX files are exported from, and
the encoder training-time evaluation uses, so both evaluate exactly the same function."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from core.preprocess import PreprocessConfig, preprocess_batch
from core.tokenizer import TextTokenizer
from training.model import DEFAULT_CLUSTER_TEMP, DualEncoder, create_model


class ServedEncoder(nn.Module):
    """One tower → (L2-normalised embedding, cluster probabilities), the latter only for nCLIP/xCLIP: the tuple
    form of `DualEncoder.served`, which is what torch.onnx.export traces.

    The cluster temperature is the model's own; `cluster_temp`, when given, must agree with it (a caller holding a
    different temperature would otherwise get silently different probabilities)."""

    def __init__(self, model: DualEncoder, modality: str, cluster_temp: float | None = None):
        super().__init__()
        _check_cluster_temp(model, cluster_temp)
        self.model, self.modality = model, modality

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.served(inputs, self.modality)
        return tuple(out[name] for name in output_names(self.model))


def _check_cluster_temp(model: DualEncoder, cluster_temp: float | None) -> None:
    """Refuse a cluster temperature other than the model's: there is one definition of the served outputs."""
    if cluster_temp is not None and model.config.has_clusters and not math.isclose(cluster_temp, model.cluster_temp):
        raise ValueError(f"cluster_temp {cluster_temp} differs from the model's {model.cluster_temp}; "
                         "build the model with create_model(..., cluster_temp=...)")


def output_names(model: DualEncoder) -> list[str]:
    return ["embedding", "cluster_probs"] if model.config.has_clusters else ["embedding"]


class TorchEncoder:
    """numpy-in/numpy-out encoders over a torch model, with the same signature as core's OnnxEncoder."""

    def __init__(self, model: DualEncoder, tokenizer: TextTokenizer, preprocess: PreprocessConfig,
                 cluster_temp: float | None = None, batch_size: int = 256):
        self.tokenizer, self.preprocess, self.batch_size = tokenizer, preprocess, batch_size
        self.names = output_names(model)
        self.towers = {m: ServedEncoder(model, m, cluster_temp).eval() for m in ("image", "text")}

    @torch.no_grad()
    def _run(self, modality: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
        device = next(self.towers[modality].parameters()).device  # the model's, e.g. CUDA after training there
        starts = range(0, max(len(inputs), 1), self.batch_size)
        chunks = [self.towers[modality](torch.from_numpy(inputs[i:i + self.batch_size]).to(device)) for i in starts]
        return {name: torch.cat([c[j] for c in chunks]).float().cpu().numpy() for j, name in enumerate(self.names)}

    def encode_images(self, images) -> dict[str, np.ndarray]:
        return self._run("image", preprocess_batch(list(images), self.preprocess))

    def encode_texts(self, texts) -> dict[str, np.ndarray]:
        return self._run("text", self.tokenizer.encode(list(texts)))


def torch_encoder_from_bundle(bundle_dir) -> TorchEncoder:
    """The training-side encoder rebuilt from a bundle's architecture and weights (a reference for the
    ONNX/service path)."""
    from safetensors.torch import load_file

    from core.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    model = create_model(bundle.config.architecture, eos_id=bundle.tokenizer.eos_id,
                         cluster_temp=bundle.config.cluster_temperature or DEFAULT_CLUSTER_TEMP)  # None: CLIP
    model.load_state_dict(load_file(bundle.path / "model.safetensors"))
    return TorchEncoder(model.eval(), bundle.tokenizer, bundle.preprocess)
