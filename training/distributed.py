"""Process-group wiring for `torchrun` (gloo on CPU, nccl on CUDA) and feature gathering for global-batch losses."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; a single process otherwise."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def gather_with_local_grad(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """All ranks' rows in rank order; this rank's slice keeps its autograd graph (open_clip's gather_features).

    Every rank then computes the loss of the whole global batch; the trainer multiplies the loss by the world
    size before backward so that DDP's gradient average equals the single-process gradient."""
    if info.world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[info.rank] = tensor
    return torch.cat(parts, dim=0)


def shared_parameter(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """A parameter used directly in the global loss (the logit scale): every rank already computes its full
    gradient, so its share is scaled by 1/world to undo the loss × world_size of `gather_with_local_grad`."""
    if info.world_size == 1:
        return value
    share = 1.0 / info.world_size
    return value * share + value.detach() * (1 - share)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
