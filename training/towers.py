"""Pretrained towers inside our dual encoder (`train --init`): a transformers CLIP / SigLIP model's vision and
text towers, projections and logit scale become `DualEncoder`'s `visual`, `text`, `image_proj`, `text_proj` and
`logit_scale`, so the losses, cluster heads, evaluation, export and serving are the ones every model uses.

Architectures stay data: `ModelConfig.pretrained` holds the checkpoint's format and transformers config, from which
`transformers_towers` rebuilds the modules (weights come from the init checkpoint, or from a run's checkpoint).
A sentence-transformers checkpoint (BERT family, e.g. all-MiniLM-L6-v2) can be the text tower alone
(`train --text-tower`, `ModelConfig.text_tower`): its token states pooled as it pools them, then a new projection.
Also here: open_clip-style tower locking (`lock_tower`) and the parameters that count as pretrained.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)
FORMATS = ("clip", "open_clip", "siglip")


class TransformersTower(nn.Module):
    """A transformers vision or text model → its pooled features (B, width): CLIP's post-LayerNorm class /
    end-of-text token, SigLIP's attention-pooled / last-token head output."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.tower(inputs).pooler_output


@dataclasses.dataclass
class Towers:
    """What a pretrained model contributes to the dual encoder."""

    visual: nn.Module
    text: nn.Module
    image_proj: nn.Module
    text_proj: nn.Module
    logit_scale: nn.Parameter
    vision_width: int
    text_width: int
    embed_dim: int


def transformers_towers(spec: dict) -> Towers:
    """Towers built (randomly initialised) from `spec` = {"format", "transformers_config"}."""
    model = transformers_model(spec)
    config = model.config
    vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
    if spec["format"] == "siglip":  # its towers end in their own heads: the pooled features are the embedding
        return Towers(TransformersTower(model.vision_model), TransformersTower(model.text_model), nn.Identity(),
                      nn.Identity(), model.logit_scale, vision_width, text_width,
                      config.text_config.projection_size)
    return Towers(TransformersTower(model.vision_model), TransformersTower(model.text_model),
                  model.visual_projection, model.text_projection, model.logit_scale, vision_width, text_width,
                  config.projection_dim)


def transformers_model(spec: dict) -> nn.Module:
    """A transformers CLIPModel / SiglipModel (random weights, eager attention) from a `pretrained` spec."""
    if spec.get("format") not in FORMATS:
        raise ValueError(f"pretrained format must be one of {FORMATS}, got {spec.get('format')!r}")
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    config_class, model_class = (SiglipConfig, SiglipModel) if spec["format"] == "siglip" else (CLIPConfig,
                                                                                                 CLIPModel)
    config = config_class.from_dict(spec["transformers_config"])
    config._attn_implementation = "eager"  # exports to ONNX cleanly, as the import does
    return model_class(config)


def load_pretrained_weights(model: nn.Module, reference: nn.Module) -> None:
    """Copy a transformers model's tower, projection and logit-scale weights into `model` (its `DualEncoder`);
    cluster heads are left as they are (new)."""
    model.visual.tower.load_state_dict(reference.vision_model.state_dict())
    model.text.tower.load_state_dict(reference.text_model.state_dict())
    if not hasattr(model, "logit_scale"):  # nCLIP: no contrastive latent, so no projections or scale
        return
    for ours, theirs in (("image_proj", "visual_projection"), ("text_proj", "text_projection")):
        if hasattr(reference, theirs):  # SigLIP has none: its towers' heads project
            getattr(model, ours).load_state_dict(getattr(reference, theirs).state_dict())
    with torch.no_grad():
        model.logit_scale.copy_(reference.logit_scale.detach().reshape(()))


# -- a sentence-transformers text tower ----------------------------------------------------------------------------
POOLINGS = ("mean", "cls")


class PooledTextTower(nn.Module):
    """A BERT-family encoder → pooled token states (B, width): the mean over the text's tokens (sentence-
    transformers' mean pooling) or the [CLS] state. The mask comes from the ids (padding is `pad_id`), so the
    ONNX text encoder still takes ids alone."""

    def __init__(self, encoder: nn.Module, pad_id: int, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder, self.pad_id, self.pooling = encoder, pad_id, pooling

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).long()  # (B, L)
        states = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, width)
        if self.pooling == "cls":
            return states[:, 0]
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def text_tower_model(spec: dict) -> nn.Module:
    """The encoder of a `text_tower` spec {"format": "bert", "transformers_config", "pooling", "pad_id"}
    (random weights, eager attention, no pooler layer: pooling is ours)."""
    if spec.get("format") != "bert":
        raise ValueError(f"text tower format must be 'bert', got {spec.get('format')!r}")
    from transformers import BertConfig, BertModel

    config = BertConfig.from_dict(spec["transformers_config"])
    config._attn_implementation = "eager"
    return BertModel(config, add_pooling_layer=False)


def pooled_text_tower(spec: dict) -> PooledTextTower:
    return PooledTextTower(text_tower_model(spec), spec["pad_id"], spec.get("pooling", "mean"))


# -- locking -----------------------------------------------------------------------------------------------------
def tower_groups(model: nn.Module, modality: str, projection: bool = True) -> list[list[nn.Module | nn.Parameter]]:
    """A tower's layer groups, input to output, as open_clip locks them: embeddings (and the pre-LayerNorm), each
    Transformer block, the final LayerNorm, then (when `projection`) the projection."""
    tower = model.visual if modality == "image" else model.text
    projection = getattr(model, projection_name(modality), None) if projection else None
    if isinstance(tower, (TransformersTower, PooledTextTower)):
        groups = _transformers_groups(tower.tower if isinstance(tower, TransformersTower) else tower.encoder)
    else:
        groups = _own_groups(tower)
    return groups + ([[projection]] if projection is not None else [])


def _transformers_groups(tower: nn.Module) -> list[list]:
    """CLIP / SigLIP towers (`encoder.layers`) and BERT encoders (`encoder.layer`, no final norm)."""
    first = [tower.embeddings, *([tower.pre_layrnorm] if hasattr(tower, "pre_layrnorm") else [])]
    last = [m for name in ("post_layernorm", "final_layer_norm", "head") if (m := getattr(tower, name, None))]
    layers = getattr(tower.encoder, "layers", None) or tower.encoder.layer
    return [first, *([layer] for layer in layers), *([last] if last else [])]


def _own_groups(tower: nn.Module) -> list[list]:
    """Our VisionTower / TextTower."""
    embeddings = [m for name in ("patch_embed", "cls_token", "pos_embed", "ln_pre", "token_embed")
                  if (m := getattr(tower, name, None)) is not None]
    final = [m for name in ("ln_post", "ln_final") if (m := getattr(tower, name, None)) is not None]
    return [embeddings, *([block] for block in tower.blocks), final]


def projection_name(modality: str) -> str:
    return "image_proj" if modality == "image" else "text_proj"


def lock_tower(model: nn.Module, modality: str, unlocked_groups: int = 0,
               pretrained_parts: tuple[str, ...] | None = None) -> int:
    """Freeze `modality`'s tower but its last `unlocked_groups` layer groups (open_clip's `lock_image_tower` /
    `lock_text_tower`); returns the number of frozen parameters. LayerNorm parameters of frozen groups freeze
    with them; our towers have no BatchNorm. A projection that is not among the `pretrained_parts` (the new one
    over a `--text-tower`) is no part of the tower and trains, as open_clip's HF text tower keeps its `proj`."""
    own_projection = pretrained_parts is None or projection_name(modality) in pretrained_parts
    groups = tower_groups(model, modality, projection=own_projection)
    if not 0 <= unlocked_groups <= len(groups):
        raise ValueError(f"{modality} tower has {len(groups)} layer groups; cannot unlock {unlocked_groups}")
    frozen = 0
    for group in groups[:len(groups) - unlocked_groups]:
        for part in group:
            for param in ([part] if isinstance(part, nn.Parameter) else part.parameters()):
                param.requires_grad_(False)
                frozen += param.numel()
    logger.info("locked the %s tower: %d parameters frozen, last %d of %d groups train", modality, frozen,
                unlocked_groups, len(groups))
    return frozen


def pretrained_parameter_ids(model: nn.Module, parts: tuple[str, ...]) -> set[int]:
    """ids of the parameters of `model`'s children named in `parts` (e.g. "visual", "text", "image_proj",
    "logit_scale"): the ones that come from a pretrained checkpoint and train at a lower learning rate."""
    ids = set()
    for name in parts:
        part = getattr(model, name, None)
        if isinstance(part, nn.Parameter):
            ids.add(id(part))
        elif part is not None:
            ids.update(id(p) for p in part.parameters())
    return ids


def is_fully_locked(model: nn.Module, modality: str) -> bool:
    """Every parameter of `modality`'s tower frozen: its outputs are a fixed function of its input (in eval mode)."""
    tower = model.visual if modality == "image" else model.text
    return not any(p.requires_grad for p in tower.parameters())


class LockedTextFeatures:
    """A fully locked text tower's outputs for a fixed set of token rows, computed once, in eval mode and in a
    fixed order (LiT: Zhai et al. 2022 precompute the locked tower's representations). A row outside the set is
    computed when asked for."""

    def __init__(self, tower: nn.Module, rows: torch.Tensor, batch_size: int = 256):
        self.tower = tower
        unique = torch.unique(rows, dim=0)  # sorted: the same batches, hence the same features, on every start
        self.index = {row.tobytes(): i for i, row in enumerate(unique.numpy())}
        self.features = self._run(unique, batch_size)  # (N, width)

    @torch.no_grad()
    def _run(self, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
        device = next(self.tower.parameters()).device
        return torch.cat([self.tower(rows[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(rows), batch_size)])

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token rows → (B, width) tower outputs, on `input_ids`' device."""
        found = [self.index.get(row.tobytes()) for row in input_ids.cpu().numpy()]
        if None in found:
            return self._run(input_ids, len(input_ids)).to(input_ids.device)
        return self.features[found].to(input_ids.device)
