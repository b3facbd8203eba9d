"""KED-MI, knowledge-enriched distributional model inversion (Chen et al., ICCV 2021; official code
github.com/SCccc21/Knowledge-Enriched-DMI: k+1_gan.py, attack.py `dist_inversion`, utils.py).

Stage 1, an inversion-specific GAN on the PUBLIC inputs that knows the target: the discriminator D has K
class outputs (K: the target's outputs) and a feature layer; "real" is read from its class logits l as
D_real(x) = Z / (Z + 1), Z = sum_k exp(l_k) (the semi-supervised GAN of Salimans et al. 2016). Each
discriminator update minimises

    soft CE(l(x_lab), softmax(T(x_lab))) + 1/2 [ mean softplus(lse l(x_unl)) - mean lse l(x_unl)
                                               + mean softplus(lse l(G(z))) ]

on two batches of public inputs (x_lab labelled by the target's soft predictions, x_unl unlabelled) and one
of fakes; each generator update minimises feature matching plus an entropy term,

    mean_j | mean_i f_j(G(z_i)) - mean_i f_j(x_unl,i) | + entropy_weight x sum_i H(softmax(l(G(z_i)))),

f the discriminator's features (its flattened convolution output) on another unlabelled batch, H the
entropy of D's class prediction (summed over the batch, as the official `HLoss`). Adam with betas (0.5,
0.999) for both nets; `n_critic` discriminator updates per generator update (the official ratio: G
updated every 5th step).

Stage 2, the distributional attack: for each class c a Gaussian N(mu_c, diag exp(log_var_c)) over the
latents, from mu = 0 and log_var = 1, is fitted with Adam (lr 0.02, `steps` updates) on reparameterised
samples z = mu + exp(log_var / 2) eps to minimise

    prior + identity_weight x identity = softplus(-lse l(G(z))) + identity_weight x CE(T(G(z)), c),

(the prior is -log D_real, the official mean softplus(lse l) - mean lse l, written stably; with
`identity_loss: logit` or `augment` the identity term is LOMMA's, `raymia.inversion.lomma`); the
reconstructions of class c are `per_class` samples of its fitted distribution (the official code evaluates
5 such samples per identity).

Where raymia differs from the official code:
- the nets are gan.py's DCGAN pair sized to the input shape (the discriminator's last layer replaced by K
  class outputs), not the official 64x64 generator and `MinibatchDiscriminator` (whose minibatch
  discrimination layer is left out); defaults latent_dim 64, width 32, gan_steps 2000 as GMI's and
  PLG-MI's GAN here (official: z 100, 120 epochs of CelebA's public part);
- public batches are drawn with replacement from one seeded RNG (official: two shuffled loaders);
- the attack's losses are summed over classes (official: averaged over a batch of identities); with Adam
  the step on each class's parameters is the same either way, up to Adam's epsilon;
- the official attack computes a clipped z that it never uses (`clip_range`); raymia has no clip.

Cache (`cache_dir`): the trained pair is `kedmi-gan-<key>.pt`; the key hashes the public inputs' bytes, the
TARGET (its weights and structure: its soft labels train the discriminator), the data's shape and
normalisation, every setting but `checkpoint_every`, the seed and the device type; `kedmi-gan-<key>.ckpt.pt`
is the periodic checkpoint from which a killed run resumes exactly (gan.py's helpers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raymia import progress
from raymia.cache import load_state
from raymia.datainfo import DataInfo
from raymia.inversion.gan import (
    Discriminator,
    GanBudget,
    Generator,
    _after_step,
    _fresh,
    _load_pair,
    _resume,
    _save_pair,
    cache_key,
)
from raymia.inversion.lomma import IdentityParams, identity_flops, identity_loss
from raymia.inversion.plgmi import target_digest
from raymia.inversion.registry import (
    INVERSION,
    InversionContext,
    Reconstructions,
    class_labels,
    costs,
    forward_flops,
    image_shape,
    public_inputs,
    white_box,
)
from raymia.registry import MAX_STEPS, Params
from raymia.seeding import derive_seed
from raymia.storage import store_dir

log = logging.getLogger("raymia")

_ARCH_VERSION = 1  # bump when the nets or the training loop change (part of the cache key)


@dataclass(frozen=True)
class KGanSettings(GanBudget):
    """What the inversion-specific GAN is and how it trains: the shared budget (`gan.GanBudget`), then
    KED-MI's own."""

    n_critic: int = 5
    entropy_weight: float = 1e-4


class ClassDiscriminator(nn.Module):
    """images [N, C, H, W] (normalised) -> (features [N, F], class logits [N, K]): gan.py's discriminator
    with K class outputs in place of its one score."""

    def __init__(self, shape: tuple[int, int, int], width: int, num_classes: int):
        super().__init__()
        base = Discriminator(shape, width)
        self.features = base.features
        self.classes = nn.Linear(base.score.in_features, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.classes(f)


def build_kgan(info: DataInfo, num_classes: int, settings: KGanSettings,
               seed: int) -> tuple[Generator, ClassDiscriminator]:
    """The pair, initialised from `seed` (the global RNG is left as it was)."""
    shape = image_shape(info, "ked_mi")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "kedmi-gan-init"))
        return (Generator(shape, settings.latent_dim, settings.width, info),
                ClassDiscriminator(shape, settings.width, num_classes))


# ---------------------------------------------------------------------------------------------------------
# losses


def discriminator_loss(lab_logits: torch.Tensor, target_logits: torch.Tensor, unl_logits: torch.Tensor,
                       fake_logits: torch.Tensor) -> torch.Tensor:
    """The official `dg_loss`: soft cross-entropy to the target's softmax on labelled inputs, plus the
    semi-supervised GAN loss on unlabelled inputs and fakes (see the module docstring)."""
    soft = -(F.softmax(target_logits, 1) * F.log_softmax(lab_logits, 1)).sum(1).mean()
    lse_u, lse_f = torch.logsumexp(unl_logits, 1), torch.logsumexp(fake_logits, 1)
    return soft + 0.5 * (F.softplus(lse_u).mean() - lse_u.mean() + F.softplus(lse_f).mean())


def generator_loss(fake_features: torch.Tensor, real_features: torch.Tensor, fake_logits: torch.Tensor,
                   entropy_weight: float) -> torch.Tensor:
    """Feature matching (mean absolute difference of the batch means) plus entropy_weight x the entropy of
    D's class prediction on the fakes, summed over the batch (the official `HLoss`)."""
    matching = (fake_features.mean(0) - real_features.mean(0)).abs().mean()
    p_log_p = F.softmax(fake_logits, 1) * F.log_softmax(fake_logits, 1)
    return matching + entropy_weight * -p_log_p.sum()


def prior_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per image [N]: -log D_real = softplus(lse l) - lse l = softplus(-lse l)."""
    return F.softplus(-torch.logsumexp(logits, 1))


# ---------------------------------------------------------------------------------------------------------
# training and cache


@dataclass
class FittedKGan:
    """A trained pair (eval mode). `source`: 'cache', 'trained' or 'resumed'; `start_step`: where this
    call's training started (`steps` when loaded); `path`: the file."""

    generator: Generator
    discriminator: ClassDiscriminator
    key: str
    path: Path
    source: str
    start_step: int


def kgan_key(target: nn.Module, x_public: torch.Tensor, info: DataInfo, settings: KGanSettings, seed: int,
             device: torch.device) -> str:
    """The cache key (`gan.cache_key`) with the target, whose soft labels train the discriminator."""
    return cache_key("kedmi-gan", _ARCH_VERSION, x_public, info, settings, seed, device, target=target_digest(target))


def train_kgan(target: nn.Module, x_public: torch.Tensor, info: DataInfo, settings: KGanSettings,
               cache_dir: Path, device: torch.device, seed: int, stop_after: int | None = None) -> FittedKGan | None:
    """The cached pair for this target, public inputs and settings, else train it (resuming from a
    checkpoint). The target is used in eval mode with frozen parameters and given back as it was.

    `stop_after`: return None after this many generator updates of this call, as if the process were
    killed then (no checkpoint beyond the periodic ones): for tests.
    """
    x = x_public.detach().float().cpu()
    key = kgan_key(target, x, info, settings, seed, device)
    path = store_dir(cache_dir) / f"kedmi-gan-{key}.pt"
    ckpt = path.with_name(f"kedmi-gan-{key}.ckpt.pt")
    with white_box(target, device):
        with torch.no_grad():
            k = int(target(x[:1].to(device)).shape[1])  # the discriminator's classes: the target's outputs
        g_net, d_net = build_kgan(info, k, settings, seed)
        state = load_state(path, key)
        if state is not None and _load_pair(g_net, d_net, state, what="ked_mi"):
            log.info("ked_mi: GAN loaded from %s", path)
            return FittedKGan(g_net.to(device).eval(), d_net.to(device).eval(), key, path, "cache", settings.steps)

        def fresh(g, d):
            return _fresh(g, d, settings, seed, device, role="kedmi-gan-train")

        g_net, d_net, opt_g, opt_d, rng = fresh(g_net, d_net)
        start = _resume(ckpt, key, g_net, d_net, opt_g, opt_d, rng, what="ked_mi")
        if start is None:  # a checkpoint that does not fit may have been loaded in part: start clean
            g_net, d_net, opt_g, opt_d, rng = fresh(*build_kgan(info, k, settings, seed))
            start = 0
        if start:
            log.info("ked_mi: resuming GAN training at step %d/%d from %s", start, settings.steps, ckpt)
        else:
            log.info("ked_mi: training the GAN on %d public inputs labelled by the target (%d steps)",
                     x.shape[0], settings.steps)

        n, b, zdim = x.shape[0], settings.batch_size, settings.latent_dim

        def batch() -> torch.Tensor:
            return x[torch.randint(n, (b,), generator=rng)].to(device)

        for step in progress.steps(range(start, settings.steps), "ked_mi: GAN training steps"):
            d_net.requires_grad_(True)
            for _ in range(settings.n_critic):
                lab, unl = batch(), batch()
                z = torch.randn(b, zdim, generator=rng).to(device)
                with torch.no_grad():
                    fake, soft = g_net(z), target(lab).float()
                loss_d = discriminator_loss(d_net(lab)[1], soft, d_net(unl)[1], d_net(fake)[1])
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
            d_net.requires_grad_(False)
            unl = batch()
            fake_f, fake_l = d_net(g_net(torch.randn(b, zdim, generator=rng).to(device)))
            with torch.no_grad():
                real_f = d_net(unl)[0]
            loss_g = generator_loss(fake_f, real_f, fake_l, settings.entropy_weight)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            if _after_step(step + 1, start, settings.steps, settings.checkpoint_every, stop_after, ckpt, key, g_net,
                           d_net, opt_g, opt_d, rng, "ked_mi: GAN"):
                return None
        d_net.requires_grad_(True)

    _save_pair(path, ckpt, key, g_net, d_net)
    return FittedKGan(g_net.eval(), d_net.eval(), key, path, "resumed" if start else "trained", start)


# ---------------------------------------------------------------------------------------------------------
# the attack

_KGAN = KGanSettings()


class _Own(Params):
    """KED-MI's distributional search and its GAN."""

    per_class: int = Field(1, ge=1, le=10_000, description="reconstructions per class: samples of the class's "
                                                           "fitted latent distribution (KED-MI: 5)")
    steps: int = Field(1500, ge=1, le=MAX_STEPS, description="Adam updates of each class's latent distribution (KED-MI: "
                                               "1500; its CelebA script 2400)")
    lr: float = Field(0.02, gt=0, description="Adam learning rate on mu and log_var (KED-MI: 0.02)")
    identity_weight: float = Field(100.0, ge=0, description="weight of the identity loss CE(T(G(z)), c) "
                                                            "against the prior -log D_real (KED-MI: 100)")
    samples: int = Field(1, ge=1, le=1024, description="reparameterised samples per class and update, their "
                                                       "losses summed (KED-MI: 1)")
    latent_dim: int = Field(_KGAN.latent_dim, ge=1, le=4096, description="GAN latent dimension (KED-MI: 100)")
    width: int = Field(_KGAN.width, ge=1, le=1024, description="channels of the GAN's first (last) conv layer")
    gan_steps: int = Field(_KGAN.steps, ge=1, le=MAX_STEPS, description="generator updates of GAN training")
    gan_batch_size: int = Field(_KGAN.batch_size, ge=1, description="images per GAN batch (KED-MI: 64)")
    gan_lr: float = Field(_KGAN.lr, gt=0, description="Adam learning rate of both GAN nets, betas (0.5, 0.999) "
                                                      "(KED-MI: 2e-4)")
    n_critic: int = Field(_KGAN.n_critic, ge=1, le=100, description="discriminator updates per generator "
                                                                   "update (KED-MI: 5)")
    entropy_weight: float = Field(_KGAN.entropy_weight, ge=0, description="weight of the entropy of D's class "
                                  "prediction on fakes in the generator's loss (KED-MI: 1e-4)")
    checkpoint_every: int = Field(_KGAN.checkpoint_every, ge=1,
                                  description="GAN training checkpoint period in steps (not in the cache key)")

    def gan(self) -> KGanSettings:
        return KGanSettings(latent_dim=self.latent_dim, width=self.width, steps=self.gan_steps,
                            batch_size=self.gan_batch_size, lr=self.gan_lr, n_critic=self.n_critic,
                            entropy_weight=self.entropy_weight, checkpoint_every=self.checkpoint_every)


class KEDMIParams(IdentityParams, _Own):
    """KED-MI's params, listed (pydantic orders inherited fields from the last base) as its own (the
    distributional search and its GAN), then the identity term (LOMMA's options)."""


@INVERSION.register("ked_mi", KEDMIParams)
def ked_mi(target: nn.Module, classes: list[int], p: KEDMIParams, ctx: InversionContext) -> Reconstructions:
    """KED-MI (Chen et al. 2021): a GAN whose discriminator learns the target's soft labels on public
    inputs, then one latent Gaussian per class fitted to the prior and identity losses, sampled."""
    shape = image_shape(ctx.info, "ked_mi")
    dev = ctx.device
    gan = train_kgan(target, public_inputs(ctx, "ked_mi"), ctx.info, p.gan(), ctx.cache_dir, dev, ctx.seed)
    assert gan is not None  # stop_after is not set
    g_net, d_net = gan.generator.requires_grad_(False), gan.discriminator.requires_grad_(False)  # eval mode
    identity = identity_loss(target, p, ctx, public_inputs(ctx, "ked_mi"), "ked_mi")
    k = len(classes)
    y = torch.tensor(classes, dtype=torch.int64, device=dev).repeat_interleave(p.samples)
    gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "ked_mi", *classes))
    mu = torch.zeros(k, p.latent_dim, device=dev, requires_grad=True)
    log_var = torch.ones(k, p.latent_dim, device=dev, requires_grad=True)
    opt = torch.optim.Adam([mu, log_var], lr=p.lr)
    for _ in range(p.steps):
        eps = torch.randn(k * p.samples, p.latent_dim, generator=gen).to(dev)
        z = mu.repeat_interleave(p.samples, 0) + (0.5 * log_var).exp().repeat_interleave(p.samples, 0) * eps
        x = g_net(z)
        loss = prior_loss(d_net(x)[1]) + p.identity_weight * identity(x, y)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        eps = torch.randn(k * p.per_class, p.latent_dim, generator=gen).to(dev)
        z = mu.repeat_interleave(p.per_class, 0) + (0.5 * log_var).exp().repeat_interleave(p.per_class, 0) * eps
        images = g_net(z)
    return Reconstructions(images.detach().cpu().reshape(-1, *shape), class_labels(classes, p.per_class))


@costs("ked_mi")
def ked_mi_flops(p: KEDMIParams, info: DataInfo, target_forward: float, num_classes: int, num_public: int) -> float:
    """GAN training (per generator update: n_critic discriminator updates on a labelled, an unlabelled and
    a fake batch, with the target on the labelled one and G on the fakes, then a generator update through
    D plus D on another unlabelled batch), the students' distillation and the distribution fitting (G, D
    and the identity term's models per sample), a backward pass counted as twice the forward."""
    g_net, d_net = build_kgan(info, info.num_classes, p.gan(), 0)  # small nets: one input each on the CPU
    g = forward_flops(g_net.eval(), torch.zeros(1, p.latent_dim))
    d = forward_flops(d_net.eval(), torch.zeros(1, *info.input_shape))
    gan = p.gan_steps * p.gan_batch_size * (p.n_critic * (g + target_forward + 3 * 3 * d) + 3 * (g + d) + d)
    identity, distil = identity_flops(p, info, target_forward, num_public)
    search = p.steps * p.samples * num_classes * (3 * (g + d) + identity)
    return gan + distil + search + p.per_class * num_classes * g
