"""Where a fine-tuning run starts (`train --init SRC`): a pretrained checkpoint directory (any format
`xclip-serve import` reads), an imported bundle, or a bundle trained here. The towers, tokenizer, preprocessing and
logit scale come from it; no BPE is trained. The objective is the run's: `clip` continues contrastive training,
`xclip` / `nclip` add fresh cluster heads to the pretrained towers."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from core.bundle import load_bundle
from core.preprocess import PreprocessConfig
from core.tokenizer import TextTokenizer
from training.model import ClusterHeadConfig, ModelConfig, TextConfig, VisionConfig
from training.towers import load_pretrained_weights, transformers_model

log = logging.getLogger(__name__)
# a new head's missing weights are expected when the run's objective adds what the init lacks
NEW_PARTS = ("image_head.", "text_head.", "image_proj.", "text_proj.", "logit_scale")


ALL_PARTS = ("visual", "text", "image_proj", "text_proj", "logit_scale")


@dataclasses.dataclass
class InitSource:
    """A run's starting point: its architecture, tokenizer, preprocessing (None: the run's own) and how to load
    its weights; `pretrained_parts` names the model's children those weights fill (trained at a lower rate)."""

    model_config: ModelConfig
    tokenizer: TextTokenizer
    preprocess: PreprocessConfig | None
    load_weights: Callable[[nn.Module], None]
    description: str
    pretrained_parts: tuple[str, ...] = ALL_PARTS


def resolve_init(src: str | Path, objective: str, cluster_head: ClusterHeadConfig) -> InitSource:
    """The InitSource of checkpoint or bundle directory `src` for a run of `objective` (its cluster heads, when it
    has any, shaped by `cluster_head`)."""
    src = Path(src)
    if (src / "config.json").is_file() and str(_json(src / "config.json").get("format", "")).startswith(
            "xclip-bundle/"):
        return _from_bundle(src, objective, cluster_head)
    from training.pretrained import load_pretrained

    pretrained = load_pretrained(src)
    spec = {"format": pretrained.kind, "transformers_config": pretrained.model.config.to_dict()}
    config = pretrained_model_config(_name(src), objective, spec, pretrained.model, cluster_head)
    return InitSource(config, pretrained.tokenizer, pretrained.preprocess,
                      lambda model: load_pretrained_weights(model, pretrained.model),
                      f"{pretrained.kind} checkpoint {src}")


def pretrained_model_config(name: str, objective: str, spec: dict, reference: nn.Module,
                            cluster_head: ClusterHeadConfig) -> ModelConfig:
    """Our ModelConfig around a transformers model's towers: the shapes recorded for people and for checks."""
    vision, text = reference.config.vision_config, reference.config.text_config
    embed_dim = getattr(reference.config, "projection_dim", None) or text.projection_size
    return ModelConfig(
        name=name, objective=objective, embed_dim=embed_dim, pretrained=spec, cluster_head=cluster_head,
        vision=VisionConfig(image_size=vision.image_size, patch_size=vision.patch_size, width=vision.hidden_size,
                            layers=vision.num_hidden_layers, heads=vision.num_attention_heads,
                            mlp_ratio=vision.intermediate_size / vision.hidden_size),
        text=TextConfig(context_length=text.max_position_embeddings, vocab_size=text.vocab_size,
                        width=text.hidden_size, layers=text.num_hidden_layers, heads=text.num_attention_heads,
                        mlp_ratio=text.intermediate_size / text.hidden_size),
        init_logit_scale=float(reference.logit_scale.detach()))


def _from_bundle(src: Path, objective: str, cluster_head: ClusterHeadConfig) -> InitSource:
    """An imported bundle (its transformers model is in `extra.source`) or one trained here (`architecture`)."""
    bundle = load_bundle(src)
    weights = load_file(src / "model.safetensors")
    source = bundle.config.extra.get("source") or {}
    if bundle.config.architecture is None and "transformers_config" in source:
        spec = {"format": source["format"], "transformers_config": source["transformers_config"]}
        reference = transformers_model(spec)
        reference.load_state_dict(weights)
        config = pretrained_model_config(bundle.config.model_name, objective, spec, reference, cluster_head)
        return InitSource(config, bundle.tokenizer, bundle.preprocess,
                          lambda model: load_pretrained_weights(model, reference), f"imported bundle {src}")
    if bundle.config.architecture is None:
        raise ValueError(f"{src} records neither an architecture nor a transformers config; it cannot be "
                         "fine-tuned")
    trained = ModelConfig.from_dict(bundle.config.architecture)
    heads = trained.cluster_head if trained.has_clusters else cluster_head
    config = dataclasses.replace(trained, objective=objective, cluster_head=heads)
    return InitSource(config, bundle.tokenizer, bundle.preprocess, lambda model: _load_own(model, weights),
                      f"bundle {src}")


def _load_own(model: nn.Module, weights: dict) -> None:
    """A bundle trained here into a model of possibly another objective: what both have is loaded, what only the
    run's objective has starts fresh, and what only the bundle has is dropped (e.g. heads when going to clip)."""
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in weights]
    unexpected_new = [k for k in missing if not k.startswith(NEW_PARTS)]
    if unexpected_new:
        raise ValueError(f"the bundle's weights lack {unexpected_new[:5]}: not the same architecture")
    model.load_state_dict({k: v for k, v in weights.items() if k in wanted}, strict=False)
    if missing:
        log.info("init: %d tensors start fresh (%s...)", len(missing), missing[0])


def _name(src: Path) -> str:
    return src.resolve().name or "pretrained"


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- a sentence-transformers text tower ----------------------------------------------------------------------------
def resolve_text_tower(directory: str | Path, model_config: ModelConfig) -> InitSource:
    """`train --text-tower DIR`: a sentence-transformers / BERT checkpoint directory (`config.json`,
    `model.safetensors`, `tokenizer.json`, `1_Pooling/config.json`) as the text tower of `model_config`, its
    WordPiece tokenizer (fixed to the config's context length) as the run's; the image tower stays the config's."""
    from tokenizers import Tokenizer

    from core.tokenizer import fix_length

    directory = Path(directory)
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (directory / n).is_file()]
    if missing:
        raise ValueError(f"text tower {directory} lacks {', '.join(missing)} (a sentence-transformers directory "
                         "with safetensors weights is expected)")
    hf_config = _json(directory / "config.json")
    if hf_config.get("model_type") != "bert":
        raise ValueError(f"text tower {directory}: model_type {hf_config.get('model_type')!r} is not 'bert'")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    pad_token = (tokenizer.padding or {}).get("pad_token", "[PAD]")
    text_tokenizer = TextTokenizer(fix_length(tokenizer, model_config.text.context_length, pad_token))
    spec = {"format": "bert", "transformers_config": hf_config, "pooling": _pooling(directory),
            "pad_id": text_tokenizer.pad_id}
    text = TextConfig(context_length=model_config.text.context_length, vocab_size=hf_config["vocab_size"],
                      width=hf_config["hidden_size"], layers=hf_config["num_hidden_layers"],
                      heads=hf_config["num_attention_heads"],
                      mlp_ratio=hf_config["intermediate_size"] / hf_config["hidden_size"])
    config = dataclasses.replace(model_config, text=text, text_tower=spec)
    weights = _bert_weights(directory / "model.safetensors")
    return InitSource(config, text_tokenizer, None, lambda model: _load_text_tower(model, weights),
                      f"text tower {directory}", pretrained_parts=("text",))


def _pooling(directory: Path) -> str:
    """sentence-transformers' pooling mode (1_Pooling/config.json): mean (the default) or cls."""
    pooling = _json(directory / "1_Pooling" / "config.json")
    if pooling.get("pooling_mode_cls_token"):
        return "cls"
    if any(pooling.get(k) for k in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")):
        raise ValueError(f"{directory}/1_Pooling: only mean and cls pooling are supported")
    return "mean"


def _bert_weights(path: Path) -> dict:
    """The encoder's weights, without a `bert.` prefix or the pooler (pooling is the tower's own)."""
    weights = {k.removeprefix("bert."): v for k, v in load_file(path).items()}
    # position_ids: a buffer older transformers saved and newer ones rebuild
    return {k: v for k, v in weights.items() if not k.startswith("pooler.") and not k.endswith("position_ids")}


def _load_text_tower(model: nn.Module, weights: dict) -> None:
    missing, unexpected = model.text.encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"text tower weights do not fit its config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
