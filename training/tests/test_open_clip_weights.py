"""Tests for reading OpenCLIP hub checkpoints as transformers CLIPModel: features equal an independent
OpenCLIP reference forward (written from open_clip's VisionTransformer / CLIP._encode_text), and every
architecture CLIPModel cannot reproduce is refused by name."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPModel

from training.open_clip_weights import CONFIG_NAME, WEIGHTS_NAME, read_open_clip

TOLERANCE = 1e-5
IMAGE_SIZE, PATCH_SIZE, CONTEXT, VOCAB, EMBED_DIM = 32, 8, 16, 100, 24
# open_clip's end-of-text: the highest id its tokenizer emits. Some vocabularies have embedding rows above it,
# so pooling must not assume the last row (transformers' first-eos rule with eos = VOCAB - 1 fails here).
EOT = VOCAB - 3
TEXT_ARGMAX, TEXT_EOS = "argmax", "eos"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One tiny OpenCLIP architecture: the fields its open_clip_config.json will carry."""

    quick_gelu: bool = False
    gelu_tanh: bool = False  # act_kwargs={"approximate": "tanh"} (SigLIP-era configs)
    eps: float = 1e-5  # norm_kwargs={"eps": ...} when not the default
    pool_type: str = TEXT_ARGMAX
    eos_id: int | None = None  # pool_type 'eos' (e.g. mt5's 1)
    final_ln_after_pool: bool = False
    custom_text: bool = False  # CustomTextCLIP: the text tower's keys under `text.`
    nonscalar_logit_scale: bool = False
    save_attn_mask: bool = False
    vision_width: int = 48
    head_width: int = 16  # 3 vision heads
    vision_mlp_ratio: float = 2.5
    text_width: int = 32
    text_heads: int = 4


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(spec: Spec) -> nn.Module:
    if spec.quick_gelu:
        return QuickGELU()
    return nn.GELU(approximate="tanh" if spec.gelu_tanh else "none")


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); fused in_proj as nn.MultiheadAttention's."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, spec: Spec):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=spec.eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=spec.eps)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, hidden), gelu=_activation(spec), c_proj=nn.Linear(hidden, width)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, spec: Spec):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, spec) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    """open_clip's ViT: patchify, class token, positions, ln_pre, blocks, ln_post on the class token, proj."""

    def __init__(self, spec: Spec):
        super().__init__()
        width, grid = spec.vision_width, IMAGE_SIZE // PATCH_SIZE
        self.final_ln_after_pool = spec.final_ln_after_pool
        self.conv1 = nn.Conv2d(3, width, kernel_size=PATCH_SIZE, stride=PATCH_SIZE, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=spec.eps)
        self.transformer = Transformer(width, 2, width // spec.head_width, spec.vision_mlp_ratio, spec)
        self.ln_post = nn.LayerNorm(width, eps=spec.eps)
        self.proj = nn.Parameter(torch.empty(width, EMBED_DIM))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv1(image).flatten(2).transpose(1, 2)  # (B, grid², width)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        pooled = self.ln_post(x[:, 0]) if self.final_ln_after_pool else self.ln_post(x)[:, 0]
        return pooled @ self.proj


class OpenClipReference(nn.Module):
    """open_clip's CLIP with its state-dict key names; text pooled at argmax(ids) or at the first eos_id."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        width = spec.text_width
        self.visual = VisionTransformer(spec)
        self.token_embedding = nn.Embedding(VOCAB, width)
        self.positional_embedding = nn.Parameter(torch.empty(CONTEXT, width))
        self.transformer = Transformer(width, 2, spec.text_heads, 4.0, spec)
        self.ln_final = nn.LayerNorm(width, eps=spec.eps)
        self.text_projection = nn.Parameter(torch.empty(width, EMBED_DIM))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        causal = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)  # additive: -inf above the diagonal
        self.register_buffer("attn_mask", causal, persistent=False)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask)
        if self.spec.pool_type == TEXT_ARGMAX:
            position = ids.argmax(dim=-1)
        else:
            position = (ids == self.spec.eos_id).int().argmax(dim=-1)
        rows = torch.arange(x.shape[0])
        if self.spec.final_ln_after_pool:  # pool then LN; open_clip's default is LN every token then pool
            return self.ln_final(x[rows, position]) @ self.text_projection
        return self.ln_final(x)[rows, position] @ self.text_projection


def _randomize(model: nn.Module) -> nn.Module:
    """Random weights everywhere (LayerNorm gains near 1): no mis-mapped tensor hides behind an init value."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.ndim == 1:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.2)
        model.logit_scale.fill_(2.9)
    return model.eval()


def _model_cfg(spec: Spec) -> dict:
    """The open_clip_config.json model_cfg of a Spec; optional fields only when set, as on the hub."""
    vision = {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "width": spec.vision_width, "layers": 2,
              "head_width": spec.head_width, "mlp_ratio": spec.vision_mlp_ratio}
    text = {"context_length": CONTEXT, "vocab_size": VOCAB, "width": spec.text_width,
            "heads": spec.text_heads, "layers": 2}
    for tower in (vision, text):
        if spec.gelu_tanh:
            tower["act_kwargs"] = {"approximate": "tanh"}
        if spec.eps != 1e-5:
            tower["norm_kwargs"] = {"eps": spec.eps}
        if spec.final_ln_after_pool:
            tower["final_ln_after_pool"] = True
    if spec.pool_type != TEXT_ARGMAX:
        text.update(pool_type=spec.pool_type, eos_id=spec.eos_id)
    cfg = {"embed_dim": EMBED_DIM, "quick_gelu": spec.quick_gelu, "vision_cfg": vision, "text_cfg": text}
    if spec.custom_text:
        cfg["custom_text"] = True
    if spec.nonscalar_logit_scale:
        cfg["nonscalar_logit_scale"] = True
    return cfg


def _state_dict(model: OpenClipReference) -> dict[str, torch.Tensor]:
    """The reference's weights as open_clip saves them for this spec's layout."""
    spec = model.spec
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if spec.nonscalar_logit_scale:
        state["logit_scale"] = state["logit_scale"].reshape(1)
    if spec.save_attn_mask:
        state["attn_mask"] = model.attn_mask.clone()
    if spec.custom_text:
        state = {k if k.startswith(("visual.", "logit_")) else f"text.{k}": v for k, v in state.items()}
    return state


def write_checkpoint(directory: Path, spec: Spec, seed: int = 0) -> OpenClipReference:
    """Save a random reference model as an OpenCLIP hub directory; returns the reference."""
    torch.manual_seed(seed)
    model = _randomize(OpenClipReference(spec))
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": _model_cfg(spec), "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    save_file(_state_dict(model), directory / WEIGHTS_NAME)
    return model


def token_ids(end_positions: list[int], end_id: int, seed: int = 0) -> torch.Tensor:
    """(B, CONTEXT) ids: an end token at each given position, padding (0) after it, random tokens before it:
    in [1, EOT) for argmax pooling, above an eos like mt5's 1 (so argmax would point elsewhere). Each row
    starts with id 2, where a "first eos_token_id == 2" rule would pool."""
    generator = torch.Generator().manual_seed(seed)
    low, high = (1, EOT) if end_id == EOT else (end_id + 1, VOCAB)
    ids = torch.randint(low, high, (len(end_positions), CONTEXT), generator=generator)
    for row, position in enumerate(end_positions):
        ids[row, position] = end_id
        ids[row, position + 1:] = 0
    ids[:, 0] = 2
    return ids


def load_clip_model(directory: Path) -> tuple[CLIPModel, dict]:
    """CLIPModel with the mapped weights loaded strictly (nothing missing, nothing extra)."""
    config, state, preprocess = read_open_clip(directory)
    model = CLIPModel(config).eval()
    model.load_state_dict(state, strict=True)
    return model, preprocess


def check(tmp_path: Path, spec: Spec) -> None:
    """CLIPModel's image and text features equal the OpenCLIP reference's, and the logit scale is carried."""
    reference = write_checkpoint(tmp_path, spec)
    model, _ = load_clip_model(tmp_path)
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    end_id = EOT if spec.pool_type == TEXT_ARGMAX else spec.eos_id
    ids = token_ids([3, 9, CONTEXT - 1, 1], end_id)
    with torch.no_grad():
        got_image = model.get_image_features(pixel_values=images).pooler_output  # projected (B, EMBED_DIM)
        got_text = model.get_text_features(input_ids=ids).pooler_output
        want_image, want_text = reference.encode_image(images), reference.encode_text(ids)
    torch.testing.assert_close(got_image, want_image, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(got_text, want_text, atol=TOLERANCE, rtol=0)
    assert model.logit_scale.item() == pytest.approx(reference.logit_scale.item())
    assert model.config.logit_scale_init_value == pytest.approx(reference.logit_scale.item())


@pytest.mark.parametrize("spec", [
    Spec(quick_gelu=True),
    Spec(quick_gelu=False),
    Spec(gelu_tanh=True, eps=1e-6),
    Spec(pool_type=TEXT_EOS, eos_id=1),
    Spec(custom_text=True, quick_gelu=True),
    Spec(nonscalar_logit_scale=True, save_attn_mask=True),
    Spec(final_ln_after_pool=True),
    Spec(head_width=8, vision_mlp_ratio=4.0, text_heads=2),
], ids=repr)
def test_features_match_open_clip(tmp_path, spec):
    check(tmp_path, spec)


def test_wrong_activation_is_caught(tmp_path):
    """The parity check can fail: the same weights read as GELU instead of QuickGELU give other features."""
    reference = write_checkpoint(tmp_path, Spec(quick_gelu=True))
    config_path = tmp_path / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["model_cfg"]["quick_gelu"] = False
    config_path.write_text(json.dumps(config))
    model, _ = load_clip_model(tmp_path)
    ids = token_ids([5, 12], EOT)
    with torch.no_grad():
        gap = (model.get_text_features(input_ids=ids).pooler_output - reference.encode_text(ids)).abs().max()
    assert gap > 100 * TOLERANCE


def test_mapped_weights_save_as_safetensors(tmp_path):
    """The mapped state dict can be written as it is (safetensors refuses non-contiguous tensors)."""
    write_checkpoint(tmp_path / "src", Spec())
    _, state, _ = read_open_clip(tmp_path / "src")
    save_file(state, tmp_path / "model.safetensors")
    assert set(load_file(tmp_path / "model.safetensors")) == set(state)


def test_preprocess_config_fills_open_clip_defaults(tmp_path):
    write_checkpoint(tmp_path, Spec())
    config_path = tmp_path / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["preprocess_cfg"] = {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash", "unknown": 1}
    config_path.write_text(json.dumps(config))
    _, _, preprocess = read_open_clip(tmp_path)
    assert preprocess == {"size": IMAGE_SIZE, "mode": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3,
                          "interpolation": "bicubic", "resize_mode": "squash", "fill_color": 0}


def refuses(tmp_path: Path, match: str, config_edits: dict | None = None, weight_edit=None) -> None:
    """read_open_clip raises ValueError matching `match` once the checkpoint is edited. config_edits:
    {"section.field" or "field": value} on model_cfg; weight_edit: a function mutating the state dict."""
    model = write_checkpoint(tmp_path, Spec())
    config = {"model_cfg": _model_cfg(Spec())}
    for dotted, value in (config_edits or {}).items():
        *section, field = dotted.split(".")
        (config["model_cfg"][section[0]] if section else config["model_cfg"])[field] = value
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    if weight_edit is not None:
        state = _state_dict(model)
        weight_edit(state)
        save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=match):
        read_open_clip(tmp_path)


@pytest.mark.parametrize("edits, match", [
    ({"vision_cfg.timm_model_name": "vit_base_patch16_224"}, "timm"),
    ({"vision_cfg.layers": [3, 4, 6, 3]}, "ModifiedResNet"),
    ({"vision_cfg.attentional_pool": True}, "attentional pooling"),
    ({"vision_cfg.ls_init_value": 1e-4}, "layer scale"),
    ({"text_cfg.ls_init_value": 1e-4}, "layer scale"),
    ({"vision_cfg.pool_type": "avg"}, "vision_cfg.pool_type"),
    ({"vision_cfg.global_average_pool": True}, "global_average_pool"),
    ({"vision_cfg.no_ln_pre": True}, "no_ln_pre"),
    ({"vision_cfg.qk_norm": True}, "qk_norm"),
    ({"vision_cfg.image_size": [32, 48]}, "not square"),
    ({"vision_cfg.norm_kwargs": {"elementwise_affine": False}}, "norm_kwargs"),
    ({"vision_cfg.act_kwargs": {"approximate": "tanh"}, "quick_gelu": True}, "QuickGELU"),
    ({"vision_cfg.some_new_field": 1}, "does not know"),
    ({"text_cfg.hf_model_name": "roberta-base"}, "Hugging Face text tower"),
    ({"text_cfg.text_arch": "modern"}, "modern"),
    ({"text_cfg.pool_type": "last"}, "text_cfg.pool_type"),
    ({"text_cfg.pool_type": "eos", "text_cfg.eos_id": 2}, "eos_id=2"),
    ({"text_cfg.pool_type": "eos"}, "eos_id=None"),
    ({"text_cfg.no_causal_mask": True}, "bidirectional"),
    ({"text_cfg.embed_cls": True}, "CoCa class token"),
    ({"text_cfg.proj_bias": True}, "projection with bias"),
    ({"text_cfg.proj_type": "none"}, "proj_type"),
    ({"init_logit_bias": -10.0}, "SigLIP"),
    ({"multimodal_cfg": {"width": 32}}, "CoCa"),
    ({"vision_cfg": None}, "vision_cfg and text_cfg"),
    ({"embed_dim": None}, "embed_dim"),
    ({"text_cfg.width": 64, "text_cfg.heads": 4}, "shapes"),
])
def test_refuses_config(tmp_path, edits, match):
    refuses(tmp_path, match, config_edits=edits)


@pytest.mark.parametrize("weight_edit, match", [
    (lambda s: s.update(logit_bias=torch.zeros(())), "logit_bias"),
    (lambda s: s.update({"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(48)}), "no place"),
    (lambda s: s.pop("visual.ln_pre.weight"), "missing 'visual.ln_pre.weight'"),
    (lambda s: s.pop("logit_scale"), "missing 'logit_scale'"),
])
def test_refuses_weights(tmp_path, weight_edit, match):
    refuses(tmp_path, match, weight_edit=weight_edit)


def test_never_unpickles(tmp_path):
    """Only safetensors are read: a directory with just the pickled .bin is refused."""
    write_checkpoint(tmp_path, Spec())
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled"):
        read_open_clip(tmp_path)
