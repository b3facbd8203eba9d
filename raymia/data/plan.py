"""The membership plan: which audited point each bank model trains on.

`keep[m, i]` is True when population point i is in model m's training set. The matrix is balanced: every
point is IN for exactly M/2 models (the design LiRA and RMIA assume), drawn from the spec's seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raymia.seeding import derive_seed


@dataclass(frozen=True)
class MembershipPlan:
    population: np.ndarray  # int64 [P]: indices into the data set's training split
    keep: np.ndarray  # bool [M, P]
    targets: tuple[int, ...]

    @property
    def num_models(self) -> int:
        return self.keep.shape[0]

    def members_of(self, m: int) -> np.ndarray:
        """Indices into the training split of model m's training set."""
        return self.population[self.keep[m]]


def balanced_keep(num_models: int, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """A [M, P] boolean matrix whose every column has exactly M/2 True entries, chosen uniformly."""
    if num_models % 2:
        raise ValueError("num_models must be even")
    order = np.argsort(rng.random((num_models, num_points)), axis=0)
    return order < num_models // 2


def make_plan(num_train: int, num_models: int, population: int | None, targets: list[int], seed: int) -> MembershipPlan:
    rng = np.random.default_rng(derive_seed(seed, "plan"))
    p = num_train if population is None else population
    if p > num_train:
        raise ValueError(f"plan.population={p} exceeds the {num_train} points of the training split")
    pop = np.sort(rng.permutation(num_train)[:p]).astype(np.int64)
    keep = balanced_keep(num_models, p, rng)
    return MembershipPlan(population=pop, keep=keep, targets=tuple(targets))
