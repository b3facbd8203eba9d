"""Optimisers and learning-rate schedules from the spec's training recipe (stepped once per batch)."""

from __future__ import annotations

import torch

from raymia.spec import TrainSpec


def make_optimizer(params, recipe: TrainSpec) -> torch.optim.Optimizer:
    """The recipe's optimizer. Where every tensor is a float on a CPU or CUDA device it runs fused (one
    kernel per tensor, the same update rule; several times faster than the per-tensor loop, which on a CPU
    is PyTorch's default), unless this torch has no fused kernel there. Its arithmetic is elementwise, so
    a pack's stacked tensors get each model's own update."""
    params = list(params)
    if recipe.optimizer == "sgd":
        cls, kw = torch.optim.SGD, {"momentum": recipe.momentum, "nesterov": recipe.nesterov and recipe.momentum > 0}
    elif recipe.optimizer == "adam":
        cls, kw = torch.optim.Adam, {}
    elif recipe.optimizer == "adamw":
        cls, kw = torch.optim.AdamW, {}
    else:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}")
    kw.update(lr=recipe.lr, weight_decay=recipe.weight_decay)
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return cls(params, fused=True, **kw)
        except RuntimeError:  # an older torch without this optimizer's fused kernel on this device
            pass
    return cls(params, **kw)


def make_scheduler(opt: torch.optim.Optimizer, recipe: TrainSpec, total_steps: int):
    total_steps = max(1, total_steps)
    if recipe.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    if recipe.schedule == "step":
        milestones = [max(1, round(f * total_steps)) for f in recipe.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=recipe.lr_decay)
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total_steps + 1)
    raise ValueError(f"unknown schedule {recipe.schedule!r}")
