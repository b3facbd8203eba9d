"""The one step loop: every bank model, every pack and every defense that trains a model trains here.

`run_steps` is the whole recipe in one short function: batches (each caller's own stream, already
augmented, on the device, in its memory format), the optimizer with its per-parameter learning-rate
factors and epoch limits, the schedule, autocast, airbench's lookahead and the divergence check, for one
model or for a pack of K stacked models (whose per-model losses are summed). Defenses change the step
through `Hooks`, never through a copy of the loop:

- `loss(logits, y, step)`: the objective (the bank's: `Defense.loss`; RelaxLoss's depends on the epoch);
- `Hooks.before_step(step)`: an inner game before the step (AdvReg's inference-model steps);
- `Hooks.extra_loss(logits, y, step)`: a term added to the loss (AdvReg's gain, ADMM's proximal term);
- `Hooks.gradient(x, y)`: computes the gradient itself in place of loss.backward() (DP-SGD's per-example
  clipping and noise; its Poisson batches are the `batches` it passes);
- `Hooks.before_update()`: edits the gradients before the optimizer step (pruning's masks);
- `Hooks.after_step(step)`: acts on the weights after the step (pruning's masks, ADMM's updates);
- the trained subset: `Net.tensors` (`module_net` keeps the tensors with requires_grad: TL-DMI's frozen
  layers are left out).

The loop takes every generator from its caller (batch order, augmentation, a defense's own streams), so
each caller keeps its seeds and the order of its random draws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from raymia.errors import TrainingDiverged
from raymia.train.augment import Augmenter
from raymia.train.batches import batch_passes
from raymia.train.recipe import Lookahead, make_optimizer, make_scheduler, module_tensors

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]  # (inputs, targets) per step, on the device
Loss = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (logits, targets, step) -> loss


@dataclass
class Net:
    """What the loop trains. `forward` maps a batch to logits; `tensors` are what the optimizer steps,
    with one learning-rate factor and one epoch limit (None: none) each; `state` is what lookahead
    averages (the tensors and the buffers). In a pack (`pack`), dim 0 of every tensor, of the inputs and
    of the loss is the model."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    tensors: list[torch.Tensor]
    lr_scales: list[float]
    train_epochs: list[int | None]
    state: list[torch.Tensor]
    pack: bool = False


def module_net(model: torch.nn.Module) -> Net:
    """One module: its parameters with requires_grad and the factors it declares (`module_tensors`)."""
    tensors, scales, limits = module_tensors(model, trainable_only=True)
    return Net(model, tensors, scales, limits, [*model.parameters(), *model.buffers()])


@dataclass
class Hooks:
    """How a defense changes the step (see the module docstring); every hook is optional."""

    before_step: Callable[[int], None] | None = None
    extra_loss: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor | None] | None = None
    gradient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None
    before_update: Callable[[], None] | None = None
    after_step: Callable[[int], None] | None = None


NO_HOOKS = Hooks()


def autocast_dtype(device: torch.device, precision: str, cpu: bool = False) -> torch.dtype | None:
    """The autocast dtype of `bank.precision` on `device`: bf16 on CUDA; on a CPU only when `cpu` asks
    for it (tests: `bank.precision: bf16` leaves a CPU run in fp32)."""
    if precision == "bf16" and (device.type == "cuda" or cpu):
        return torch.bfloat16
    return None


def memory_format(channels_last: bool, device: torch.device, input_shape: Sequence[int]) -> torch.memory_format:
    """`bank.channels_last` applies on CUDA to image inputs only."""
    use = channels_last and device.type == "cuda" and len(input_shape) == 3
    return torch.channels_last if use else torch.contiguous_format


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def member_batches(x: torch.Tensor, y: torch.Tensor, recipe, order: torch.Generator, augment: torch.Generator,
                   index: torch.Tensor | None = None,
                   fmt: torch.memory_format = torch.contiguous_format) -> Batches:
    """One model's batches: full batches of its n members (`batch_passes` on `order`), augmented with
    draws from `augment` (`Augmenter`). The members are x[index] (x on its own when index is None), their
    targets y (one row per member); everything is on the device already."""
    n = x.shape[0] if index is None else index.numel()
    augmenter = Augmenter(recipe.augment, n, augment)

    def stream() -> Batches:
        for positions, passes in batch_passes(n, recipe.batch_size, order):
            b = positions.to(y.device)
            xb = augmenter(x[b if index is None else index[b]], positions, passes)
            yield (xb.contiguous(memory_format=fmt) if xb.ndim == 4 else xb), y[b]

    return stream()


def pack_batches(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, counts: list[int], recipe,
                 orders: list[torch.Generator], augments: list[torch.Generator], shared: bool,
                 fmt: torch.memory_format = torch.contiguous_format) -> Batches:
    """A pack's batches [K, B, ...]: model k (with `counts[k]` members) draws from its own `orders[k]`
    and `augments[k]` exactly what `member_batches` draws for it alone. `index` [K, n_max] maps each
    model's positions to rows of x, the shared training split (`shared`), or x is per model
    [K, n_max, ...]; y is [K, n_max(, C)]. `fmt`: channels_last lays every model's images out so."""
    k = index.shape[0]
    streams = [batch_passes(n, recipe.batch_size, g) for n, g in zip(counts, orders)]
    augmenters = [Augmenter(recipe.augment, n, g) for n, g in zip(counts, augments)]
    rows = torch.arange(k, device=index.device)[:, None]

    def stream() -> Batches:
        while True:
            batches = [next(s) for s in streams]  # per model: positions in its member list, their passes
            local = torch.stack([b for b, _ in batches]).to(index.device)  # [K, B]
            xb = x[index[rows, local]] if shared else x[rows, local]
            if augmenters[0].active:
                xb = torch.stack([a(xb[i], *batches[i]) for i, a in enumerate(augmenters)])
            if fmt is torch.channels_last:
                xb = xb.flatten(0, 1).contiguous(memory_format=fmt).unflatten(0, (k, -1))
            yield xb, y[rows, local]

    return stream()


def run_steps(net: Net, batches: Batches, loss: Loss | None, recipe, steps: int, steps_per_epoch: int | None, *,
              hooks: Hooks = NO_HOOKS, precision: torch.dtype | None = None, max_steps: int | None = None,
              names: Sequence[str] = ("model",), remedy: str = "lower train.lr") -> torch.Tensor | None:
    """Train `net` for `steps` steps of the recipe (its optimizer; its schedule and lookahead over
    `steps`, epochs of `steps_per_epoch`: needed by lookahead and by epoch limits), the first `max_steps`
    of them only when given (timing). `loss` may be None when `hooks.gradient` computes the gradient. Each
    step: `before_step`, the next batch, the forward and the loss (plus `extra_loss`) under autocast to
    `precision` (or `gradient` in their place), backward (a pack's losses summed), `before_update`, the
    optimizer and schedule steps, lookahead, `after_step`. The caller sets the train mode. Raises
    TrainingDiverged (a RaymiaError: one line) naming the models (`names`, one per model) whose last loss or weights are not
    finite. Returns the last loss (per model in a pack; None if `gradient` returned none)."""
    opt = make_optimizer(net.tensors, recipe, net.lr_scales, net.train_epochs)
    sched = make_scheduler(opt, recipe, steps, steps_per_epoch)
    if recipe.lookahead and steps_per_epoch is None:
        raise ValueError("lookahead needs run_steps(..., steps_per_epoch)")
    ahead = Lookahead(net.state, steps, steps_per_epoch) if recipe.lookahead else None
    device = net.tensors[0].device if net.tensors else torch.device("cpu")
    last = None
    for t in range(steps if max_steps is None else min(steps, max_steps)):
        if hooks.before_step is not None:
            hooks.before_step(t)
        xb, yb = next(batches)
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            if hooks.gradient is not None:
                last = hooks.gradient(xb, yb)
            else:
                logits = net.forward(xb).float()
                last = loss(logits, yb, t)
                term = hooks.extra_loss(logits, yb, t) if hooks.extra_loss is not None else None
                last = last if term is None else last + term
        if hooks.gradient is None:
            (last.sum() if net.pack else last).backward()
        if hooks.before_update is not None:
            hooks.before_update()
        opt.step()
        sched.step()
        if ahead is not None:
            ahead.step(t + 1)
        if hooks.after_step is not None:
            hooks.after_step(t)
    if ahead is not None:
        ahead.finish()
    check_finite(net, last, names, remedy)
    return last


@torch.no_grad()
def check_finite(net: Net, last: torch.Tensor | None, names: Sequence[str], remedy: str) -> None:
    """The divergence check: every model's last loss and trained tensors are finite."""
    ok = [] if last is None else [torch.isfinite(last.detach()).reshape(-1)]
    ok += [torch.isfinite(t).reshape(t.shape[0] if net.pack else 1, -1).all(1) for t in net.tensors]
    if not ok:
        return
    good = torch.stack(ok).all(0).cpu().tolist()
    bad = [n for n, g in zip(names, good) if not g]
    if bad:
        loss = "" if last is None or net.pack else f" (loss {last.item()})"
        raise TrainingDiverged(f"{', '.join(bad)}: training diverged{loss}; {remedy}")
