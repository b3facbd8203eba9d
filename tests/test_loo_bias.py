"""Leave-one-out without bias: on signals that carry no membership information, every attack's AUC averaged
over all targets is 0.5 (docs/validity.md). With a plain balanced keep matrix the shadows of a member hold
one IN fewer and one OUT more than those of a non-member, and LiRA online reads that (AUC about 0.46 at
M = 8); raymia's plans pair complementary models and leave the target's pair out of its shadows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from raymia.attacks import ATTACKS, run_attack
from raymia.data.plan import make_plan, paired_keep
from raymia.signals import Signals

# Learned attacks train an MLP per target: a smaller budget keeps this test to seconds; a classifier that
# cannot see membership stays at chance whatever its budget.
FAST_PARAMS = {"shokri": {"max_iter": 15, "max_train": 4000}, "salem": {"max_iter": 15, "max_train": 4000}}


def membership_free(num_models: int, num_points: int, keep: np.ndarray, seed: int) -> Signals:
    """Every model's logits on point i are drawn from one distribution per point (the point's own mean,
    with its label usually on top, plus independent noise): outputs do not depend on membership."""
    rng = np.random.default_rng(seed)
    c, q = 10, 2

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, c, n)
        mu = rng.normal(0.0, 1.5, (n, c))
        mu[np.arange(n), labels] += rng.normal(3.0, 2.0, n)
        logits = mu[None, None] + rng.normal(0.0, 1.0, (num_models, q, n, c))
        return logits.astype(np.float32), labels

    x, y = draw(num_points)
    zx, zy = draw(2000)
    return Signals(logits=x, labels=y, keep=keep, pop_logits=zx, pop_labels=zy)


def mean_auc(signals: Signals, name: str) -> float:
    aucs = [roc_auc_score(signals.keep[t], run_attack(name, FAST_PARAMS.get(name), signals, t))
            for t in range(signals.num_models)]
    return float(np.mean(aucs))


@pytest.mark.parametrize("num_models", [8, 16])
def test_every_attack_is_at_chance_on_membership_free_signals(num_models):
    p = 10_000
    keep = make_plan(p, num_models, None, [0], seed=num_models).keep
    signals = membership_free(num_models, p, keep, seed=num_models)
    aucs = {name: mean_auc(signals, name) for name in ATTACKS.names()}
    off = {k: round(v, 4) for k, v in aucs.items() if abs(v - 0.5) > 0.01}
    assert not off, f"attacks away from chance on membership-free signals (M={num_models}): {off}"


def test_shadows_hold_the_same_counts_whatever_the_targets_membership():
    keep = make_plan(500, 8, None, [0], seed=3).keep
    signals = membership_free(8, 500, keep, seed=3)
    for t in range(8):
        shadows = signals.shadows_of(t)
        assert t not in shadows and (t ^ 1) not in shadows and shadows.size == 6
        assert (keep[shadows].sum(axis=0) == 3).all()  # 3 IN and 3 OUT for every point, member or not


def test_unpaired_keep_matrix_biases_lira():
    """The bias this design removes, measured: each point IN for M/2 models drawn per point, every other
    model a shadow. LiRA online is deflated well below chance."""
    m, p = 8, 10_000
    rng = np.random.default_rng(0)
    keep = np.argsort(rng.random((m, p)), axis=0) < m // 2
    signals = membership_free(m, p, keep, seed=0)
    assert signals.paired_model(0) is None and signals.shadows_of(0).size == m - 1
    assert mean_auc(signals, "lira_online") < 0.48


def test_paired_keep_is_balanced_and_complementary():
    keep = paired_keep(6, 11, np.random.default_rng(0))
    assert (keep.sum(axis=0) == 3).all()
    assert np.array_equal(keep[1], ~keep[0]) and np.array_equal(keep[5], ~keep[4])
    assert (keep[::2].sum(axis=1) == 5).all()  # model 2j holds floor(P/2) points, its pair the rest


def test_too_few_models_for_leave_one_out():
    keep = paired_keep(2, 10, np.random.default_rng(0))
    signals = membership_free(2, 10, keep, seed=0)
    with pytest.raises(ValueError, match="num_models >= 4"):
        signals.shadow_mask(0)
