"""The model bank: M models (target(s) + shadows) trained with the same recipe and defense.

The bank is cut into packs of K consecutive models; a pack is the unit of work and of storage. This
module is the compute core: it needs torch only (no Ray), so it runs directly on a GPU machine; the Ray
Train job in raymia.engine spreads packs over a worker group and calls `train_pack` on each.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from raymia.data import Dataset, load_dataset
from raymia.data.plan import MembershipPlan, make_plan
from raymia.defenses import Defense, build_defense
from raymia.errors import SpecError
from raymia.models import build_model
from raymia.seeding import derive_seed
from raymia.spec import AuditSpec
from raymia.train.infer import query_logits
from raymia.train.recipe import make_optimizer

log = logging.getLogger("raymia")


@dataclass
class BankContext:
    """Everything a worker needs to train any model of the bank, rebuilt from the spec on each worker."""

    spec: AuditSpec
    data: Dataset
    plan: MembershipPlan
    defense: Defense

    @classmethod
    def from_spec(cls, spec: AuditSpec) -> BankContext:
        data = load_dataset(spec.data.name, spec.data.params)
        n_train = data.x_train.shape[0]
        if spec.plan.population is not None and spec.plan.population > n_train:
            raise SpecError(
                f"{spec.plan.population} exceeds the {n_train} training points of {data.name!r}",
                where="plan.population",
            )
        if data.info.kind != "image" and any(q != "identity" for q in spec.queries):
            raise SpecError(f"{data.name!r} is not an image data set; accepted: [identity]", where="queries")
        plan = make_plan(n_train, spec.plan.num_models, spec.plan.population, spec.plan.targets, spec.seed)
        defense = build_defense(spec.defense.name, spec.defense.params, data.info)
        return cls(spec=spec, data=data, plan=plan, defense=defense)

    @property
    def num_packs(self) -> int:
        return math.ceil(self.plan.num_models / self.spec.bank.pack_size)

    def pack_models(self, pack: int) -> list[int]:
        """Pack p holds the consecutive models [p*K, (p+1)*K) (the same rule as raymia.store)."""
        k = self.spec.bank.pack_size
        return list(range(pack * k, min((pack + 1) * k, self.plan.num_models)))

    @property
    def audited_x(self) -> torch.Tensor:
        return self.data.x_train[torch.from_numpy(self.plan.population)]

    @property
    def audited_y(self) -> np.ndarray:
        return self.data.y_train.numpy()[self.plan.population]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecError("cuda requested but no CUDA device is visible; accepted here: auto, cpu", where="bank.device")
    return torch.device(name)


def train_model(ctx: BankContext, m: int, device: torch.device) -> torch.nn.Module:
    """Train bank model m on its members with the spec's recipe and defense; returns it in eval mode."""
    spec = ctx.spec
    members = torch.from_numpy(ctx.plan.members_of(m))
    x, y = ctx.data.x_train[members], ctx.data.y_train[members]
    data_gen = torch.Generator().manual_seed(derive_seed(spec.seed, "defense-data", m))
    x, y_target = ctx.defense.transform_train_data(x, y, data_gen)
    x, y_target = x.to(device), y_target.to(device)

    torch.manual_seed(derive_seed(spec.seed, "init", m))
    model = build_model(spec.model.name, spec.model.params, ctx.data.info)
    model = ctx.defense.prepare_model(model).to(device)
    opt = make_optimizer(model.parameters(), spec.train)
    order = torch.Generator().manual_seed(derive_seed(spec.seed, "order", m))
    n, bs = x.shape[0], spec.train.batch_size
    model.train()
    for _ in range(spec.train.epochs):
        perm = torch.randperm(n, generator=order).to(device)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            loss = ctx.defense.loss(model(x[idx]), y_target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"model {m}: training diverged (loss {loss.item()}); lower train.lr")
    return model.eval()


def train_pack(ctx: BankContext, pack: int, device: torch.device) -> dict[str, np.ndarray]:
    """Train the models of one pack and query them. Returns the arrays stored for the pack:

    logits      float32 [K, Q, P, C]  audited population under every query augmentation
    test_logits float32 [K, T, C]     the test split, identity query (utility)
    models      int64   [K]           bank indices of the pack's models
    """
    spec = ctx.spec
    xs, xt = ctx.audited_x, ctx.data.x_test
    logits, test_logits = [], []
    models = ctx.pack_models(pack)
    t0 = time.perf_counter()
    for m in models:
        model = train_model(ctx, m, device)
        gen = torch.Generator().manual_seed(derive_seed(spec.seed, "query", m))
        logits.append(query_logits(model, ctx.defense, xs, spec.queries, gen, device=device))
        test_logits.append(query_logits(model, ctx.defense, xt, ["identity"], gen, device=device)[0])
    log.debug("pack %d: trained %d models in %.1fs", pack, len(models), time.perf_counter() - t0)
    return {
        "logits": torch.stack(logits).numpy().astype(np.float32),
        "test_logits": torch.stack(test_logits).numpy().astype(np.float32),
        "models": np.asarray(models, dtype=np.int64),
    }
