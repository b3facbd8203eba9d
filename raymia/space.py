"""Search-space declarations, free of any tuning library.

Defenses declare their hyperparameter space with these small dataclasses; the sweep engine turns them
into Optuna suggestions. Keeping them here lets the compute core stay importable without Optuna.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log-uniform Float space needs low > 0")

    def contains(self, v: Any) -> bool:
        return isinstance(v, int | float) and self.low <= v <= self.high


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low < 1:
            raise ValueError("a log-uniform Int space needs low >= 1")

    def contains(self, v: Any) -> bool:
        return isinstance(v, int) and self.low <= v <= self.high


@dataclass(frozen=True)
class Categorical:
    choices: tuple

    def contains(self, v: Any) -> bool:
        return v in self.choices


Domain = Float | Int | Categorical


def describe(d: Domain) -> str:
    if isinstance(d, Categorical):
        return "{" + ", ".join(repr(c) for c in d.choices) + "}"
    kind = "log " if d.log else ""
    return f"{kind}[{d.low}, {d.high}]"


# How a sweep's sampler is sized (raymia.searcher.make_sampler; `raymia check` shows it): Optuna's defaults
# are for long studies, and would make a short sweep a random search.


def startup_trials(num_trials: int) -> int:
    """Random trials before TPE or GP model the results: a quarter of the sweep, from 2 to Optuna's 10."""
    return max(2, min(10, math.ceil(num_trials / 4)))


def population_size(num_trials: int) -> int:
    """NSGA-II's generation: a third of the sweep, from 4 to Optuna's 50, so a sweep breeds at least twice
    once it has 8 trials."""
    return max(4, min(50, math.ceil(num_trials / 3)))
