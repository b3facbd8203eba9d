"""The sweep's Optuna sampler, sized to the sweep, and Tune's OptunaSearch telling it the constraints.

Optuna's defaults are sized for long studies: TPE and GP sample their first 10 trials at random and NSGA-II
breeds generations of 50, so a sweep of 8 trials would be a random search. `make_sampler` scales them to
`sweep.num_trials` (`raymia.space.startup_trials`, `population_size`). The spec's constraints reach the sampler through
its `constraints_func` (feasible when every value is <= 0): Tune's OptunaSearch tells the study only the
objectives, so `ConstrainedOptunaSearch` stores each finished trial's constraint values on its Optuna
trial (`CONSTRAINTS_ATTR`) just before. Imports Ray Tune and Optuna: only `raymia.sweep` uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from raymia.space import population_size, startup_trials

CONSTRAINTS_ATTR = "raymia.constraints"


def constraint_values(constraints: Sequence[Any], result: dict[str, Any]) -> list[float]:
    """Optuna's convention, one value per constraint, <= 0 when met: `value - metric` for `>=`, `metric -
    value` for `<=`; a metric the trial lacks counts as broken (1.0)."""
    out = []
    for c in constraints:
        v = result.get(c.metric)
        if not isinstance(v, int | float) or isinstance(v, bool) or math.isnan(v):
            out.append(1.0)
        else:
            out.append(float(c.value - v) if c.op == ">=" else float(v - c.value))
    return out


def _stored_constraints(trial) -> Sequence[float]:
    return trial.user_attrs.get(CONSTRAINTS_ATTR, ())


def make_sampler(name: str, seed: int, num_trials: int, constrained: bool):
    """The sampler `sweep.sampler` names, sized to the sweep, with the constraints when there are some."""
    import optuna

    cf = {"constraints_func": _stored_constraints} if constrained else {}
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(num_trials), **cf)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size(num_trials), **cf)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(num_trials), **cf)
    return optuna.samplers.RandomSampler(seed=seed)


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that stores a finished trial's constraint values on its Optuna trial before telling the
    study its objectives, where the sampler's `constraints_func` reads them."""

    def __init__(self, *args, constraints: Sequence[Any] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self._constraints = list(constraints)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and self._constraints and trial_id not in self._completed_trials:
            ot_trial.set_user_attr(CONSTRAINTS_ATTR, constraint_values(self._constraints, result or {}))
        super().on_trial_complete(trial_id, result, error)
