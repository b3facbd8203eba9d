"""DMP, distillation for membership privacy (Shejwalkar & Houmansadr, AAAI 2021).

Each bank model is trained in two stages, so that its members reach the released model only through a
teacher's predictions on other data:

1. the teacher (the paper's unprotected model theta_up) trains on the model's members with the recipe and
   its cross-entropy (label smoothing included, if any), as an undefended model would;
2. the student (the released model theta_p) trains on a reference set of public points, never on the
   members, to match the teacher's softened predictions there: the loss is
   T^2 KL(softmax(t / T) || softmax(s / T)) per point (t the teacher's logits, s the student's), the
   recipe's optimizer and schedule over `distill_epochs` passes over the reference set.

With `keep_fraction` below 1, only the reference points on which the teacher's prediction has the lowest
entropy are kept: raymia's reading of the paper's criterion for choosing the transfer data (its abstract
names the criterion; only the abstract was available to check against). The reference code uses the whole
reference set, the default.

Reference code compared: vrt1shjwlkr/AAAI21-MIA-Defense (`purchase/purchase_distillation.py`, the paper's
code) and DependableSystemsLab/MIA_defense_HAMP (`cifar10/lira-train-dmp.py`, HAMP's DMP baseline audited
with LiRA). Where raymia differs:

- the reference set is the public split (`FitJob.reference_x`: training points outside the audited
  population, a seeded subset of as many as the model has members), unlabelled (its labels are not used);
  a plan without public points is refused, as is a class split with no public point of the model's classes.
  The paper's code draws it from held-out data the same way; HAMP's CIFAR-10 baseline has none and trains a
  DCGAN on each model's members to synthesise 100,000 points;
- the loss is the per-point KL ('batchmean') times T^2 (Hinton et al.'s scale, which keeps the gradient's
  size across temperatures), so with T = 1 the student steps as the recipe's cross-entropy would; the
  reference code's F.kl_div uses the element-wise 'mean' (1/C of that) and compensates with its own
  optimizer (SGD, lr 0.5 to 0.0005, momentum 0.99, 200 epochs). Here the student uses the spec's recipe,
  like every other bank model;
- the teacher's soft labels are computed once, in eval mode, on the un-augmented reference inputs (as the
  reference code does); the recipe's augmentation then applies to the student's inputs only;
- the student starts from the model's seeded initialisation and the teacher from a copy of it; the
  student's layers that initialise from data (airbench's whitening stem) are re-fitted on the reference
  inputs, so no member input reaches the student;
- the reference code keeps the epoch of best validation accuracy; raymia trains for the recipe's epochs
  (a validation split would be audited points or public ones no other defense sees).

Per model the bank reports `transfer_points` (the reference points kept) and `teacher_agreement` (the
share of them on which the student predicts the teacher's label).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raymia.defenses.base import (
    DEFENSES,
    Defense,
    FitJob,
    outputs,
    public_has_audited_classes,
    require_public,
    train_plain,
)
from raymia.errors import SpecError
from raymia.models.base import data_init_modules
from raymia.registry import MAX_EPOCHS, Params
from raymia.seeding import derive_seed
from raymia.space import Domain, Float
from raymia.train.loop import member_batches, module_net, run_steps


class DmpParams(Params):
    """DMP's parameters (the paper's and HAMP's runs use temperature 1 and the whole reference set)."""

    temperature: float = Field(1.0, gt=0.0, le=100.0, description="softmax temperature T of the "
                               "distillation loss, T^2 KL(softmax(t/T) || softmax(s/T))")
    keep_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of the reference points kept for "
                                 "the transfer: those with the lowest entropy of the teacher's prediction "
                                 "(1: all)")
    distill_epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS, description="passes of the student over the kept reference "
                                       "points (None: the recipe's epochs)")


def lowest_entropy(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Sorted indices of the ceil(fraction x n) rows whose softmax has the lowest entropy (at least one;
    ties broken by index, so the choice is deterministic)."""
    n = logits.shape[0]
    k = max(1, min(n, math.ceil(fraction * n - 1e-9)))
    logp = F.log_softmax(logits.double(), dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1)
    order = torch.sort(entropy, stable=True).indices
    return torch.sort(order[:k]).values


def distillation_loss(temperature: float):
    """T^2 KL(softmax(t/T) || softmax(s/T)) averaged over the batch, with the targets given as the
    teacher's probabilities softmax(t/T) (the loop's (logits, targets, step) signature)."""
    t2 = temperature * temperature

    def loss(logits: torch.Tensor, target: torch.Tensor, step: int) -> torch.Tensor:
        return t2 * F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="batchmean")

    return loss


def distill(student: nn.Module, x: torch.Tensor, target: torch.Tensor, job: FitJob, temperature: float,
            epochs: int) -> nn.Module:
    """Train `student` on inputs x toward the teacher's probabilities `target` [n, C] at `temperature`,
    with the job's recipe for `epochs` passes over x (`run_steps`; batch order and augmentation seeded from
    the job's seed). Returns it in eval mode."""
    recipe = job.recipe
    per_epoch = math.ceil(x.shape[0] / recipe.batch_size)
    batches = member_batches(x, target, recipe, torch.Generator().manual_seed(derive_seed(job.seed, "distill-order")),
                             torch.Generator().manual_seed(derive_seed(job.seed, "distill-augment")),
                             fmt=job.memory_format)
    student.train()
    run_steps(module_net(student), batches, distillation_loss(temperature), recipe, epochs * per_epoch, per_epoch,
              precision=job.precision, names=[f"model {job.m} (DMP student)"])
    return student.eval()


@DEFENSES.register(
    "dmp",
    DmpParams,
    doc="DMP (Shejwalkar & Houmansadr 2021): a teacher trains on the members, the released student only on "
        "public points labelled with the teacher's soft predictions.",
)
class Dmp(Defense):
    """Distillation for membership privacy (see the module docstring)."""

    params: DmpParams

    def check_data(self, data: Any, population: Any) -> None:
        """The student trains on public points: refuse a plan that leaves none, or only points of classes
        the model never learns (a class split: the student would never see an input of its classes)."""
        require_public(self.name, data, population, "to distil the teacher into the released model")
        if not public_has_audited_classes(data, population):
            raise SpecError(f"{self.name} distils on public points of the classes the model learns; the public "
                            "split holds only other classes (a class split), so the released model would never "
                            "see an input of its own classes", where="data.private_classes")

    def fit(self, job: FitJob) -> nn.Module:
        p = self.params
        if job.reference_x is None or job.reference_x.shape[0] == 0:
            raise SpecError(f"{self.name} needs public reference points (training points outside the audited "
                            "population)", where="plan.population")
        teacher = train_plain(self, replace(job, model=copy.deepcopy(job.model)))
        logits = outputs(teacher, job.reference_x)
        keep = lowest_entropy(logits, p.keep_fraction)
        x, logits = job.reference_x[keep], logits[keep]
        target = F.softmax(logits / p.temperature, dim=1)
        student = job.model
        for layer in data_init_modules(student):
            layer.init_from_data(x)
        distill(student, x, target, job, p.temperature, p.distill_epochs or job.recipe.epochs)
        job.report["transfer_points"] = float(x.shape[0])
        job.report["teacher_agreement"] = float((outputs(student, x).argmax(1) == logits.argmax(1)).float().mean())
        return student

    def training_cost(self, recipe: Any) -> tuple[float, str] | None:
        """The teacher's plain training, then the student's `distill_epochs` passes over keep_fraction of a
        reference set as large as the members (an upper bound: smaller when the public split is)."""
        p = self.params
        student = p.keep_fraction * (p.distill_epochs or recipe.epochs) / recipe.epochs
        return 1.0 + student, "a teacher, then a student on the kept reference points"

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {"temperature": Float(1.0, 8.0, log=True), "keep_fraction": Float(0.25, 1.0)}
