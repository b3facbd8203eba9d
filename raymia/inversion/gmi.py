"""GMI, the generative model-inversion attack (Zhang et al., CVPR 2020).

Stage 1: a GAN is trained on PUBLIC data only (`raymia.inversion.gan`: DCGAN-style nets sized to the input,
WGAN-GP by default as in GMI's code; cached under ctx.cache_dir and resumable). Stage 2: for each class c,
latent codes z are optimised to minimise

    identity loss + prior_weight x prior loss = -log p_target(c | G(z)) - prior_weight x D(G(z)),

with the generator and discriminator frozen in eval mode, by SGD with Nesterov momentum, z clipped to
[-clip, clip] after every step (GMI's code: N(0, I) starts, 1500 steps, momentum 0.9, clip 1). The paper
weights the identity term instead (prior + lambda x identity, lambda = 100, lr 0.02): the same objective
as prior_weight = 1 / lambda with a learning rate lambda times larger, hence the defaults 0.01 and 2.0.
Each reconstruction is searched from `restarts` random starts and, as in GMI's code (`Celeba/attack.py`: 5
seeds, `max_score`), the one whose image the target gives the highest logit of its class is kept. GMI's
code averages both losses over its batch of identities, so its step on each latent is the step above
divided by the batch size; raymia's step on a latent does not depend on how many are searched together
(docs/validity.md). `identity_loss: logit` and `augment` turn it into LOMMA's GMI (`raymia.inversion.lomma`).
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field
from torch import nn

from raymia.inversion.gan import GanParams, gan_flops, public_gan
from raymia.inversion.lomma import IdentityParams, identity_flops, identity_loss
from raymia.inversion.registry import (
    INVERSION,
    InversionContext,
    Reconstructions,
    class_labels,
    costs,
    image_shape,
    prepares,
    public_inputs,
)
from raymia.registry import MAX_STEPS, Params
from raymia.seeding import derive_seed

log = logging.getLogger("raymia")


class _Search(Params):
    """GMI's latent search."""

    per_class: int = Field(1, ge=1, le=10_000, description="reconstructions per class")
    steps: int = Field(1500, ge=1, le=MAX_STEPS, description="latent optimisation steps (GMI: 1500)")
    lr: float = Field(2.0, gt=0, description="SGD learning rate on z (GMI: 0.02 on 100 x identity loss)")
    momentum: float = Field(0.9, ge=0, lt=1, description="Nesterov momentum of the latent SGD")
    prior_weight: float = Field(0.01, ge=0, description="weight of the prior loss -D(G(z)) (GMI: 1/100)")
    restarts: int = Field(5, ge=1, le=1000, description="random starts per reconstruction; the one with the "
                                                       "target's highest class logit is kept (GMI: 5 seeds)")
    clip: float = Field(1.0, gt=0, description="z is clipped to [-clip, clip] after every step")


class GMIParams(GanParams, IdentityParams, _Search):
    """GMI's params, listed (pydantic orders inherited fields from the last base) as the latent search, the
    identity term (LOMMA's options), then the GAN prior."""


@INVERSION.register("gmi", GMIParams)
def gmi(target: nn.Module, classes: list[int], p: GMIParams, ctx: InversionContext) -> Reconstructions:
    """GMI (Zhang et al. 2020): latent search in a GAN trained on public data, identity + prior loss."""
    shape = image_shape(ctx.info, "gmi")
    dev = ctx.device
    gan = public_gan(p, ctx, "gmi")
    g_net, d_net = gan.generator.requires_grad_(False), gan.discriminator.requires_grad_(False)  # eval mode
    identity = identity_loss(target, p, ctx, public_inputs(ctx, "gmi"), "gmi")
    y = class_labels(classes, p.per_class).repeat_interleave(p.restarts).to(dev)
    gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "gmi", *classes))
    z = torch.randn(y.shape[0], p.latent_dim, generator=gen).clamp(-p.clip, p.clip).to(dev)
    z.requires_grad_(True)
    opt = torch.optim.SGD([z], lr=p.lr, momentum=p.momentum, nesterov=p.momentum > 0)
    for _ in range(p.steps):
        x = g_net(z)
        loss = identity(x, y) - p.prior_weight * d_net(x)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            z.clamp_(-p.clip, p.clip)
    with torch.no_grad():
        score = target(g_net(z)).gather(1, y.unsqueeze(1)).view(-1, p.restarts)
        best = score.argmax(1)
        images = g_net(z.view(-1, p.restarts, p.latent_dim)[torch.arange(best.shape[0], device=dev), best])
    return Reconstructions(images.detach().cpu().reshape(-1, *shape), class_labels(classes, p.per_class))


@prepares("gmi")
def prepare_gan(p: GMIParams, ctx: InversionContext) -> str:
    """GMI's GAN depends on the public data only: trained (or found) once for every target."""
    return f"GAN {public_gan(p, ctx, 'gmi').source}"


@costs("gmi")
def gmi_flops(p: GMIParams, info, target_forward: float, num_classes: int, num_public: int) -> float:
    """GAN training (`gan_flops`), the students' distillation and the latent search (every latent through
    G, D and the identity term's models), a backward pass counted as twice the forward."""
    gan, g, d = gan_flops(p, info)
    identity, distil = identity_flops(p, info, target_forward, num_public)
    search = p.steps * p.restarts * p.per_class * num_classes * (3 * (g + d) + identity)
    return gan + distil + search
