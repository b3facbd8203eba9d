"""The sweep's Optuna sampler, sized to the sweep, and Tune's OptunaSearch telling it the constraints.

Optuna's defaults are sized for long studies: TPE and GP sample their first 10 trials at random and NSGA-II
breeds generations of 50, so a sweep of 8 trials would be a random search. `make_sampler` scales them to
`sweep.num_trials` (`raymia.space.startup_trials`, `population_size`). The spec's constraints reach the sampler through
its `constraints_func` (feasible when every value is <= 0): Tune's OptunaSearch tells the study only the
objectives, so `ConstrainedOptunaSearch` stores each finished trial's constraint values on its Optuna
trial (`CONSTRAINTS_ATTR`) just before. It also makes the proposals independent of which of the concurrent
trials finishes first (`ConstrainedOptunaSearch`), so that a sweep run again with the same seed proposes the
same settings, and a sweep resumed from Tune's saved state proposes what it would have proposed undisturbed
(`ConstrainedOptunaSearch.restore`). Imports Ray Tune and Optuna: only `raymia.sweep` uses it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from raymia.errors import uninterruptible
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


class PicklableNSGAII(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, which Tune can pickle with the searcher (into tuner.pkl and each saved state): Optuna's
    holds a thread lock, which pickle refuses, so a sweep with `sampler: nsga2` failed as it began. The lock
    guards a cache within one process: the unpickled sampler gets a new one."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_thread_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _thread_lock=threading.Lock())


def make_sampler(name: str, seed: int, num_trials: int, constrained: bool):
    """The sampler `sweep.sampler` names, sized to the sweep, with the constraints when there are some.
    TPE stays univariate: it models each parameter from the trials that drew it, which suits a parameter
    drawn only in some modes (`raymia.space`'s `when`); GP and NSGA-II model the parameters every trial
    draws, and draw the others at random."""
    cf = {"constraints_func": _stored_constraints} if constrained else {}
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(num_trials), **cf)
    if name == "nsga2":
        return PicklableNSGAII(seed=seed, population_size=population_size(num_trials), **cf)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(num_trials), **cf)
    return optuna.samplers.RandomSampler(seed=seed)


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that stores a finished trial's constraint values on its Optuna trial before telling the
    study its objectives, where the sampler's `constraints_func` reads them, and that proposes the same
    settings whatever order the concurrent trials finish in.

    With `max_concurrent` = c trials at a time, proposal n (counted from 0) is made once trials 0 .. n-c
    have been told to the study and before any later one is: trial j, once it ends, is held until trials
    0 .. j-1 are told and proposal j+c-1 is made (the last c trials of `num_trials` are told as they end).
    `suggest` answers None while proposal n waits; Tune asks again when a trial ends, so a free slot waits
    only for the trial c proposals back. Without this, which trials the sampler has seen, and so what it
    proposes, would depend on the machine's timing."""

    def __init__(self, *args, max_concurrent: int, num_trials: int, constraints: Sequence[Any] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self._constraints = list(constraints)
        self._in_step, self._num_trials = max(1, max_concurrent), num_trials
        self._proposed: list[str] = []  # trial ids in the order they were proposed
        self._held: dict[str, tuple[dict | None, bool]] = {}  # finished, not yet told: (result, error)
        self._told = 0  # trials _proposed[:_told] are told to the study
        self._saved_trials: list[Any] | None = None  # the study's trials when Tune last saved the searcher
        self._saved_attrs: dict[str, Any] = {}  # and its system attributes

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a searcher pickled before the hold rule (a sweep begun by an older raymia, resumed by this one)
        # tells its trials as they end, and one saved without its study's trials leaves the study as it is
        self.__dict__.update({"_in_step": 1, "_num_trials": 0, "_proposed": [], "_held": {}, "_told": 0,
                              "_saved_trials": None, "_saved_attrs": {}}, **state)

    def save(self, checkpoint_path: str) -> None:
        # the study's trials as they are now, with the sampler's state that saw them: what `restore` puts back
        study = self._ot_study
        self._saved_trials = study.get_trials(deepcopy=True)
        self._saved_attrs = study._storage.get_study_system_attrs(study._study_id)  # NSGA-II's parents
        super().save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        """The searcher as Tune saved it, and its study made again as it was then.

        The study's storage outlives the process: a killed sweep's study holds the trials asked and told after
        Tune's last save (a trial asked then stays RUNNING for good, and is asked again under a new number when
        the resumed search proposes it). The sampler restored here has the random state of the save, but would
        see those trials and propose other settings than the undisturbed sweep. So the study is deleted and made again from the trials it had at the save,
        with their numbers, settings, results and attributes: a trial that was running then is RUNNING again,
        and is told when Tune has run it again with its own setting (its stored packs are reused)."""
        super().restore(checkpoint_path)
        if self._saved_trials is not None:
            self._remake_study(self._saved_trials, self._saved_attrs)

    def _remake_study(self, trials: list[Any], attrs: dict[str, Any]) -> None:
        old = self._ot_study
        try:
            optuna.delete_study(study_name=old.study_name, storage=self._storage)
        except KeyError:  # no such study: its storage is new (the sweep's folder on another machine, or deleted)
            pass
        study = optuna.create_study(storage=self._storage, sampler=old.sampler, pruner=old.pruner,
                                    study_name=old.study_name, directions=old.directions)
        study.add_trials(sorted(trials, key=lambda t: t.number))
        # The study made again has new trial ids: the trials not told yet get handles on theirs.
        ids = {t.number: t._trial_id for t in study.get_trials(deepcopy=False)}
        for trial_id, ot_trial in self._ot_trials.items():
            if trial_id not in self._completed_trials and ot_trial.number in ids:
                self._ot_trials[trial_id] = optuna.Trial(study, ids[ot_trial.number])
        # NSGA-II caches each generation's parents by trial id: computed again, they would come in another
        # order, and the parents it draws from them would differ
        new_id = {t._trial_id: ids[t.number] for t in trials}
        parents = getattr(study.sampler, "_get_parent_cache_key_prefix", lambda: None)()
        for key, value in attrs.items():
            if parents and key.startswith(parents):
                value = [new_id[i] for i in value]
            study._storage.set_study_system_attr(study._study_id, key, value)
        # And a new study id, which the sampler's cached intersection search space (GP's) checks: what it
        # caches, it computed from the same trials.
        inner = [v for v in vars(study.sampler).values() if isinstance(v, optuna.samplers.BaseSampler)]
        for sampler in [study.sampler, *inner]:
            for cache in vars(sampler).values():
                if isinstance(cache, optuna.search_space.IntersectionSearchSpace) and cache._study_id is not None:
                    cache._study_id = study._study_id
        self._ot_study = study

    def suggest(self, trial_id: str) -> dict | None:
        with uninterruptible():  # Optuna's study is in SQLite: a SIGTERM's stop waits for its write
            return self._suggest(trial_id)

    def _suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials:
            if self._told < len(self._proposed) - self._in_step + 1:
                return None  # proposal n waits until trial n - c is told
            config = super().suggest(trial_id)
            self._proposed.append(trial_id)
            self._tell_ready()  # the trial held for this proposal, which it was not to see
            return config
        return super().suggest(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        with uninterruptible():  # as `suggest`
            self._on_trial_complete(trial_id, result, error)

    def _on_trial_complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        if trial_id in self._completed_trials or trial_id in self._held:
            return  # a trial that Tune retried after it failed: told once
        if trial_id not in self._proposed:  # proposed before a resume by a searcher without the hold rule
            self._tell(trial_id, result, error)
            return
        self._held[trial_id] = (result, error)
        self._tell_ready()

    def _tell_ready(self) -> None:
        """Tell the held trials whose turn it is: trial j once trials 0 .. j-1 are told and proposal j+c-1
        is made (or every trial is proposed)."""
        while self._told < len(self._proposed) and self._proposed[self._told] in self._held:
            j = self._told
            if len(self._proposed) < min(j + self._in_step, self._num_trials):
                return
            trial_id = self._proposed[j]
            self._tell(trial_id, *self._held.pop(trial_id))
            self._told += 1

    def _tell(self, trial_id: str, result: dict | None, error: bool) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and self._constraints:
            ot_trial.set_user_attr(CONSTRAINTS_ATTR, constraint_values(self._constraints, result or {}))
        super().on_trial_complete(trial_id, result, error)
