"""Import a pretrained checkpoint (training/pretrained.py) into a bundle, the same contract a trained model's
export writes, gated on parity twice: each ONNX encoder against its torch tower (random and real tensors, batched
against one by one), and end to end, from raw strings and image files through the bundle's own tokenizer,
preprocessing and ONNX Runtime, against the reference (transformers' processor + `get_*_features`, normalised).
A bundle that fails either is not written."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from core import __version__
from core.bundle import MODALITIES, BundleConfig, OnnxFiles, load_bundle
from core.manifest import write_manifest
from core.metrics import check_templates
from core.onnx_encoder import OnnxEncoder
from core.preprocess import load_image, preprocess_batch
from training.export import (
    INPUT_NAMES,
    ONNX_OPSET,
    PARITY_TOLERANCE,
    ExportParityError,
    check_parity,
    export_onnx,
    text_padding_report,
    write_bundle,
)
from training.pretrained import Pretrained, load_pretrained

log = logging.getLogger(__name__)
TEMPLATES = ("a photo of a {}.",)  # CLIP's own single prompt
# Parity texts: cases, punctuation, digits, unicode, runs of spaces and one longer than any context (truncation)
PARITY_TEXTS = (
    "a photo of a cat.", "A Photo Of A DOG!", "two red hearts, one blue star", "the fox's face; smiling?",
    "  lots   of   spaces  ", "café naïve résumé", "emoji 🦊 and 東京", "12 apples & 3 pears", "x",
    " ".join(["a very long caption about a small happy bird"] * 12),
)


class PretrainedTower(nn.Module):
    """One tower of a transformers CLIP/SigLIP model → its L2-normalised projected embedding, as served."""

    def __init__(self, model: nn.Module, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor]:
        if self.modality == "image":
            features = self.model.get_image_features(pixel_values=inputs)
        else:
            features = self.model.get_text_features(input_ids=inputs)
        return (F.normalize(_tensor(features), dim=-1),)


def _tensor(features) -> torch.Tensor:
    """transformers 5 returns a model output whose `pooler_output` is the projection; older ones a tensor."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def import_checkpoint(src: str | Path, out_dir: Path, name: str | None = None,
                      parity_images: Sequence[Path] = (), overwrite: bool = False,
                      templates: Sequence[str] | None = None) -> Path:
    """Write the bundle of checkpoint directory `src` to `out_dir`, with `templates` as its zero-shot prompts
    (default: CLIP's "a photo of a {}."); ExportParityError (nothing written) when its embeddings differ from the
    reference's by more than PARITY_TOLERANCE."""
    templates = check_templates(templates or TEMPLATES)
    src = Path(src)
    pretrained = load_pretrained(src)
    model_name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", src.resolve().name).strip("-") or pretrained.kind
    with tempfile.TemporaryDirectory() as scratch:
        images = [*parity_image_files(Path(scratch)), *photographs(), *map(Path, parity_images)]

        def fill(tmp: Path) -> None:
            report = {m: _export_tower(pretrained, m, tmp, images) for m in MODALITIES}
            report["text"]["padding"] = text_padding_report(
                PretrainedTower(pretrained.model, "text").eval(), tmp / "text_encoder.onnx",
                pretrained.tokenizer.encode(list(PARITY_TEXTS)), pretrained.tokenizer.eos_id)
            _write_files(pretrained, src, model_name, tmp, report, templates)
            write_manifest(tmp)
            report["end_to_end"] = end_to_end_parity(pretrained, tmp, images)
            _record_parity(tmp, report)

        return write_bundle(out_dir, fill, overwrite)


def _export_tower(pretrained: Pretrained, modality: str, tmp: Path, images: list[Path]) -> dict:
    """Export one tower to ONNX and check it against torch on random and real tensors."""
    tower = PretrainedTower(pretrained.model, modality).eval()
    inputs = _tensor_inputs(pretrained, modality, images)
    path = tmp / f"{modality}_encoder.onnx"
    export_onnx(tower, torch.from_numpy(inputs["random"][:2]), path, ["embedding"])
    return check_parity(tower, path, inputs, ["embedding"])


def _tensor_inputs(pretrained: Pretrained, modality: str, images: list[Path], seed: int = 0) -> dict:
    """Random and real encoder inputs (pixels or ids) for the tower parity check."""
    rng = np.random.default_rng(seed)
    if modality == "image":
        size = pretrained.preprocess.image_size
        real = preprocess_batch([load_image(p) for p in images], pretrained.preprocess)
        return {"random": rng.standard_normal((4, 3, size, size)).astype(np.float32), "real": real}
    tokenizer = pretrained.tokenizer
    random_ids = rng.integers(0, tokenizer.vocab_size, (4, tokenizer.context_length))
    ends = rng.integers(1, tokenizer.context_length, 4)
    for row, end in enumerate(ends):  # a text ends with its end token; padding follows
        random_ids[row, end:] = tokenizer.pad_id
        random_ids[row, end - 1] = tokenizer.eos_id
    return {"random": np.minimum(random_ids, pretrained.model.config.text_config.vocab_size - 1).astype(np.int64),
            "real": tokenizer.encode(list(PARITY_TEXTS))}


@torch.no_grad()
def end_to_end_parity(pretrained: Pretrained, bundle_dir: Path, images: list[Path]) -> dict:
    """Max abs difference between the bundle (its tokenizer, preprocessing and ONNX encoders, from raw strings and
    image files) and the reference (the checkpoint's processor and transformers model, normalised); raises
    ExportParityError beyond PARITY_TOLERANCE."""
    from transformers.image_utils import load_image as reference_load

    encoder = OnnxEncoder(load_bundle(bundle_dir), providers="cpu")
    texts = list(PARITY_TEXTS)
    reference_texts = _tensor(pretrained.model.get_text_features(**pretrained.reference_text(texts)))
    pixels = pretrained.reference_images([reference_load(str(p)) for p in images])
    reference_images = _tensor(pretrained.model.get_image_features(pixel_values=pixels))
    report = {
        "text_vs_reference": _max_diff(encoder.encode_texts(texts)["embedding"], reference_texts),
        "image_vs_reference": _max_diff(encoder.encode_images([load_image(p) for p in images])["embedding"],
                                        reference_images),
        "texts": len(texts), "images": len(images),
    }
    worst = max(report["text_vs_reference"], report["image_vs_reference"])
    report["passed"] = worst <= PARITY_TOLERANCE
    if not report["passed"]:
        raise ExportParityError(f"the bundle's embeddings differ from the reference's by {worst:.2e} "
                                f"(> {PARITY_TOLERANCE:.0e}): {report}")
    return report


def _max_diff(ours: np.ndarray, reference: torch.Tensor) -> float:
    return float(np.abs(ours - F.normalize(reference, dim=-1).numpy()).max())


def _write_files(pretrained: Pretrained, src: Path, model_name: str, tmp: Path, report: dict,
                 templates: tuple[str, ...]) -> None:
    """config.json, the weights, tokenizer, preprocessing and (empty) label sets."""
    config = BundleConfig(
        model_name=model_name, objective="clip", embed_dim=pretrained.embed_dim, num_clusters=0,
        logit_scale=pretrained.logit_scale, logit_bias=pretrained.logit_bias,
        onnx=OnnxFiles(inputs=INPUT_NAMES, outputs=("embedding",), opset=ONNX_OPSET,
                       text_padding="longest" if report["text"]["padding"]["passed"] else "fixed"),
        templates=templates,
        extra={"version": __version__, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
               # with model.safetensors, enough to rebuild the transformers model (fine-tuning from a bundle)
               "source": {"format": pretrained.kind, "directory": src.resolve().name,
                          "model_type": pretrained.model.config.model_type,
                          "transformers_config": pretrained.model.config.to_dict()},
               "parity": report})
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    state = {k: v.detach().contiguous() for k, v in pretrained.model.state_dict().items()}
    save_file(state, tmp / "model.safetensors")
    pretrained.tokenizer.save(tmp / "tokenizer.json")
    pretrained.preprocess.save(tmp / "preprocess.json")
    (tmp / "label_sets.json").write_text("{}")


def _record_parity(tmp: Path, report: dict) -> None:
    """Put the finished parity report into config.json (and the manifest over it)."""
    config = json.loads((tmp / "config.json").read_text())
    config["parity"] = report
    (tmp / "config.json").write_text(json.dumps(config, indent=1))


# -- parity images -----------------------------------------------------------------------------------------------
def photographs() -> list[Path]:
    """Real photographs available offline: matplotlib's sample photo (Grace Hopper, JPEG), shipped with the train
    extra; none when matplotlib is absent."""
    try:
        from matplotlib import cbook
    except ImportError:
        return []
    return [Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))]


SYNTHETIC_SIZES = ((640, 480), (333, 517), (224, 224), (97, 61), (1000, 750))


def parity_image_files(directory: Path, seed: int = 0) -> list[Path]:
    """Image files of several sizes and aspect ratios (noise, gradients and shapes, as JPEG and PNG) written to
    `directory`: the raw files the end-to-end check decodes with both implementations."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (width, height) in enumerate(SYNTHETIC_SIZES):
        yy, xx = np.mgrid[0:height, 0:width]
        smooth = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], -1)
        noise = rng.integers(0, 256, (height, width, 3))
        pixels = np.where(((xx // 40 + yy // 40) % 2 == 0)[..., None], smooth, (smooth + noise) // 2).astype(np.uint8)
        path = directory / f"parity_{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(pixels).save(path, quality=90) if i % 2 else Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
