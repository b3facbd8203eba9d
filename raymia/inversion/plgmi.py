"""PLG-MI, the pseudo label-guided model-inversion attack (Yuan et al., AAAI 2023; official code
github.com/LetheSec/PLG-MI-Attack: top_n_selection.py, train_cgan.py, reconstruct.py).

Stage 0, pseudo-labels: the target (eval mode) classifies the PUBLIC inputs; for each attacked class c the
`top_n` public inputs with the highest softmax probability of c get the pseudo-label c (selected per class
from the whole public set, so one input may be selected for several classes; ties go to the earlier input).

Stage 1, a conditional GAN on the pseudo-labelled inputs: a class-conditional generator G(z, y) and a
projection discriminator D(x, y) = psi(phi(x)) + <embed(y), phi(x)> (Miyato & Koyama 2018), hinge loss.
Each step updates G once, then D `n_critic` times (the official order). G's loss adds the inversion term:

    -mean D(G(z, y), y) + alpha x mean L_inv(T(aug(G(z, y))), y),  L_inv = -logit_y + max_{j != y} logit_j

(the max-margin loss), with y drawn uniformly over the attacked classes and gradients reaching G through
the frozen target. D's real batches are pseudo-labelled inputs with the official dequantisation noise
(U(0, 1/256) added to the pixels). Adam with betas (0, 0.9) for both nets.

Stage 2, the attack: for each class c, `per_class x restarts` latents z ~ N(0, I) are optimised with Adam
(lr 0.1, 600 steps by default, as reconstruct.py) to minimise the sum over `views` random augmentations of
L_inv(T(aug(G(z, c))), c), G in eval mode; each reconstruction keeps the restart with the lowest final
L_inv on the un-augmented image (the official script reports its 5 seeds separately instead).

Augmentations (`augment`, on the pixels in [0, 1], then normalised again): a random crop of the image's
aspect ratio and area fraction in [crop_scale, 1] resized back, a horizontal flip (p 0.5), a rotation in
[-rotate, rotate] degrees (one bilinear affine resampling, zero padding), then brightness and contrast
factors in [1 - jitter, 1 + jitter] and a clamp to [0, 1]: the official kornia pipeline (RandomResizedCrop
scale 0.8-1, ratio 1; ColorJitter 0.2, 0.2; RandomHorizontalFlip; RandomRotation 5), drawn from raymia's
seeded RNG.

Where raymia differs from the official code:
- pseudo-labels and the cGAN cover the ATTACKED classes only (the official code labels and trains on all
  1000 target classes, then attacks 300); the cGAN therefore depends on the class list (its cache key has it);
- the nets are gan.py's DCGAN pair sized to the input shape (see `raymia.inversion.gan`) made conditional,
  not the official 64x64 ResNet generator and SN-ResNet discriminator: G's BatchNorms are class-conditional
  (per-class gain and bias, as the official CategoricalConditionalBatchNorm); D is gan.py's convolution
  stack with spectral norm on every layer (the official D's normalisation), ReLU, no InstanceNorm, and
  global sum pooling to phi(x) (as the official D), then the projection head;
- defaults: latent_dim 64, width 32, gan_steps 2000 as GMI's GAN here (official: 128, 64, 30000 with
  64x64 ResNets), so GMI and PLG-MI get the same generator budget; n_critic (the code's n_dis) 5, lr 2e-4, batch 64, alpha 0.2,
  top_n 30, steps 600, lr 0.1, 5 restarts, 2 views as the official code;
- the random crop keeps the image's aspect ratio (official: square crops of 64x64 images, the same there);
  ColorJitter is applied to every image (the official training applies it with p 0.5) and
  brightness is multiplicative (torchvision's); real batches are drawn with replacement (official: shuffled
  epochs); the D update's fake images are generated without a graph (same values, less work).

Cache (`cache_dir`): the trained pair is `plgmi-cgan-<key>.pt`; the key hashes the public inputs' bytes, the
TARGET (its state_dict: names, shapes, values, buffers; and its module structure, `repr`), the attacked
classes, the data's shape and normalisation, every setting but `checkpoint_every`, the seed and the device
type. `plgmi-cgan-<key>.ckpt.pt` is the periodic checkpoint (nets, optimizers, step, RNG state) from which
a killed run resumes exactly; files, checksums and resume are gan.py's helpers. Every random draw (batches,
z, y, noise, augmentations) comes from CPU generators seeded with `derive_seed`; on CUDA the backward of
the resampling uses atomic adds, so runs there may differ in the last bits.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from raymia import progress
from raymia.cache import load_state, state_checksum
from raymia.datainfo import DataInfo
from raymia.errors import SpecError
from raymia.inversion.gan import (
    GanBudget,
    _after_step,
    _fresh,
    _halvings,
    _load_pair,
    _resume,
    _save_pair,
    cache_key,
)
from raymia.inversion.registry import (
    INVERSION,
    InversionContext,
    Reconstructions,
    class_labels,
    costs,
    forward_flops,
    image_shape,
    pixel_transform,
    public_inputs,
    white_box,
)
from raymia.registry import MAX_STEPS, Params
from raymia.seeding import derive_seed
from raymia.storage import StoredFile, store_dir

log = logging.getLogger("raymia")

_ARCH_VERSION = 1  # bump when the nets, the pseudo-labelling or the training loop change (in the cache key)
_BETAS = (0.0, 0.9)  # the official Adam betas of both nets


@dataclass(frozen=True)
class Augment:
    """The random views of generated images (see the module docstring); the official values by default."""

    crop_scale: float = 0.8
    flip: bool = True
    rotate: float = 5.0
    jitter: float = 0.2

    @property
    def identity(self) -> bool:
        return self.crop_scale >= 1 and not self.flip and self.rotate == 0 and self.jitter == 0


@dataclass(frozen=True)
class CGanSettings(GanBudget):
    """What the cGAN is and how it trains: the shared budget (`gan.GanBudget`), then PLG-MI's own."""

    n_critic: int = 5
    alpha: float = 0.2
    top_n: int = 30
    augment: Augment = field(default_factory=Augment)
    # the cache key hashes the fields by name, n_critic under its name before the rename (n_dis): cGANs cached
    # before it are found
    KEY_NAMES: ClassVar[dict[str, str]] = {"n_critic": "n_dis"}


# ---------------------------------------------------------------------------------------------------------
# the nets


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine map, then a per-class gain (initialised 1) and bias (0)."""

    def __init__(self, features: int, num_classes: int, dims: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(features, affine=False) if dims == 1 else nn.BatchNorm2d(features, affine=False)
        self.gain = nn.Embedding(num_classes, features)
        self.bias = nn.Embedding(num_classes, features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        view = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        return self.norm(x) * self.gain(y).view(view) + self.bias(y).view(view)


class ConditionalGenerator(nn.Module):
    """(z [N, latent_dim], y [N] in [0, num_classes)) -> images [N, C, H, W] in the normalised input space:
    gan.py's generator with class-conditional BatchNorms."""

    def __init__(self, shape: tuple[int, int, int], latent_dim: int, width: int, num_classes: int,
                 info: DataInfo):
        super().__init__()
        c, h, w = shape
        k = _halvings(h, w)
        self.start = (width * 2**k, h >> k, w >> k)
        flat = width * 2**k * (h >> k) * (w >> k)
        self.fc = nn.Linear(latent_dim, flat)
        self.fc_norm = ConditionalBatchNorm(flat, num_classes, 1)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(width * 2**i, width * 2 ** (i - 1), 4, 2, 1)
                                 for i in range(k, 0, -1))
        self.norms = nn.ModuleList(ConditionalBatchNorm(width * 2 ** (i - 1), num_classes, 2)
                                   for i in range(k, 0, -1))
        self.out = nn.Sequential(nn.Conv2d(width, c, 3, padding=1), nn.Tanh())
        mean, std = pixel_transform(info)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc_norm(self.fc(z), y)).view(-1, *self.start)
        for up, norm in zip(self.ups, self.norms):
            x = F.relu(norm(up(x), y))
        pixels = (self.out(x) + 1) / 2
        return (pixels - self.mean) / self.std


class ProjectionDiscriminator(nn.Module):
    """(images [N, C, H, W] normalised, y [N]) -> psi(phi(x)) + <embed(y), phi(x)> [N]: gan.py's convolution
    stack with spectral norm, ReLU and global sum pooling as phi."""

    def __init__(self, shape: tuple[int, int, int], width: int, num_classes: int):
        super().__init__()
        c, h, w = shape
        k = _halvings(h, w)
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(c, width, 3, padding=1)), nn.ReLU()]
        for i in range(k):
            layers += [spectral_norm(nn.Conv2d(width * 2**i, width * 2 ** (i + 1), 4, 2, 1)), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.psi = spectral_norm(nn.Linear(width * 2**k, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, width * 2**k))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        phi = self.features(x).sum(dim=(2, 3))
        return self.psi(phi).squeeze(1) + (self.embed(y) * phi).sum(1)


def build_cgan(info: DataInfo, num_classes: int, settings: CGanSettings,
               seed: int) -> tuple[ConditionalGenerator, ProjectionDiscriminator]:
    """The pair for `num_classes` conditions, initialised from `seed` (the global RNG is left as it was)."""
    shape = image_shape(info, "plg_mi")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "plgmi-cgan-init"))
        return (ConditionalGenerator(shape, settings.latent_dim, settings.width, num_classes, info),
                ProjectionDiscriminator(shape, settings.width, num_classes))


# ---------------------------------------------------------------------------------------------------------
# losses, augmentations, pseudo-labels


def max_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row [N]: -logit_y + max_{j != y} logit_j (the official `max_margin_loss`, unreduced)."""
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.max(1).values - true


def augment(x: torch.Tensor, rng: torch.Generator, aug: Augment, mean: torch.Tensor,
            std: torch.Tensor) -> torch.Tensor:
    """A random view of each image in x (normalised, [N, C, H, W]); the draws come from `rng` (CPU)."""
    if aug.identity:
        return x
    n, _, h, w = x.shape
    u = torch.rand(n, 6, generator=rng).to(x.device, x.dtype)
    side = torch.sqrt(aug.crop_scale + (1 - aug.crop_scale) * u[:, 0])  # of the crop, as a fraction
    tx, ty = (2 * u[:, 1] - 1) * (1 - side), (2 * u[:, 2] - 1) * (1 - side)
    angle = (2 * u[:, 3] - 1) * math.radians(aug.rotate)
    sx = torch.where(u[:, 4] < 0.5, -1.0, 1.0) * side if aug.flip else side
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin * side * h / w, tx], 1),  # rotation in pixel units
                         torch.stack([sin * sx * w / h, cos * side, ty], 1)], 1)
    pixels = x * std + mean
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if aug.jitter > 0:
        factors = 1 + aug.jitter * (2 * torch.rand(n, 2, generator=rng).to(x.device, x.dtype) - 1)
        pixels = pixels * factors[:, 0].view(n, 1, 1, 1)
        centre = pixels.mean(dim=(1, 2, 3), keepdim=True)
        pixels = (pixels - centre) * factors[:, 1].view(n, 1, 1, 1) + centre
        pixels = pixels.clamp(0, 1)
    return (pixels - mean) / std


def pseudo_label(target: nn.Module, x_public: torch.Tensor, classes: Sequence[int], top_n: int,
                 device: torch.device, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices into x_public [k x top_n], condition index [k x top_n] (position of the class in
    `classes`), the target's probability of that class [k x top_n]): per class, the top_n public inputs by
    the target's softmax probability (stable order: ties go to the earlier input). target in eval mode."""
    with torch.no_grad():
        probs = torch.cat([F.softmax(target(x_public[i:i + batch].to(device)).float(), 1).cpu()
                           for i in range(0, x_public.shape[0], batch)])
    idx, cond, conf = [], [], []
    for j, c in enumerate(classes):
        order = torch.sort(probs[:, c], descending=True, stable=True).indices[:top_n]
        idx.append(order)
        cond.append(torch.full((order.shape[0],), j, dtype=torch.int64))
        conf.append(probs[order, c])
    return torch.cat(idx), torch.cat(cond), torch.cat(conf)


# ---------------------------------------------------------------------------------------------------------
# training and cache


@dataclass
class FittedCGan:
    """A trained pair (eval mode) for `classes` (condition j is classes[j]). `source`: 'cache', 'trained'
    or 'resumed'; `start_step`: where this call's training started (`steps` when loaded); `path`: the file."""

    generator: ConditionalGenerator
    discriminator: ProjectionDiscriminator
    classes: list[int]
    key: str
    path: Path
    source: str
    start_step: int


def target_digest(target: nn.Module) -> str:
    """sha256 over the target's state_dict (names, dtypes, shapes, values, buffers) and its structure."""
    h = hashlib.sha256(state_checksum(target.state_dict()).encode())
    h.update(repr(target).encode())
    return h.hexdigest()


def cgan_key(target: nn.Module, x_public: torch.Tensor, classes: Sequence[int], info: DataInfo,
             settings: CGanSettings, seed: int, device: torch.device) -> str:
    """The cache key (`gan.cache_key`) with the target and the attacked classes."""
    return cache_key("plgmi-cgan", _ARCH_VERSION, x_public, info, settings, seed, device,
                     target=target_digest(target), classes=[int(c) for c in classes])


def hinge_cgan_steps(g_net: nn.Module, d_net: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                     rng: torch.Generator, x: torch.Tensor, y: torch.Tensor,
                     draw_labels: Callable[[int], torch.Tensor], settings: Any, info: DataInfo, start: int,
                     device: torch.device, ckpt: Path | StoredFile, key: str, what: str, stop_after: int | None = None,
                     extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> bool:
    """Steps `start`..settings.steps of PLG-MI's conditional GAN game on inputs x [N, ...] (CPU) with
    labels y [N]: per step one generator update (hinge loss -D(G(z, c), c), plus `extra_loss(fake, c)`,
    with D frozen) and `settings.n_critic` discriminator updates (hinge loss on real inputs with
    dequantisation noise and on fakes); fake labels c come from `draw_labels(batch)`; every random draw
    from `rng`. A checkpoint every `settings.checkpoint_every` steps; False when `stop_after` steps of
    this call stopped it (as a kill would), True when it finished. Shared by PLG-MI and the `gan`
    non-member set (raymia.data.ood), which trains without an extra loss."""
    std_cpu = pixel_transform(info)[1]
    n, b, zdim = x.shape[0], settings.batch_size, settings.latent_dim
    for step in progress.steps(range(start, settings.steps), "plg_mi: cGAN training steps"):
        z = torch.randn(b, zdim, generator=rng).to(device)
        c = draw_labels(b).to(device)
        d_net.requires_grad_(False)
        fake = g_net(z, c)
        loss_g = -d_net(fake, c).mean()
        if extra_loss is not None:
            loss_g = loss_g + extra_loss(fake, c)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        d_net.requires_grad_(True)
        for _ in range(settings.n_critic):
            pick = torch.randint(n, (b,), generator=rng)
            noise = torch.rand(b, *x.shape[1:], generator=rng) / 256 / std_cpu  # dequantisation
            real, y_real = (x[pick] + noise).to(device), y[pick].to(device)
            z = torch.randn(b, zdim, generator=rng).to(device)
            c = draw_labels(b).to(device)
            with torch.no_grad():
                fake = g_net(z, c)
            loss_d = F.relu(1 - d_net(real, y_real)).mean() + F.relu(1 + d_net(fake, c)).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        if _after_step(step + 1, start, settings.steps, settings.checkpoint_every, stop_after, ckpt, key, g_net,
                       d_net, opt_g, opt_d, rng, f"{what}: cGAN"):
            return False
    return True


def train_cgan(target: nn.Module, x_public: torch.Tensor, classes: Sequence[int], info: DataInfo,
               settings: CGanSettings, cache_dir: Path, device: torch.device, seed: int,
               stop_after: int | None = None) -> FittedCGan | None:
    """The cached cGAN for this target, public inputs, classes and settings, else train it (resuming from
    a checkpoint). The target is used in eval mode with frozen parameters and given back as it was.

    `stop_after`: return None after this many steps of this call, as if the process were killed then (no
    checkpoint is written beyond the periodic ones): for tests, or to spread training over several calls.
    """
    classes = [int(c) for c in classes]
    if settings.top_n > x_public.shape[0]:
        raise ValueError(f"top_n {settings.top_n} exceeds the {x_public.shape[0]} public inputs")
    k = len(classes)
    key = cgan_key(target, x_public, classes, info, settings, seed, device)
    path = store_dir(cache_dir) / f"plgmi-cgan-{key}.pt"
    ckpt = path.with_name(f"plgmi-cgan-{key}.ckpt.pt")
    g_net, d_net = build_cgan(info, k, settings, seed)
    state = load_state(path, key)
    if state is not None and _load_pair(g_net, d_net, state, what="plg_mi"):
        log.info("plg_mi: cGAN loaded from %s", path)
        return FittedCGan(g_net.to(device).eval(), d_net.to(device).eval(), classes, key, path, "cache",
                          settings.steps)

    def fresh(g, d):
        return _fresh(g, d, settings, seed, device, betas=_BETAS, role="plgmi-cgan-train")

    g_net, d_net, opt_g, opt_d, rng = fresh(g_net, d_net)
    start = _resume(ckpt, key, g_net, d_net, opt_g, opt_d, rng, what="plg_mi")
    if start is None:  # a checkpoint that does not fit may have been loaded in part: start clean
        g_net, d_net, opt_g, opt_d, rng = fresh(*build_cgan(info, k, settings, seed))
        start = 0

    with white_box(target, device):
        x = x_public.detach().float().cpu()
        idx, cond, conf = pseudo_label(target, x, classes, settings.top_n, device)
        x_sel = x[idx]
        if start:
            log.info("plg_mi: resuming cGAN training at step %d/%d from %s", start, settings.steps, ckpt)
        else:
            log.info("plg_mi: training the cGAN on %d pseudo-labelled public inputs (top %d of %d per class, "
                     "mean target confidence %.3f; %d steps)", x_sel.shape[0], settings.top_n, x.shape[0],
                     float(conf.mean()), settings.steps)
        mean, std = pixel_transform(info, device)
        cls = torch.tensor(classes, dtype=torch.int64, device=device)

        def inversion_loss(fake: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # on an augmented view
            return settings.alpha * max_margin(target(augment(fake, rng, settings.augment, mean, std)), cls[y]).mean()

        finished = hinge_cgan_steps(g_net, d_net, opt_g, opt_d, rng, x_sel, cond,
                                    lambda b: torch.randint(k, (b,), generator=rng), settings, info, start, device,
                                    ckpt, key, "plg_mi", stop_after, extra_loss=inversion_loss)
        if not finished:
            return None

    _save_pair(path, ckpt, key, g_net, d_net)
    return FittedCGan(g_net.eval(), d_net.eval(), classes, key, path, "resumed" if start else "trained", start)


# ---------------------------------------------------------------------------------------------------------
# the attack

_CGAN = CGanSettings()
_AUG = Augment()


class PLGMIParams(Params):
    per_class: int = Field(1, ge=1, le=10_000, description="reconstructions per class")
    steps: int = Field(600, ge=1, le=MAX_STEPS, description="latent optimisation steps (PLG-MI: 600)")
    lr: float = Field(0.1, gt=0, description="Adam learning rate on z (PLG-MI: 0.1)")
    restarts: int = Field(5, ge=1, le=1000, description="random starts per reconstruction; the lowest final "
                                                       "max-margin loss is kept (PLG-MI: 5 seeds)")
    views: int = Field(2, ge=1, le=64, description="augmented views per latent step, their losses summed "
                                                  "(PLG-MI: 2)")
    top_n: int = Field(_CGAN.top_n, ge=1, le=10_000_000,
                       description="public inputs pseudo-labelled per attacked class: the target's most "
                                   "confident ones (PLG-MI: 30)")
    alpha: float = Field(_CGAN.alpha, ge=0, description="weight of the max-margin inversion loss in the "
                                                        "generator's loss (PLG-MI: 0.2)")
    crop_scale: float = Field(_AUG.crop_scale, gt=0, le=1, description="smallest area fraction of the random "
                              "crop, resized back (PLG-MI: 0.8; 1: no crop)")
    flip: bool = Field(_AUG.flip, description="random horizontal flips (PLG-MI: on; turn off for classes that "
                                              "are not mirror-symmetric, e.g. digits)")
    rotate: float = Field(_AUG.rotate, ge=0, le=180, description="random rotation of up to this many degrees "
                                                                "(PLG-MI: 5)")
    jitter: float = Field(_AUG.jitter, ge=0, lt=1, description="random brightness and contrast factors in "
                                                              "[1 - jitter, 1 + jitter] (PLG-MI: 0.2)")
    latent_dim: int = Field(_CGAN.latent_dim, ge=1, le=4096, description="cGAN latent dimension (PLG-MI: 128)")
    width: int = Field(_CGAN.width, ge=1, le=1024,
                       description="channels of the cGAN's first (last) conv layer (PLG-MI: 64)")
    gan_steps: int = Field(_CGAN.steps, ge=1, le=MAX_STEPS, description="generator updates of cGAN training (PLG-MI: 30000)")
    gan_batch_size: int = Field(_CGAN.batch_size, ge=1, description="images per cGAN batch (PLG-MI: 64)")
    gan_lr: float = Field(_CGAN.lr, gt=0, description="Adam learning rate of both cGAN nets, betas (0, 0.9) "
                                                      "(PLG-MI: 2e-4)")
    n_critic: int = Field(_CGAN.n_critic, ge=1, le=100, validation_alias="n_dis",
                          description="discriminator updates per generator update (PLG-MI: 5)")
    checkpoint_every: int = Field(_CGAN.checkpoint_every, ge=1,
                                  description="cGAN training checkpoint period in steps (not in the cache key)")

    def augment(self) -> Augment:
        return Augment(crop_scale=self.crop_scale, flip=self.flip, rotate=self.rotate, jitter=self.jitter)

    def cgan(self) -> CGanSettings:
        return CGanSettings(latent_dim=self.latent_dim, width=self.width, steps=self.gan_steps,
                            batch_size=self.gan_batch_size, lr=self.gan_lr, n_critic=self.n_critic, alpha=self.alpha,
                            top_n=self.top_n, augment=self.augment(), checkpoint_every=self.checkpoint_every)


@INVERSION.register("plg_mi", PLGMIParams)
def plg_mi(target: nn.Module, classes: list[int], p: PLGMIParams, ctx: InversionContext) -> Reconstructions:
    """PLG-MI (Yuan et al. 2023): a cGAN on the target's top-n pseudo-labelled public inputs, then latent search.

    The cGAN's generator loss adds alpha x the target's max-margin loss on augmented fakes; the search
    minimises the max-margin loss over augmented views of G(z, c) with Adam, keeping the best restart."""
    shape = image_shape(ctx.info, "plg_mi")
    x_public = public_inputs(ctx, "plg_mi")
    if p.top_n > x_public.shape[0]:
        raise SpecError(f"{p.top_n} exceeds the {x_public.shape[0]} public inputs", where="inversion.params.top_n")
    dev = ctx.device
    cgan = train_cgan(target, x_public, classes, ctx.info, p.cgan(), ctx.cache_dir, dev, ctx.seed)
    assert cgan is not None  # stop_after is not set
    g_net = cgan.generator.requires_grad_(False)  # eval mode
    mean, std = pixel_transform(ctx.info, dev)
    aug = p.augment()
    y = class_labels(classes, p.per_class).repeat_interleave(p.restarts).to(dev)
    cond = torch.arange(len(classes)).repeat_interleave(p.per_class * p.restarts).to(dev)
    gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "plg_mi", *classes))
    z = torch.randn(y.shape[0], p.latent_dim, generator=gen).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=p.lr)
    for _ in range(p.steps):
        x = g_net(z, cond)
        loss = sum(max_margin(target(augment(x, gen, aug, mean, std)), y) for _ in range(p.views))
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        final = max_margin(target(g_net(z, cond)), y).view(-1, p.restarts)
        best = final.argmin(1)
        keep = torch.arange(best.shape[0], device=dev) * p.restarts + best
        images = g_net(z[keep], cond[keep])
    return Reconstructions(images.detach().cpu().reshape(-1, *shape), class_labels(classes, p.per_class))


@costs("plg_mi")
def plg_mi_flops(p: PLGMIParams, info: DataInfo, target_forward: float, num_classes: int, num_public: int) -> float:
    """cGAN training (per generator update: G, D and the target on an augmented fake batch, then n_critic
    discriminator updates on a real and a fake batch) and the latent search (G and `views` target passes
    per latent), a backward pass counted as twice the forward; pseudo-labelling is one target pass per
    public input and is left out (it depends on the public set's size, not the settings)."""
    g_net, d_net = build_cgan(info, num_classes, p.cgan(), 0)  # small nets: one input each on the CPU
    y = torch.zeros(1, dtype=torch.int64)
    g = forward_flops(g_net.eval(), torch.zeros(1, p.latent_dim), y)
    d = forward_flops(d_net.eval(), torch.zeros(1, *info.input_shape), y)
    gan = p.gan_steps * p.gan_batch_size * (3 * (g + d + target_forward) + p.n_critic * (g + 3 * 2 * d))
    search = p.steps * p.restarts * p.per_class * num_classes * 3 * (g + p.views * target_forward)
    return gan + search
