"""Optimisers and learning-rate schedules from the spec's training recipe (stepped once per batch)."""

from __future__ import annotations

import torch

from raymia.spec import TrainSpec


def make_optimizer(params, recipe: TrainSpec, lr_scales=None) -> torch.optim.Optimizer:
    """The recipe's optimizer. `params`: a module (its parameters, with the learning-rate factors it
    declares: raymia.models.base.param_lr_scales) or tensors, with `lr_scales` one factor per tensor. A
    tensor with factor f trains at lr x f and weight decay / f (the same decay per step). Where every
    tensor is a float on a CPU or CUDA device it runs fused (one kernel per tensor, the same update rule;
    several times faster than the per-tensor loop, which on a CPU is PyTorch's default), unless this torch
    has no fused kernel there. Its arithmetic is elementwise, so a pack's stacked tensors get each model's
    own update."""
    if isinstance(params, torch.nn.Module):
        # imported here: raymia.models imports the defenses, which import this module
        from raymia.models.base import param_lr_scales

        declared = param_lr_scales(params)
        named = list(params.named_parameters())
        params, lr_scales = [t for _, t in named], [declared.get(n, 1.0) for n, _ in named]
    params = list(params)
    scales = [1.0] * len(params) if lr_scales is None else [float(f) for f in lr_scales]
    if len(scales) != len(params):
        raise ValueError(f"lr_scales: {len(scales)} factors for {len(params)} tensors")
    if recipe.optimizer == "sgd":
        cls, kw = torch.optim.SGD, {"momentum": recipe.momentum, "nesterov": recipe.nesterov and recipe.momentum > 0}
    elif recipe.optimizer == "adam":
        cls, kw = torch.optim.Adam, {}
    elif recipe.optimizer == "adamw":
        cls, kw = torch.optim.AdamW, {}
    else:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}")
    kw.update(lr=recipe.lr, weight_decay=recipe.weight_decay)
    groups: dict[float, list[torch.Tensor]] = {}
    for t, f in zip(params, scales):
        groups.setdefault(f, []).append(t)
    spec: list | list[dict] = params if set(groups) <= {1.0} else [
        {"params": ts, "lr": recipe.lr * f, "weight_decay": recipe.weight_decay / f} for f, ts in groups.items()]
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return cls(spec, fused=True, **kw)
        except RuntimeError:  # an older torch without this optimizer's fused kernel on this device
            pass
    return cls(spec, **kw)


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
        # The recipe's momentum holds throughout (PyTorch's default would cycle it between 0.85 and 0.95).
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=total_steps + 1, cycle_momentum=False)
    raise ValueError(f"unknown schedule {recipe.schedule!r}")


class Lookahead:
    """airbench94's lookahead over a model's (or a pack's) float tensors: after every `every`-th optimizer
    step t of `total`, the running average moves towards the weights, ema <- ema + (1 - d) (w - ema) with
    d = 0.95^5 (t / total)^3, and the weights are set to it; `finish` sets them to it at the end. Early
    in training d is about 0 (the weights run free); late it nears 0.77 (strong averaging). Elementwise,
    so a pack's stacked tensors get each model's own average."""

    def __init__(self, tensors, total_steps: int, every: int = 5):
        self.tensors = [t for t in tensors if t.is_floating_point()]
        self.ema = [t.detach().clone() for t in self.tensors]
        self.total, self.every = max(1, total_steps), every

    @torch.no_grad()
    def step(self, t: int) -> None:
        """Call after optimizer step t (1-based)."""
        if t % self.every == 0:
            self._update(0.95 ** 5 * (t / self.total) ** 3)

    @torch.no_grad()
    def finish(self) -> None:
        self._update(1.0)

    def _update(self, decay: float) -> None:
        for e, t in zip(self.ema, self.tensors):
            e.lerp_(t.detach(), 1 - decay)
            t.copy_(e)
