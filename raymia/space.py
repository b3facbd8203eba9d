"""Search-space declarations, free of any tuning library.

Defenses declare their hyperparameter space with these small dataclasses; the sweep engine turns them
into Optuna suggestions. Keeping them here lets the compute core stay importable without Optuna.

A domain's `when` says it is searched only in some modes: a parameter that acts only in a mode
(`Params.acts_when`, the one declaration) is drawn only in the trials whose mode turns it on, and left at its
default in the others, so a trial never varies a value its defense ignores. A defense's `search_space()`
leaves `when` out: `raymia.sweep_space.resolve_space` sets it from `acts_when` where the space searches the mode,
and `check_conditions` checks a space's conditions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ActsWhen:
    """When a parameter acts, as a condition on another field of its block (its mode): that field is one of
    `values`, or none of `unless`, or above `above`, or (`given`) set at all (not None, not empty). A parameter
    given while its mode is off changes nothing, so the user who wrote it gets another model than the one they
    asked for."""

    field: str
    values: tuple = ()
    above: float | None = None
    given: bool = False
    unless: tuple = ()

    def holds(self, v: Any) -> bool:
        if self.unless:
            return v not in self.unless
        if self.given:
            return v is not None and v != [] and v != ()
        if self.above is not None:
            return isinstance(v, int | float) and not isinstance(v, bool) and v > self.above
        return v in self.values

    def __str__(self) -> str:
        if self.unless:
            return f"{self.field} not " + " or ".join("null" if v is None else str(v) for v in self.unless)
        if self.given:
            return f"{self.field} set"
        if self.above is not None:
            return f"{self.field} > {self.above:g}"
        return f"{self.field}: " + " or ".join("null" if v is None else str(v) for v in self.values)


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False
    when: ActsWhen | None = None

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
    when: ActsWhen | None = None

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
    when: ActsWhen | None = None

    def contains(self, v: Any) -> bool:
        return v in self.choices


Domain = Float | Int | Categorical


def describe(d: Domain, condition: bool = True) -> str:
    """`[low, high]`, `log [low, high]` or `{choices}`, followed by its condition (`if method: admm`) unless
    `condition` is False (an end "of [0, 10]" is named under the mode that turns it on)."""
    cond = f" if {d.when}" if d.when is not None and condition else ""
    if isinstance(d, Categorical):
        return "{" + ", ".join(repr(c) for c in d.choices) + "}" + cond
    kind = "log " if d.log else ""
    return f"{kind}[{d.low}, {d.high}]{cond}"


def check_conditions(space: dict[str, Any]) -> None:
    """A space's conditions can be drawn in its order: each `when` names a parameter searched earlier in the
    space (the trial has drawn it when it decides), not itself conditional (an inactive mode's value would
    be its default, which the space does not know), and a condition on values (`values`, `unless`) names
    values the mode can draw. A ValueError naming both parameters otherwise."""
    before: dict[str, Any] = {}
    for name, dom in space.items():
        cond = dom.when if isinstance(dom, Float | Int | Categorical) else None
        if cond is not None:
            mode = before.get(cond.field)
            if not isinstance(mode, Float | Int | Categorical):
                raise ValueError(f"{name} is searched when {cond}, but {cond.field} is not searched before it "
                                 "in the space")
            if mode.when is not None:
                raise ValueError(f"{name} is searched when {cond}, but {cond.field} is itself searched only "
                                 f"when {mode.when}")
            if not (cond.given or cond.above is not None):
                named = cond.unless or cond.values
                if not named or not all(mode.contains(v) for v in named):
                    raise ValueError(f"{name} is searched when {cond}, but {cond.field} is {describe(mode)}: "
                                     "the values must be in it")
        before[name] = dom


# How a sweep's sampler is sized (raymia.searcher.make_sampler; `raymia check` shows it): Optuna's defaults
# are for long studies, and would make a short sweep a random search.


def startup_trials(num_trials: int) -> int:
    """Random trials before TPE or GP model the results: a quarter of the sweep, from 2 to Optuna's 10."""
    return max(2, min(10, math.ceil(num_trials / 4)))


def population_size(num_trials: int) -> int:
    """NSGA-II's generation: a third of the sweep, from 4 to Optuna's 50, so a sweep breeds at least twice
    once it has 8 trials."""
    return max(4, min(50, math.ceil(num_trials / 3)))
