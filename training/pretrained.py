"""Read the pretrained checkpoints people download: a transformers CLIP or SigLIP directory, or OpenCLIP as the hub
ships it. Each becomes a `Pretrained`: the torch reference model, the bundle's own tokenizer and preprocessing
built from the checkpoint's files, and the checkpoint's own processor as the reference to check them against.

Weights are read from safetensors only; pickled checkpoints (`.bin`, `.pt`, ...) are refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import string
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, normalizers, processors

from core.preprocess import PreprocessConfig
from core.tokenizer import TextTokenizer, fix_length

logger = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a checkpoint is a local directory: never reach for the hub

FORMATS = {
    "clip": "transformers CLIPModel: config.json (model_type 'clip'), model.safetensors, tokenizer.json or "
            "vocab.json + merges.txt, preprocessor_config.json",
    "siglip": "transformers SiglipModel: config.json (model_type 'siglip'), model.safetensors, tokenizer.json or "
              "spiece.model, preprocessor_config.json",
    "open_clip": "OpenCLIP: open_clip_config.json, open_clip_model.safetensors, tokenizer.json or vocab.json + "
                 "merges.txt",
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TO_SAFETENSORS = (
    "convert it once, where you trust the file, with: python -c \"import torch; from safetensors.torch import "
    "save_file; save_file(torch.load('{name}', weights_only=True), '{target}')\" (a transformers directory: "
    "CLIPModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True))"
)


class CheckpointError(ValueError):
    """The directory is not a checkpoint this importer reads (the message says what it expected)."""


@dataclasses.dataclass
class Pretrained:
    """A checkpoint ready to export: the reference model, the bundle's tokenizer and preprocessing, and the
    reference's own text and image processors (inputs → tensors of the model)."""

    kind: str  # "clip" | "siglip" | "open_clip"
    model: torch.nn.Module  # transformers CLIPModel or SiglipModel, fp32, eval
    tokenizer: TextTokenizer
    preprocess: PreprocessConfig
    reference_text: Callable[[list[str]], dict[str, torch.Tensor]]
    reference_images: Callable[[list[Image.Image]], torch.Tensor]
    logit_scale: float
    logit_bias: float | None

    @property
    def embed_dim(self) -> int:
        config = self.model.config
        return int(getattr(config, "projection_dim", None) or config.text_config.projection_size)


def detect_format(src: Path) -> str:
    """The checkpoint format of directory `src`; CheckpointError naming the files expected when it is none."""
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory; expected a checkpoint directory")
    names = {p.name for p in src.iterdir()}
    hf_weights = "model.safetensors" in names or "model.safetensors.index.json" in names
    if "config.json" in names and hf_weights:
        model_type = _read_json(src / "config.json").get("model_type")
        if model_type in ("clip", "siglip"):
            return model_type
        if "open_clip_model.safetensors" not in names:
            raise CheckpointError(f"{src}/config.json has model_type {model_type!r}; the importer reads "
                                  "'clip' and 'siglip' (and OpenCLIP directories)")
    if "open_clip_config.json" in names and "open_clip_model.safetensors" in names:
        return "open_clip"
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        target = "open_clip_model.safetensors" if "open_clip_config.json" in names else "model.safetensors"
        raise CheckpointError(f"{src} holds pickled weights ({', '.join(pickles)}), which are never loaded "
                              "(unpickling runs arbitrary code); " + TO_SAFETENSORS.format(name=pickles[0],
                                                                                           target=target))
    expected = "; ".join(f"{kind}: {files}" for kind, files in FORMATS.items())
    raise CheckpointError(f"{src} is not a checkpoint directory this importer reads. Expected one of: {expected}")


def load_pretrained(src: str | Path) -> Pretrained:
    """Read checkpoint directory `src` in whichever supported format it is."""
    src = Path(src)
    kind = detect_format(src)
    logger.info("reading %s checkpoint %s", kind, src)
    return {"clip": _load_hf_clip, "siglip": _load_siglip, "open_clip": _load_open_clip}[kind](src)


# -- transformers CLIP ------------------------------------------------------------------------------------------
def _load_hf_clip(src: Path) -> Pretrained:
    from transformers import AutoImageProcessor, CLIPModel

    model = _from_pretrained(CLIPModel, src)
    processor = AutoImageProcessor.from_pretrained(src, local_files_only=True)
    return _clip_like("clip", model, _hf_text_tokenizer(src), _preprocess_of(processor), processor)


def _load_open_clip(src: Path) -> Pretrained:
    from transformers import CLIPImageProcessor, CLIPModel

    from training.open_clip_weights import read_open_clip

    config, state, preprocess_cfg = read_open_clip(src)
    model = CLIPModel(config)
    model.load_state_dict(state, strict=True)
    preprocess = _open_clip_preprocess(preprocess_cfg, config.vision_config.image_size)
    processor = CLIPImageProcessor(
        do_center_crop=preprocess.resize_mode == "resize_center_crop",
        size=({"shortest_edge": preprocess.image_size} if preprocess.resize_mode == "resize_center_crop"
              else {"height": preprocess.image_size, "width": preprocess.image_size}),
        crop_size={"height": preprocess.image_size, "width": preprocess.image_size},
        resample=Image.Resampling[preprocess.interpolation.upper()], image_mean=list(preprocess.mean),
        image_std=list(preprocess.std))
    return _clip_like("open_clip", model.eval(), _hf_text_tokenizer(src), preprocess, processor)


def _clip_like(kind: str, model, hf_tokenizer, preprocess: PreprocessConfig, image_processor) -> Pretrained:
    """A CLIP-architecture checkpoint: softmax zero-shot with its logit scale, no bias."""
    context = model.config.text_config.max_position_embeddings
    bundle_tokenizer = TextTokenizer(fix_length(_backend_copy(hf_tokenizer), context, hf_tokenizer.pad_token))
    return Pretrained(
        kind=kind, model=model, tokenizer=bundle_tokenizer, preprocess=preprocess,
        # the way its model card calls it: padded to the longest, with the attention mask
        reference_text=lambda texts: dict(hf_tokenizer(texts, padding=True, truncation=True, max_length=context,
                                                        return_tensors="pt")),
        reference_images=lambda images: image_processor(images=images, return_tensors="pt")["pixel_values"],
        logit_scale=float(model.logit_scale.detach().exp()), logit_bias=None)


# -- transformers SigLIP ----------------------------------------------------------------------------------------
def _load_siglip(src: Path) -> Pretrained:
    from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

    model = _from_pretrained(SiglipModel, src)
    processor = AutoImageProcessor.from_pretrained(src, local_files_only=True)
    hf_tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    context = model.config.text_config.max_position_embeddings
    backend = (_backend_copy(hf_tokenizer) if hasattr(hf_tokenizer, "backend_tokenizer")
               else siglip_tokenizer(Path(hf_tokenizer.vocab_file), hf_tokenizer))
    return Pretrained(
        kind="siglip", model=model, tokenizer=TextTokenizer(fix_length(backend, context, hf_tokenizer.pad_token)),
        preprocess=_preprocess_of(processor),
        # SigLIP was trained on texts padded to the full context and attending to the padding (big_vision; its
        # model card pads to max_length "as that's how the model was trained"): ids only, no attention mask,
        # which transformers 5's tokenizer would add
        reference_text=lambda texts: {"input_ids": hf_tokenizer(texts, padding="max_length", truncation=True,
                                                                max_length=context, return_tensors="pt").input_ids},
        reference_images=lambda images: processor(images=images, return_tensors="pt")["pixel_values"],
        logit_scale=float(model.logit_scale.detach().exp()), logit_bias=float(model.logit_bias.detach()))


def siglip_tokenizer(spiece_model: Path, slow) -> Tokenizer:
    """SiglipTokenizer (SentencePiece, in Python) as one `tokenizers` pipeline: its text canonicalisation
    (lower case, punctuation removed, whitespace collapsed; big_vision's prompt engineering) in front of the
    SentencePiece model, then `$A </s>`. The import's parity check compares the two on every parity text. One
    known difference: after a special token typed inside a text ("</s> after"), SiglipTokenizer starts the next
    word without a word-start marker and this pipeline with one."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spiece_model.read_bytes())
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, [(p.piece, p.score) for p in proto.pieces])
    canonical = [normalizers.Lowercase()] if getattr(slow, "do_lower_case", True) else []
    canonical += [normalizers.Replace(Regex("[" + re.escape(string.punctuation) + "]"), ""),
                  normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    tokenizer.normalizer = normalizers.Sequence([*canonical, tokenizer.normalizer])
    eos = slow.eos_token
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {eos}",
                                                             special_tokens=[(eos, slow.eos_token_id)])
    tokenizer.add_special_tokens([str(t) for t in slow.all_special_tokens])
    return tokenizer


# -- shared ------------------------------------------------------------------------------------------------------
def _from_pretrained(model_class, src: Path):
    """A transformers model from `src`'s safetensors (never a pickle), fp32, eager attention (exports cleanly)."""
    return model_class.from_pretrained(src, use_safetensors=True, local_files_only=True, dtype=torch.float32,
                                       attn_implementation="eager").eval()


def _hf_text_tokenizer(src: Path):
    """The directory's CLIP tokenizer: tokenizer.json, or vocab.json + merges.txt."""
    from transformers import CLIPTokenizer

    files = {p.name for p in src.iterdir()}
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        raise CheckpointError(f"{src} has no tokenizer: expected tokenizer.json or vocab.json + merges.txt")
    return CLIPTokenizer.from_pretrained(src, local_files_only=True)


def _backend_copy(hf_tokenizer) -> Tokenizer:
    """An independent copy of a transformers tokenizer's `tokenizers` pipeline (fixing its length must not change
    the reference's)."""
    return Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())


def _preprocess_of(processor) -> PreprocessConfig:
    """The bundle's preprocessing equal to a transformers image processor's (CLIPImageProcessor,
    SiglipImageProcessor); CheckpointError for settings it cannot express."""
    size, crop = dict(processor.size or {}), dict(getattr(processor, "crop_size", None) or {})
    if not processor.do_resize or not processor.do_normalize or not processor.do_rescale:
        raise CheckpointError("the image processor must resize, rescale and normalise")
    if not np.isclose(processor.rescale_factor, 1 / 255):
        raise CheckpointError(f"rescale_factor {processor.rescale_factor} is not 1/255")
    common = {"mean": tuple(processor.image_mean), "std": tuple(processor.image_std), "reducing_gap": None,
              "interpolation": Image.Resampling(int(processor.resample)).name.lower()}
    if getattr(processor, "do_center_crop", False) and size.get("shortest_edge"):
        if crop.get("height") != crop.get("width"):
            raise CheckpointError(f"crop_size {crop} is not square")
        return PreprocessConfig(image_size=crop["height"], resize_mode="resize_center_crop",
                                resize_size=size["shortest_edge"], **common)
    if size.get("height") and size.get("height") == size.get("width") and not getattr(processor, "do_center_crop",
                                                                                        False):
        return PreprocessConfig(image_size=size["height"], resize_mode="squash", **common)
    raise CheckpointError(f"image processor size {size} / crop {crop} is neither a square resize nor a "
                          "shortest-edge resize with a square centre crop")


def _open_clip_preprocess(cfg: dict, image_size: int) -> PreprocessConfig:
    """OpenCLIP's preprocess_cfg (defaults filled by `read_open_clip`) as our preprocessing: 'shortest' is
    Resize + CenterCrop, 'squash' a plain resize."""
    modes = {"shortest": "resize_center_crop", "squash": "squash"}
    if cfg["resize_mode"] not in modes:
        raise CheckpointError(f"open_clip_config.json preprocess_cfg resize_mode {cfg['resize_mode']!r} is not "
                              f"supported (supported: {sorted(modes)})")
    return PreprocessConfig(image_size=image_size, resize_mode=modes[cfg["resize_mode"]], mean=tuple(cfg["mean"]),
                            std=tuple(cfg["std"]), interpolation=cfg["interpolation"], reducing_gap=None)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data
