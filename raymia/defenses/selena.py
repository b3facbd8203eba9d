"""SELENA (Tang et al., USENIX Security 2022): Split-AI, then self-distillation on the members.

Each bank model is trained in two stages, on its own members only (no public data):

1. Split-AI: every member is left out of `excluded_per_point` (L) of `sub_models` (K) sub-models, drawn
   at random per member; sub-model k trains on the members that do not leave it out, with the recipe and
   its cross-entropy. A member's soft label is the mean softmax of the L sub-models that never saw it.
2. Self-distillation: the released model trains on the members with those soft labels (soft-label
   cross-entropy, the recipe's optimizer, schedule and epochs), so what it learns about a member comes from
   models that did not train on it.

Reference code compared: inspire-group/MIAdefenseSELENA (`purchase/SELENA/generation10.py`: each point's L
excluded sub-models, a shuffled arange(K) cut to L; `purchase/SELENA/Split_AI/train.py`: sub-model k on the
points whose list lacks k, Adam 1e-3, 30 epochs; `purchase/SELENA/Distillation/train.py`: `splitai_test`
mode 1, the mean softmax of a training point's L sub-models, and `distill_train`, -sum(t log softmax(s)) /
batch with Adam 1e-3, 60 epochs) and HAMP's baseline (DependableSystemsLab/MIA_defense_HAMP,
`cifar10/lira-train-selena.py`, which averages the sub-models' logits instead). Where raymia differs:

- the sub-models and the released model use the spec's recipe (the reference: Adam for Purchase, SGD for
  CIFAR) and train for the recipe's epochs; the reference keeps each model's epoch of best test accuracy,
  which reads the test split, so raymia keeps the last;
- every sub-model takes the same number of steps, epochs x ceil(n (K - L) / K / batch), its expected share
  of the members (the reference: its own epochs), so that sub-models can train as one pack: where the bank
  trains packs (`FitJob.vectorize`) they train `bank.pack_size` at a time, each with its own batches (the
  same sub-models as one at a time, to float tolerance; 2.1x faster in packs of 8 on the digits MLP,
  benchmarks/selena_packs.py);
- every sub-model starts from the model's seeded initialisation (the reference draws one per sub-model);
  layers that initialise from data (airbench's whitening) are re-fitted on each sub-model's own members, so
  no member reaches a sub-model that leaves it out;
- soft labels are computed in eval mode on the un-augmented members; the recipe's augmentation applies to
  the released model's inputs, with the member's soft label unchanged;
- Split-AI's own adaptive inference (a non-member query answered by a random member's L sub-models) is not
  the released model: SELENA releases the distilled model, which is what the audit queries.

Per model the bank reports `soft_label_accuracy`: the share of members whose soft label (from sub-models that
never saw them) predicts their own label, the accuracy the released model is taught on its members.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from raymia.defenses.base import DEFENSES, OUTPUT_CHUNK, Defense, FitJob, outputs, train_plain
from raymia.errors import SpecError
from raymia.models.base import data_init_modules
from raymia.registry import Params
from raymia.seeding import derive_seed
from raymia.space import Domain, Int
from raymia.train.bank import train_modules_packed

log = logging.getLogger("raymia")

# A sub-model (or a pack of them) that trains this long gets a progress line (a CIFAR-10 ResNet's 25
# sub-models take hours; a digits MLP's take a fraction of a second and print nothing).
PROGRESS_AFTER_S = 5.0


class SelenaParams(Params):
    """SELENA's parameters (the paper's defaults: K 25, L 10)."""

    sub_models: int = Field(25, ge=2, le=200, description="K: sub-models of Split-AI, each trained with the recipe")
    excluded_per_point: int = Field(10, ge=1, description="L: sub-models that leave each member out (less than "
                                    "sub_models); its soft label is their mean softmax")

    @model_validator(mode="after")
    def _fewer_excluded_than_sub_models(self) -> SelenaParams:
        if self.excluded_per_point >= self.sub_models:
            raise ValueError(f"excluded_per_point ({self.excluded_per_point}) must be below sub_models "
                             f"({self.sub_models}): every sub-model must train on some members")
        return self


def split_assignment(n: int, k: int, l_: int, seed: int) -> np.ndarray:
    """Bool [n, k]: True where member i is left out of sub-model j; each row has exactly `l_` True, a
    uniformly drawn subset (the first `l_` of a random permutation of the k sub-models, as the reference
    code draws it)."""
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((n, k)), axis=1)
    out = np.zeros((n, k), dtype=bool)
    np.put_along_axis(out, order[:, :l_], True, axis=1)
    return out


def split_ai_labels(sub_probs: torch.Tensor, excluded: np.ndarray) -> torch.Tensor:
    """Soft labels [n, C]: for member i the mean of sub_probs[j, i] over the sub-models j that leave it out
    (`excluded` [n, K]); sub_probs [K, n, C] are the sub-models' softmax outputs on the members."""
    w = torch.as_tensor(excluded.T, dtype=sub_probs.dtype, device=sub_probs.device)  # [K, n]
    return (w[:, :, None] * sub_probs).sum(dim=0) / w.sum(dim=0)[:, None]


@DEFENSES.register(
    "selena",
    SelenaParams,
    doc="SELENA (Tang et al. 2022): Split-AI sub-models label each member without having seen it; the "
        "released model is distilled on the members from those soft labels.",
)
class Selena(Defense):
    """Split-AI and self-distillation (see the module docstring)."""

    params: SelenaParams

    def fit(self, job: FitJob) -> nn.Module:
        p = self.params
        n = job.x.shape[0]
        excluded = split_assignment(n, p.sub_models, p.excluded_per_point, derive_seed(job.seed, "split-ai"))
        empty = np.flatnonzero(excluded.all(axis=0))
        if empty.size:
            raise SpecError(f"model {job.m}: sub-model {int(empty[0])} of SELENA has no member to train on "
                            f"({n} members): lower excluded_per_point ({p.excluded_per_point}) or sub_models "
                            f"({p.sub_models})", where="defense.params")
        rows = [torch.from_numpy(np.flatnonzero(~excluded[:, k])).to(job.x.device) for k in range(p.sub_models)]
        # every sub-model takes the same number of steps (a pack steps them together): its expected share of
        # the members' epochs, as the bank's models take the expected member count's
        per_epoch = math.ceil(n * (p.sub_models - p.excluded_per_point) / p.sub_models / job.recipe.batch_size)
        size = job.pack_size if job.vectorize else 1
        probs = []
        for start in range(0, p.sub_models, size):
            ks = list(range(start, min(start + size, p.sub_models)))
            t0 = time.perf_counter()
            probs += self._sub_models(job, ks, rows, per_epoch)
            if (took := time.perf_counter() - t0) >= PROGRESS_AFTER_S:
                done = f"{ks[0] + 1}" if len(ks) == 1 else f"{ks[0] + 1}-{ks[-1] + 1}"
                log.info("model %d: SELENA sub-model %s/%d trained (%.0fs)", job.m, done, p.sub_models, took)
        soft = split_ai_labels(torch.stack(probs), excluded)
        labels = job.y if job.y.ndim == 1 else job.y.argmax(dim=1)
        job.report["soft_label_accuracy"] = float((soft.argmax(dim=1) == labels).float().mean())
        return train_plain(self, replace(job, y=soft))

    def _sub_models(self, job: FitJob, ks: list[int], rows: list[torch.Tensor], per_epoch: int) -> list[torch.Tensor]:
        """Sub-models `ks` trained on their members with the recipe (as one pack when there are several):
        their softmax outputs on every member, [n, C] each. Sub-model k's batch order and augmentation come
        from its own seed, so it is the same model (to float tolerance) alone or in a pack."""
        seeds = [derive_seed(job.seed, "sub-model", k) for k in ks]
        subs = []
        for k in ks:
            sub = copy.deepcopy(job.model)
            for layer in data_init_modules(sub):  # no member reaches a sub-model that leaves it out
                layer.init_from_data(job.x[rows[k]])
            subs.append(sub)
        if len(ks) == 1:
            sub_job = replace(job, model=subs[0], x=job.x[rows[ks[0]]], y=job.y[rows[ks[0]]], seed=seeds[0],
                              steps_per_epoch=per_epoch, report={})
            return [outputs(train_plain(self, sub_job), job.x).softmax(dim=1)]
        counts = [rows[k].numel() for k in ks]
        index = torch.stack([F.pad(rows[k], (0, max(counts) - rows[k].numel())) for k in ks])
        pack = train_modules_packed(
            subs, job.x, job.y[index], index, counts, job.recipe, self.loss,
            [derive_seed(s, "order") for s in seeds], [derive_seed(s, "augment") for s in seeds], True, per_epoch,
            job.device, job.memory_format, job.precision, tuple(job.x.shape[1:]),
            [f"model {job.m} (SELENA sub-model {k})" for k in ks])
        with torch.no_grad():
            logits = torch.cat([pack(job.x[i:i + OUTPUT_CHUNK], shared_input=True).float()
                                for i in range(0, job.x.shape[0], OUTPUT_CHUNK)], dim=1)
        return list(logits.softmax(dim=2).unbind(0))

    def training_cost(self, recipe: Any) -> tuple[float, str] | None:
        """K sub-models on (K - L) / K of the members each, then the released model: K - L + 1 plain
        trainings in steps."""
        k, l_ = self.params.sub_models, self.params.excluded_per_point
        return float(k - l_ + 1), f"{k} sub-models on {k - l_} of every {k} members each, then the released model"

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        # L at the paper's K: the share of members each sub-model trains on, 1 - L/K, from 0.92 to 0.52
        return {"excluded_per_point": Int(2, 12)}
