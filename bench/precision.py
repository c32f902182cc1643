"""fp32 vs bf16 autocast training throughput on this machine, side by side in one run, for the shipped configs
(and the matmul peak of each dtype). Writes the `precision` section of docs/BENCHMARKS.md.

    python bench/precision.py [--configs tiny small] [--steps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.report import markdown_table, write_section
from training.losses import NClipConfig, ObjectiveLoss
from training.model import create_model
from training.perf import measure_matmul_peak


def samples_per_second(config: str, precision: str, batch: int, steps: int) -> float:
    """Training steps (forward, xCLIP loss, backward, AdamW) per second × batch, after one warm-up step."""
    torch.manual_seed(0)
    model = create_model(config)
    cfg = model.config
    loss_fn = ObjectiveLoss(cfg.objective, NClipConfig(), cfg.cluster_head.num_clusters)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size)
    ids = torch.randint(3, cfg.text.vocab_size, (batch, cfg.text.context_length))
    ids[:, cfg.text.context_length // 2] = 2
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(pixels, ids)
        sum(loss_fn({k: v.float() for k, v in out.items()}).values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    peaks = {d: measure_matmul_peak(getattr(torch, d)) / 1e9 for d in ("float32", "bfloat16")}
    rows = [["matmul 1024² (GFLOP/s)", f"{peaks['float32']:.1f}", f"{peaks['bfloat16']:.1f}",
             f"{peaks['bfloat16'] / peaks['float32']:.2f}"]]
    for config in args.configs:
        fp32 = samples_per_second(config, "fp32", args.batch, args.steps)
        bf16 = samples_per_second(config, "bf16", args.batch, args.steps)
        rows.append([f"train `{config}` (samples/s)", f"{fp32:.1f}", f"{bf16:.1f}", f"{bf16 / fp32:.2f}"])
    text = markdown_table(["measure", "fp32", "bf16 autocast", "bf16 / fp32"], rows)
    print(text)
    note = (f"Batch {args.batch}, {args.steps} timed steps after one warm-up, xCLIP loss, AdamW. "
            "`--precision auto` picks bf16 only on CUDA or CPUs with native bf16 (AVX512-BF16/AMX).\n\n")
    write_section("precision", "Training precision: fp32 vs bf16 autocast (CPU)", note + text)


if __name__ == "__main__":
    main()
