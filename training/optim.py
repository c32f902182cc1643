"""Optimiser wiring: AdamW parameter groups, the cosine-with-warmup schedule, and pickle-free checkpoints
(safetensors for every tensor, JSON for the rest)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def param_groups(model: nn.Module, weight_decay: float,
                 lr_scales: dict[str, tuple[set[int], float]] | None = None) -> list[dict]:
    """Decay matrices only: no weight decay on norms, biases, embeddings, positions, prototypes' scale or logit
    scale. `lr_scales` {name: (parameter ids, scale)} puts those parameters in groups whose learning rate is
    `lr_scale` × the schedule's (fine-tuning: pretrained weights slower than new heads); frozen ones are left out."""
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embed" in name or "token" in name or "logit_scale" in name
        scaled = next((key for key, (ids, _) in (lr_scales or {}).items() if id(param) in ids), "")
        groups.setdefault((scaled, exempt), []).append(param)
    scales = {key: scale for key, (_, scale) in (lr_scales or {}).items()}
    return [{"params": params, "weight_decay": 0.0 if exempt else weight_decay,
             **({"lr_scale": scales[scaled]} if scaled else {})}
            for (scaled, exempt), params in sorted(groups.items())]


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup to base_lr, then cosine decay to base_lr · min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: Path, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, extra: dict) -> Path:
    """Write `step_NNNNNNN/` (weights, loss buffers, optimiser state, JSON state) then point `latest` at it."""
    path = directory / f"step_{step:07d}"
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in loss_fn.state_dict().items()} or {"_empty": torch.zeros(0)},
              path / "loss.safetensors")
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors or {"_empty": torch.zeros(0)}, path / "optimizer.safetensors")
    (path / "state.json").write_text(json.dumps({"step": step, "optimizer": meta, **extra}, indent=1))
    (directory / "latest").write_text(path.name)
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / "latest"
    return directory / pointer.read_text().strip() if pointer.exists() else None


def load_checkpoint(path: Path, model: nn.Module, loss_fn: nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore weights, loss buffers and optimiser state in place; returns the JSON state (with `step`)."""
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(path / "model.safetensors"))
    loss_state = {k: v for k, v in load_file(path / "loss.safetensors").items() if k != "_empty"}
    loss_fn.load_state_dict(loss_state)
    if optimizer is not None:
        tensors = {k: v for k, v in load_file(path / "optimizer.safetensors").items() if k != "_empty"}
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    return state
