"""The attack registry and the one way to run a registered attack.

An attack is a pure function `fn(signals, target, params) -> np.ndarray` returning float64 [P]: one
membership score per audited point, higher = more likely a member of model `target`. Every other model in
the bank is a shadow (`signals.shadows_of(target)`). Attacks only read outputs; none trains a model.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from raymia.errors import SpecError
from raymia.registry import Params, Registry
from raymia.signals import Signals

AttackFn = Callable[[Signals, int, Params], np.ndarray]

ATTACKS: Registry[AttackFn] = Registry("attack", package="raymia.attacks")


def run_attack(
    name: str, params: dict[str, Any] | None, signals: Signals, target: int, where: str = "attack"
) -> np.ndarray:
    """Look up attack `name`, validate `params` against its parameter model (None: its defaults), and score
    every point for model `target` (a row of `signals`; the others are its shadows, `signals.shadows_of`).

    Returns float64 [signals.num_points]: one membership score per audited point, higher = more likely a
    member (`raymia.attack_metrics(scores, signals.keep[target])`). Unknown names and invalid parameters
    raise SpecError naming `where.name` / `where.params.<field>`.
    """
    if not isinstance(signals, Signals):
        raise TypeError(f"signals must be a raymia.Signals (raymia.read_signals gives one), got {type(signals).__name__}")
    if isinstance(target, bool) or not isinstance(target, numbers.Integral) or not 0 <= target < signals.num_models:
        raise ValueError(f"target must be a model index, an int in [0, {signals.num_models}), got {target!r}")
    if not isinstance(name, str):
        raise SpecError(f"an attack's name is a string, got {type(name).__name__}", where=f"{where}.name")
    entry = ATTACKS.get(name, where=f"{where}.name")
    parsed = entry.parse(params, where=f"{where}.params")
    scores = np.asarray(entry.obj(signals, target, parsed), dtype=np.float64)
    if scores.shape != (signals.num_points,):  # a plug-in's bug, told in one line naming the spec's entry
        raise SpecError(f"attack {name!r} returned scores of shape {scores.shape}; an attack returns one score "
                        f"per audited point, shape ({signals.num_points},)", where=where)
    return scores
