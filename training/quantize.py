"""Reduced-precision twins of a bundle's encoders: dynamic INT8 for CPUs (`*_encoder.int8.onnx`) and fp16 for GPUs
(`*_encoder.fp16.onnx`, fp32 inputs/outputs), each with a fidelity report against fp32 (embedding cosines,
zero-shot accuracy change, file sizes) stored under its name in config.json."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from itertools import islice
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from core import data as datasets
from core.bundle import MODALITIES, Bundle, BundleConfig, load_bundle
from core.manifest import write_manifest
from core.metrics import DEFAULT_TEMPLATES
from core.onnx_encoder import OnnxEncoder
from core.preprocess import normalize, preprocess_batch

log = logging.getLogger(__name__)
# Activations are always uint8 in dynamic quantisation. uint8 weights (U8U8) avoid the saturation of the
# U8S8 kernels on AVX2 CPUs without VNNI, and measured at least as close to fp32 as QInt8 on the tiny model.
WEIGHT_TYPE = QuantType.QUInt8
OP_TYPES = ["MatMul", "Gemm"]
MAX_INPUTS = 64
HELD_OUT_SPLITS = ("test", "val")


def fp16_encoder(fp32_path: Path, fp16_path: Path) -> None:
    """fp16 weights and activations for GPU execution providers; inputs and outputs stay float32, so callers
    and the service's preprocessing do not change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True), str(fp16_path))


def quantize_encoder(fp32_path: Path, int8_path: Path) -> None:
    """Shape-infer and fold the fp32 graph (ORT's recommended pre-processing), then quantise MatMul/Gemm."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_for_quantisation(fp32_path, Path(tmp))
        quantize_dynamic(prepared, Path(int8_path).resolve(), weight_type=WEIGHT_TYPE, op_types_to_quantize=OP_TYPES)


def prepare_for_quantisation(fp32_path: Path, scratch: Path) -> Path:
    """ORT's recommended pre-processing (shape inference and folding) of an fp32 graph, written into `scratch`.
    Its symbolic shape inference gives up on some graphs (SigLIP's pooling head, a dynamic sequence axis): then
    ONNX shape inference alone. It runs inside `scratch`, where a failing inference leaves its temporary files."""
    fp32_path, prepared = Path(fp32_path).resolve(), Path(scratch).resolve() / "prepared.onnx"
    with contextlib.chdir(scratch):
        try:
            quant_pre_process(str(fp32_path), str(prepared))
        except Exception:  # noqa: BLE001 (it raises bare Exception and AssertionError)
            log.info("symbolic shape inference failed on %s; pre-processing with ONNX shape inference only",
                     fp32_path.name)
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    return prepared


CONVERTERS = {"int8": quantize_encoder, "fp16": fp16_encoder}


def add_int8_variant(bundle_dir: Path, data: str | None) -> dict:
    """Write both INT8 encoders into the bundle, measure them against fp32, record the report in config.json."""
    return add_variant(bundle_dir, data, "int8")


def add_fp16_variant(bundle_dir: Path, data: str | None) -> dict:
    """Write both fp16 encoders (for GPUs) into the bundle, measured against fp32 like INT8."""
    return add_variant(bundle_dir, data, "fp16")


def add_variant(bundle_dir: Path, data: str | None, variant: str) -> dict:
    """Write both encoders of `variant`, measure them against fp32 (on CPU), record the report in config.json."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)  # verify before touching it
    try:
        for modality in MODALITIES:
            CONVERTERS[variant](bundle.onnx_path(modality), bundle_dir / bundle.config.onnx.file(modality, variant))
        write_manifest(bundle_dir)  # evaluate_bundle verifies the bundle, the new files included
        report = variant_report(bundle, data, variant)
    except BaseException:
        _remove_variant(bundle_dir, bundle.config, variant)
        raise
    _store_report(bundle_dir, report, variant)
    log.info("%s encoders added to %s: %s", variant, bundle_dir, report["cosine"])
    return report


def variant_report(bundle: Bundle, data: str | None, variant: str) -> dict:
    """Cosines of `variant` vs fp32 embeddings, file sizes and (with labelled `data`) the zero-shot top-1 change."""
    source, inputs = measurement_inputs(bundle, data)
    report = {
        **({"weight_type": WEIGHT_TYPE.name, "op_types": OP_TYPES} if variant == "int8" else {}),
        "files": {m: bundle.config.onnx.file(m, variant) for m in MODALITIES},
        "bytes": {m: {v: bundle.onnx_path(m, v).stat().st_size for v in ("fp32", variant)} for m in MODALITIES},
        "inputs": {"source": source, **{m: len(x) for m, x in inputs.items()}},
        **embedding_agreement(bundle, inputs, variant),
    }
    if data:
        report["zeroshot_top1"] = zeroshot_change(bundle.path, data, held_out_split(data), variant)
    return report


def held_out_split(data: str) -> str | None:
    """The test split, else the val split, else None (all of the data)."""
    present = datasets.splits_present(data)
    return next((split for split in HELD_OUT_SPLITS if split in present), None)


def measurement_inputs(bundle: Bundle, data: str | None, seed: int = 0) -> tuple[str, dict[str, np.ndarray]]:
    """(source, inputs): held-out images and captions of `data`, else noise images and label-set prompts."""
    if data:
        split = held_out_split(data)
        samples = list(islice(datasets.iter_samples(data, split=split), MAX_INPUTS))
        texts = [text for s in samples for text in s.texts][:MAX_INPUTS]
        pixels = preprocess_batch([s.image for s in samples], bundle.preprocess)
        return f"data:{split or 'all'}", {"image": pixels, "text": bundle.tokenizer.encode(texts)}
    size = bundle.preprocess.image_size
    noise = np.random.default_rng(seed).integers(0, 256, (MAX_INPUTS, size, size, 3), dtype=np.uint8)
    prompts = [t.format(label) for labels in bundle.label_sets.values() for label in labels
               for t in DEFAULT_TEMPLATES][:MAX_INPUTS] or ["a photo"]
    return "random", {"image": normalize(noise, bundle.preprocess), "text": bundle.tokenizer.encode(prompts)}


def embedding_agreement(bundle: Bundle, inputs: dict[str, np.ndarray], variant: str = "int8") -> dict:
    """Per modality: mean/min cosine of `variant` vs fp32 embeddings, and cluster argmax agreement if clustered."""
    encoders = {v: OnnxEncoder(bundle, providers="cpu", variant=v) for v in ("fp32", variant)}
    cosine, clusters = {}, {}
    for modality, x in inputs.items():
        fp32, int8 = (encoders[v].postprocess(encoders[v].run(modality, x)) for v in ("fp32", variant))
        cos = np.sum(fp32["embedding"] * int8["embedding"], axis=1)  # rows are unit-norm after postprocess
        cosine[modality] = {"mean": float(cos.mean()), "min": float(cos.min())}
        if "cluster_probs" in fp32:
            same = fp32["cluster_probs"].argmax(1) == int8["cluster_probs"].argmax(1)
            clusters[modality] = float(same.mean())
    return {"cosine": cosine, **({"cluster_argmax_agreement": clusters} if clusters else {})}


def zeroshot_change(bundle_dir: Path, data: str, split: str | None, variant: str = "int8") -> dict:
    """`zeroshot/<set>/top1` of fp32 and `variant` through `eval --bundle`'s routine, and their difference."""
    from training.bundle_eval import evaluate_bundle

    split = split or "test"  # evaluate_bundle reads all of the data when the split is absent
    fp32, low = (evaluate_bundle(bundle_dir, data, split=split, variant=v) for v in ("fp32", variant))
    keys = sorted(k for k in fp32 if k.startswith("zeroshot/") and k.endswith("/top1"))
    return {k: {"fp32": fp32[k], variant: low[k], "delta": low[k] - fp32[k]} for k in keys}


def _store_report(bundle_dir: Path, report: dict, variant: str = "int8") -> None:
    """config.json gets the report under the variant's name; the manifest is rewritten so the bundle verifies."""
    config = _read_config(bundle_dir)
    _write_config(bundle_dir, dataclasses.replace(config, extra={**config.extra, variant: report}))
    write_manifest(bundle_dir)


def _remove_variant(bundle_dir: Path, config: BundleConfig, variant: str) -> None:
    """Undo a failed run: drop the variant's files and any old report, leaving a verifying fp32 bundle."""
    for modality in MODALITIES:
        (bundle_dir / config.onnx.file(modality, variant)).unlink(missing_ok=True)
    if variant in config.extra:
        extra = {k: v for k, v in config.extra.items() if k != variant}
        _write_config(bundle_dir, dataclasses.replace(config, extra=extra))
    write_manifest(bundle_dir)


def _read_config(bundle_dir: Path) -> BundleConfig:
    return BundleConfig.from_dict(json.loads((bundle_dir / "config.json").read_text()))


def _write_config(bundle_dir: Path, config: BundleConfig) -> None:
    (bundle_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
