"""The served heads of a trained model: what the ONNX files compute, and what training-time evaluation uses,
so both evaluate exactly the same function."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.preprocess import PreprocessConfig, preprocess_batch
from core.tokenizer import TextTokenizer
from training.model import DualEncoder


class ServedEncoder(nn.Module):
    """One tower → (L2-normalised embedding, cluster probabilities) — the latter only for nCLIP/xCLIP.

    CLIP and xCLIP serve their contrastive projection. nCLIP has none, and its two towers share no embedding
    space, only the K clusters (each side's distribution is the other's target). So it serves √p: unit-norm, and
    the dot product of an image's and a text's is their Bhattacharyya coefficient Σ√(p·q). Serving each tower's
    own bottleneck instead left nCLIP's retrieval near chance (docs/BENCHMARKS.md, objectives)."""

    def __init__(self, model: DualEncoder, modality: str, cluster_temp: float):
        super().__init__()
        self.model, self.modality, self.cluster_temp = model, modality, cluster_temp

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tower = self.model.visual if self.modality == "image" else self.model.text
        out = self.model._outputs(tower(inputs), self.modality)
        if "cluster_logits" not in out:
            return (F.normalize(out["embedding"], dim=-1),)
        probs = F.softmax(out["cluster_logits"] / self.cluster_temp, dim=-1)
        shared = torch.sqrt(probs) if self.model.config.objective == "nclip" else out["embedding"]
        return F.normalize(shared, dim=-1), probs


def output_names(model: DualEncoder) -> list[str]:
    return ["embedding", "cluster_probs"] if model.config.has_clusters else ["embedding"]


class TorchEncoder:
    """numpy-in/numpy-out encoders over a torch model, with the same signature as core's OnnxEncoder."""

    def __init__(self, model: DualEncoder, tokenizer: TextTokenizer, preprocess: PreprocessConfig,
                 cluster_temp: float, batch_size: int = 256):
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
    from training.model import DualEncoder, ModelConfig

    bundle = load_bundle(bundle_dir)
    model = DualEncoder(ModelConfig.from_dict(bundle.config.architecture), eos_id=bundle.tokenizer.eos_id)
    model.load_state_dict(load_file(bundle.path / "model.safetensors"))
    temp = bundle.config.cluster_temperature or 1.0
    return TorchEncoder(model.eval(), bundle.tokenizer, bundle.preprocess, temp)
