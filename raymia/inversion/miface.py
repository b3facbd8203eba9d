"""MIFace (Fredrikson, Jha & Ristenpart, CCS 2015): gradient descent on the input itself.

For class c, minimise  -log p_target(c | x) + tv * TV(x) + l2 * mean(x^2)  over the input x, starting from
an all-black image (`zeros`: every pixel 0, the paper's start) or the mean public image (`public_mean`),
with Adam, and project x back onto the valid pixel range (pixels in [0, 1], i.e. [(0 - mean) / std,
(1 - mean) / std] per channel in the normalised space the target reads) after every step. TV is the mean
absolute difference of neighbouring pixels, L2 the mean squared value, both in the normalised space
(zero = the data set's mean pixel); the paper had no such prior (its denoising step is replaced by them).
The default weights are mild: on 8x8 digits, larger ones (tv 0.05, l2 0.01) kept the evaluator's top-1 at
1.0 but moved the reconstructions away from the private images (KNN distance 3.4 -> 5.0 in the evaluator's
feature space); `public_mean` starts gave the closest ones (1.9).

Each reconstruction is searched `restarts` times, the first from the start image itself and the others
from it plus Gaussian pixel noise (std `init_noise`); the one the target gives the highest probability of
its class is kept. All classes, reconstructions and restarts are optimised at once as one batch: the loss
is a sum of per-image terms and Adam is per-coordinate, so each image's path is its own.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raymia.inversion.registry import (
    INVERSION,
    InversionContext,
    Reconstructions,
    class_labels,
    costs,
    image_shape,
    pixel_transform,
    public_inputs,
)
from raymia.registry import MAX_STEPS, ActsWhen, Params
from raymia.seeding import derive_seed

log = logging.getLogger("raymia")


class MIFaceParams(Params):
    per_class: int = Field(1, ge=1, le=10_000, description="reconstructions per class")
    steps: int = Field(300, ge=1, le=MAX_STEPS, description="gradient steps on each input")
    lr: float = Field(0.05, gt=0, description="Adam learning rate, in units of the normalised input")
    tv: float = Field(0.005, ge=0, description="weight of the total-variation prior (mean |neighbour diff|)")
    l2: float = Field(0.001, ge=0, description="weight of the L2 prior (mean squared normalised input)")
    restarts: int = Field(4, ge=1, le=1000, description="searches per reconstruction; the one the target is "
                                                       "most confident of is kept")
    init: Literal["zeros", "public_mean"] = Field(
        "zeros", description="start image: zeros = every pixel 0 (black, the paper's); public_mean = the mean "
                             "public input")
    init_noise: float = Field(0.2, ge=0, description="std of the Gaussian pixel noise added to the start of "
                                                     "every restart but the first")

    acts_when = {"init_noise": ActsWhen("restarts", above=1)}


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per image [N]: mean absolute difference between vertical and horizontal neighbours."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1) if x.shape[-2] > 1 else 0.0
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1) if x.shape[-1] > 1 else 0.0
    return dh + dw


@INVERSION.register("miface", MIFaceParams)
def miface(target: nn.Module, classes: list[int], p: MIFaceParams, ctx: InversionContext) -> Reconstructions:
    """MIFace (Fredrikson et al. 2015): gradient descent on the input, TV + L2 prior, pixel range kept."""
    shape = image_shape(ctx.info, "miface")
    dev = ctx.device
    mean, std = pixel_transform(ctx.info, dev)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    if p.init == "public_mean":
        start = public_inputs(ctx, "miface").mean(0, keepdim=True).to(dev)
    else:
        start = lo.expand(1, *shape)
    y = class_labels(classes, p.per_class).repeat_interleave(p.restarts).to(dev)
    n = y.shape[0]
    gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "miface", *classes))
    noise = torch.randn((n, *shape), generator=gen).to(dev) * p.init_noise / std
    noise.view(-1, p.restarts, *shape)[:, 0] = 0  # the first restart starts from the start image itself
    x = torch.clamp(start + noise, lo, hi).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=p.lr)
    for _ in range(p.steps):
        loss = F.cross_entropy(target(x), y, reduction="none")
        loss = loss + p.tv * total_variation(x) + p.l2 * x.pow(2).flatten(1).mean(1)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            x.copy_(torch.clamp(x, lo, hi))
    with torch.no_grad():
        conf = torch.softmax(target(x), dim=-1).gather(1, y[:, None]).view(-1, p.restarts)
        best = conf.argmax(1)
        images = x.detach().view(-1, p.restarts, *shape)[torch.arange(best.shape[0], device=dev), best]
    log.debug("miface: mean target confidence of the kept reconstructions %.3f",
              conf.max(1).values.mean().item())
    return Reconstructions(images.cpu(), class_labels(classes, p.per_class))


@costs("miface")
def miface_flops(p: MIFaceParams, info, target_forward: float, num_classes: int, num_public: int) -> float:
    """Every input through the target and back (a backward pass counted as twice the forward)."""
    return p.steps * p.restarts * p.per_class * num_classes * 3 * target_forward
