"""LOMMA's identity loss for the GAN inversions `gmi` and `ked_mi` (Nguyen et al., CVPR 2023, "Re-thinking
model inversion attacks against deep neural networks"; official code
github.com/sutd-visual-computing-group/Re-thinking_MI: attack.py `iden_loss`, `reg_loss`, `get_act_reg`;
engine.py `train_augmodel`; recovery.py's variants `L_logit`, `L_aug` and `ours`). Both attacks take these
params; the defaults keep their own cross-entropy identity term.

- `identity_loss: logit` (LOMMA's `L_logit`): per reconstruction x of class c,

      -T(x)_c + feature_reg x mean_j (f_j(x) - p_j)^2        in place of CE(T(x), c),

  f the target's penultimate features (the input of its last nn.Linear), p their mean over the public
  inputs. The cross-entropy stops pulling once the class wins, which leaves reconstructions near the
  decision boundary; the logit keeps pulling, and the feature term keeps x's features at the scale of
  natural inputs' so that the logit cannot grow by blowing them up.
- `augment: [model, ...]` (LOMMA's `L_aug`): one student per listed architecture (raymia's registry),
  distilled from the target on the public inputs (KL to its softmax at temperature 1; SGD lr 0.01,
  momentum 0.9, weight decay 1e-4, batch 64, 20 epochs, as `train_augmodel`). The identity term is the
  mean over the target and the students; the feature term is the target's alone, as in the official
  code. A reconstruction that every student also recognises has less of the target's idiosyncrasies.

Both together are the paper's LOMMA. Where raymia differs from the official code:
- p is the mean over every public input (the official code: about 5,000 of them, in shuffled batches);
- the official `reg_loss` averages over the batch and the features, and `iden_loss` is a batch mean:
  here both are per reconstruction (summed over the batch, like the attacks' other terms), so a
  reconstruction's step does not depend on how many are searched together;
- the students are the listed raymia architectures (official: EfficientNet-B0/B1/B2 pretrained on
  ImageNet, for a VGG16, IR152 or FaceNet64 target on 64x64 faces);
- `ked_mi` keeps its latents unclipped (LOMMA's copy of KED-MI clips z to [-1, 1] before the generator).

Students are cached (`lomma-student-<key>.pt` under the attack's cache folder); the key hashes the target
(weights and structure), the public inputs' bytes, the architecture, the distillation settings, the seed
and the device type.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from raymia.cache import data_digest, key_digest, load_state, save_state
from raymia.datainfo import DataInfo
from raymia.defenses.dmp import distillation_loss
from raymia.errors import SpecError
from raymia.inversion.evaluation import features, last_linear
from raymia.inversion.plgmi import target_digest
from raymia.inversion.registry import InversionContext, forward_flops
from raymia.models.base import MODELS
from raymia.registry import MAX_EPOCHS, ActsWhen, Params
from raymia.seeding import derive_seed
from raymia.spec import ModelSpec, TrainSpec
from raymia.storage import store_dir
from raymia.train.loop import member_batches, module_net, run_steps

log = logging.getLogger("raymia")

STUDENT_FORMAT = 1  # bump when distillation changes (part of the cache key)


class IdentityParams(Params):
    """The identity term's params, shared by `gmi` and `ked_mi` (this module's docstring)."""

    identity_loss: Literal["ce", "logit"] = Field(
        "ce", description="identity term: ce (cross-entropy of the class) or logit (minus the class's logit plus "
                          "feature_reg x the squared distance of the target's penultimate features to their "
                          "public mean; LOMMA)")
    feature_reg: float = Field(1.0, ge=0, description="logit loss: weight of the feature distance (LOMMA: 1)")
    augment: list[ModelSpec] = Field(
        default_factory=list, description="architectures of students distilled from the target on the public "
                                          "inputs; the identity term is the mean over target and students (LOMMA: 3)")
    augment_epochs: int = Field(20, ge=1, le=MAX_EPOCHS, description="distillation epochs over the public inputs (LOMMA: 20)")
    augment_lr: float = Field(0.01, gt=0, description="SGD learning rate of distillation, momentum 0.9, weight "
                                                      "decay 1e-4 (LOMMA: 0.01)")
    augment_batch_size: int = Field(64, ge=1, description="public inputs per distillation batch (LOMMA: 64)")

    acts_when = {"feature_reg": ActsWhen("identity_loss", ("logit",)),
                 **{k: ActsWhen("augment", given=True) for k in ("augment_epochs", "augment_lr", "augment_batch_size")}}

    @field_validator("augment")
    @classmethod
    def _known_models(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        for i, m in enumerate(v):
            try:
                MODELS.get(m.name, where=f"{i}.name").parse(m.params, where=f"{i}.params")
            except SpecError as e:
                raise ValueError(str(e)) from None
        return v


@dataclass
class IdentityLoss:
    """`loss(x, y)` -> [N]: the identity term of each image x_i for class y_i under `models` (the target
    first, then its students, all white-box); `feature_mean` is p for the logit loss (None for ce)."""

    models: list[nn.Module]
    kind: str
    feature_reg: float
    feature_mean: torch.Tensor | None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        term, reg = torch.zeros(x.shape[0], device=x.device), None
        for i, model in enumerate(self.models):
            if i == 0 and self.feature_mean is not None:
                with penultimate(model) as feats:
                    logits = model(x)
                reg = (feats[0].flatten(1) - self.feature_mean).pow(2).mean(1)
            else:
                logits = model(x)
            if self.kind == "ce":
                term = term + F.cross_entropy(logits, y, reduction="none")
            else:
                term = term - logits.gather(1, y.unsqueeze(1)).squeeze(1)
        term = term / len(self.models)
        return term if reg is None else term + self.feature_reg * reg


def identity_loss(target: nn.Module, p: IdentityParams, ctx: InversionContext, x_public: torch.Tensor,
                  attack: str) -> IdentityLoss:
    """The identity term of attack `attack` for these params: students distilled (or loaded) and the public
    feature mean computed as they require. The students come back white-box (eval mode, frozen)."""
    students = [distil_student(target, x_public, ctx.info, s, i, p, ctx, attack) for i, s in enumerate(p.augment)]
    mean = None
    if p.identity_loss == "logit" and p.feature_reg > 0:
        mean = features(target, x_public).mean(0).to(ctx.device)
    return IdentityLoss([target, *students], p.identity_loss, p.feature_reg, mean)


@contextmanager
def penultimate(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every forward pass of `model` appends the input of its last nn.Linear (with its
    graph, so gradients flow through it) to the yielded list."""
    _, layer = last_linear(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"the last nn.Linear of {type(model).__name__} ran {len(captured)} times in one forward pass")


def distil_student(target: nn.Module, x_public: torch.Tensor, info: DataInfo, student: ModelSpec, index: int,
                   p: IdentityParams, ctx: InversionContext, attack: str) -> nn.Module:
    """Student `index` (architecture `student`) distilled from the target on the public inputs, cached under
    ctx.cache_dir; returned on ctx.device, white-box (eval mode, parameters frozen)."""
    entry = MODELS.get(student.name)  # checked when the params were parsed
    params = entry.parse(student.params, where=f"augment.{index}.params")
    dev = ctx.device
    x = x_public.detach().float().cpu()
    key = key_digest({"format": STUDENT_FORMAT, "what": "lomma-student", "target": target_digest(target),
                      "public": data_digest(SimpleNamespace(name="public", x_train=x, y_train=torch.zeros(0))),
                      "arch": student.name, "params": student.params, "index": index, "epochs": p.augment_epochs,
                      "lr": p.augment_lr, "batch_size": p.augment_batch_size, "seed": ctx.seed, "device": dev.type})
    path = store_dir(ctx.cache_dir) / f"lomma-student-{key}.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(ctx.seed, "lomma-student", index, "init"))
        model = entry.obj(params, info)
    state = load_state(path, key)
    if state is not None:
        try:
            model.load_state_dict(state)
            log.info("%s: student %d (%s) loaded from %s", attack, index, student.name, path)
            return model.to(dev).eval().requires_grad_(False)
        except (RuntimeError, ValueError) as e:
            log.warning("cache %s does not fit student %d (%s); distilling again", path, index, e)
    log.info("%s: distilling student %d (%s) from the target on %d public inputs (%d epochs)", attack, index,
             student.name, x.shape[0], p.augment_epochs)
    with torch.no_grad():
        soft = torch.cat([F.softmax(target(c.to(dev)).float(), 1) for c in x.split(256)])
    batch = min(p.augment_batch_size, x.shape[0])
    recipe = TrainSpec(optimizer="sgd", lr=p.augment_lr, momentum=0.9, weight_decay=1e-4, epochs=p.augment_epochs,
                       batch_size=batch)
    per_epoch = math.ceil(x.shape[0] / batch)
    model = model.to(dev).train()
    batches = member_batches(x.to(dev), soft, recipe,
                             torch.Generator().manual_seed(derive_seed(ctx.seed, "lomma-student", index, "order")),
                             torch.Generator())  # no augmentation: never drawn from
    run_steps(module_net(model), batches, distillation_loss(1.0), recipe, p.augment_epochs * per_epoch, per_epoch,
              names=[f"{attack} student {index} ({student.name})"], remedy="lower augment_lr")
    save_state(path, key, model.state_dict())
    return model.eval().requires_grad_(False)


def identity_flops(p: IdentityParams, info: DataInfo, target_forward: float, num_public: int) -> tuple[float, float]:
    """(FLOPs of one image's identity term, forward and backward; FLOPs of distilling every student once),
    a backward pass counted as twice the forward."""
    students = []
    for s in p.augment:
        entry = MODELS.get(s.name, where="inversion.params.augment.name")
        with torch.random.fork_rng(devices=[]):
            students.append(forward_flops(entry.obj(entry.parse(s.params, where="inversion.params.augment.params"),
                                                    info).eval(), torch.zeros(1, *info.input_shape)))
    per_image = 3 * (target_forward + sum(students))
    distil = num_public * (target_forward + 3 * p.augment_epochs * sum(students)) if students else 0.0
    return per_image, distil
