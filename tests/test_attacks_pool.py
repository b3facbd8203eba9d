"""A shadow pool that leaves model j out gives exactly the scores of a bank without model j (every attack
that reads shadows through Signals.shadow_mask)."""

from __future__ import annotations

import numpy as np
import pytest

from raymia.attacks import run_attack
from raymia.signals import Signals

ATTACKS = ["loss", "confidence", "entropy", "modified_entropy", "correctness", "label_only",
           "lira_online", "lira_offline", "rmia_online", "rmia_offline"]


def bank(m=9, p=60, q=2, c=4, z=30, seed=0):
    rng = np.random.default_rng(seed)
    keep = rng.random((m, p)) < 0.5
    labels = rng.integers(0, c, p)
    logits = rng.normal(size=(m, q, p, c)).astype(np.float32)
    logits[:, :, np.arange(p), labels] += 1.5 * keep[:, None, :]
    pop_labels = rng.integers(0, c, z)
    pop = rng.normal(size=(m, q, z, c)).astype(np.float32)
    return logits, labels, keep, pop, pop_labels


@pytest.mark.parametrize("attack", ATTACKS)
def test_pool_equals_removing_the_model(attack):
    logits, labels, keep, pop, pop_labels = bank()
    left_out, target = 3, 5
    pool = np.ones(9, dtype=bool)
    pool[left_out] = False
    with_pool = Signals(logits, labels, keep, pop, pop_labels, shadow_pool=pool)
    rest = [i for i in range(9) if i != left_out]
    removed = Signals(logits[rest], labels, keep[rest], pop[rest], pop_labels)
    a = run_attack(attack, None, with_pool, target)
    b = run_attack(attack, None, removed, rest.index(target))
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert with_pool.shadows_of(target).tolist() == [0, 1, 2, 4, 6, 7, 8]
