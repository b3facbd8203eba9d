"""The membership plan: which audited point each bank model trains on.

`keep[m, i]` is True when population point i is in model m's training set. Models come in complementary
pairs (2j, 2j + 1): model 2j trains on a uniformly drawn half of the population (floor(P/2) points) and model
2j + 1 on the other half, as Privacy Meter splits its data. Every point is therefore IN for exactly M/2
models (the balance LiRA and RMIA assume), and leave-one-out stays unbiased: when model t is attacked, its
pair (`paired_model(t)`) is left out of the shadows too (`Signals.shadow_mask`), so every point has exactly
(M-2)/2 IN and (M-2)/2 OUT shadows, whatever t's own membership. With a plain balanced matrix (each point
IN for M/2 models drawn per point), the shadows of a member would hold one IN fewer and one OUT more than
those of a non-member: the shadow counts would carry the target's membership (docs/validity.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raymia.seeding import derive_seed
from raymia.signals import paired_model


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


def paired_keep(num_models: int, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """A [M, P] boolean matrix of M/2 complementary pairs: row 2j holds a uniformly drawn floor(P/2) of the
    points, row 2j + 1 the others. Every column has exactly M/2 True entries."""
    if num_models % 2:
        raise ValueError("num_models must be even")
    keep = np.zeros((num_models, num_points), dtype=bool)
    for j in range(num_models // 2):
        keep[2 * j, rng.permutation(num_points)[: num_points // 2]] = True
        keep[paired_model(2 * j)] = ~keep[2 * j]
    return keep


def make_plan(num_train: int, num_models: int, population: int | None, targets: list[int], seed: int) -> MembershipPlan:
    rng = np.random.default_rng(derive_seed(seed, "plan"))
    p = num_train if population is None else population
    if p > num_train:
        raise ValueError(f"plan.population={p} exceeds the {num_train} points of the training split")
    pop = np.sort(rng.permutation(num_train)[:p]).astype(np.int64)
    keep = paired_keep(num_models, p, rng)
    return MembershipPlan(population=pop, keep=keep, targets=tuple(targets))
