"""Latent-space metric-privacy synthetic data (arXiv 2202.05469): the bank trains on VAE-made records.

A VAE is fitted once to the public split (training points outside the audited population); each bank
model's members are encoded to latent codes, every code is perturbed with noise satisfying metric privacy
(d_X-privacy) at level ``epsilon``, and the decoded records replace the members (labels kept). The model's
outputs and training loop are otherwise unchanged.

Caveat (from the paper): the VAE itself is fitted WITHOUT differential privacy (in the paper, to the
private data; here, to public data only); the metric-privacy guarantee covers the released synthetic
records only, not the VAE's weights. Larger epsilon means less noise, more utility and less privacy.

Choices made here (the paper's text fixes neither):
- the VAE is fitted to the PUBLIC split only (``public_indices``: the training points outside the audited
  population, which no bank model trains on), shared by every bank model; fitting it to audited points
  would let a model's non-members shape its synthetic training data (understating leakage), so a plan
  that leaves no public point is refused (``check_data``);
- reconstruction is Gaussian in the data's NORMALISED space (inputs as the classifier sees them): the loss
  per record is ||x - x_hat||^2 + beta * KL(q(z|x) || N(0, I)), a unit-variance-1/2 Gaussian decoder, with
  a linear output layer (no sigmoid: normalised pixels are not in [0, 1]);
- images (C, H, W) with H, W >= 16 get a small conv VAE (two stride-2 convolutions, mirrored by transposed
  convolutions, output padding chosen so any H, W are reproduced exactly); smaller images (e.g. 8x8
  digits) and tabular records get an MLP VAE over the flattened input;
- the mechanisms (inferred, see REFERENCE 1.1): ``euclidean`` has density proportional to
  exp(-eps ||z' - z||_2) (uniform direction, radius ~ Gamma(latent_dim, 1/eps)); ``laplace`` adds
  i.i.d. Laplace(0, 1/eps) per coordinate (the L1 metric).

The fitted VAE is cached under the bank's cache directory, keyed by the data, the public indices, the
VAE's training parameters, the seed and the device type (epsilon, mechanism and encode only change the
transform, so a sweep over them reuses one VAE). Cache files hold tensors and strings only, carry a
checksum of their content, are written atomically and read with ``torch.load(weights_only=True)``; a
damaged file is refitted.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raymia.cache import data_digest, key_digest, load_state, save_state
from raymia.datainfo import DataInfo
from raymia.defenses.base import DEFENSES, Defense, public_indices, require_public
from raymia.device import resolve_device
from raymia.registry import MAX_EPOCHS, Params
from raymia.seeding import derive_seed
from raymia.space import Categorical, Domain, Float, Int
from raymia.spec import TrainSpec
from raymia.storage import store_dir
from raymia.train.loop import Hooks, member_batches, module_net, run_steps

log = logging.getLogger("raymia")

_ARCH_VERSION = 2  # bump when the VAE architecture or its training loop changes
_CHUNK = 1024  # records encoded / decoded at once




# ---------------------------------------------------------------------------------------------------------
# parameters


class VaeParams(Params):
    """Parameters of the VAE metric-privacy defense (see the module docstring)."""

    epsilon: float = Field(
        10.0, gt=0.0, validation_alias="eps",
        description="metric-privacy level of the latent noise (larger: less noise)")
    latent_dim: int = Field(16, ge=1, le=4096, description="dimension of the VAE's latent code, where the noise is added")
    beta: float = Field(1.0, ge=0.0, description="weight of the KL term of the VAE loss")
    mechanism: Literal["euclidean", "laplace"] = Field(
        "euclidean", description="euclidean: uniform direction, radius ~ Gamma(latent_dim, 1/epsilon) (L2 "
        "metric); laplace: i.i.d. Laplace(0, 1/epsilon) per coordinate (L1 metric)")
    encode: Literal["mean", "sample"] = Field(
        "mean", description="latent code of a record: the encoder's mean, or one sample of q(z|x)")
    class_conditional: bool = Field(
        False, description="feed the label (one-hot) to the encoder and the decoder")
    vae_epochs: int = Field(30, ge=1, le=MAX_EPOCHS, description="VAE training epochs over the public split (training "
                            "points outside the population)")
    vae_lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate of the VAE")
    vae_batch_size: int = Field(128, ge=1, validation_alias="vae_batch",
                                description="public points per VAE training step")
    hidden: int = Field(256, ge=1, le=65536,  # a VAE is fitted after the run starts: no typo's width reaches it
                        description="hidden width of the MLP VAE (and of the conv VAE's FC layer)")
    vae_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the VAE trains and runs (auto: CUDA when visible); part of the cache key")


# ---------------------------------------------------------------------------------------------------------
# the VAE


def _conv_sizes(s: int) -> tuple[int, int, int]:
    """Spatial sizes after 0, 1 and 2 stride-2 convolutions (kernel 4, padding 1): floor halving."""
    return s, s // 2, s // 4


class VAE(nn.Module):
    """Gaussian-encoder VAE with a linear decoder output: conv for images >= 16x16, MLP otherwise."""

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int, hidden: int, num_classes: int,
                 class_conditional: bool):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.cond = num_classes if class_conditional else 0
        shape = self.input_shape
        self.conv = len(shape) == 3 and min(shape[1:]) >= 16
        if self.conv:
            c, h, w = shape
            hs, ws = _conv_sizes(h), _conv_sizes(w)
            self.feat_shape = (64, hs[2], ws[2])
            feat = 64 * hs[2] * ws[2]
            self.enc = nn.Sequential(nn.Conv2d(c, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1),
                                     nn.ReLU(), nn.Flatten())
            self.enc_fc = nn.Sequential(nn.Linear(feat + self.cond, hidden), nn.ReLU())
            self.dec_fc = nn.Sequential(nn.Linear(latent_dim + self.cond, hidden), nn.ReLU(),
                                        nn.Linear(hidden, feat), nn.ReLU())
            # Transposed conv (k4, s2, p1) doubles a size; output padding restores an odd one.
            self.dec = nn.Sequential(
                nn.ConvTranspose2d(64, 32, 4, 2, 1, output_padding=(hs[1] - 2 * hs[2], ws[1] - 2 * ws[2])),
                nn.ReLU(),
                nn.ConvTranspose2d(32, c, 4, 2, 1, output_padding=(hs[0] - 2 * hs[1], ws[0] - 2 * ws[1])),
            )
        else:
            d = math.prod(shape)
            self.enc = nn.Flatten()
            self.enc_fc = nn.Sequential(nn.Linear(d + self.cond, hidden), nn.ReLU(),
                                        nn.Linear(hidden, hidden), nn.ReLU())
            self.dec_fc = nn.Sequential(nn.Linear(latent_dim + self.cond, hidden), nn.ReLU(),
                                        nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d))
            self.dec = nn.Identity()
        self.mu = nn.Linear(hidden, latent_dim)
        self.logvar = nn.Linear(hidden, latent_dim)

    def _onehot(self, y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        if not self.cond:
            return None
        if y is None:
            raise ValueError("a class-conditional VAE needs the labels")
        return F.one_hot(y.long(), self.num_classes).to(like.dtype)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(z | x[, y])."""
        h = self.enc(x)
        oh = self._onehot(y, h)
        h = self.enc_fc(h if oh is None else torch.cat([h, oh], dim=1))
        return self.mu(h), self.logvar(h).clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of p(x | z[, y]) in the input's (normalised) space, shaped like the inputs."""
        oh = self._onehot(y, z)
        h = self.dec_fc(z if oh is None else torch.cat([z, oh], dim=1))
        if self.conv:
            h = self.dec(h.view(-1, *self.feat_shape))
        return h.reshape(-1, *self.input_shape)


def vae_loss(model: VAE, x: torch.Tensor, y: torch.Tensor | None, beta: float,
             generator: torch.Generator) -> torch.Tensor:
    """Batch mean of ||x - x_hat||^2 + beta * KL(q(z|x) || N(0, I)), one reparameterised sample per record."""
    mu, logvar = model.encode(x, y)
    noise = torch.randn(mu.shape, generator=generator).to(mu.device)
    z = mu + (0.5 * logvar).exp() * noise
    rec = (model.decode(z, y) - x).pow(2).flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
    return (rec + beta * kl).mean()


def train_vae(model: VAE, x: torch.Tensor, y: torch.Tensor, p: VaeParams, seed: int,
              device: torch.device) -> VAE:
    """Fit the VAE with Adam (constant lr) over full shuffled mini-batches on the step loop, its loss as the
    loop's `gradient` hook (order and sampling noise seeded); raises TrainingDiverged when it diverges."""
    model.to(device).train()
    noise_gen = torch.Generator().manual_seed(derive_seed(seed, "noise"))
    x, y = x.to(device), y.to(device)
    n = x.shape[0]
    batch = min(p.vae_batch_size, n)
    recipe = TrainSpec(optimizer="adam", lr=p.vae_lr, epochs=p.vae_epochs, batch_size=batch)
    per_epoch = -(-n // batch)
    batches = member_batches(x, y, recipe, torch.Generator().manual_seed(derive_seed(seed, "order")),
                             torch.Generator())  # no augmentation: the second generator is never drawn from

    def gradient(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        loss = vae_loss(model, xb, yb if model.cond else None, p.beta, noise_gen)
        loss.backward()
        return loss.detach()

    run_steps(module_net(model), batches, None, recipe, p.vae_epochs * per_epoch, per_epoch,
              hooks=Hooks(gradient=gradient), names=["the VAE"], remedy="lower vae_lr")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# the mechanisms


def _exponential(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard exponential draws (float64) from a torch generator: -log(1 - U), U in [0, 1)."""
    return -torch.log1p(-torch.rand(shape, generator=generator, dtype=torch.float64))


def metric_noise(n: int, dim: int, eps: float, mechanism: str, generator: torch.Generator) -> torch.Tensor:
    """float32 [n, dim] latent noise of the metric-privacy mechanism at level eps.

    euclidean: u uniform on the unit sphere times r ~ Gamma(shape=dim, scale=1/eps) (a sum of dim
    exponentials of rate eps, exact for an integer dim): density proportional to exp(-eps ||noise||_2).
    laplace: i.i.d. Laplace(0, 1/eps), the difference of two exponentials of rate eps.
    """
    if mechanism == "euclidean":
        g = torch.randn((n, dim), generator=generator, dtype=torch.float64)
        u = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
        r = _exponential((n, dim), generator).sum(dim=1, keepdim=True) / eps
        return (u * r).float()
    if mechanism == "laplace":
        return ((_exponential((n, dim), generator) - _exponential((n, dim), generator)) / eps).float()
    raise ValueError(f"unknown mechanism {mechanism!r}; accepted: euclidean, laplace")


# ---------------------------------------------------------------------------------------------------------
# the defense


@DEFENSES.register(
    "vae_metric_privacy",
    VaeParams,
    doc="Latent metric privacy (arXiv 2202.05469): train on VAE-decoded records whose latent codes carry "
    "d_X-private noise.",
)
class VaeMetricPrivacy(Defense):
    """Replace each model's members by synthetic records: encode, add metric-privacy noise, decode."""

    params: VaeParams

    def __init__(self, params: VaeParams, info: DataInfo, label_smoothing: float = 0.0):
        super().__init__(params, info, label_smoothing)
        self.vae: VAE | None = None
        self.device = torch.device("cpu")
        self.cache_path: Path | None = None
        self.loaded_from_cache = False
        self.public_index: np.ndarray | None = None  # the training points the VAE is fitted to

    def build_vae(self) -> VAE:
        p = self.params
        return VAE(self.info.input_shape, p.latent_dim, p.hidden, self.info.num_classes, p.class_conditional)

    def cache_key(self, data: Any, seed: int, public: np.ndarray) -> str:
        p = self.params
        fields = {"arch": _ARCH_VERSION, "data": data_digest(data, with_labels=p.class_conditional),
                  "public": key_digest({"index": np.asarray(public).tolist()}),
                  "seed": seed, "device": self.device.type,
                  **{k: getattr(p, k) for k in ("latent_dim", "beta", "class_conditional", "vae_epochs",
                                                "vae_lr", "hidden")},
                  "vae_batch": p.vae_batch_size}  # its name before the rename: cached VAEs stay found
        return key_digest(fields)

    def check_data(self, data: Any, population: Any) -> None:
        """The VAE is fitted to the public split: refuse a plan that leaves none."""
        require_public(self.name, data, population, "to fit its VAE on")

    def setup(self, data: Any, population: Any, cache_dir: Any, seed: int) -> None:
        """Fit the VAE once on the public split, or load it from the cache (see the module docstring)."""
        self.check_data(data, population)
        self.device = resolve_device(self.params.vae_device, where="defense.params.vae_device")
        public = public_indices(data.x_train.shape[0], population)
        self.public_index = public
        key = self.cache_key(data, seed, public)
        self.cache_path = store_dir(cache_dir) / f"vae-{key}.pt"
        vae_seed = derive_seed(seed, "vae")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(vae_seed)
            model = self.build_vae()
        state = load_state(self.cache_path, key)
        if state is not None:
            try:
                model.load_state_dict(state)
                self.loaded_from_cache = True
            except RuntimeError as e:
                log.warning("cache %s does not fit the VAE (%s); refitting", self.cache_path, e)
                state = None
        if state is None:
            self.loaded_from_cache = False
            log.info("vae_metric_privacy: fitting the VAE on %d public records (%s)", public.size,
                     self.device)
            idx = torch.from_numpy(public)
            model = train_vae(model, data.x_train[idx], data.y_train[idx], self.params, vae_seed, self.device)
            save_state(self.cache_path, key, model.state_dict())
        self.vae = model.to(self.device).eval()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                    noise: bool = True) -> torch.Tensor:
        """Decoded records: encode (mean, or a sample drawn from `generator`), add the mechanism's noise
        (when `noise`), decode. Returns a new tensor with x's shape, dtype and device."""
        if self.vae is None:
            raise RuntimeError("vae_metric_privacy: setup() has not run")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        p, vae = self.params, self.vae
        out = []
        for i in range(0, x.shape[0], _CHUNK):
            xb = x[i:i + _CHUNK].to(self.device, torch.float32)
            yb = y[i:i + _CHUNK].to(self.device) if vae.cond else None
            mu, logvar = vae.encode(xb, yb)
            z = mu
            if p.encode == "sample":
                z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator).to(self.device)
            if noise:
                z = z + metric_noise(z.shape[0], z.shape[1], p.epsilon, p.mechanism, generator).to(self.device)
            out.append(vae.decode(z, yb).to(x.device, x.dtype))
        if not out:
            return torch.empty_like(x)
        return torch.cat(out).reshape(x.shape)

    def transform_train_data(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthetic records for one model's members (labels kept); noise is drawn from `generator`."""
        return self.reconstruct(x, y, generator, noise=True), y

    # --- declarations ------------------------------------------------------------------------------
    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {
            "epsilon": Float(0.1, 100.0, log=True),
            "latent_dim": Categorical((8, 16, 32, 64, 128)),
            "beta": Float(0.1, 4.0, log=True),
            "encode": Categorical(("mean", "sample")),
            "class_conditional": Categorical((False, True)),
            "vae_epochs": Int(10, 100, log=True),
            "vae_lr": Float(1e-4, 1e-2, log=True),
        }

    def privacy_guarantee(self) -> dict[str, Any] | None:
        """Metric privacy of each released synthetic record (not of the VAE, fitted without DP)."""
        metric = "l2" if self.params.mechanism == "euclidean" else "l1"
        return {"metric_epsilon": self.params.epsilon, "metric": metric}


__all__ = ["VAE", "VaeMetricPrivacy", "VaeParams", "metric_noise", "train_vae"]
