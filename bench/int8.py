"""INT8 (dynamic quantisation) vs fp32 encoders of one bundle: cosine to fp32, zero-shot change, file size and
ONNX Runtime throughput side by side. Writes the `int8` section of docs/BENCHMARKS.md.

    python bench/int8.py --bundle runs/bench-objectives/xclip-s0-bundle --data .cache/data/emoji-16.0.0
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.report import markdown_table, write_section
from core.bundle import load_bundle
from core.onnx_encoder import OnnxEncoder
from training.quantize import add_int8_variant


def items_per_second(encoder: OnnxEncoder, modality: str, inputs: np.ndarray, repeats: int = 5) -> float:
    """ONNX Runtime throughput of one batch, best of `repeats`."""
    encoder.run(modality, inputs)
    best = min(_timed(encoder, modality, inputs) for _ in range(repeats))
    return len(inputs) / best


def _timed(encoder: OnnxEncoder, modality: str, inputs: np.ndarray) -> float:
    start = time.perf_counter()
    encoder.run(modality, inputs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp()) / args.bundle.name
    shutil.copytree(args.bundle, work)  # the measured bundle itself stays as it was
    report = add_int8_variant(work, args.data)
    bundle = load_bundle(work)
    rng = np.random.default_rng(0)
    size = bundle.preprocess.image_size
    inputs = {"image": rng.standard_normal((args.batch, 3, size, size)).astype(np.float32),
              "text": bundle.tokenizer.encode(["a smiling face with heart eyes emoji"] * args.batch)}
    encoders = {v: OnnxEncoder(bundle, providers="cpu", variant=v) for v in ("fp32", "int8")}
    rows = []
    for modality in ("image", "text"):
        rates = {v: items_per_second(e, modality, inputs[modality]) for v, e in encoders.items()}
        size_mb = {v: report["bytes"][modality][v] / 1e6 for v in ("fp32", "int8")}
        rows.append([modality, f"{report['cosine'][modality]['mean']:.4f}", f"{report['cosine'][modality]['min']:.4f}",
                     f"{size_mb['fp32']:.1f} → {size_mb['int8']:.1f}", f"{rates['fp32']:.0f}", f"{rates['int8']:.0f}",
                     f"{rates['int8'] / rates['fp32']:.2f}"])
    zs = [[k, f"{100 * v['fp32']:.1f}", f"{100 * v['int8']:.1f}", f"{100 * v['delta']:+.1f}"]
          for k, v in report.get("zeroshot_top1", {}).items()]
    text = markdown_table(["encoder", "mean cos", "min cos", "MB", "fp32 items/s", "int8 items/s", "int8/fp32"], rows)
    text += "\n\n" + markdown_table(["zero-shot (test split)", "fp32 %", "int8 %", "Δ points"], zs)
    print(text)
    note = (f"Bundle `{args.bundle}`; cosines on {report['inputs']['source']} inputs; throughput of one batch of "
            f"{args.batch} through ONNX Runtime CPU, best of 5, both variants in the same process.\n\n")
    write_section("int8", "INT8 dynamic quantisation vs fp32", note + text)
    shutil.rmtree(work.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
