"""Adversarial regularisation (Nasr, Shokri & Houmansadr, CCS 2018): a min-max membership game.

An inference model h learns to tell the classifier's members (its training points) from reference
non-members; the classifier minimises its cross-entropy plus ``lam`` times h's gain on the members, so it
learns outputs on which h cannot separate members from non-members. The steps alternate: ``k`` steps of
h (on a batch of members and a batch of reference points) for every step of the classifier.

`minmax_train` is the game on the one step loop (`raymia.train.loop.run_steps`: the game is its
before_step and extra_loss hooks), with optional parameter masks and an extra loss term, so
pruning (MCMIA) reuses it for dense pretraining, ADMM and masked retraining with or without the game.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raymia.datainfo import DataInfo
from raymia.defenses.base import DEFENSES, Defense, FitJob, require_public
from raymia.errors import SpecError
from raymia.registry import MAX_EPOCHS, ActsWhen, Params
from raymia.seeding import derive_seed
from raymia.space import Categorical, Domain
from raymia.train.batches import batch_stream
from raymia.train.loop import Hooks, autocast, member_batches, module_net, run_steps

Masks = dict[str, torch.Tensor]  # parameter name -> {0, 1} tensor of the parameter's shape

INFERENCE_HIDDEN = 64


class AdvRegParams(Params):
    """Adversarial regularisation's parameters (the paper's lambda grid is {0.5, 1, 3, 6, 10})."""

    lam: float = Field(1.0, ge=0.0, description="lambda: weight of the inference model's gain in the "
                       "classifier's loss (0: plain training)")
    inference_steps: int = Field(1, ge=1, le=100, description="k: inference-model steps per classifier step")
    inference_lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate of the inference model")
    warmup_epochs: int = Field(0, ge=0, le=MAX_EPOCHS, description="plain cross-entropy epochs before the game starts")

    acts_when = {k: ActsWhen("lam", above=0.0) for k in ("inference_steps", "inference_lr", "warmup_epochs")}


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


# Over 60 lines for its docstring (the game, step by step) and its keyword options; the body is short.
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
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    precision: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """Train `model` in place for `steps` classifier steps of the recipe (`raymia.train.loop.run_steps`:
    optimizer, lr, batch size, schedule over `steps`, augmentation, lookahead), playing the membership game
    once `warmup_steps` plain steps are done and `lam` > 0. `steps_per_epoch` is needed by models that
    train some parameters for a limited number of epochs and by lookahead. `loss(logits, y)` is the
    classifier's objective (default: cross-entropy with the recipe's label smoothing; the defenses pass
    their `Defense.loss`); `precision` the autocast dtype of the classifier's steps and of the game.

    Each game step (the loop's `before_step` hook): `inference_steps` Adam steps of h maximising
    log h(members) + log(1 - h(reference)) on the classifier's eval-mode outputs (eval mode keeps
    reference points out of BatchNorm's running statistics), then one classifier step on
    loss + lam * mean log h(member outputs), h frozen (`extra_loss` hook). `param_mask` keeps masked-out
    coordinates exactly zero (their gradients are zeroed and the mask is re-applied after every step);
    `extra_loss()` is added to every classifier loss (ADMM's proximal term); `after_step(i)` runs after
    classifier step i. Returns facts for the report: the final training loss and, with the game, h's
    balanced accuracy on all members vs all reference points.
    """
    num_classes = num_classes or (int(y.shape[1]) if torch.is_floating_point(y) else int(y.max()) + 1)
    game = lam > 0 and steps > warmup_steps
    if game and (ref_x is None or ref_y is None or ref_x.shape[0] == 0):
        raise ValueError("the membership game needs reference (non-member) points")
    if loss is None:
        def loss(logits: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, yb, label_smoothing=recipe.label_smoothing)
    batches = member_batches(x, y, recipe, torch.Generator().manual_seed(derive_seed(seed, "order")),
                             torch.Generator().manual_seed(derive_seed(seed, "augment")), fmt=memory_format)
    h = _Game(model, x, y, ref_x, ref_y, num_classes, recipe.batch_size, inference_steps, inference_lr,
              warmup_steps, seed, precision) if game else None
    term = None if h is None else h.term(lam)

    def extra(logits: torch.Tensor, yb: torch.Tensor, step: int) -> torch.Tensor | None:
        out = term(logits, yb, step) if term is not None else None
        if extra_loss is not None:
            out = extra_loss() if out is None else out + extra_loss()
        return out

    def after(step: int) -> None:
        if param_mask:
            apply_masks(model, param_mask)
        if after_step is not None:
            after_step(step)

    if param_mask:
        apply_masks(model, param_mask)
    hooks = Hooks(before_step=None if h is None else h.play, extra_loss=extra,
                  before_update=(lambda: zero_masked_grads(model, param_mask)) if param_mask else None,
                  after_step=after)
    model.train()
    last = run_steps(module_net(model), batches, lambda logits, yb, step: loss(logits, yb), recipe, steps,
                     steps_per_epoch, hooks=hooks, precision=precision, names=["model"])
    model.eval()
    facts = {"train_loss": float(last.detach())}
    if h is not None:
        facts["inference_accuracy"] = _inference_accuracy(model, h.h, x, h.y_onehot, ref_x, h.ref_onehot)
    return facts


class _Game:
    """The inference model h of the min-max game, its Adam and its batch streams (seeded from `seed`)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ref_x: torch.Tensor,
                 ref_y: torch.Tensor, num_classes: int, batch: int, steps: int, lr: float, warmup_steps: int,
                 seed: int, precision: torch.dtype | None):
        self.model, self.x, self.ref_x, self.steps, self.warmup = model, x, ref_x, steps, warmup_steps
        self.num_classes, self.precision, self.device = num_classes, precision, x.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "inference-init"))
            self.h = InferenceModel(num_classes).to(x.device)
        self.opt = torch.optim.Adam(self.h.parameters(), lr=lr)
        self.members = batch_stream(x.shape[0], batch, torch.Generator().manual_seed(derive_seed(seed, "h-members")))
        self.refs = batch_stream(ref_x.shape[0], batch,
                                 torch.Generator().manual_seed(derive_seed(seed, "h-reference")))
        self.y_onehot, self.ref_onehot = _onehot(y, num_classes), _onehot(ref_y, num_classes)

    def play(self, step: int) -> None:
        """`steps` Adam steps of h on the classifier's eval-mode outputs (the loop's before_step hook);
        leaves the classifier in train mode."""
        if step < self.warmup:
            return
        model, h = self.model, self.h
        model.eval()
        h.train().requires_grad_(True)
        for _ in range(self.steps):
            bm, br = next(self.members).to(self.device), next(self.refs).to(self.device)
            with autocast(self.device, self.precision):
                with torch.no_grad():
                    out_m, out_r = model(self.x[bm]).float(), model(self.ref_x[br]).float()
                s_m, s_r = h(out_m, self.y_onehot[bm]), h(out_r, self.ref_onehot[br])
                # maximise the gain log h(m) + log(1 - h(r)): minimise the binary cross-entropy
                h_loss = -(F.logsigmoid(s_m).mean() + F.logsigmoid(-s_r).mean())
            self.opt.zero_grad(set_to_none=True)
            h_loss.backward()
            self.opt.step()
        h.eval().requires_grad_(False)
        model.train()

    def term(self, lam: float) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor | None]:
        """The game's term of the classifier's loss (the loop's extra_loss hook): lam * mean log h."""
        def gain(logits: torch.Tensor, yb: torch.Tensor, step: int) -> torch.Tensor | None:
            if step < self.warmup:
                return None
            return lam * F.logsigmoid(self.h(logits, _onehot(yb, self.num_classes))).mean()
        return gain


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

    params: AdvRegParams

    def check_data(self, data: Any, population: Any) -> None:
        """The game's reference set comes from the public split: refuse a plan that leaves none."""
        if self.params.lam > 0:
            require_public(self.name, data, population, "for its inference model's reference set",
                           ", or set defense.params.lam: 0")

    def check(self, model_name: str, info: DataInfo, model_params: dict | None = None, recipe: Any = None) -> None:
        """A warm-up as long as the training leaves the game no step: the models would train plainly under
        the defense's name."""
        p = self.params
        if recipe is not None and p.lam > 0 and p.warmup_epochs >= recipe.epochs:
            raise SpecError(f"warmup_epochs {p.warmup_epochs} is not below train.epochs {recipe.epochs}: the game "
                            f"would never start; accepted: 0 to {recipe.epochs - 1}",
                            where="defense.params.warmup_epochs")

    def inert(self, recipe: Any) -> str | None:
        return "lam 0 gives the inference model's gain no weight: plain training" if self.params.lam == 0 else None

    def fit(self, job: FitJob) -> nn.Module:
        p = self.params
        total = job.recipe.epochs * job.steps_per_epoch
        facts = minmax_train(
            job.model, job.x, job.y, job.reference_x, job.reference_y, job.recipe, total, p.lam,
            num_classes=self.info.num_classes, inference_steps=p.inference_steps, inference_lr=p.inference_lr,
            warmup_steps=min(total, p.warmup_epochs * job.steps_per_epoch), seed=job.seed,
            steps_per_epoch=job.steps_per_epoch, loss=self.loss, precision=job.precision,
            memory_format=job.memory_format,
        )
        if "inference_accuracy" in facts:
            job.report["inference_accuracy"] = facts["inference_accuracy"]
        return job.model

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {"lam": Categorical((0.5, 1.0, 3.0, 6.0, 10.0))}
