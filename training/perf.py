"""Speed accounting: the machine's measured matmul peak and the model's FLOPs per training sample, for MFU."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 1.0) -> float:
    """Sustained FLOP/s of a square matmul on this machine's CPU threads (or current CUDA device, where the
    matrices are 8192 wide: smaller ones leave a GPU's tensor cores idle and understate its peak)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = max(size, 8192) if device == "cuda" else size
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:  # CUDA kernels run asynchronously: time them only once they have finished
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        a @ b
    sync()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
        sync()
    return 2 * size**3 * runs / (time.perf_counter() - start)


def training_flops_per_sample(model: torch.nn.Module, pixels: torch.Tensor, input_ids: torch.Tensor,
                              text_features: torch.Tensor | None = None) -> float:
    """Forward + backward FLOPs of one sample, counted by torch on a small batch (with `text_features`, the text
    tower's outputs precomputed, the tower's own are not counted)."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(pixels, input_ids) if text_features is None else model(pixels, input_ids, text_features)
        sum(v.float().sum() for v in out.values() if v.ndim > 0).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / pixels.shape[0]
