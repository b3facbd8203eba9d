"""Optimisers and learning-rate schedules from the spec's training recipe (stepped once per batch)."""

from __future__ import annotations

import torch

from raymia.spec import LOOKAHEAD_START_EPOCHS, TrainSpec


def module_tensors(model: torch.nn.Module, trainable_only: bool = False):
    """A module's parameters with the factors it declares for them (raymia.models.base.param_lr_scales and
    param_train_epochs): (tensors, lr_scales, train_epochs), in `named_parameters` order; `trainable_only`
    keeps those with requires_grad."""
    # imported here: raymia.models imports the defenses, which import this module
    from raymia.models.base import param_lr_scales, param_train_epochs

    scales, until = param_lr_scales(model), param_train_epochs(model)
    named = [(n, t) for n, t in model.named_parameters() if t.requires_grad or not trainable_only]
    return [t for _, t in named], [scales.get(n, 1.0) for n, _ in named], [until.get(n) for n, _ in named]


def make_optimizer(params, recipe: TrainSpec, lr_scales=None, train_epochs=None) -> torch.optim.Optimizer:
    """The recipe's optimizer. `params`: a module (its parameters, with the factors it declares:
    `module_tensors`) or tensors, with `lr_scales` one learning-rate factor per tensor and `train_epochs`
    one limit per tensor (None: no limit). A tensor with factor f trains at lr x f and weight decay / f (the
    same decay per step); one with a limit of e epochs stops training after e epochs (its group's lr is
    held at 0 from then on by `make_scheduler`, given steps_per_epoch). Where every tensor is a float on a
    CPU or CUDA device it runs fused (one kernel per tensor, the same update rule; several times faster
    than the per-tensor loop, which on a CPU is PyTorch's default), unless this torch has no fused kernel
    there. Its arithmetic is elementwise, so a pack's stacked tensors get each model's own update."""
    if isinstance(params, torch.nn.Module):
        params, lr_scales, train_epochs = module_tensors(params)
    params = list(params)
    scales = [1.0] * len(params) if lr_scales is None else [float(f) for f in lr_scales]
    limits = [None] * len(params) if train_epochs is None else [None if e is None else int(e) for e in train_epochs]
    if len(scales) != len(params):
        raise ValueError(f"lr_scales: {len(scales)} factors for {len(params)} tensors")
    if len(limits) != len(params):
        raise ValueError(f"train_epochs: {len(limits)} limits for {len(params)} tensors")
    if recipe.optimizer == "sgd":
        cls, kw = torch.optim.SGD, {"momentum": recipe.momentum, "nesterov": recipe.nesterov and recipe.momentum > 0}
    elif recipe.optimizer == "adam":
        cls, kw = torch.optim.Adam, {}
    elif recipe.optimizer == "adamw":
        cls, kw = torch.optim.AdamW, {}
    else:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}")
    kw.update(lr=recipe.lr, weight_decay=recipe.weight_decay)
    groups: dict[tuple[float, int | None], list[torch.Tensor]] = {}
    for t, f, e in zip(params, scales, limits):
        groups.setdefault((f, e), []).append(t)
    spec: list | list[dict] = params if set(groups) <= {(1.0, None)} else [
        {"params": ts, "lr": recipe.lr * f, "weight_decay": recipe.weight_decay / f, "train_epochs": e}
        for (f, e), ts in groups.items()]
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return cls(spec, fused=True, **kw)
        except RuntimeError:  # an older torch without this optimizer's fused kernel on this device
            pass
    return cls(spec, **kw)


def make_scheduler(opt: torch.optim.Optimizer, recipe: TrainSpec, total_steps: int,
                   steps_per_epoch: int | None = None):
    """The recipe's schedule over `total_steps` optimizer steps (call `step()` after each). Param groups
    with a `train_epochs` limit (`make_optimizer`) need `steps_per_epoch`: their lr is 0 from then on."""
    total_steps = max(1, total_steps)
    sched = _schedule(opt, recipe, total_steps)
    stops = [(g, g["train_epochs"]) for g in opt.param_groups if g.get("train_epochs") is not None]
    if not stops:
        return sched
    if steps_per_epoch is None:
        raise ValueError("parameters that train for a limited number of epochs need make_scheduler(..., "
                         "steps_per_epoch)")
    return StopAfter(sched, [(g, e * steps_per_epoch) for g, e in stops])


def _schedule(opt: torch.optim.Optimizer, recipe: TrainSpec, total_steps: int):
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
    if recipe.schedule == "triangle":
        return torch.optim.lr_scheduler.LambdaLR(opt, triangle(recipe, total_steps))
    raise ValueError(f"unknown schedule {recipe.schedule!r}")


def triangle(recipe: TrainSpec, total_steps: int):
    """airbench's schedule: the lr factor of step t (0-based) rises linearly from `start` at t = 0 to 1 at
    t = int(peak x total) and falls linearly to `end` at t = total (np.interp over those three points)."""
    tri = recipe.triangle
    top = int(tri.peak * total_steps)

    def factor(t: int) -> float:
        if t <= top:
            return tri.start + (1.0 - tri.start) * t / top if top > 0 else 1.0
        return 1.0 + (tri.end - 1.0) * min(1.0, (t - top) / max(1, total_steps - top))

    return factor


class StopAfter:
    """A schedule whose param groups with a step limit stop training there: after the limit-th `step()`
    (and from the start for a limit of 0) their lr is held at 0, so they take no update, weight decay
    included (airbench freezes its whitening bias after 3 epochs)."""

    def __init__(self, sched, stops: list[tuple[dict, int]]):
        self.sched, self.stops, self.t = sched, stops, 0
        self._hold()

    def step(self) -> None:
        self.sched.step()
        self.t += 1
        self._hold()

    def _hold(self) -> None:
        for group, limit in self.stops:
            if self.t >= limit:
                group["lr"] = 0.0


class Lookahead:
    """airbench94's lookahead over a model's (or a pack's) float tensors. From epoch `start_epochs` (0-based)
    on, after every `every`-th optimizer step t of `total`: the first time, the running average starts as
    a copy of the weights; later it moves towards them, ema <- ema + (1 - d) (w - ema) with
    d = 0.95^5 (t / total)^3, and the weights are set to it. At the end of every epoch once it has started
    (and in `finish`) the weights are set to the average again. d nears 0.77 late in training (strong
    averaging). Elementwise, so a pack's stacked tensors get each model's own average."""

    def __init__(self, tensors, total_steps: int, steps_per_epoch: int, start_epochs: int = LOOKAHEAD_START_EPOCHS,
                 every: int = 5):
        self.tensors = [t for t in tensors if t.is_floating_point()]
        self.ema: list[torch.Tensor] | None = None
        self.total, self.per_epoch = max(1, total_steps), max(1, steps_per_epoch)
        self.start, self.every = start_epochs, every

    @torch.no_grad()
    def step(self, t: int) -> None:
        """Call after optimizer step t (1-based)."""
        if (t - 1) // self.per_epoch >= self.start and t % self.every == 0:
            if self.ema is None:
                self.ema = [w.detach().clone() for w in self.tensors]
            else:
                self._update(0.95 ** 5 * (t / self.total) ** 3)
        if t % self.per_epoch == 0 and self.ema is not None:
            self._update(1.0)

    @torch.no_grad()
    def finish(self) -> None:
        if self.ema is not None:
            self._update(1.0)

    def _update(self, decay: float) -> None:
        for e, t in zip(self.ema, self.tensors):
            e.lerp_(t.detach(), 1 - decay)
            t.copy_(e)
