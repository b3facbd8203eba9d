"""DP-SGD (Abadi et al., CCS 2016): per-example gradient clipping and Gaussian noise, with a privacy
accountant.

Each step draws a Poisson batch (every training example independently with probability q = b / n, b the
expected batch size), computes every example's gradient (torch.func: vmap of grad over functional_call),
clips each to L2 norm C over all parameters jointly, sums them, adds N(0, (sigma C)^2) noise per coordinate
and divides by the EXPECTED batch size q n (not the drawn one, which would leak the batch size). The
step loop (`raymia.train.loop.run_steps`) runs it as its gradient hook on the Poisson batches
(`poisson_batches`) and hands the result to the recipe's optimizer (SGD as in the paper; Adam/AdamW are post-processing of the
noisy gradient, so the guarantee holds for them too). An empty Poisson batch still adds noise and steps.

Training length: epochs * ceil(n / b) steps, n the model's training set size, so an "epoch" is n / b
expected batches as in non-private training. After training the accountant (opacus' RDP or PRV) turns
(q, sigma, steps, delta) into the model's epsilon, reported per model with the sampling rate and sigma.

BatchNorm mixes the examples of a batch, so per-example gradients (and the guarantee) do not exist for it:
`check` refuses registry models that always carry BatchNorm, and `fit` refuses any model that has it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from raymia.datainfo import DataInfo
from raymia.defenses.base import DEFENSES, Defense, FitJob, meta_model
from raymia.errors import SpecError
from raymia.registry import ActsWhen, Params
from raymia.seeding import derive_seed
from raymia.space import Domain, Float, Int
from raymia.train.augment import Augmenter
from raymia.train.loop import Hooks, module_net, run_steps

log = logging.getLogger("raymia")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# opacus' RDP analysis warns when the best Renyi order is its largest one; this happens for very small
# epsilons (large sigma, e.g. while searching for the noise of a target epsilon) and only means the bound
# could be slightly tighter, never that it is wrong.
_ALPHA_WARNING = "Optimal order is the largest alpha"
# ... and when it is the smallest (1.1): small sigma, a large epsilon. The epsilon is then a valid upper bound
# but looser than orders below 1.1 would give. Every model of a bank has the same setting, so opacus would
# print it once per model; raymia says it once per setting, with what it means.
_SMALLEST_ALPHA = "Optimal order is the smallest alpha"
_NOTED: set[tuple[float, float, int]] = set()


@contextlib.contextmanager
def _accountant_warnings(sigma: float, q: float, steps: int):
    """Run an accountant call: its largest-alpha warning dropped, its smallest-alpha warning turned into one
    `raymia` log line per setting (with the epsilon it qualifies); any other warning passes through."""
    out: list[float] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield out
    for w in caught:
        text = str(w.message)
        if text.startswith(_ALPHA_WARNING):
            continue
        if text.startswith(_SMALLEST_ALPHA):
            if (sigma, q, steps) not in _NOTED:
                _NOTED.add((sigma, q, steps))
                eps = f"{out[0]:.4g}" if out else "the reported epsilon"
                log.warning("DP-SGD: epsilon %s (sigma %.3g, sampling rate %.3g, %d steps) is a valid but loose "
                            "upper bound: the RDP accountant's best order is its smallest (alpha 1.1), as for any "
                            "large epsilon; the model is barely private either way", eps, sigma, q, steps)
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class DpSgdParams(Params):
    """DP-SGD's parameters.

    ``delta``: None means 1 / n**1.1 for a training set of n examples, strictly below 1 / n as DP
    practice requires (a delta of 1 / n would allow releasing one whole record).
    """

    noise_multiplier: float = Field(
        1.0, ge=0.0, description="sigma: noise std per coordinate is sigma * max_grad_norm (before / q n)"
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="C: every per-example gradient is clipped to L2 norm C")
    target_epsilon: float | None = Field(
        None, gt=0.0,
        description="when set, sigma is chosen so that the accountant's epsilon at the run's sampling rate, "
        "steps and delta is at most this (within 0.01 of it); noise_multiplier is then ignored",
    )
    delta: float | None = Field(
        None, gt=0.0, lt=1.0, description="delta of the guarantee; None: 1 / n**1.1 (n: training set size)"
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="opacus accountant: 'rdp' (Renyi DP, Mironov 2017) or 'prv' (tighter numerical PRV)"
    )
    lr: float | None = Field(None, gt=0.0, description="learning rate; None: the recipe's lr")
    batch_size: int | None = Field(
        None, ge=1, description="expected Poisson batch size b (q = b / n); None: the recipe's batch_size"
    )
    physical_batch_size: int = Field(
        256, ge=1,
        description="per-example gradients are computed in chunks of at most this many examples (memory "
        "only; the step is the same)",
    )

    acts_when = {"noise_multiplier": ActsWhen("target_epsilon", (None,))}


# ---------------------------------------------------------------------------------------------------------
# the mechanism, as functions the tests can check one by one


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def poisson_batch(n: int, q: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson batch: each of n examples kept independently with probability q (CPU int64)."""
    return torch.nonzero(torch.rand(n, generator=generator) < q).flatten()


def per_example_grads(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: [B, *shape]} gradients of each example's loss w.r.t. the trainable parameters, losses [B]).

    The model runs through functional_call with its buffers (and frozen parameters) passed unchanged;
    each example is a batch of one, so the loss is exactly the per-example loss."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    fixed = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    fixed.update({k: v.detach() for k, v in model.named_buffers()})

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, fixed), (xi[None],))
        return loss_fn(logits.float(), yi[None])

    grads, losses = vmap(grad_and_value(one), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    return grads, losses


def clip_and_sum(grads: dict[str, torch.Tensor], max_grad_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip each example's gradient to L2 norm C over all parameters jointly and sum over the batch.

    Returns ({name: summed clipped gradient}, per-example norms [B] before clipping). The scale is
    min(1, C / (norm + 1e-6)), opacus' convention."""
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", scale, g) for k, g in grads.items()}, norms


def add_noise(
    summed: dict[str, torch.Tensor], noise_multiplier: float, max_grad_norm: float, expected_batch: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """(sum + N(0, (sigma C)^2 I)) / expected_batch: the privatised mean gradient."""
    out = {}
    for k, s in summed.items():
        noise = torch.randn(s.shape, generator=generator, device=s.device, dtype=s.dtype)
        out[k] = (s + noise_multiplier * max_grad_norm * noise) / expected_batch
    return out


def noisy_gradient(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, noise_multiplier: float,
    max_grad_norm: float, expected_batch: float, generator: torch.Generator, physical_batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """One DP-SGD gradient on the batch (x, y) (possibly empty): per-example clipped gradients, summed
    in chunks of `physical_batch_size`, noised and divided by the expected batch size."""
    summed = {k: torch.zeros_like(v) for k, v in model.named_parameters() if v.requires_grad}
    for i in range(0, x.shape[0], physical_batch_size):
        grads, _ = per_example_grads(model, loss_fn, x[i : i + physical_batch_size], y[i : i + physical_batch_size])
        part, _ = clip_and_sum(grads, max_grad_norm)
        for k in summed:
            summed[k] += part[k]
    return add_noise(summed, noise_multiplier, max_grad_norm, expected_batch, generator)


def poisson_batches(x: torch.Tensor, y: torch.Tensor, q: float, augmenter: Augmenter, generator: torch.Generator,
                    per_epoch: int, fmt: torch.memory_format = torch.contiguous_format):
    """DP-SGD's batches for the step loop: a Poisson batch (`poisson_batch`) per step, augmented (Poisson
    batches have no passes: an epoch of `per_epoch` steps stands in for one); an empty batch stays empty."""
    step = 0
    while True:
        idx = poisson_batch(x.shape[0], q, generator)
        on_device = idx.to(x.device)
        xb, yb = x[on_device], y[on_device]
        if xb.shape[0]:
            xb = augmenter(xb, idx, torch.full_like(idx, step // per_epoch))
        yield (xb.contiguous(memory_format=fmt) if xb.ndim == 4 else xb), yb
        step += 1


def accounted_epsilon(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at `delta` of `steps` Poisson-subsampled Gaussian steps (opacus accountant); inf if sigma = 0."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    if noise_multiplier <= 0.0:
        return math.inf
    if steps == 0:
        return 0.0
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(noise_multiplier, sampling_rate, steps)]
    with _accountant_warnings(noise_multiplier, sampling_rate, steps) as eps:
        eps.append(float(acc.get_epsilon(delta=delta)))
    return eps[0]


def noise_for_epsilon(
    target_epsilon: float, sampling_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """The noise multiplier whose accounted epsilon is at most `target_epsilon` (and within 0.01 of it)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ALPHA_WARNING)
        warnings.filterwarnings("ignore", message=_SMALLEST_ALPHA)  # the search's trial sigmas; the chosen one's
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,  # epsilon is
                                          sample_rate=sampling_rate, steps=steps, accountant=accountant,  # noted
                                          epsilon_tolerance=0.01))  # by accounted_epsilon


# ---------------------------------------------------------------------------------------------------------
# the defense


@DEFENSES.register(
    "dpsgd",
    DpSgdParams,
    doc="DP-SGD (Abadi et al. 2016): Poisson batches, per-example clipping, Gaussian noise; accounted epsilon.",
)
class DpSgd(Defense):
    """DP-SGD training of every bank model, with the accountant's epsilon in each model's report."""

    data_dependent_init = False
    params: DpSgdParams

    def check(self, model_name: str, info: DataInfo, model_params: dict | None = None, recipe: Any = None) -> None:
        """Refuse models with BatchNorm: the registry's that have it by default (resnet18, vgg, wrn,
        mobilenetv2) and those given it through their params (cnn with batch_norm)."""
        model = meta_model(model_name, model_params, info)
        if model is not None and has_batch_norm(model):
            raise SpecError(self._batch_norm_message(f"model {model_name!r}"), where="defense.name")

    def _batch_norm_message(self, model: str) -> str:
        return (f"defense {self.name!r} cannot train {model}: it has BatchNorm layers, which mix the "
                "examples of a batch, so per-example gradients (and the DP guarantee) do not exist; use a "
                "model without BatchNorm")

    def loss_per_example(self, logits: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
        """The loss of one example (a batch of one): the default cross-entropy (hard or soft targets, the
        recipe's label smoothing), so the per-example gradient depends on that example alone."""
        return self.loss(logits, y_target)

    def resolve(self, n: int, epochs: int, recipe_batch: int) -> dict[str, float]:
        """The run's sampling rate, steps, delta and noise multiplier for a training set of n examples."""
        p = self.params
        b = p.batch_size if p.batch_size is not None else recipe_batch
        q = min(1.0, b / n)
        steps = epochs * math.ceil(n / b)
        delta = p.delta if p.delta is not None else 1.0 / n**1.1
        sigma = p.noise_multiplier
        if p.target_epsilon is not None:
            sigma = noise_for_epsilon(p.target_epsilon, q, steps, delta, p.accountant)
        return {"sampling_rate": q, "steps": steps, "delta": delta, "noise_multiplier": sigma,
                "expected_batch": q * n}

    def accounted_guarantee(self, n: int, recipe: Any) -> dict[str, float] | None:
        """The epsilon every model of n members is trained to, known before training (the same `resolve`
        and accountant as `fit`'s report)."""
        run = self.resolve(n, recipe.epochs, recipe.batch_size)
        eps = accounted_epsilon(run["noise_multiplier"], run["sampling_rate"], int(run["steps"]), run["delta"],
                                self.params.accountant)
        return {"epsilon": eps, **run}

    def fit(self, job: FitJob) -> nn.Module:
        """Train job.model with DP-SGD for epochs * ceil(n / b) steps; report its accounted epsilon."""
        p = self.params
        model = job.model
        if has_batch_norm(model):
            raise SpecError(self._batch_norm_message(f"bank model {job.m} ({type(model).__name__})"),
                            where="model.params")
        n = job.x.shape[0]
        if n == 0:
            raise ValueError(f"model {job.m}: empty training set")
        run = self.resolve(n, job.recipe.epochs, job.recipe.batch_size)
        q, steps, sigma = run["sampling_rate"], int(run["steps"]), run["noise_multiplier"]
        recipe = job.recipe if p.lr is None else job.recipe.model_copy(update={"lr": p.lr})
        per_epoch = max(1, steps // recipe.epochs)
        sample_gen = torch.Generator().manual_seed(derive_seed(job.seed, "poisson"))
        augment_gen = torch.Generator().manual_seed(derive_seed(job.seed, "augment"))
        noise_gen = torch.Generator(device=job.device).manual_seed(derive_seed(job.seed, "noise"))
        batches = poisson_batches(job.x, job.y, q, Augmenter(recipe.augment, n, augment_gen), sample_gen,
                                  per_epoch, job.memory_format)

        def gradient(xb: torch.Tensor, yb: torch.Tensor) -> None:
            """The privatised gradient in place of backward (the loop's gradient hook)."""
            g = noisy_gradient(model, self.loss_per_example, xb, yb, sigma, p.max_grad_norm,
                               run["expected_batch"], noise_gen, p.physical_batch_size)
            for name, t in model.named_parameters():
                if t.requires_grad:
                    t.grad = g[name]

        model.train()
        run_steps(module_net(model), batches, None, recipe, steps, per_epoch, hooks=Hooks(gradient=gradient),
                  precision=job.precision, names=[f"model {job.m}"], remedy="lower the lr")
        job.report.update(
            epsilon=accounted_epsilon(sigma, q, steps, run["delta"], p.accountant),
            noise_multiplier=sigma, sampling_rate=q, delta=run["delta"], steps=float(steps),
        )
        return model

    # --- declarations ------------------------------------------------------------------------------
    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        """sigma log [0.3, 5], C log [0.1, 10], lr log [1e-3, 1], expected batch log [32, 512]."""
        return {
            "noise_multiplier": Float(0.3, 5.0, log=True),
            "max_grad_norm": Float(0.1, 10.0, log=True),
            "lr": Float(1e-3, 1.0, log=True),
            "batch_size": Int(32, 512, log=True),
        }

    def privacy_guarantee(self) -> dict[str, Any] | None:
        """The target epsilon when one is set (each model's accounted epsilon is in its report)."""
        if self.params.target_epsilon is None:
            return None
        return {"epsilon_target": self.params.target_epsilon}


__all__ = ["DpSgd", "DpSgdParams", "accounted_epsilon", "noise_for_epsilon", "noisy_gradient"]
