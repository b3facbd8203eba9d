"""Adversarial regularisation (Nasr, Shokri & Houmansadr, CCS 2018): a min-max membership game.

An inference model h learns to tell the classifier's members (its training points) from reference
non-members; the classifier minimises its cross-entropy plus ``lam`` times h's gain on the members, so it
learns outputs on which h cannot separate members from non-members. The steps alternate: ``k`` steps of
h (on a batch of members and a batch of reference points) for every step of the classifier.

`minmax_train` is the game's loop on its own, with optional parameter masks and an extra loss term, so
pruning (MCMIA) reuses it for dense pretraining, ADMM and masked retraining with or without the game.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raymia.defenses.base import DEFENSES, Defense, FitJob, require_public
from raymia.registry import Params
from raymia.seeding import derive_seed
from raymia.space import Categorical, Domain
from raymia.train.augment import Augmenter
from raymia.train.batches import batch_passes, batch_stream
from raymia.train.recipe import make_optimizer, make_scheduler

Masks = dict[str, torch.Tensor]  # parameter name -> {0, 1} tensor of the parameter's shape

INFERENCE_HIDDEN = 64


class AdvRegParams(Params):
    """Adversarial regularisation's parameters (the paper's lambda grid is {0.5, 1, 3, 6, 10})."""

    lam: float = Field(1.0, ge=0.0, description="lambda: weight of the inference model's gain in the "
                       "classifier's loss (0: plain training)")
    inference_steps: int = Field(1, ge=1, le=100, description="k: inference-model steps per classifier step")
    inference_lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate of the inference model")
    warmup_epochs: int = Field(0, ge=0, description="plain cross-entropy epochs before the game starts")


class InferenceModel(nn.Module):
    """h(p, y): the membership probability (as a logit) of a point from the classifier's full softmax
    vector p concatenated with the one-hot label y; an MLP with two hidden layers of `hidden` units."""

    def __init__(self, num_classes: int, hidden: int = INFERENCE_HIDDEN):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * num_classes, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, logits: torch.Tensor, y_onehot: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([logits.softmax(dim=1), y_onehot], dim=1)).squeeze(1)


def _onehot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot rows for hard labels; soft labels (float [n, C]) are used as they are."""
    if torch.is_floating_point(y):
        return y
    return F.one_hot(y.long(), num_classes).float()


def zero_masked_grads(model: nn.Module, masks: Masks) -> None:
    """Zero the gradient of every masked-out coordinate."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        g = params[name].grad
        if g is not None:
            g.mul_(mask)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Set every masked-out coordinate to exactly zero."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


def minmax_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ref_x: torch.Tensor | None,
    ref_y: torch.Tensor | None,
    recipe: Any,
    steps: int,
    lam: float,
    *,
    num_classes: int | None = None,
    inference_steps: int = 1,
    inference_lr: float = 1e-3,
    warmup_steps: int = 0,
    seed: int = 0,
    steps_per_epoch: int | None = None,
    param_mask: Masks | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train `model` in place for `steps` classifier steps with the recipe (optimizer, lr, batch size,
    schedule over `steps`, augmentation, label smoothing), playing the membership game once
    `warmup_steps` plain steps are done and `lam` > 0. `steps_per_epoch` is needed by models that
    train some parameters for a limited number of epochs (`make_scheduler`).

    Each game step: `inference_steps` Adam steps of h maximising log h(members) + log(1 - h(reference))
    on the classifier's eval-mode outputs (eval mode keeps reference points out of BatchNorm's running
    statistics), then one classifier step on CE + lam * mean log h(member outputs), h frozen.
    `param_mask` keeps masked-out coordinates exactly zero (their gradients are zeroed and the mask is
    re-applied after every optimizer step); `extra_loss()` is added to every classifier loss (ADMM's
    proximal term); `after_step(i)` runs after classifier step i. Returns facts for the report: the final
    training loss and, with the game, h's balanced accuracy on all members vs all reference points.
    """
    device = x.device
    num_classes = num_classes or (int(y.shape[1]) if torch.is_floating_point(y) else int(y.max()) + 1)
    game = lam > 0 and steps > warmup_steps
    if game and (ref_x is None or ref_y is None or ref_x.shape[0] == 0):
        raise ValueError("the membership game needs reference (non-member) points")
    batch = recipe.batch_size
    order = batch_passes(x.shape[0], batch, torch.Generator().manual_seed(derive_seed(seed, "order")))
    augment = Augmenter(recipe.augment, x.shape[0], torch.Generator().manual_seed(derive_seed(seed, "augment")))
    opt = make_optimizer(model, recipe)
    sched = make_scheduler(opt, recipe, steps, steps_per_epoch)

    h: InferenceModel | None = None
    if game:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "inference-init"))
            h = InferenceModel(num_classes).to(device)
        h_opt = torch.optim.Adam(h.parameters(), lr=inference_lr)
        h_members = batch_stream(x.shape[0], batch, torch.Generator().manual_seed(derive_seed(seed, "h-members")))
        h_refs = batch_stream(ref_x.shape[0], batch, torch.Generator().manual_seed(derive_seed(seed, "h-reference")))
        ref_onehot = _onehot(ref_y, num_classes)
    y_onehot = _onehot(y, num_classes)
    if param_mask:
        apply_masks(model, param_mask)

    loss = torch.zeros((), device=device)
    for step in range(steps):
        playing = h is not None and step >= warmup_steps
        if playing:
            # --- k steps of the inference model on fixed classifier outputs
            model.eval()
            h.train().requires_grad_(True)
            for _ in range(inference_steps):
                bm, br = next(h_members).to(device), next(h_refs).to(device)
                with torch.no_grad():
                    out_m, out_r = model(x[bm]).float(), model(ref_x[br]).float()
                s_m, s_r = h(out_m, y_onehot[bm]), h(out_r, ref_onehot[br])
                # maximise the gain log h(m) + log(1 - h(r)): minimise the binary cross-entropy
                h_loss = -(F.logsigmoid(s_m).mean() + F.logsigmoid(-s_r).mean())
                h_opt.zero_grad(set_to_none=True)
                h_loss.backward()
                h_opt.step()
            h.eval().requires_grad_(False)
        # --- one classifier step
        model.train()
        positions, passes = next(order)
        b = positions.to(device)
        xb = augment(x[b], positions, passes)
        logits = model(xb).float()
        loss = F.cross_entropy(logits, y[b], label_smoothing=recipe.label_smoothing)
        if playing:
            loss = loss + lam * F.logsigmoid(h(logits, y_onehot[b])).mean()
        if extra_loss is not None:
            loss = loss + extra_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if param_mask:
            zero_masked_grads(model, param_mask)
        opt.step()
        if param_mask:
            apply_masks(model, param_mask)
        sched.step()
        if after_step is not None:
            after_step(step)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training diverged (loss {loss.item()}); lower train.lr")
    model.eval()
    facts = {"train_loss": float(loss.detach())}
    if h is not None and steps > warmup_steps:
        facts["inference_accuracy"] = _inference_accuracy(model, h, x, y_onehot, ref_x, ref_onehot)
    return facts


@torch.no_grad()
def _inference_accuracy(model: nn.Module, h: InferenceModel, x: torch.Tensor, y1: torch.Tensor,
                        ref_x: torch.Tensor, ref1: torch.Tensor, chunk: int = 1024) -> float:
    """Balanced accuracy of h (threshold 0.5) on every member vs every reference point."""
    def rate(xs: torch.Tensor, ys: torch.Tensor, member: bool) -> float:
        hits = 0
        for i in range(0, xs.shape[0], chunk):
            s = h(model(xs[i:i + chunk]).float(), ys[i:i + chunk])
            hits += int(((s > 0) == member).sum())
        return hits / max(1, xs.shape[0])

    model.eval()
    return 0.5 * (rate(x, y1, True) + rate(ref_x, ref1, False))


@DEFENSES.register(
    "advreg",
    AdvRegParams,
    doc="Adversarial regularisation (Nasr et al. 2018): min-max game against a membership inference model.",
)
class AdvReg(Defense):
    """Min-max training against an inference model over (softmax vector, one-hot label).

    Inferred choices: h is an MLP with two hidden layers of 64 ReLU units trained with Adam on balanced
    batches of members and reference points; the reference set is drawn from the PUBLIC split (training
    points outside the audited population: `raymia.train.bank.reference_index`, as many as the model has
    members when there are more, else all), never from the audited non-members, which would make the
    points the audit scores part of training; a plan with no public point is refused (lam > 0); the
    classifier uses the spec's recipe with its schedule over all `epochs * steps_per_epoch` steps, the
    first `warmup_epochs` of them plain cross-entropy.
    """

    name = "advreg"
    vectorizable = False
    params: AdvRegParams

    def check_data(self, data: Any, population: Any) -> None:
        """The game's reference set comes from the public split: refuse a plan that leaves none."""
        if self.params.lam > 0:
            require_public(self.name, data, population, "for its inference model's reference set",
                           ", or set defense.params.lam: 0")

    def fit(self, job: FitJob) -> nn.Module:
        p = self.params
        total = job.recipe.epochs * job.steps_per_epoch
        facts = minmax_train(
            job.model, job.x, job.y, job.reference_x, job.reference_y, job.recipe, total, p.lam,
            num_classes=self.info.num_classes, inference_steps=p.inference_steps, inference_lr=p.inference_lr,
            warmup_steps=min(total, p.warmup_epochs * job.steps_per_epoch), seed=job.seed,
            steps_per_epoch=job.steps_per_epoch,
        )
        if "inference_accuracy" in facts:
            job.report["inference_accuracy"] = facts["inference_accuracy"]
        return job.model

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {"lam": Categorical((0.5, 1.0, 3.0, 6.0, 10.0))}
