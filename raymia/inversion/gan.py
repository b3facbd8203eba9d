"""GMI's image prior: a small DCGAN-style generator and discriminator trained on PUBLIC data only, cached and
resumable.

Architecture (adapts to the input shape (C, H, W)): H and W are halved k times while both are even and
the halves stay >= 4 (8x8 digits: k = 1 from 4x4; 28x28: k = 2 from 7x7; 32x32 and 64x64: k = 3 and 4
from 4x4). The generator maps z ~ N(0, I) through Linear -> BatchNorm -> ReLU to width x 2^k channels at
(H, W) / 2^k, then k blocks ConvTranspose(4, stride 2) -> BatchNorm -> ReLU halving the channels, then a
3x3 convolution to C channels and tanh; the result, read as pixels in [0, 1], is normalised with the data
set's mean and std, so every generated image is in the target's input space and its valid range. The
discriminator mirrors it: a 3x3 convolution to `width` channels, k blocks Conv(4, stride 2) ->
InstanceNorm (affine) -> LeakyReLU(0.2) doubling the channels, and a linear layer to one unnormalised
score (GMI's critic: no BatchNorm, so the gradient penalty is per sample).

Training (`train_gan`): Adam (betas 0.5, 0.999) for both nets; each step is `n_critic` discriminator
updates then one generator update, on batches drawn with replacement. `loss`: `wgan_gp` (GMI's: critic
loss D(fake) - D(real) + gp_weight x (||grad D(interpolate)|| - 1)^2, generator loss -D(G(z))) or `dcgan`
(the non-saturating logistic loss). Every random draw (batches, z, interpolation weights) comes from one
CPU generator seeded from the seed, whose state is part of the checkpoint, and the nets are initialised
from the same seed, so a resumed run ends with exactly the weights of an uninterrupted one (on the same
device).

Cache (`cache_dir`): the trained pair is `gmi-gan-<key>.pt`, the key hashing the public inputs' bytes,
the data's shape and normalisation, every training setting but `checkpoint_every`, the seed and the device
type. While training, `gmi-gan-<key>.ckpt.pt` holds generator, discriminator, both optimizers, the step
and the generator's RNG state, written every `checkpoint_every` steps; a run that is killed resumes from
it, and it is removed once the final file is written. Both files use `raymia.cache`'s helpers
(tensors and strings only, checksum, atomic write, `torch.load(weights_only=True)`); a damaged or foreign
file is ignored with a warning (the final file refitted, the checkpoint restarted).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raymia import progress
from raymia.cache import data_digest, key_digest, load_state, save_state
from raymia.datainfo import DataInfo
from raymia.inversion.registry import (
    InversionContext,
    forward_flops,
    image_shape,
    pixel_transform,
    public_inputs,
)
from raymia.registry import MAX_STEPS, ActsWhen, Params
from raymia.seeding import derive_seed
from raymia.storage import StoredFile, store_dir

log = logging.getLogger("raymia")

_ARCH_VERSION = 1  # bump when the architecture or the training loop changes (part of the cache key)


@dataclass(frozen=True)
class GanBudget:
    """The size and training budget that GMI's, PLG-MI's and KED-MI's GANs share by default, so that the
    attacks get the same generator budget (all but `checkpoint_every` are part of each cache key)."""

    latent_dim: int = 64
    width: int = 32
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-4
    checkpoint_every: int = 200


@dataclass(frozen=True)
class GanSettings(GanBudget):
    """What GMI's GAN is and how it trains: the shared budget, then its loss."""

    loss: Literal["wgan_gp", "dcgan"] = "wgan_gp"
    n_critic: int = 5
    gp_weight: float = 10.0


_GAN = GanSettings()


class GanParams(Params):
    """The params of GMI's GAN prior, trained on public inputs only (shared by `gmi` and `brep_mi`: the
    same settings find the same cached GAN)."""

    latent_dim: int = Field(_GAN.latent_dim, ge=1, le=4096, description="dimension of the GAN's latent z (GMI: 100)")
    width: int = Field(_GAN.width, ge=1, le=1024, description="channels of the GAN's first (last) conv layer")
    gan_steps: int = Field(_GAN.steps, ge=1, le=MAX_STEPS, description="generator updates of GAN training")
    gan_batch_size: int = Field(_GAN.batch_size, ge=1, description="public inputs per GAN batch")
    gan_lr: float = Field(_GAN.lr, gt=0, description="Adam learning rate of both GAN nets (betas 0.5, 0.999)")
    gan_loss: Literal["wgan_gp", "dcgan"] = Field(
        _GAN.loss, description="wgan_gp (GMI's) or dcgan (non-saturating logistic loss)")
    n_critic: int = Field(_GAN.n_critic, ge=1, description="discriminator updates per generator update")
    gp_weight: float = Field(_GAN.gp_weight, ge=0, description="gradient-penalty weight (wgan_gp)")
    checkpoint_every: int = Field(_GAN.checkpoint_every, ge=1,
                                  description="GAN training checkpoint period in steps (not in the cache key)")

    acts_when = {"gp_weight": ActsWhen("gan_loss", ("wgan_gp",))}

    def gan(self) -> GanSettings:
        return GanSettings(latent_dim=self.latent_dim, width=self.width, steps=self.gan_steps,
                           batch_size=self.gan_batch_size, lr=self.gan_lr, loss=self.gan_loss,
                           n_critic=self.n_critic, gp_weight=self.gp_weight,
                           checkpoint_every=self.checkpoint_every)


def _halvings(h: int, w: int) -> int:
    k = 0
    while h % 2 == 0 and w % 2 == 0 and min(h, w) // 2 >= 4:
        h, w, k = h // 2, w // 2, k + 1
    return k


class Generator(nn.Module):
    """z [N, latent_dim] -> images [N, C, H, W] in the normalised input space (pixels in [0, 1])."""

    def __init__(self, shape: tuple[int, int, int], latent_dim: int, width: int, info: DataInfo):
        super().__init__()
        c, h, w = shape
        k = _halvings(h, w)
        self.start = (width * 2**k, h >> k, w >> k)
        self.fc = nn.Sequential(nn.Linear(latent_dim, width * 2**k * (h >> k) * (w >> k)),
                                nn.BatchNorm1d(width * 2**k * (h >> k) * (w >> k)), nn.ReLU())
        blocks: list[nn.Module] = []
        for i in range(k, 0, -1):
            blocks += [nn.ConvTranspose2d(width * 2**i, width * 2 ** (i - 1), 4, 2, 1),
                       nn.BatchNorm2d(width * 2 ** (i - 1)), nn.ReLU()]
        self.up = nn.Sequential(*blocks, nn.Conv2d(width, c, 3, padding=1), nn.Tanh())
        mean, std = pixel_transform(info)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        pixels = (self.up(self.fc(z).view(-1, *self.start)) + 1) / 2
        return (pixels - self.mean) / self.std


class Discriminator(nn.Module):
    """images [N, C, H, W] (normalised) -> one unnormalised realism score each [N]."""

    def __init__(self, shape: tuple[int, int, int], width: int):
        super().__init__()
        c, h, w = shape
        k = _halvings(h, w)
        layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), nn.LeakyReLU(0.2)]
        for i in range(k):
            layers += [nn.Conv2d(width * 2**i, width * 2 ** (i + 1), 4, 2, 1),
                       nn.InstanceNorm2d(width * 2 ** (i + 1), affine=True), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.score = nn.Linear(width * 2**k * (h >> k) * (w >> k), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(x)).squeeze(1)


@dataclass
class FittedGan:
    """A trained pair (eval mode). `source`: 'cache' (loaded), 'trained' (from scratch) or 'resumed' (from
    the checkpoint); `start_step`: the step this call's training started at (0 from scratch, the
    checkpoint's step when resumed, `steps` when loaded); `path`: the cache file."""

    generator: Generator
    discriminator: Discriminator
    key: str
    path: Path
    source: str
    start_step: int


def cache_key(what: str, arch: int, x_public: torch.Tensor, info: DataInfo, settings: Any, seed: int,
              device: torch.device, **extra: Any) -> str:
    """The cache key of a GAN fitted on public inputs (GMI's, PLG-MI's, KED-MI's): `what` and its
    architecture version, the public inputs' bytes, the data's shape and normalisation, every setting of the
    `settings` dataclass but `checkpoint_every`, the seed, the device type, and `extra` (a target's digest,
    the attacked classes)."""
    public = SimpleNamespace(name="public", x_train=x_public, y_train=torch.empty(0, dtype=torch.int64))
    names = getattr(settings, "KEY_NAMES", {})  # a renamed setting under its name before the rename
    fields = {names.get(k, k): v for k, v in asdict(settings).items() if k != "checkpoint_every"}
    return key_digest({"what": what, "arch": arch, "public": data_digest(public, with_labels=False),
                       "shape": list(info.input_shape), "mean": info.mean, "std": info.std, "settings": fields,
                       "seed": seed, "device": device.type, **extra})


def gan_key(x_public: torch.Tensor, info: DataInfo, settings: GanSettings, seed: int,
            device: torch.device) -> str:
    """GMI's cache key (`cache_key`)."""
    return cache_key("gmi-gan", _ARCH_VERSION, x_public, info, settings, seed, device)


def build_gan(info: DataInfo, settings: GanSettings, seed: int) -> tuple[Generator, Discriminator]:
    """The pair, initialised from `seed` (the global RNG is left as it was)."""
    shape = image_shape(info, "gmi")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "gmi-gan-init"))
        return (Generator(shape, settings.latent_dim, settings.width, info),
                Discriminator(shape, settings.width))


def train_gan(x_public: torch.Tensor, info: DataInfo, settings: GanSettings, cache_dir: Path,
              device: torch.device, seed: int, stop_after: int | None = None) -> FittedGan | None:
    """The cached pair for these public inputs and settings, else train it (resuming from a checkpoint).

    `stop_after`: return None after this many steps of this call, as if the process were killed then (no
    checkpoint is written beyond the periodic ones): for tests, or to spread training over several calls.
    """
    g_net, d_net = build_gan(info, settings, seed)
    key = gan_key(x_public, info, settings, seed, device)
    path = store_dir(cache_dir) / f"gmi-gan-{key}.pt"
    ckpt = path.with_name(f"gmi-gan-{key}.ckpt.pt")
    state = load_state(path, key)
    if state is not None and _load_pair(g_net, d_net, state):
        log.info("gmi: GAN loaded from %s", path)
        return FittedGan(g_net.to(device).eval(), d_net.to(device).eval(), key, path, "cache", settings.steps)

    g_net, d_net, opt_g, opt_d, rng = _fresh(g_net, d_net, settings, seed, device)
    start = _resume(ckpt, key, g_net, d_net, opt_g, opt_d, rng)
    if start is None:  # a checkpoint that does not fit may have been loaded in part: start clean
        g_net, d_net, opt_g, opt_d, rng = _fresh(*build_gan(info, settings, seed), settings, seed, device)
        start = 0
    if start:
        log.info("gmi: resuming GAN training at step %d/%d from %s", start, settings.steps, ckpt)
    else:
        log.info("gmi: training the GAN on %d public inputs (%d steps)", x_public.shape[0], settings.steps)

    x = x_public.detach().float().cpu()
    n, b, zdim = x.shape[0], settings.batch_size, settings.latent_dim
    for step in progress.steps(range(start, settings.steps), "gmi: GAN training steps"):
        for _ in range(settings.n_critic):
            real = x[torch.randint(n, (b,), generator=rng)].to(device)
            z = torch.randn(b, zdim, generator=rng).to(device)
            with torch.no_grad():
                fake = g_net(z)
            d_real, d_fake = d_net(real), d_net(fake)
            if settings.loss == "wgan_gp":
                eps = torch.rand(b, 1, 1, 1, generator=rng).to(device)
                loss_d = d_fake.mean() - d_real.mean() + settings.gp_weight * _penalty(d_net, real, fake, eps)
            else:
                loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        score = d_net(g_net(torch.randn(b, zdim, generator=rng).to(device)))
        loss_g = -score.mean() if settings.loss == "wgan_gp" else F.softplus(-score).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if _after_step(step + 1, start, settings.steps, settings.checkpoint_every, stop_after, ckpt, key, g_net,
                       d_net, opt_g, opt_d, rng, "gmi: GAN"):
            return None

    _save_pair(path, ckpt, key, g_net, d_net)
    return FittedGan(g_net.eval(), d_net.eval(), key, path, "resumed" if start else "trained", start)


def public_gan(p: GanParams, ctx: InversionContext, attack: str) -> FittedGan:
    """GMI's GAN for these params on ctx's public inputs, from the cache or trained: what `gmi` and
    `brep_mi` search in."""
    gan = train_gan(public_inputs(ctx, attack), ctx.info, p.gan(), ctx.cache_dir, ctx.device, ctx.seed)
    assert gan is not None  # stop_after is not set
    return gan


def gan_flops(p: GanParams, info: DataInfo) -> tuple[float, float, float]:
    """(FLOPs of training GMI's GAN, of one generator forward, of one discriminator forward): per generator
    update n_critic critic steps on a real and a fake batch (plus the gradient penalty's extra pass for
    wgan_gp), then a generator step; a backward pass counted as twice the forward."""
    g_net, d_net = build_gan(info, p.gan(), 0)  # small nets: one forward of one input each on the CPU
    g = forward_flops(g_net.eval(), torch.zeros(1, p.latent_dim))
    d = forward_flops(d_net.eval(), torch.zeros(1, *info.input_shape))
    penalty = 2 * d if p.gan_loss == "wgan_gp" else 0.0
    train = p.gan_steps * p.gan_batch_size * (p.n_critic * (g + 3 * 2 * d + 3 * penalty) + 3 * (g + d))
    return train, g, d


def _fresh(g_net: nn.Module, d_net: nn.Module, settings: GanSettings, seed: int, device: torch.device,
           betas: tuple[float, float] = (0.5, 0.999), role: str = "gmi-gan-train"):
    """The nets on the device in train mode, their Adam optimizers (`betas`; `settings.lr`) and the training
    RNG (seeded from `seed` and `role`), as at step 0. `settings`: anything with an `lr`."""
    g_net.to(device).train()
    d_net.to(device).train()
    opt_g = torch.optim.Adam(g_net.parameters(), lr=settings.lr, betas=betas)
    opt_d = torch.optim.Adam(d_net.parameters(), lr=settings.lr, betas=betas)
    rng = torch.Generator().manual_seed(derive_seed(seed, role))
    return g_net, d_net, opt_g, opt_d, rng


def _penalty(d_net: nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: mean over the batch of (||grad_x D(x)|| - 1)^2 at random interpolates of real and fake."""
    mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(d_net(mix).sum(), mix, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def _unprefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def _load_pair(g_net: nn.Module, d_net: nn.Module, state: dict[str, torch.Tensor], what: str = "gmi") -> bool:
    try:
        g_net.load_state_dict(_unprefixed("generator", state))
        d_net.load_state_dict(_unprefixed("discriminator", state))
    except (RuntimeError, KeyError) as e:
        log.warning("%s: cached GAN does not fit the networks (%s); refitting", what, e)
        return False
    return True


def _optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as flat tensors (`prefix.<param index>.<name>`); its
    hyper-parameters come from the settings, which the key covers."""
    return {f"{prefix}.{i}.{name}": v if torch.is_tensor(v) else torch.tensor(v)
            for i, st in opt.state_dict()["state"].items() for name, v in st.items()}


def _load_optimizer(prefix: str, opt: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in _unprefixed(prefix, state).items():
        i, name = k.split(".", 1)
        per_param.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": per_param, "param_groups": opt.state_dict()["param_groups"]})


def _after_step(done: int, start: int, steps: int, every: int, stop_after: int | None, ckpt: Path | StoredFile,
                key: str, g_net: nn.Module, d_net: nn.Module, opt_g: torch.optim.Optimizer,
                opt_d: torch.optim.Optimizer, rng: torch.Generator, what: str) -> bool:
    """After generator update `done` of a GAN's training (this call started at `start`): the periodic
    checkpoint every `every` updates, and True when `stop_after` updates of this call stop it, as a kill
    would. `what` names the GAN in the log ("gmi: GAN")."""
    if done % every == 0 and done < steps:
        save_state(ckpt, key, _checkpoint(g_net, d_net, opt_g, opt_d, rng, done))
        log.info("%s training at step %d/%d (checkpointed)", what, done, steps)
    if stop_after is not None and done - start >= stop_after and done < steps:
        log.info("%s training stopped at step %d/%d (stop_after)", what, done, steps)
        return True
    return False


def _save_pair(path: Path | StoredFile, ckpt: Path | StoredFile, key: str, g_net: nn.Module, d_net: nn.Module) -> None:
    """The trained pair as the cache file, and the checkpoint gone."""
    save_state(path, key, {**_prefixed("generator", g_net.state_dict()),
                           **_prefixed("discriminator", d_net.state_dict())})
    ckpt.unlink(missing_ok=True)


def _checkpoint(g_net: nn.Module, d_net: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                rng: torch.Generator, step: int) -> dict[str, torch.Tensor]:
    return {**_prefixed("generator", g_net.state_dict()), **_prefixed("discriminator", d_net.state_dict()),
            **_optimizer_tensors("opt_g", opt_g), **_optimizer_tensors("opt_d", opt_d),
            "rng": rng.get_state(), "step": torch.tensor(step, dtype=torch.int64)}


def _resume(ckpt: Path | StoredFile, key: str, g_net: nn.Module, d_net: nn.Module, opt_g: torch.optim.Optimizer,
            opt_d: torch.optim.Optimizer, rng: torch.Generator, what: str = "gmi") -> int | None:
    """Restore the checkpoint into the nets, optimizers and RNG: the step it was taken at (0: there is
    none; None: it does not fit, and may have been loaded in part)."""
    state = load_state(ckpt, key)
    if state is None:
        return 0
    try:
        g_net.load_state_dict(_unprefixed("generator", state))
        d_net.load_state_dict(_unprefixed("discriminator", state))
        _load_optimizer("opt_g", opt_g, state)
        _load_optimizer("opt_d", opt_d, state)
        rng.set_state(state["rng"])
        return int(state["step"])
    except (RuntimeError, KeyError, ValueError) as e:
        log.warning("%s: checkpoint %s does not fit (%s); training from the start", what, ckpt, e)
        return None
