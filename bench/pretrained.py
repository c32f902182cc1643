"""Imported pretrained shapes on this CPU: a CLIP ViT-B/32 and a SigLIP base/16 built from their published configs
(random weights), imported with `xclip-serve import`'s code path (parity figures included), then ONNX Runtime vs
transformers torch eager, and INT8 vs fp32, at batch 1 and 32, images and texts, side by side in one run.
Writes the `pretrained` section of docs/BENCHMARKS.md.

    python bench/pretrained.py                  # both models (~15 min on 2 cores)
    python bench/pretrained.py --models b32 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.report import markdown_table, write_section
from core.bundle import load_bundle
from core.onnx_encoder import OnnxEncoder
from core.tokenizer import trim_to_longest
from training.importer import PretrainedTower, import_checkpoint
from training.quantize import OP_TYPES, embedding_agreement, prepare_for_quantisation, quantize_encoder
from training.random_checkpoints import save_clip, save_siglip

MODELS = {"b32": ("CLIP ViT-B/32", save_clip), "siglip-base": ("SigLIP base/16-224", save_siglip)}
BATCHES = (1, 32)


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls after one warm-up."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def inputs_for(bundle, modality: str, batch: int, seed: int = 0) -> np.ndarray:
    """A batch of encoder inputs: noise pixels, or token ids of texts of the usual caption length."""
    rng = np.random.default_rng(seed)
    if modality == "image":
        size = bundle.preprocess.image_size
        return rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    words = ["a", "photo", "of", "the", "small", "red", "fox", "sitting", "on", "green", "grass"]
    texts = [" ".join(rng.choice(words, 10)) for _ in range(batch)]
    return bundle.tokenizer.encode(texts)


def measure(kind: str, root: Path, repeats: int) -> tuple[list[list[str]], dict]:
    """Rows of the throughput table and the parity / INT8 figures of one model shape."""
    src = MODELS[kind][1](root / kind, shape=kind)
    bundle_dir = import_checkpoint(src, root / f"{kind}-bundle")
    bundle = load_bundle(bundle_dir)
    for modality in ("image", "text"):
        quantize_encoder(bundle.onnx_path(modality), bundle_dir / bundle.config.onnx.file(modality, "int8"))
    from training.pretrained import load_pretrained

    model = load_pretrained(src).model
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    encoders = {v: OnnxEncoder(bundle, providers="cpu", variant=v, intra_op_threads=threads)
                for v in ("fp32", "int8")}
    rows = []
    for modality in ("image", "text"):
        tower = PretrainedTower(model, modality).eval()
        for batch in BATCHES:
            x = inputs_for(bundle, modality, batch)
            # torch gets what transformers' processor gives: CLIP's texts padded to the longest (padding=True),
            # SigLIP's to its context (padding="max_length", as it was trained)
            cut = modality == "text" and bundle.config.onnx.text_padding == "longest"
            reference_x = trim_to_longest(x, bundle.tokenizer.eos_id) if cut else x
            with torch.no_grad():
                torch_s = best_seconds(lambda x=reference_x, tower=tower: tower(torch.from_numpy(x)), repeats)
            ort_s, int8_s = (best_seconds(lambda e=encoders[v], x=x, m=modality: e.run(m, x), repeats)
                             for v in ("fp32", "int8"))
            full = "–"
            if modality == "text":  # the same encoder fed the full context, as bundles before text_padding
                session = encoders["fp32"].sessions["text"]
                full = f"{batch / best_seconds(lambda s=session, x=x: s.run(None, {'input_ids': x}), repeats):.1f}"
            rows.append([MODELS[kind][0], modality, str(batch), f"{batch / torch_s:.1f}", full,
                         f"{batch / ort_s:.1f}", f"{torch_s / ort_s:.2f}×", f"{batch / int8_s:.1f}",
                         f"{ort_s / int8_s:.2f}×"])
            print(" | ".join(rows[-1]), flush=True)
    agreement = embedding_agreement(bundle, {m: inputs_for(bundle, m, 32, seed=1) for m in ("image", "text")})
    quant = quantisation_rows(MODELS[kind][0], bundle, root, repeats)
    return rows, {"parity": bundle.config.extra["parity"], "int8": agreement, "quantisation": quant}


# dynamic-quantisation settings compared on the image encoder: ours (training/quantize.py) and the signed-weight
# kernels with 7-bit weights (reduce_range), which avoid the U8S8 saturation on CPUs without VNNI
QUANT_VARIANTS = {"U8U8 (ours)": {"weight_type": "QUInt8"},
                  "U8S8, per channel, reduce_range": {"weight_type": "QInt8", "per_channel": True,
                                                      "reduce_range": True}}


def quantisation_rows(name: str, bundle, root: Path, repeats: int) -> list[list[str]]:
    """Image encoder at batch 32: throughput and cosine to fp32 of each QUANT_VARIANTS setting."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared = prepare_for_quantisation(bundle.onnx_path("image"), root)
    x = inputs_for(bundle, "image", 32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    fp32 = ort.InferenceSession(str(bundle.onnx_path("image")), options, providers=["CPUExecutionProvider"])
    reference = fp32.run(None, {"pixel_values": x})[0]
    fp32_s = best_seconds(lambda: fp32.run(None, {"pixel_values": x}), repeats)
    rows = []
    for label, settings in QUANT_VARIANTS.items():
        path = root / "variant.onnx"
        quantize_dynamic(prepared, path, op_types_to_quantize=OP_TYPES,
                         **{**settings, "weight_type": QuantType[settings["weight_type"]]})
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        cosine = np.sum(session.run(None, {"pixel_values": x})[0] * reference, axis=1)
        seconds = best_seconds(lambda s=session: s.run(None, {"pixel_values": x}), repeats)
        rows.append([name, label, f"{32 / seconds:.1f}", f"{fp32_s / seconds:.2f}×", f"{cosine.mean():.4f}",
                     f"{cosine.min():.4f}"])
    return rows


def figures(name: str, extra: dict) -> str:
    """One line of parity and INT8 agreement figures."""
    parity, int8 = extra["parity"], extra["int8"]["cosine"]
    return (f"- {name}: ONNX vs torch max |Δ| image {parity['image']['real_vs_torch']:.1e} / text "
            f"{parity['text']['real_vs_torch']:.1e}; bundle from raw files and strings vs transformers' own "
            f"processor + model: image {parity['end_to_end']['image_vs_reference']:.1e}, text "
            f"{parity['end_to_end']['text_vs_reference']:.1e}; batched vs one by one "
            f"{max(parity['image']['real_batched_vs_single'], parity['text']['real_batched_vs_single']):.1e}; "
            f"INT8 cosine to fp32 (mean / min) image {int8['image']['mean']:.4f} / {int8['image']['min']:.4f}, "
            f"text {int8['text']['mean']:.4f} / {int8['text']['min']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/BENCHMARKS.md alone.")
    args = parser.parse_args()
    rows, lines, quant = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for kind in args.models:
            model_rows, extra = measure(kind, Path(scratch), args.repeats)
            rows += model_rows
            quant += extra["quantisation"]
            lines.append(figures(MODELS[kind][0], extra))
    table = markdown_table(["model", "input", "batch", "torch eager /s", "ORT fp32, full context /s",
                            "ORT fp32 /s", "ORT ÷ torch", "ORT INT8 /s", "INT8 ÷ fp32"], rows)
    body = (f"Random weights in the published shapes, imported by `xclip-serve import`'s code path; items per "
            f"second, best of {args.repeats}, {os.cpu_count()} threads for both runtimes; texts are 10 words, "
            f"served as the bundle says (`text_padding`: CLIP's cut to the batch's longest text, SigLIP's padded "
            f"to its context of 64), torch given them padded to the longest as transformers' processor does with "
            f"padding=True; \"full context\": the same ONNX encoder fed all 77 / 64 positions.\n\n{table}\n\n" + "\n".join(lines) + "\n\n"
            "Dynamic INT8 settings on the image encoder, batch 32 (speed-up over fp32 in the same run):\n\n"
            + markdown_table(["model", "weights", "images/s", "÷ fp32", "mean cosine", "min cosine"], quant)
            + "\n")
    print(body)
    if not args.no_write:
        write_section("pretrained", "Pretrained shapes: ONNX Runtime vs torch, INT8 (CPU)", body)


if __name__ == "__main__":
    main()
