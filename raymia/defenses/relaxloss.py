"""RelaxLoss (Chen, Yu & Fritz, ICLR 2022): keep the members' training loss near a target level alpha.

Members are told apart from non-members by their lower loss; RelaxLoss stops training from driving the
members' loss towards 0. This is the training loop of the official code (github.com/DingfanChen/RelaxLoss,
``source/cifar/defense/relaxloss.py`` and ``source/nonimage/defense/relaxloss.py``, ``Trainer.train``), per
batch, with CE the batch's mean cross-entropy and epochs counted from 0:

- even epochs: loss = |CE - alpha| (gradient descent above alpha, gradient ascent below it);
- odd epochs: loss = CE while CE > alpha (gradient descent); otherwise posterior flattening, against soft
  targets t built from the model's own (not detached) softmax p: t_y = min(p_y, upper) for the true class,
  t_j = (1 - t_y) / (C - 1) for every other class; the flattening loss is
  - ``image`` (the CIFAR code): mean_i [(1 - correct_i) soft-CE(z_i, t_i) - CE(z_i, y_i)]: gradient ascent
    on the cross-entropy of every sample plus the soft-target loss of the misclassified ones;
  - ``tabular`` (the Purchase/Texas code): mean_i soft-CE(z_i, t_i).

The loss depends on the epoch, which the bank's `loss(logits, y)` hook does not see, so the defense trains
each model in `fit`: the step loop (`raymia.train.loop.run_steps`) with the spec's recipe (optimizer,
schedule, batch size, augmentation, lookahead, `bank.precision`) and the bank's epoch length, given this
epoch-dependent loss; models therefore train one at a time (`Defense.trains_itself`). The batch order and
augmentation draws are seeded from the model's defense seed (`FitJob.seed`); `train.label_smoothing` is
refused (the official loss uses plain cross-entropy). Each model reports its members' final mean
cross-entropy as ``train_ce``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raymia.datainfo import DataInfo
from raymia.defenses.base import DEFENSES, Defense, FitJob, train_plain
from raymia.errors import SpecError
from raymia.registry import Params
from raymia.space import Domain, Float


class RelaxLossParams(Params):
    """The official code's two hyperparameters (its configs: CIFAR-10 ResNet-20 alpha 1, VGG-11 0.4;
    CIFAR-100 ResNet-20 alpha 3, VGG-11 0.5; upper 1 on CIFAR; Purchase alpha 0.8 upper 0.3; Texas alpha 2.5
    upper 0.1)."""

    alpha: float = Field(1.0, gt=0.0, le=10.0, description="target level of the mean training cross-entropy")
    upper: float = Field(1.0, gt=0.0, le=1.0, description="largest true-class probability of the posterior-"
                         "flattening soft targets (1: no clamp)")
    flatten: Literal["auto", "image", "tabular"] = Field(
        "auto", description="posterior-flattening loss: the official image code's (soft-CE on misclassified "
        "samples minus the CE of all) or its tabular code's (soft-CE of all); auto: by the data's kind")


def soft_targets(logits: torch.Tensor, y: torch.Tensor, upper: float) -> torch.Tensor:
    """t_y = min(p_y, upper), t_j = (1 - t_y) / (C - 1) elsewhere; p = softmax(logits), not detached (the
    official code lets the gradient flow through the targets)."""
    c = logits.shape[1]
    p_true = logits.softmax(dim=1).gather(1, y[:, None]).squeeze(1).clamp(0.0, upper)
    onehot = F.one_hot(y, c).to(logits.dtype)
    return onehot * p_true[:, None] + (1.0 - onehot) * ((1.0 - p_true) / (c - 1))[:, None]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against probability targets: -sum_j t_j log p_j, [B]."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)


def flattening_loss(logits: torch.Tensor, y: torch.Tensor, upper: float, form: str) -> torch.Tensor:
    """The posterior-flattening loss of one batch (`form`: ``image`` or ``tabular``, see the module)."""
    soft = soft_cross_entropy(logits, soft_targets(logits, y, upper))
    if form == "tabular":
        return soft.mean()
    if form != "image":
        raise ValueError(f"unknown flattening form {form!r}")
    correct = (logits.argmax(dim=1) == y).to(logits.dtype)
    return ((1.0 - correct) * soft - F.cross_entropy(logits, y, reduction="none")).mean()


def relaxloss(logits: torch.Tensor, y: torch.Tensor, epoch: int, alpha: float, upper: float = 1.0,
              form: str = "image") -> torch.Tensor:
    """RelaxLoss's objective on one batch at `epoch` (0-based), as the official training loop computes it
    (the branch is chosen on the batch's mean cross-entropy, so this is not a vmap-able function)."""
    ce = F.cross_entropy(logits, y)
    if epoch % 2 == 0:
        return (ce - alpha).abs()
    if bool(ce > alpha):
        return ce
    return flattening_loss(logits, y, upper, form)


@DEFENSES.register(
    "relaxloss",
    RelaxLossParams,
    doc="RelaxLoss (ICLR 2022): hold the training loss near alpha; ascent and posterior flattening epochs.",
)
class RelaxLoss(Defense):
    """The official training loop in the spec's recipe (see the module docstring)."""

    params: RelaxLossParams

    def __init__(self, params: RelaxLossParams, info: DataInfo, label_smoothing: float = 0.0):
        super().__init__(params, info, label_smoothing)
        flatten = params.flatten
        self.form = ("image" if info.kind == "image" else "tabular") if flatten == "auto" else flatten

    def check(self, model_name: str, info: DataInfo, model_params: dict | None = None, recipe: Any = None) -> None:
        chance = math.log(info.num_classes)
        if self.params.alpha >= chance:
            raise SpecError(f"relaxloss alpha {self.params.alpha:g} is at or above ln({info.num_classes}) = "
                            f"{chance:.3g}, the loss of a uniform prediction: a model held there classifies no "
                            f"better than chance; accepted: below {chance:.3g}", where="defense.params.alpha")
        if self.label_smoothing > 0:
            raise SpecError("relaxloss sets its own targets (plain cross-entropy, soft targets when "
                            "flattening): set train.label_smoothing: 0", where="train.label_smoothing")

    def fit(self, job: FitJob) -> nn.Module:
        """Train model m with the recipe; epoch e is steps [e * steps_per_epoch, (e + 1) * steps_per_epoch)
        of the bank's epoch length. Reports the members' final mean cross-entropy (eval mode) as
        ``train_ce``."""
        p, spe = self.params, job.steps_per_epoch
        if torch.is_floating_point(job.y):
            raise ValueError("relaxloss trains on hard labels")
        model = train_plain(self, job, loss=lambda logits, y, step: relaxloss(logits, y, step // spe, p.alpha,
                                                                              p.upper, self.form))
        job.report["train_ce"] = member_ce(model, job.x, job.y)
        return model

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        # Up to 2: below ln K for every data set of 10 classes or more (the official CIFAR-100 alpha of 3
        # needs the range widened in the sweep's space).
        return {"alpha": Float(0.01, 2.0, log=True)}


@torch.no_grad()
def member_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    """Mean cross-entropy of `model` (as it is: call eval() first) on (x, y)."""
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        total += float(F.cross_entropy(model(x[i:i + chunk]).float(), y[i:i + chunk], reduction="sum"))
    return total / max(1, x.shape[0])
