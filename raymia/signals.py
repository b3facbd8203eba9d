"""Signals: what the attacker sees of every bank model, the input of every score-based attack."""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


def paired_model(m: int) -> int:
    """The model trained on the complement of model m's half of the population: m xor 1 (data/plan.py
    draws the bank in such pairs, as Privacy Meter does)."""
    return m ^ 1


@dataclass(frozen=True, eq=False)  # arrays: == would be ambiguous; two Signals are equal only as one object
class Signals:
    """Eval-mode outputs of a bank of M models on P audited points under Q query augmentations.

    logits:     float32 [M, Q, P, C]  what a querier sees (any output post-processing of the defense
                                       applied); softmax(logits) is the returned score vector.
    labels:     int64   [P]           true labels of the audited points.
    keep:       bool    [M, P]        keep[m, i]: point i was in model m's training set.
    pop_logits: float32 [M, Q, Z, C]  optional: population points that NO bank model trained on (the test
                                       split), under the same queries: RMIA's reference points z.
    pop_labels: int64   [Z]
    shadow_pool: bool   [M]           optional: the models an attacker may use as shadows (None: all). A
                                       non-adaptive audit trains only the targets with the defense and keeps
                                       them out of the pool.
    fit_mask:   bool    [P]           optional: the points an attack may fit or calibrate on (None: all).
                                       Points outside it are only scored: out-of-distribution non-members
                                       that no model trained on (their keep columns are all False). An attack
                                       fits thresholds, classifiers, pooled variances and its pairing on the
                                       fit points only, so appending such points leaves every other score as
                                       it was (tests/test_ood_signals.py).
    """

    logits: np.ndarray
    labels: np.ndarray
    keep: np.ndarray
    pop_logits: np.ndarray | None = None
    pop_labels: np.ndarray | None = None
    shadow_pool: np.ndarray | None = None
    fit_mask: np.ndarray | None = None
    # Per-model transforms of the outputs (LiRA's phi, RMIA's log p_y, a threshold statistic) are the same
    # whichever model is the target, as is what every target's fit starts from (the threshold family's
    # sorted pool), and a fit on the shadows the same for a target and its pair: kept here, an attack run
    # against every target computes each once.
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def derived(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """compute(), kept for later calls with the same key; arrays (alone or in a tuple) come back
        read-only, since they are shared. The key names the transform and every parameter it depends on: a
        per-model transform must not depend on the target or the shadow pool; a fit on the shadows has their
        mask in its key (a target and its paired model have the same shadows), one on the pool the pool's."""
        if key not in self._derived:
            value = compute()
            for part in value if isinstance(value, tuple) else (value,):
                if isinstance(part, np.ndarray):
                    part.flags.writeable = False
            self._derived[key] = value
        return self._derived[key]

    def forget_derived(self) -> None:
        """Drop what `derived` kept (the audit does so after each attack: the memory goes back)."""
        self._derived.clear()

    def with_shadow_pool(self, pool: np.ndarray) -> Signals:
        """These signals with `pool` (bool [M]) as the models an attacker may use as shadows. The copy reads
        what `derived` kept here (a per-model transform is the same for any pool; a fit names its shadows or
        pool in its key) and keeps its own fits, which go with it."""
        view = replace(self, shadow_pool=np.asarray(pool, dtype=bool))
        object.__setattr__(view, "_derived", ChainMap({}, self._derived))
        return view

    def __post_init__(self) -> None:
        if self.logits.ndim != 4:
            raise ValueError(f"logits must be [M, Q, P, C], got shape {self.logits.shape}")
        m, _, p, c = self.logits.shape
        if self.keep.shape != (m, p):
            raise ValueError(f"keep must be [M={m}, P={p}], got {self.keep.shape}")
        if self.labels.shape != (p,):
            raise ValueError(f"labels must be [P={p}], got {self.labels.shape}")
        if p and (self.labels.min() < 0 or self.labels.max() >= c):
            raise ValueError(f"labels must lie in [0, {c})")
        if (self.pop_logits is None) != (self.pop_labels is None):
            raise ValueError("pop_logits and pop_labels go together")
        if self.pop_logits is not None:
            mq = self.logits.shape[:2]
            if self.pop_logits.ndim != 4 or self.pop_logits.shape[:2] != mq or self.pop_logits.shape[3] != c:
                raise ValueError(f"pop_logits must be [M, Q, Z, C={c}] with M, Q = {mq}, got {self.pop_logits.shape}")
            if self.pop_labels.shape != (self.pop_logits.shape[2],):
                raise ValueError("pop_labels must be [Z]")
        if self.shadow_pool is not None and self.shadow_pool.shape != (m,):
            raise ValueError(f"shadow_pool must be [M={m}]")
        if self.fit_mask is not None:
            if self.fit_mask.shape != (p,) or self.fit_mask.dtype != np.bool_ or not self.fit_mask.any():
                raise ValueError(f"fit_mask must be bool [P={p}] with at least one True")
            if self.keep[:, ~self.fit_mask].any():
                raise ValueError("points outside fit_mask must be non-members of every model")

    def __repr__(self) -> str:  # the shapes, not the arrays (a notebook echoing the signals printed pages)
        pop = "" if self.pop_logits is None else f", population={self.pop_logits.shape[2]}"
        pool = "" if self.shadow_pool is None else f", shadow_pool={int(self.shadow_pool.sum())} models"
        fit = "" if self.fit_mask is None else f", fit_points={int(self.fit_mask.sum())}"
        return (f"Signals(models={self.num_models}, queries={self.num_queries}, points={self.num_points}, "
                f"classes={self.num_classes}{pop}{pool}{fit})")

    @property
    def fit_index(self) -> np.ndarray:
        """int64 indices of the points attacks may fit on (every point without a fit_mask)."""
        if self.fit_mask is None:
            return np.arange(self.num_points, dtype=np.int64)
        return np.flatnonzero(self.fit_mask).astype(np.int64)

    @property
    def num_models(self) -> int:
        return self.logits.shape[0]

    @property
    def num_queries(self) -> int:
        return self.logits.shape[1]

    @property
    def num_points(self) -> int:
        return self.logits.shape[2]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[3]

    def paired_model(self, target: int) -> int | None:
        """The model whose keep row is the complement of the target's (raymia's plans pair model 2j with
        2j + 1), or None when that model's row is not an exact complement."""
        pair = paired_model(target)
        fit = self.fit_index
        if pair < self.num_models and np.array_equal(self.keep[pair, fit], ~self.keep[target, fit]):
            return pair
        return None

    @property
    def pool_mask(self) -> np.ndarray:
        """bool [M]: the models an attacker may use as shadows (every model without a shadow_pool)."""
        return np.ones(self.num_models, dtype=bool) if self.shadow_pool is None else self.shadow_pool

    def shadow_mask(self, target: int) -> np.ndarray:
        """bool [M]: the models that act as shadows when model `target` is attacked: every other model of the
        shadow pool except the target's paired model. Leaving the pair out is what keeps leave-one-out
        unbiased: every point then has the same number of IN shadows whether or not the target trained on
        it, so the shadows' membership says nothing about the target's (see data/plan.py). A keep matrix
        without complementary pairs (signals built by hand) keeps every other model, and that bias."""
        if not 0 <= target < self.num_models:
            raise ValueError(f"target {target} out of range [0, {self.num_models})")
        mask = self.pool_mask.copy()
        mask[target] = False
        pair = self.paired_model(target)
        if pair is not None:
            mask[pair] = False
        if not mask.any():
            raise ValueError(
                f"model {target} has no shadow model besides itself and its paired model: leave-one-out "
                "needs plan.num_models >= 4"
            )
        return mask

    def shadows_of(self, target: int) -> np.ndarray:
        """Indices of the models that act as shadows when model `target` is attacked."""
        return np.flatnonzero(self.shadow_mask(target)).astype(np.int64)
