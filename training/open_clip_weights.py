"""Reads an OpenCLIP checkpoint directory as the Hugging Face hub ships it (`open_clip_config.json` +
`open_clip_model.safetensors`) as the equivalent transformers `CLIPConfig` and `CLIPModel` state dict,
refusing any architecture that `CLIPModel` cannot reproduce exactly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"

# transformers' CLIPTextModel pools at argmax(input_ids) only when eos_token_id == 2 (its pre-PR-24773 rule),
# and at the first eos_token_id otherwise. open_clip's default 'argmax' pooling is the former, whatever the
# tokenizer (and argmax takes the first end-of-text even when padding repeats it).
ARGMAX_POOLING_EOS_ID = 2

# open_clip's PreprocessCfg defaults (src/open_clip/transform.py, constants.OPENAI_DATASET_MEAN/STD); `size`
# is always the vision tower's image size, as open_clip's create_model sets it.
PREPROCESS_DEFAULTS = {
    "mode": "RGB",
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}

# Fields that must keep these values for CLIPModel to be exact: field -> (accepted values, what others mean).
_MODEL_FIXED = {
    "init_logit_bias": ((None,), "a SigLIP-style sigmoid logit bias"),
    "multimodal_cfg": ((None,), "a CoCa multimodal text decoder"),
    "audio_cfg": ((None,), "a CLAP audio tower"),
    "audio_naflex_cfg": ((None,), "a NaFlex audio front-end"),
    "genlip_cfg": ((None,), "a GenLIP generative trunk"),
    "genlap_cfg": ((None,), "a GenLAP generative trunk"),
}
_ATTENTION_FIXED = {
    "block_type": ((None, "default"), "custom attention blocks"),
    "qk_norm": ((False,), "QK LayerNorm in attention"),
    "scaled_cosine_attn": ((False,), "scaled cosine attention"),
    "scale_heads": ((False,), "per-head attention scales"),
    "scale_attn_inner": ((False,), "a LayerNorm inside attention"),
    "scale_attn": ((False,), "a LayerNorm after attention"),
    "scale_fc": ((False,), "a LayerNorm inside the MLP"),
    "ls_init_value": ((None,), "layer scale"),
}
_VISION_FIXED = {
    "timm_model_name": ((None, ""), "a timm image tower"),
    "attentional_pool": ((False,), "attentional pooling"),
    "pool_type": (("tok",), "pooling other than the class token"),
    "global_average_pool": ((False,), "average pooling (open_clip < 2.23)"),
    "input_patchnorm": ((False,), "dual patch norm (open_clip < 2.23)"),
    "no_ln_pre": ((False,), "no LayerNorm before the transformer"),
    **_ATTENTION_FIXED,
}
_TEXT_FIXED = {
    "text_arch": (("clip",), "the 'modern' text tower (RoPE, RMSNorm, SwiGLU)"),
    "variable_text": ((False,), "variable-length text"),
    "hf_model_name": ((None, ""), "a Hugging Face text tower"),
    "pool_type": (("argmax", "eos"), "pooling other than at the end-of-text token"),
    "no_causal_mask": ((False,), "bidirectional text attention"),
    "embed_cls": ((False,), "an appended CoCa class token"),
    "proj_bias": ((False,), "a text projection with bias"),
    "proj_type": (("linear",), "a text projection other than one matrix"),
    **_ATTENTION_FIXED,
}

# Fields read into the CLIPConfig, or that leave the inference-time computation unchanged.
_MODEL_KNOWN = {
    "embed_dim", "vision_cfg", "text_cfg", "quick_gelu",
    "custom_text",  # only moves the text keys under `text.`; the key layout is detected from the weights
    "init_logit_scale", "nonscalar_logit_scale",  # the value (and its shape) come from the weights
    "output_dict",
}
_VISION_KNOWN = {
    "image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "norm_kwargs", "act_kwargs",
    "patch_dropout",  # training only: identity in eval mode
    "pos_embed_type",  # 'sin_cos_2d' is still a stored (frozen) parameter, read like a learned one
    "final_ln_after_pool",  # LayerNorm is per token, so LN-then-take-class-token == take-then-LN
    "output_tokens", "image_seq_len",
    "attn_pooler_queries", "attn_pooler_heads", "n_queries",  # unused without attentional_pool
    "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
    "timm_model_kwargs",  # unused without timm_model_name
}
_TEXT_KNOWN = {
    "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs", "act_kwargs",
    "eos_id", "pad_id", "bos_id",
    "final_ln_after_pool",  # per-token LayerNorm commutes with picking one token (argmax / eos pooling)
    "output_tokens",
    # the tokenizer's concern, not the network's: the caller must build the matching tokenizer
    "hf_tokenizer_name", "tokenizer_kwargs", "tokenizer_mode", "tokenizer_type", "tiktoken_name", "text_mask",
    # unused without hf_model_name
    "hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "hf_model_config", "proj", "pooler_type",
}
# Buffers open_clip may have saved that CLIPModel rebuilds itself (the causal mask).
_DROPPED_KEYS = {"attn_mask", "text.attn_mask"}


def read_open_clip(directory: str | Path) -> tuple[CLIPConfig, dict[str, torch.Tensor], dict]:
    """The CLIPConfig, CLIPModel state dict and open_clip preprocess config of an OpenCLIP hub checkpoint.

    The state dict loads with `CLIPModel(config).load_state_dict(state, strict=True)` (position_ids are
    non-persistent buffers there, so they are not in it) and carries the trained `logit_scale`, which is also
    `config.logit_scale_init_value`. Tensors keep the file's dtype. For open_clip's default 'argmax' text
    pooling `config.text_config.eos_token_id` is 2: a pooling selector (transformers' argmax rule), not the
    tokenizer's end-of-text id. Raises ValueError naming the field when CLIPModel cannot reproduce the
    checkpoint exactly, FileNotFoundError when the directory lacks either file.
    """
    directory = Path(directory)
    file_config = _read_config(directory / CONFIG_NAME)
    model_cfg = file_config["model_cfg"]
    _check_model_cfg(model_cfg)
    config = clip_config(model_cfg)
    mapped = map_state_dict(_read_weights(directory), config)
    _check_shapes(config, mapped)
    config.logit_scale_init_value = float(mapped["logit_scale"])
    vision, text = config.vision_config, config.text_config
    log.info("read OpenCLIP %s: vision %d layers x %d, text %d layers x %d, %s", directory,
             vision.num_hidden_layers, vision.hidden_size, text.num_hidden_layers, text.hidden_size,
             text.hidden_act)
    return config, mapped, preprocess_config(file_config, config.vision_config.image_size)


def _read_config(path: Path) -> dict:
    """The parsed open_clip_config.json, which must hold a model_cfg."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an OpenCLIP hub checkpoint directory")
    file_config = json.loads(path.read_text())
    if not isinstance(file_config, dict) or not isinstance(file_config.get("model_cfg"), dict):
        raise ValueError(f"{path} has no model_cfg object")  # noqa: TRY004 (every refusal is a ValueError)
    return file_config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The safetensors state dict; pickled checkpoints are never loaded (unpickling runs arbitrary code)."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (pickled open_clip_pytorch_model.bin is never read)")
    return load_file(path)


def _check_model_cfg(model_cfg: dict) -> None:
    """Refuse, naming the field, any model_cfg that CLIPModel cannot reproduce exactly."""
    _check_fields("model_cfg", model_cfg, _MODEL_FIXED, _MODEL_KNOWN)
    vision_cfg, text_cfg = model_cfg.get("vision_cfg"), model_cfg.get("text_cfg")
    if not isinstance(vision_cfg, dict) or not isinstance(text_cfg, dict):
        raise ValueError("model_cfg needs both vision_cfg and text_cfg objects")  # noqa: TRY004 (as above)
    if not isinstance(model_cfg.get("embed_dim"), int):
        raise ValueError("model_cfg.embed_dim (the projection size) is missing")  # noqa: TRY004 (as above)
    if isinstance(vision_cfg.get("layers"), (list, tuple)):  # per-stage depths
        raise ValueError("vision_cfg.layers is a list: a ModifiedResNet image tower, "  # noqa: TRY004
                         "which CLIPModel cannot represent")
    _check_fields("vision_cfg", vision_cfg, _VISION_FIXED, _VISION_KNOWN)
    _check_fields("text_cfg", text_cfg, _TEXT_FIXED, _TEXT_KNOWN)


def _check_fields(section: str, cfg: dict, fixed: dict, known: set) -> None:
    """Refuse a field set away from its accepted values, then any field this module does not know."""
    for field, (accepted, meaning) in fixed.items():
        if cfg.get(field, accepted[0]) not in accepted:
            raise ValueError(f"{section}.{field}={cfg[field]!r} means {meaning}, "
                             "which CLIPModel cannot represent")
    unknown = sorted(set(cfg) - set(fixed) - known)
    if unknown:
        raise ValueError(f"{section} has fields this importer does not know: {unknown}; "
                         "refusing rather than guessing")


def clip_config(model_cfg: dict) -> CLIPConfig:
    """The CLIPConfig of a checked open_clip model_cfg (logit_scale_init_value left at transformers')."""
    embed_dim = model_cfg["embed_dim"]
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    return CLIPConfig(
        projection_dim=embed_dim,
        vision_config={**_vision_config(model_cfg["vision_cfg"], quick_gelu), "projection_dim": embed_dim},
        text_config={**_text_config(model_cfg["text_cfg"], quick_gelu), "projection_dim": embed_dim},
    )


def _vision_config(cfg: dict, quick_gelu: bool) -> dict:
    """CLIPVisionConfig fields from open_clip's CLIPVisionCfg (defaults as in open_clip's dataclass)."""
    width = cfg.get("width", 768)
    return {
        "hidden_size": width,
        "num_hidden_layers": cfg.get("layers", 12),
        "num_attention_heads": width // cfg.get("head_width", 64),  # as open_clip's _build_vision_tower
        "intermediate_size": int(width * cfg.get("mlp_ratio", 4.0)),  # int() as open_clip's blocks do
        "image_size": _square(cfg.get("image_size", 224), "vision_cfg.image_size"),
        "patch_size": _square(cfg.get("patch_size", 16), "vision_cfg.patch_size"),
        "hidden_act": _hidden_act(cfg, quick_gelu, "vision_cfg"),
        "layer_norm_eps": _layer_norm_eps(cfg, "vision_cfg"),
    }


def _text_config(cfg: dict, quick_gelu: bool) -> dict:
    """CLIPTextConfig fields from open_clip's CLIPTextCfg (defaults as in open_clip's dataclass)."""
    width = cfg.get("width", 512)
    return {
        "hidden_size": width,
        "num_hidden_layers": cfg.get("layers", 12),
        "num_attention_heads": cfg.get("heads", 8),
        "intermediate_size": int(width * cfg.get("mlp_ratio", 4.0)),
        "vocab_size": cfg.get("vocab_size", 49408),
        "max_position_embeddings": cfg.get("context_length", 77),
        "hidden_act": _hidden_act(cfg, quick_gelu, "text_cfg"),
        "layer_norm_eps": _layer_norm_eps(cfg, "text_cfg"),
        **_pooling_token_ids(cfg),
    }


def _pooling_token_ids(cfg: dict) -> dict:
    """eos/bos/pad ids that make CLIPTextModel pool at the position open_clip's text_global_pool picks."""
    pad_id = cfg.get("pad_id", 0)
    if cfg.get("pool_type", "argmax") == "argmax":
        return {"eos_token_id": ARGMAX_POOLING_EOS_ID, "bos_token_id": None, "pad_token_id": pad_id}
    eos_id = cfg.get("eos_id")
    if eos_id is None or eos_id == ARGMAX_POOLING_EOS_ID:
        # transformers reads eos_token_id == 2 as "pool at argmax": first-eos pooling on id 2 has no encoding
        raise ValueError(f"text_cfg.pool_type='eos' with text_cfg.eos_id={eos_id!r}: CLIPModel pools on the "
                         f"first eos_token_id only for ids other than {ARGMAX_POOLING_EOS_ID}")
    return {"eos_token_id": eos_id, "bos_token_id": cfg.get("bos_id"), "pad_token_id": pad_id}


def _hidden_act(cfg: dict, quick_gelu: bool, section: str) -> str:
    """The transformers activation name of open_clip's act_layer (QuickGELU or nn.GELU(**act_kwargs))."""
    act_kwargs = cfg.get("act_kwargs") or {}
    if quick_gelu:
        if act_kwargs:
            raise ValueError(f"{section}.act_kwargs={act_kwargs!r} with quick_gelu: "
                             "QuickGELU takes no arguments")
        return "quick_gelu"
    approximate = act_kwargs.get("approximate", "none")
    if set(act_kwargs) - {"approximate"} or approximate not in ("none", "tanh"):
        raise ValueError(f"{section}.act_kwargs={act_kwargs!r}: only nn.GELU's approximate='none'/'tanh' "
                         "map exactly")
    return "gelu_pytorch_tanh" if approximate == "tanh" else "gelu"


def _layer_norm_eps(cfg: dict, section: str) -> float:
    """LayerNorm eps from norm_kwargs (open_clip's LayerNorm is nn.LayerNorm, eps 1e-5 unless overridden)."""
    norm_kwargs = cfg.get("norm_kwargs") or {}
    if set(norm_kwargs) - {"eps"}:
        raise ValueError(f"{section}.norm_kwargs={norm_kwargs!r}: only eps maps onto CLIPModel's LayerNorm")
    return float(norm_kwargs.get("eps", 1e-5))


def _square(value: int | list[int], field: str) -> int:
    """One side of a square size; CLIPModel's vision embeddings assume square images and patches."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{field}={value!r} is not square, which CLIPModel cannot represent")
        value = value[0]
    return int(value)


def map_state_dict(state: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """The CLIPModel state dict of an open_clip CLIP (or native-text CustomTextCLIP) state dict."""
    if "logit_bias" in state:
        raise ValueError("the weights hold logit_bias: a SigLIP-style sigmoid model, "
                         "which CLIPModel cannot represent")
    remaining = {k: v for k, v in state.items() if k not in _DROPPED_KEYS}
    text = "text." if "text.token_embedding.weight" in remaining else ""  # CustomTextCLIP nests the tower
    mapped = {"logit_scale": _take(remaining, "logit_scale").reshape(())}  # (1,) with nonscalar_logit_scale
    mapped.update(_map_vision(remaining, config.vision_config.num_hidden_layers))
    mapped.update(_map_text(remaining, text, config.text_config.num_hidden_layers))
    if remaining:
        raise ValueError(f"weights CLIPModel has no place for (not a plain CLIP): {sorted(remaining)}")
    return mapped


def _map_vision(state: dict, layers: int) -> dict[str, torch.Tensor]:
    """vision_model.* and visual_projection from open_clip's VisionTransformer (`visual.*`)."""
    out = {
        "vision_model.embeddings.class_embedding": _take(state, "visual.class_embedding"),
        "vision_model.embeddings.patch_embedding.weight": _take(state, "visual.conv1.weight"),
        "vision_model.embeddings.position_embedding.weight": _take(state, "visual.positional_embedding"),
        # open_clip multiplies features @ proj (width, embed_dim); nn.Linear stores (embed_dim, width)
        "visual_projection.weight": _take(state, "visual.proj").t().contiguous(),
    }
    out.update(_rename_module(state, "visual.ln_pre", "vision_model.pre_layrnorm"))
    out.update(_rename_module(state, "visual.ln_post", "vision_model.post_layernorm"))
    for i in range(layers):
        out.update(_map_block(state, f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}"))
    return out


def _map_text(state: dict, prefix: str, layers: int) -> dict[str, torch.Tensor]:
    """text_model.* and text_projection from open_clip's text tower (top level, or under `text.`)."""
    out = {
        "text_model.embeddings.token_embedding.weight": _take(state, f"{prefix}token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": _take(state, f"{prefix}positional_embedding"),
        "text_projection.weight": _take(state, f"{prefix}text_projection").t().contiguous(),
    }
    out.update(_rename_module(state, f"{prefix}ln_final", "text_model.final_layer_norm"))
    for i in range(layers):
        out.update(_map_block(state, f"{prefix}transformer.resblocks.{i}",
                              f"text_model.encoder.layers.{i}"))
    return out


def _map_block(state: dict, src: str, dst: str) -> dict[str, torch.Tensor]:
    """One ResidualAttentionBlock as a CLIPEncoderLayer; the fused in_proj rows are [q; k; v]."""
    q_w, k_w, v_w = _take(state, f"{src}.attn.in_proj_weight").chunk(3, dim=0)  # row blocks: contiguous
    q_b, k_b, v_b = _take(state, f"{src}.attn.in_proj_bias").chunk(3, dim=0)
    out = {
        f"{dst}.self_attn.q_proj.weight": q_w, f"{dst}.self_attn.q_proj.bias": q_b,
        f"{dst}.self_attn.k_proj.weight": k_w, f"{dst}.self_attn.k_proj.bias": k_b,
        f"{dst}.self_attn.v_proj.weight": v_w, f"{dst}.self_attn.v_proj.bias": v_b,
    }
    renames = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
               "ln_1": "layer_norm1", "ln_2": "layer_norm2"}
    for old, new in renames.items():
        out.update(_rename_module(state, f"{src}.{old}", f"{dst}.{new}"))
    return out


def _rename_module(state: dict, src: str, dst: str) -> dict[str, torch.Tensor]:
    """A module's weight and bias under a new name (a LayerNorm or a Linear alike)."""
    return {f"{dst}.weight": _take(state, f"{src}.weight"), f"{dst}.bias": _take(state, f"{src}.bias")}


def _take(state: dict, key: str) -> torch.Tensor:
    """Remove and return one tensor, so that whatever is left over at the end is known to be unmapped."""
    try:
        return state.pop(key)
    except KeyError as err:
        raise ValueError(f"weights are missing {key!r} (the config and the weights disagree)") from err


def _check_shapes(config: CLIPConfig, mapped: dict[str, torch.Tensor]) -> None:
    """Refuse weights whose shapes disagree with the config, against a CLIPModel built on the meta device."""
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {name: tuple(t.shape) for name, t in CLIPModel(config).state_dict().items()}
    wrong = [f"{name}: {tuple(t.shape)} in the weights, {expected.get(name)} in the config"
             for name, t in mapped.items() if tuple(t.shape) != expected.get(name)]
    wrong += [f"{name}: not in the weights" for name in sorted(set(expected) - set(mapped))]
    if wrong:
        raise ValueError(f"weights do not match the config's shapes: {wrong}")


def preprocess_config(file_config: dict, image_size: int) -> dict:
    """open_clip's preprocess config: PreprocessCfg defaults overlaid with the file's known, non-null keys."""
    overlay = {k: v for k, v in (file_config.get("preprocess_cfg") or {}).items()
               if k in PREPROCESS_DEFAULTS and v is not None}
    return {"size": image_size, **PREPROCESS_DEFAULTS, **overlay}
