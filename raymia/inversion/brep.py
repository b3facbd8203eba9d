"""BREP-MI, label-only model inversion by boundary repulsion (Kahla et al., CVPR 2022; official code
github.com/m-kahla/Label-Only-Model-Inversion-Attacks-via-Boundary-Repulsion: brep_mi.py, brep_mi_utils.py,
config2.yaml).

The attacker sees only the target's predicted labels. It searches in GMI's GAN, trained on public inputs
(`raymia.inversion.gan`: the same settings find the same cached GAN as `gmi`):

1. a start per reconstruction: latents z ~ N(0, I) clipped to [-clip, clip] are drawn in batches of
   `init_batch` until the target labels G(z) as the class (each start a different draw);
2. repulsion: around the current z, `points` points on a sphere of radius R are labelled; the step moves z
   away from those outside the class,

       z <- clip(z + min(R / 3, max_step) x mean_i(-[label(G(z + u_i)) != c] u_i) / R),

   and is taken only if G(z) stays in the class;
3. when more than `threshold` of the sphere lies in the class, R grows by `expansion`: the point is that far
   from every boundary. The official test is "the sum of the points' labels, +1 inside and -1 outside,
   exceeds 0.75 x points", which is more than 87.5% inside, hence the default 0.875. The search stops after `patience` steps without growth (or `max_steps` in all).

The reconstruction is G(z) at the last growth of the sphere (the official code reports the evaluation
there), or at the start if the sphere never grew. Where raymia differs from the official code:
- every step counts toward `patience`, a rejected one too; the official loop counts accepted steps only
  and so may never end when every step leaves the class, hence also `max_steps`;
- a class that no start is found for after `init_tries` batches (the official loop draws forever) keeps a
  random start, with a warning: it can only be a miss;
- `per_class` starts per class, searched side by side (the official code: one per class);
- the GAN is GMI's as raymia trains it (`gan.py`), as the official code takes GMI's pretrained generator.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field
from torch import nn

from raymia.inversion.gan import GanParams, gan_flops, public_gan
from raymia.inversion.registry import (
    INVERSION,
    InversionContext,
    Reconstructions,
    class_labels,
    costs,
    image_shape,
    prepares,
)
from raymia.registry import MAX_STEPS, Params
from raymia.seeding import derive_seed

log = logging.getLogger("raymia")


class _Search(Params):
    """BREP-MI's search (defaults: config2.yaml)."""

    per_class: int = Field(1, ge=1, le=10_000, description="reconstructions per class, each from its own start")
    radius: float = Field(2.0, gt=0, description="initial sphere radius in latent space (BREP-MI: 2)")
    points: int = Field(32, ge=1, le=4096, description="points labelled on the sphere per step (BREP-MI: 32)")
    expansion: float = Field(1.3, gt=1, description="factor by which the sphere grows (BREP-MI: 1.3)")
    threshold: float = Field(0.875, ge=0, lt=1, description="the sphere grows when more than this fraction of its "
                                                           "points is in the class (BREP-MI: 0.875)")
    max_step: float = Field(3.0, gt=0, description="step size is min(radius / 3, max_step) (BREP-MI: 3)")
    patience: int = Field(1000, ge=1, description="steps without growth before the search stops (BREP-MI: 1000)")
    max_steps: int = Field(10_000, ge=1, le=MAX_STEPS, description="steps of each search in all, at most (growing or not)")
    clip: float = Field(1.5, gt=0, description="latents are clipped to [-clip, clip] (BREP-MI: 1.5)")
    init_batch: int = Field(256, ge=1, description="latents drawn at once when looking for starts (BREP-MI: 256)")
    init_tries: int = Field(100, ge=1, description="batches drawn before a class without a start is given up")


class BrepParams(GanParams, _Search):
    """BREP-MI's params: its search, then GMI's GAN (pydantic lists inherited fields from the last base)."""


@INVERSION.register("brep_mi", BrepParams)
def brep_mi(target: nn.Module, classes: list[int], p: BrepParams, ctx: InversionContext) -> Reconstructions:
    """BREP-MI (Kahla et al. 2022): label-only; latents in GMI's GAN pushed away from the class boundary."""
    shape = image_shape(ctx.info, "brep_mi")
    dev = ctx.device
    g_net = public_gan(p, ctx, "brep_mi").generator.requires_grad_(False)  # eval mode
    gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "brep_mi", *classes))
    y = class_labels(classes, p.per_class).to(dev)

    def label(z: torch.Tensor) -> torch.Tensor:  # all the attack learns from the target
        return target(g_net(z.to(dev))).argmax(1)

    with torch.no_grad():
        z = starts(label, y, p, gen)
        best, radius = z.clone(), torch.full((len(y),), p.radius, device=dev)
        since = torch.zeros(len(y), dtype=torch.int64, device=dev)
        active = torch.ones(len(y), dtype=torch.bool, device=dev)
        for _ in range(p.max_steps):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            r = radius[idx]
            u = torch.randn(idx.numel(), p.points, p.latent_dim, generator=gen).to(dev)
            u = u * (r[:, None, None] / u.norm(dim=2, keepdim=True))
            outside = label((z[idx, None] + u).reshape(-1, p.latent_dim)).view(idx.numel(), p.points) != y[idx, None]
            grow = (~outside).float().mean(1) > p.threshold
            step = (r / 3).clamp(max=p.max_step)
            away = -(outside.float().unsqueeze(2) * u).mean(1) / r[:, None]
            moved = (z[idx] + step[:, None] * away).clamp(-p.clip, p.clip)
            ok = label(moved) == y[idx]
            z[idx[ok]] = moved[ok]
            best[idx[ok & grow]] = moved[ok & grow]
            radius[idx[grow]] *= p.expansion
            since[idx] = torch.where(grow, 0, since[idx] + 1)
            active[idx[since[idx] >= p.patience]] = False
        images = g_net(best.to(dev))
    return Reconstructions(images.detach().cpu().reshape(-1, *shape), class_labels(classes, p.per_class))


def starts(label, y: torch.Tensor, p: BrepParams, gen: torch.Generator) -> torch.Tensor:
    """One start per reconstruction [len(y), latent_dim] on y's device: a clipped N(0, I) latent that `label`
    puts in its class, each a different draw; a random one (and a warning) for a class none was found for."""
    z = torch.empty(len(y), p.latent_dim, device=y.device)
    open_ = torch.ones(len(y), dtype=torch.bool, device=y.device)
    for _ in range(p.init_tries):
        cand = torch.randn(p.init_batch, p.latent_dim, generator=gen).clamp(-p.clip, p.clip).to(y.device)
        got = label(cand)
        for c in y[open_].unique():
            slots = (open_ & (y == c)).nonzero().squeeze(1)
            hits = (got == c).nonzero().squeeze(1)[: slots.numel()]
            z[slots[: hits.numel()]] = cand[hits]
            open_[slots[: hits.numel()]] = False
        if not open_.any():
            return z
    missing = sorted({int(c) for c in y[open_]})
    log.warning("brep_mi: the target labelled none of %d generated images as class(es) %s; their reconstructions "
                "start, and stay, at random latents", p.init_tries * p.init_batch, missing)
    z[open_] = torch.randn(int(open_.sum()), p.latent_dim, generator=gen).clamp(-p.clip, p.clip).to(y.device)
    return z


@prepares("brep_mi")
def prepare_gan(p: BrepParams, ctx: InversionContext) -> str:
    """GMI's GAN depends on the public data only: trained (or found) once for every target."""
    return f"GAN {public_gan(p, ctx, 'brep_mi').source}"


@costs("brep_mi", at_most=True)
def brep_mi_flops(p: BrepParams, info, target_forward: float, num_classes: int, num_public: int) -> float:
    """GAN training (`gan_flops`) and, at most, `max_steps` steps of every reconstruction, each labelling
    `points` + 1 images (G and the target, forward only); the starts' draws are not counted."""
    gan, g, _ = gan_flops(p, info)
    return gan + p.max_steps * p.per_class * num_classes * (p.points + 1) * (g + target_forward)
