"""The dual encoder: a ViT image tower, a causal Transformer text tower, a contrastive projection per tower and,
for nCLIP/xCLIP, a cluster head per tower. Architectures are named JSON configs in `training/configs/`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.losses import NClipConfig

CONFIG_DIR = Path(__file__).parent / "configs"
OBJECTIVES = ("clip", "nclip", "xclip")
DEFAULT_CLUSTER_TEMP = NClipConfig.student_temp  # the served temperature is the trained one


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 32
    patch_size: int = 4
    width: int = 192
    layers: int = 4
    heads: int = 3
    mlp_ratio: float = 2.0
    # "patch": one patch_size-strided convolution (ViT). "conv": a stack of 3×3 stride-2 convolutions down to the
    # same patch grid (Xiao et al. 2021, "Early Convolutions Help Transformers See Better").
    stem: str = "patch"


@dataclasses.dataclass(frozen=True)
class TextConfig:
    context_length: int = 24
    vocab_size: int = 4096
    width: int = 192
    layers: int = 3
    heads: int = 3
    mlp_ratio: float = 2.0


@dataclasses.dataclass(frozen=True)
class ClusterHeadConfig:
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    num_clusters: int = 1024
    # BatchNorm after each hidden layer (SwAV's head). It standardises every feature over the batch, so samples
    # whose features barely differ at initialisation get distinct cluster scores: without it nCLIP alone sits in
    # the uniform plateau where targets and predictions are all flat. Per-rank statistics under CPU DDP
    # (SyncBatchNorm needs CUDA); SyncBatchNorm on CUDA.
    batch_norm: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "small"
    objective: str = "xclip"
    embed_dim: int = 128
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    cluster_head: ClusterHeadConfig = ClusterHeadConfig()
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's initial temperature
    # {"format": "clip" | "open_clip" | "siglip", "transformers_config": {...}}: the towers, projections and logit
    # scale are a transformers model's (train --init; training/towers.py), `vision` / `text` record their shapes
    pretrained: dict | None = None
    # {"format": "bert", "transformers_config": {...}, "pooling": "mean", "pad_id": 0}: the text tower is a
    # sentence-transformers encoder (train --text-tower; training/towers.py), `text` records its shape
    text_tower: dict | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")

    @property
    def has_clusters(self) -> bool:
        return self.objective in ("nclip", "xclip")

    @property
    def retrieval_dim(self) -> int:
        """Width of the served embedding: the contrastive projection; for nCLIP, which has none, the square root of
        its K-cluster distribution (training/encoders.py: ServedEncoder)."""
        return self.embed_dim if self.objective != "nclip" else self.cluster_head.num_clusters

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = {k: v for k, v in data.items() if k != "description"}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        sub = {"vision": VisionConfig, "text": TextConfig, "cluster_head": ClusterHeadConfig}
        for key, klass in sub.items():
            if key in data:
                data[key] = klass(**data[key])
        return cls(**data)


def available_configs() -> list[str]:
    """Names of the architecture configs shipped in `training/configs/`."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str, **overrides) -> ModelConfig:
    """A named config (`small`) or a JSON file, with top-level fields overridden (e.g. objective) and some of its
    towers' (vocab_size, context_length, image_size)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise ValueError(f"unknown model config {name_or_path!r}; available: {available_configs()}")
    data = json.loads(path.read_text())
    data.setdefault("name", path.stem)
    text_overrides = {k: v for k in ("vocab_size", "context_length") if (v := overrides.pop(k, None)) is not None}
    if text_overrides:
        data["text"] = {**data["text"], **text_overrides}
    if (image_size := overrides.pop("image_size", None)) is not None:
        data["vision"] = {**data.get("vision", {}), "image_size": image_size}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig.from_dict(data)


class Block(nn.Module):
    """Pre-norm Transformer block with fused scaled-dot-product attention."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3×(B, h, T, d)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def patch_stem(cfg: VisionConfig) -> nn.Module:
    """(B, 3, H, W) → (B, width, H/patch, W/patch): a ViT patchify, or a convolutional stem to the same grid."""
    if cfg.stem == "patch":
        return nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
    if cfg.stem != "conv":
        raise ValueError(f"vision.stem must be patch or conv, got {cfg.stem!r}")
    downsamples = int(math.log2(cfg.patch_size))
    if 2 ** downsamples != cfg.patch_size:
        raise ValueError("a conv stem needs a power-of-two vision.patch_size")
    layers, channels = [], 3
    for i in range(downsamples):
        out = max(cfg.width // 2 ** (downsamples - i), 16)
        layers += [nn.Conv2d(channels, out, 3, 2, 1), nn.GroupNorm(1, out), nn.GELU()]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, cfg.width, 1))


class VisionTower(nn.Module):
    """ViT: patchify → [CLS] + positions → blocks → LayerNorm of [CLS]; (B, 3, H, W) → (B, width)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError("vision.image_size must be a multiple of vision.patch_size")
        self.patch_embed = patch_stem(cfg)
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, cfg.width) * 0.02)
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, False) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, N, width)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x[:, 0])


class TextTower(nn.Module):
    """Causal Transformer pooled at the end-of-text token; (B, L) int64 → (B, width).

    Padding follows `</s>`, so with a causal mask the pooled token never sees padding."""

    def __init__(self, cfg: TextConfig, eos_id: int = 2):
        super().__init__()
        self.eos_id = eos_id
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.context_length, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, True) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embed(input_ids) + self.pos_embed[:, : input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        is_eos = input_ids == self.eos_id
        last = torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1)
        eos_pos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), last)  # first </s>, else the end
        return x[torch.arange(x.shape[0]), eos_pos]


class ClusterHead(nn.Module):
    """nCLIP/DINO head: MLP → bottleneck → L2-norm → weight-normalised prototypes; returns (bottleneck, logits).

    Logits are cosines to the K prototypes (weight norm with g fixed to 1, as DINO's `norm_last_layer`),
    so the temperature alone sets how sharp the cluster distribution is."""

    def __init__(self, in_dim: int, cfg: ClusterHeadConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for width in (in_dim, cfg.hidden_dim):
            layers.append(nn.Linear(width, cfg.hidden_dim))
            layers += [nn.BatchNorm1d(cfg.hidden_dim)] if cfg.batch_norm else []
            layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers, nn.Linear(cfg.hidden_dim, cfg.bottleneck_dim))
        self.prototypes = nn.Parameter(torch.randn(cfg.num_clusters, cfg.bottleneck_dim) * 0.02)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(self.mlp(features), dim=-1)  # (B, bottleneck)
        return z, z @ F.normalize(self.prototypes, dim=-1).t()  # (B, K) cosine logits


class DualEncoder(nn.Module):
    """CLIP / nCLIP / xCLIP model. `served` / `encode_*` give what the ONNX encoders serve; `forward` gives every
    training output.

    `cluster_temp` is the temperature of the served cluster distribution softmax(logits / T): the training
    student temperature (NClipConfig.student_temp), so served probabilities are the ones the loss trained."""

    def __init__(self, cfg: ModelConfig, eos_id: int = 2, cluster_temp: float = DEFAULT_CLUSTER_TEMP):
        super().__init__()
        if cluster_temp <= 0:
            raise ValueError(f"cluster_temp must be positive, got {cluster_temp}")
        self.config, self.cluster_temp = cfg, cluster_temp
        if cfg.pretrained is None:
            self.visual = VisionTower(cfg.vision)
            self.text = TextTower(cfg.text, eos_id) if cfg.text_tower is None else self._pooled_text_tower(cfg)
            if cfg.objective != "nclip":  # contrastive latent space
                self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
                self.image_proj = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
                self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        else:
            self._add_pretrained_towers(cfg)
        if cfg.has_clusters:  # separate non-contrastive latent space
            self.image_head = ClusterHead(cfg.vision.width, cfg.cluster_head)
            self.text_head = ClusterHead(cfg.text.width, cfg.cluster_head)
        # pretrained towers keep their own initialisation (their weights are loaded next): only new parts here
        if cfg.pretrained is None:
            pretrained = {id(m) for m in self.text.modules()} if cfg.text_tower is not None else set()
            self.apply(lambda module: None if id(module) in pretrained else _init_weights(module))
        else:
            for part in (m for n, m in self.named_children() if n.endswith("_head")):
                part.apply(_init_weights)

    @staticmethod
    def _pooled_text_tower(cfg: ModelConfig) -> nn.Module:
        """A sentence-transformers encoder as the text tower (weights from its checkpoint or the run's)."""
        from training.towers import pooled_text_tower

        tower = pooled_text_tower(cfg.text_tower)
        if tower.encoder.config.hidden_size != cfg.text.width:
            raise ValueError(f"text.width {cfg.text.width} differs from the text tower's "
                             f"{tower.encoder.config.hidden_size}")
        return tower

    def _add_pretrained_towers(self, cfg: ModelConfig) -> None:
        """A transformers model's towers (shapes from its config; weights from the init or run checkpoint)."""
        from training.towers import transformers_towers

        towers = transformers_towers(cfg.pretrained)
        if (towers.vision_width, towers.text_width) != (cfg.vision.width, cfg.text.width):
            raise ValueError(f"model config widths {cfg.vision.width}/{cfg.text.width} differ from the "
                             f"pretrained towers' {towers.vision_width}/{towers.text_width}")
        self.visual, self.text = towers.visual, towers.text
        if cfg.objective != "nclip":
            self.logit_scale, self.image_proj, self.text_proj = towers.logit_scale, towers.image_proj, towers.text_proj

    def _outputs(self, features: torch.Tensor, modality: str) -> dict[str, torch.Tensor]:
        out = {}
        if self.config.has_clusters:
            head = self.image_head if modality == "image" else self.text_head
            out["cluster_feature"], out["cluster_logits"] = head(features)
        if self.config.objective != "nclip":
            proj = self.image_proj if modality == "image" else self.text_proj
            out["embedding"] = proj(features)
        else:
            out["embedding"] = out["cluster_feature"]
        return out

    def served(self, inputs: torch.Tensor, modality: str, normalize: bool = True) -> dict[str, torch.Tensor]:
        """One tower's served outputs, exactly what its ONNX encoder computes: `embedding` and, for nCLIP/xCLIP,
        `cluster_probs` (in that order).

        CLIP and xCLIP serve their contrastive projection. nCLIP has none, and its two towers share no embedding
        space, only the K clusters (each side's distribution is the other's target). So it serves √p: unit-norm,
        and the dot product of an image's and a text's is their Bhattacharyya coefficient Σ√(p·q). Serving each
        tower's own bottleneck instead left nCLIP's retrieval near chance (docs/BENCHMARKS.md, objectives)."""
        tower = self.visual if modality == "image" else self.text
        out = self._outputs(tower(inputs), modality)
        if not self.config.has_clusters:
            return {"embedding": F.normalize(out["embedding"], dim=-1) if normalize else out["embedding"]}
        probs = F.softmax(out["cluster_logits"] / self.cluster_temp, dim=-1)  # (B, K)
        embedding = torch.sqrt(probs) if self.config.objective == "nclip" else out["embedding"]
        # √p is unit-norm up to rounding; normalising it anyway keeps the served vectors exactly comparable.
        return {"embedding": F.normalize(embedding, dim=-1) if normalize else embedding, "cluster_probs": probs}

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) → (B, retrieval_dim): the served image embedding (unnormalised unless `normalize`)."""
        return self.served(pixels, "image", normalize)["embedding"]

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, L) → (B, retrieval_dim): the served text embedding (unnormalised unless `normalize`)."""
        return self.served(input_ids, "text", normalize)["embedding"]

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                text_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training outputs: `image_*`/`text_*` embeddings (unnormalised), cluster logits, and `logit_scale`.
        `text_features`: the text tower's outputs for `input_ids`, when a locked tower's are precomputed."""
        out = {f"image_{k}": v for k, v in self._outputs(self.visual(pixels), "image").items()}
        text = self.text(input_ids) if text_features is None else text_features
        out.update({f"text_{k}": v for k, v in self._outputs(text, "text").items()})
        if self.config.objective != "nclip":
            out["logit_scale"] = self.logit_scale
        return out


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def create_model(name_or_config: str | ModelConfig | dict, eos_id: int = 2,
                 cluster_temp: float = DEFAULT_CLUSTER_TEMP, **overrides) -> DualEncoder:
    """One factory: a model from a config name, a JSON path, a ModelConfig or its dict (a run's or a bundle's
    `architecture`), with the tokenizer's end-of-text id and the served cluster temperature."""
    if isinstance(name_or_config, dict):
        name_or_config = ModelConfig.from_dict(name_or_config)
    if isinstance(name_or_config, ModelConfig):
        if any(v is not None for v in overrides.values()):
            raise ValueError(f"overrides {sorted(overrides)} apply to a config name or path, not a built config")
        cfg = name_or_config
    else:
        cfg = load_config(name_or_config, **overrides)
    return DualEncoder(cfg, eos_id=eos_id, cluster_temp=cluster_temp)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
