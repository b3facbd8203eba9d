"""The model-inversion registry, what an inversion attack is given, and the one way to run one.

An inversion attack is a function `fn(target, classes, params, ctx) -> Reconstructions`: for every class
in `classes` it returns `params.per_class` images in the target's (normalised) input space, class-major
(`labels` = each class repeated per_class times). The target is a white-box model: the attack reads its
outputs and their gradients with respect to its inputs (or to a generator's latents), in eval mode with
its parameters frozen (`white_box`); it never sees the target's training data. What else it may use is in
`InversionContext`: the data set's `DataInfo`, PUBLIC data (inputs only, unless an attack says it needs
their labels), a cache folder for fitted artefacts (GMI's GAN), a device and a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raymia.datainfo import DataInfo
from raymia.errors import SpecError
from raymia.registry import Params, Registry


@dataclass(frozen=True)
class InversionContext:
    """What an inversion attack may use besides the target. `x_public`: public inputs [N, *input_shape],
    normalised as the target's inputs, disjoint from the target's training data; `y_public`: their labels,
    only for attacks that need them (None otherwise)."""

    info: DataInfo
    x_public: torch.Tensor
    cache_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    y_public: torch.Tensor | None = None


@dataclass(frozen=True)
class Reconstructions:
    """images [n, C, H, W] (normalised input space, on the CPU) and the class each one reconstructs [n]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.ndim < 2 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"reconstructions of shape {tuple(self.images.shape)} with labels of shape "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


InversionFn = Callable[[nn.Module, list[int], Params, InversionContext], Reconstructions]

INVERSION: Registry[InversionFn] = Registry("inversion attack", package="raymia.inversion")


def run_inversion(name: str, params: dict[str, Any] | None, target: nn.Module, classes: Sequence[int],
                  ctx: InversionContext, where: str = "inversion") -> Reconstructions:
    """Look up attack `name`, validate `params` (SpecError `where.params: <field>: ...`) and `classes`, and
    reconstruct `per_class` images of each class from `target` (run on ctx.device; left on its device, in
    its mode and with its parameters' flags as they were)."""
    entry = INVERSION.get(name, where=f"{where}.name")
    parsed = entry.parse(params, where=f"{where}.params")
    image_shape(ctx.info, name)
    k = ctx.info.num_classes
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < k]
    if not classes or bad:
        raise SpecError(f"need one or more classes in [0, {k}); got {bad or 'none'}", where=f"{where}.classes")
    with white_box(target, ctx.device):
        out = entry.obj(target, classes, parsed, ctx)
    per_class = getattr(parsed, "per_class", 1)
    n = len(classes) * per_class
    if tuple(out.images.shape) != (n, *ctx.info.input_shape):
        raise RuntimeError(f"inversion attack {name!r} returned images of shape {tuple(out.images.shape)}, "
                           f"expected {(n, *ctx.info.input_shape)}")
    return out


PrepareFn = Callable[[Params, InversionContext], str]
_PREPARE: dict[str, PrepareFn] = {}


def prepares(name: str) -> Callable[[PrepareFn], PrepareFn]:
    """Register `fn(params, ctx) -> what it did` as attack `name`'s preparation: fitting what does not
    depend on the target (GMI's GAN on public data), so that a sweep does it once, before its trials."""
    def deco(fn: PrepareFn) -> PrepareFn:
        _PREPARE[name] = fn
        return fn
    return deco


def prepare_inversion(name: str, params: dict[str, Any] | None, ctx: InversionContext,
                      where: str = "inversion") -> str:
    """Run attack `name`'s preparation, if it has one (its artefacts are cached for the attack to find);
    returns what it did ('' when there is nothing to prepare)."""
    entry = INVERSION.get(name, where=f"{where}.name")
    parsed = entry.parse(params, where=f"{where}.params")
    fn = _PREPARE.get(name)
    return fn(parsed, ctx) if fn is not None else ""


CostFn = Callable[[Params, DataInfo, float, int, int], float]
_COST: dict[str, CostFn] = {}
_AT_MOST: set[str] = set()  # attacks whose estimate is a bound: they stop early when their search converges


def costs(name: str, at_most: bool = False) -> Callable[[CostFn], CostFn]:
    """Register `fn(params, info, target_forward_flops, num_classes, num_public) -> FLOPs` as attack `name`'s
    compute estimate for one target (its GAN training included), for `raymia check`; `at_most`: the
    estimate is an upper bound (`raymia check` says so)."""
    def deco(fn: CostFn) -> CostFn:
        _COST[name] = fn
        if at_most:
            _AT_MOST.add(name)
        return fn
    return deco


def flops_at_most(name: str) -> bool:
    """Whether attack `name`'s compute estimate is an upper bound."""
    INVERSION.get(name, where="inversion.name")  # its module registers the estimate
    return name in _AT_MOST


def inversion_flops(name: str, params: dict[str, Any] | None, info: DataInfo, target_forward: float,
                    num_classes: int, num_public: int = 0) -> float | None:
    """Attack `name`'s FLOPs against one target reconstructing `num_classes` classes from `num_public`
    public inputs (None: no estimate)."""
    entry = INVERSION.get(name, where="inversion.name")
    fn = _COST.get(name)
    parsed = entry.parse(params, where="inversion.params")
    return fn(parsed, info, target_forward, num_classes, num_public) if fn else None


def forward_flops(module: nn.Module, *inputs: torch.Tensor) -> float:
    """FLOPs of one forward pass of `module` on `inputs`, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return float(counter.get_total_flops())


@contextmanager
def white_box(target: nn.Module, device: torch.device | None = None) -> Iterator[nn.Module]:
    """The target in eval mode with its parameters frozen (gradients reach inputs only), on `device` (if
    given); mode, flags and device restored afterwards."""
    was_training = target.training
    tensors = [*target.parameters(), *target.buffers()]
    home = tensors[0].device if tensors else None
    if device is not None:
        target.to(device)
    flags = [(p, p.requires_grad) for p in target.parameters()]
    target.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield target
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        target.train(was_training)
        if device is not None and home is not None:
            target.to(home)


def image_shape(info: DataInfo, attack: str) -> tuple[int, int, int]:
    """(C, H, W), or a SpecError: the inversion attacks reconstruct images."""
    shape = tuple(int(s) for s in info.input_shape)
    if info.kind != "image" or len(shape) != 3:
        raise SpecError(f"inversion attack {attack!r} reconstructs images (C, H, W); the data are "
                        f"{info.kind} of shape {shape}", where="data")
    return shape  # type: ignore[return-value]


def pixel_transform(info: DataInfo, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) shaped [1, C, 1, 1]: normalised = (pixel - mean) / std, pixels in [0, 1] (0 and 1 when
    the data set declares no normalisation)."""
    ms = info.pixel_stats(4, device=device)
    if ms is None:
        c = info.input_shape[0]
        return torch.zeros(1, c, 1, 1, device=device), torch.ones(1, c, 1, 1, device=device)
    return ms


def public_inputs(ctx: InversionContext, attack: str) -> torch.Tensor:
    """ctx.x_public as float32 [N, *input_shape], or a SpecError if there is none or its shape is wrong."""
    x = ctx.x_public
    if x is None or x.shape[0] == 0:
        raise SpecError(f"inversion attack {attack!r} needs public data; none was given", where="public")
    if tuple(x.shape[1:]) != tuple(ctx.info.input_shape):
        raise SpecError(f"public inputs have shape {tuple(x.shape[1:])}, the data's input shape is "
                        f"{tuple(ctx.info.input_shape)}", where="public")
    return x.detach().float()


def class_labels(classes: Sequence[int], per_class: int) -> torch.Tensor:
    """Each class repeated per_class times, class-major: the order of every attack's reconstructions."""
    return torch.tensor(classes, dtype=torch.int64).repeat_interleave(per_class)
