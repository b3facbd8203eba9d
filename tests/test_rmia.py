"""Known-answer and statistical tests of RMIA (raymia.attacks.mia.rmia)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raymia.attacks import ATTACKS, run_attack
from raymia.attacks.mia.rmia import log_prob_true_label, pairwise_fraction, rmia_log_ratios
from raymia.errors import SpecError
from raymia.metrics import attack_metrics
from raymia.signals import Signals


def _two_class_logits(p: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float32 logits [M, Q, N, 2] whose softmax gives probability p [M, Q, N] to the label."""
    logits = np.empty(p.shape + (2,), dtype=np.float32)
    y = np.broadcast_to(labels, p.shape)[..., None]
    np.put_along_axis(logits, y, np.log(p)[..., None].astype(np.float32), axis=-1)
    np.put_along_axis(logits, 1 - y, np.log1p(-p)[..., None].astype(np.float32), axis=-1)
    return logits


def signals_from_probs(p: np.ndarray, keep: np.ndarray, p_pop: np.ndarray | None, seed: int = 0) -> Signals:
    """Two-class Signals with p_y = p [M, Q, P] for the audited points and p_pop [M, Q, Z] for z."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=p.shape[2]).astype(np.int64)
    pop_logits = pop_labels = None
    if p_pop is not None:
        pop_labels = rng.integers(0, 2, size=p_pop.shape[2]).astype(np.int64)
        pop_logits = _two_class_logits(p_pop, pop_labels)
    return Signals(_two_class_logits(p, labels), labels, keep, pop_logits, pop_labels)


# Hand example: 3 models, 1 query, 4 audited points, 5 population points z; model 0 is the target.
#                 target  m1    m2
P_X = np.array([[0.90, 0.6, 0.2],  # x0
                [0.36, 0.4, 0.8],  # x1
                [0.96, 0.3, 0.3],  # x2
                [0.60, 0.5, 0.5]]).T  # x3                                      -> [M=3, P=4]
P_Z = np.array([[0.40, 0.4, 0.4],  # z0
                [0.20, 0.5, 0.3],  # z1
                [0.60, 0.2, 0.2],  # z2
                [0.10, 0.4, 0.4],  # z3
                [0.45, 0.2, 0.4]]).T  # z4                                     -> [M=3, Z=5]
# Shadow membership: x0 IN m1 / OUT m2, x1 OUT m1 / IN m2, x2 OUT both, x3 IN m1 / OUT m2. The target's row
# is arbitrary (RMIA must not read it).
KEEP = np.array([[True, True, False, False],
                 [True, False, False, True],
                 [False, True, False, False]])


def _hand_signals() -> Signals:
    return signals_from_probs(P_X[:, None, :], KEEP, P_Z[:, None, :])


def test_online_by_hand() -> None:
    # Online Pr(x) = mean over both shadows:
    #   x0 (.6+.2)/2 = .4 -> ratio .9/.4 = 2.25;  x1 .6 -> .36/.6 = .6;  x2 .3 -> .96/.3 = 3.2;  x3 .5 -> 1.2
    #   z0 .4 -> 1.0;  z1 .4 -> .5;  z2 .2 -> 3.0;  z3 .4 -> .25;  z4 .3 -> 1.5
    # gamma = 2: count z with Ratio_z <= Ratio_x / 2:
    #   x0 1.125 -> {1.0, .5, .25} = 3/5;  x1 .3 -> {.25} = 1/5;  x2 1.6 -> {1.0, .5, .25, 1.5} = 4/5;
    #   x3 .6 -> {.5, .25} = 2/5
    sig = _hand_signals()
    lx, lz = rmia_log_ratios(
        log_prob_true_label(sig.logits, sig.labels), sig.keep,
        log_prob_true_label(sig.pop_logits, sig.pop_labels), 0, online=True,
    )
    np.testing.assert_allclose(np.exp(lx), [2.25, 0.6, 3.2, 1.2], rtol=1e-6)
    np.testing.assert_allclose(np.exp(lz), [1.0, 0.5, 3.0, 0.25, 1.5], rtol=1e-6)
    np.testing.assert_allclose(run_attack("rmia_online", None, sig, 0), [0.6, 0.2, 0.8, 0.4])
    # gamma = 1: x0 2.25 -> {1, .5, .25, 1.5} = 4/5; x1 .6 -> {.5, .25} = 2/5; x2 3.2 -> 5/5; x3 1.2 -> 3/5
    np.testing.assert_allclose(run_attack("rmia_online", {"gamma": 1.0}, sig, 0), [0.8, 0.4, 1.0, 0.6])


def test_offline_by_hand() -> None:
    # Pr_OUT(x) over OUT shadows only: x0 .2 (m2), x1 .4 (m1), x2 (.3+.3)/2 = .3, x3 .5 (m2).
    # Pr_OUT(z) over both shadows: z0 .4, z1 .4, z2 .2, z3 .4, z4 .3.
    sig = _hand_signals()
    # a = 0.5: Pr = (1.5 Pr_OUT + .5) / 2 = .75 Pr_OUT + .25
    #   x: .4 .55 .475 .625 -> ratios .9/.4 = 2.25, .36/.55 = .654545, .96/.475 = 2.021053, .6/.625 = .96
    #   z: .55 .55 .4 .55 .475 -> ratios .727273, .363636, 1.5, .181818, .947368
    #   gamma 2: x0 1.125 -> 4 (all but 1.5); x1 .327 -> {.18} 1; x2 1.0105 -> 4; x3 .48 -> {.36, .18} 2
    logp = log_prob_true_label(sig.logits, sig.labels)
    logp_pop = log_prob_true_label(sig.pop_logits, sig.pop_labels)
    lx, lz = rmia_log_ratios(logp, sig.keep, logp_pop, 0, online=False, a=0.5)
    np.testing.assert_allclose(np.exp(lx), [0.9 / 0.4, 0.36 / 0.55, 0.96 / 0.475, 0.6 / 0.625], rtol=1e-6)
    np.testing.assert_allclose(np.exp(lz), [0.4 / 0.55, 0.2 / 0.55, 1.5, 0.1 / 0.55, 0.45 / 0.475], rtol=1e-6)
    np.testing.assert_allclose(run_attack("rmia_offline", {"a": 0.5}, sig, 0), [0.8, 0.2, 0.8, 0.4])
    # a = 0: Pr = (Pr_OUT + 1) / 2
    #   x: .6 .7 .65 .75 -> ratios 1.5, .514286, 1.476923, .8
    #   z: .7 .7 .6 .7 .65 -> ratios .571429, .285714, 1.0, .142857, .692308
    #   gamma 2: x0 .75 -> 4 (all but 1.0); x1 .2571 -> {.14} 1; x2 .7385 -> 4; x3 .4 -> {.29, .14} 2
    #   gamma 1: x0 1.5 -> 5; x1 .514 -> {.29, .14} 2; x2 1.477 -> 5; x3 .8 -> {.57, .29, .14, .69} 4
    lx, lz = rmia_log_ratios(logp, sig.keep, logp_pop, 0, online=False, a=0.0)
    np.testing.assert_allclose(np.exp(lx), [0.9 / 0.6, 0.36 / 0.7, 0.96 / 0.65, 0.6 / 0.75], rtol=1e-6)
    np.testing.assert_allclose(np.exp(lz), [0.4 / 0.7, 0.2 / 0.7, 1.0, 0.1 / 0.7, 0.45 / 0.65], rtol=1e-6)
    np.testing.assert_allclose(run_attack("rmia_offline", {"a": 0.0}, sig, 0), [0.8, 0.2, 0.8, 0.4])
    np.testing.assert_allclose(run_attack("rmia_offline", {"a": 0.0, "gamma": 1.0}, sig, 0), [1, 0.4, 1, 0.8])
    # a = 1: Pr(x) = Pr_OUT(x) exactly: x0 .9/.2 = 4.5
    lx, _ = rmia_log_ratios(logp, sig.keep, logp_pop, 0, online=False, a=1.0)
    np.testing.assert_allclose(np.exp(lx), [4.5, 0.9, 3.2, 1.2], rtol=1e-6)


def test_queries_average_probabilities_before_the_ratio() -> None:
    # Target p_y = (.5, .5) over 2 queries, the shadow (.1, .9): averaged first, Pr(x|target) = .5 and
    # Pr(x) = .5, so Ratio_x = 1 (per-query ratios would average (5 + .5556) / 2 = 2.78).
    p = np.array([[[0.5], [0.5]], [[0.1], [0.9]]])  # [M=2, Q=2, P=1]
    p_pop = np.array([[[0.2, 0.5]], [[0.5, 0.5]]]).repeat(2, axis=1)  # Ratio_z = .4 and 1.0
    sig = signals_from_probs(p, np.array([[True], [False]]), p_pop)
    lx, lz = rmia_log_ratios(
        log_prob_true_label(sig.logits, sig.labels), sig.keep,
        log_prob_true_label(sig.pop_logits, sig.pop_labels), 0, online=True,
    )
    np.testing.assert_allclose(np.exp(lx), [1.0], rtol=1e-6)
    np.testing.assert_allclose(np.exp(lz), [0.4, 1.0], rtol=1e-6)
    np.testing.assert_allclose(run_attack("rmia_online", None, sig, 0), [0.5])  # .4 <= 1/2 < 1.0


def test_temperature_softens_the_probabilities() -> None:
    logits = np.array([[[[2.0, 0.0, -1.0]]], [[[0.5, 0.0, 0.0]]]], dtype=np.float32)  # [M=2, Q=1, P=1, C=3]
    labels = np.array([0])
    got = np.exp(log_prob_true_label(logits, labels, temperature=2.0))[:, 0]
    want = [math.exp(1) / (math.exp(1) + 1 + math.exp(-0.5)), math.exp(0.25) / (math.exp(0.25) + 2)]
    np.testing.assert_allclose(got, want, rtol=1e-7)


def test_searchsorted_equals_brute_force() -> None:
    rng = np.random.default_rng(3)
    for gamma in (1.0, 1.5, 2.0):
        lx, lz = rng.normal(size=300), rng.normal(size=211)
        brute = np.mean(np.exp(lx)[:, None] / np.exp(lz)[None, :] >= gamma, axis=1)
        np.testing.assert_array_equal(pairwise_fraction(lx, lz, gamma), brute)
    # the full attack on random signals against a brute-force pairwise count in probability space
    m, q, p, z = 6, 2, 120, 90
    probs, probs_pop = rng.uniform(0.05, 0.95, (m, q, p)), rng.uniform(0.05, 0.95, (m, q, z))
    keep = rng.random((m, p)) < 0.5
    keep[0] = False  # model 0 is a shadow OUT for every point: no fallback needed below
    sig = signals_from_probs(probs, keep, probs_pop)
    pr = probs.mean(axis=1)  # Pr(x|model) [M, P], averaged over queries
    pr_pop = probs_pop.mean(axis=1)
    t, sh = 2, np.array([0, 1, 3, 4, 5])
    ratio_x = pr[t] / pr[sh].mean(axis=0)
    ratio_z = pr_pop[t] / pr_pop[sh].mean(axis=0)
    brute = np.mean(ratio_x[:, None] / ratio_z[None, :] >= 1.7, axis=1)
    np.testing.assert_array_equal(run_attack("rmia_online", {"gamma": 1.7}, sig, t), brute)
    a = 0.3
    out = ~keep[sh]
    pr_out = (pr[sh] * out).sum(axis=0) / out.sum(axis=0)
    ratio_x = pr[t] / (((1 + a) * pr_out + (1 - a)) / 2)
    ratio_z = pr_pop[t] / (((1 + a) * pr_pop[sh].mean(axis=0) + (1 - a)) / 2)
    brute = np.mean(ratio_x[:, None] / ratio_z[None, :] >= 2.0, axis=1)
    np.testing.assert_array_equal(run_attack("rmia_offline", None, sig, t), brute)


def test_num_z_subsamples_population() -> None:
    rng = np.random.default_rng(4)
    sig = signals_from_probs(rng.uniform(0.1, 0.9, (4, 1, 30)), rng.random((4, 30)) < 0.5,
                             rng.uniform(0.1, 0.9, (4, 1, 50)))
    s = run_attack("rmia_online", {"num_z": 10, "seed": 1}, sig, 0)
    assert np.all(np.isin(np.round(s * 10, 9), np.arange(11)))  # fractions of 10 z
    np.testing.assert_array_equal(s, run_attack("rmia_online", {"num_z": 10, "seed": 1}, sig, 0))
    np.testing.assert_array_equal(run_attack("rmia_online", {"num_z": 50}, sig, 0),
                                  run_attack("rmia_online", None, sig, 0))
    with pytest.raises(ValueError, match="num_z"):
        run_attack("rmia_online", {"num_z": 51}, sig, 0)


def test_target_keep_row_is_never_read() -> None:
    rng = np.random.default_rng(5)
    probs, probs_pop = rng.uniform(0.05, 0.95, (5, 2, 40)), rng.uniform(0.05, 0.95, (5, 2, 30))
    keep = rng.random((5, 40)) < 0.5
    flipped = keep.copy()
    flipped[1] = ~flipped[1]
    a, b = signals_from_probs(probs, keep, probs_pop), signals_from_probs(probs, flipped, probs_pop)
    for name in ("rmia_online", "rmia_offline"):
        np.testing.assert_array_equal(run_attack(name, None, a, 1), run_attack(name, None, b, 1))


def test_point_without_out_shadow_falls_back() -> None:
    # x1 is IN for every shadow: offline Pr_OUT(x1) falls back to the mean over all OUT pairs (x0's .2, .4)
    p = np.array([[[0.5, 0.9]], [[0.2, 0.8]], [[0.4, 0.7]]])
    keep = np.array([[False, False], [False, True], [False, True]])
    sig = signals_from_probs(p, keep, np.full((3, 1, 3), 0.5))
    lx, _ = rmia_log_ratios(
        log_prob_true_label(sig.logits, sig.labels), sig.keep,
        log_prob_true_label(sig.pop_logits, sig.pop_labels), 0, online=False, a=1.0,
    )
    np.testing.assert_allclose(np.exp(lx), [0.5 / 0.3, 0.9 / 0.3], rtol=1e-6)


def test_separates_members_on_synthetic_signals() -> None:
    rng = np.random.default_rng(6)
    m, q, p, z = 8, 2, 600, 600
    keep = np.zeros((m, p), bool)
    for i in range(p):  # balanced: every point IN for half the models
        keep[rng.permutation(m)[: m // 2], i] = True
    hardness = rng.normal(size=p)
    logit = hardness[None, None] + 2.0 * keep[:, None, :] + 0.5 * rng.normal(size=(m, q, p))
    logit_pop = rng.normal(size=z)[None, None] + 0.5 * rng.normal(size=(m, q, z))
    sig = signals_from_probs(1 / (1 + np.exp(-logit)), keep, 1 / (1 + np.exp(-logit_pop)))
    for name in ("rmia_online", "rmia_offline"):
        for t in (0, 3):
            auc = attack_metrics(run_attack(name, None, sig, t), keep[t])["auc"]
            assert auc > 0.85, (name, t, auc)


def test_missing_population_is_an_error() -> None:
    rng = np.random.default_rng(7)
    sig = signals_from_probs(rng.uniform(0.1, 0.9, (3, 1, 5)), rng.random((3, 5)) < 0.5, None)
    for name in ("rmia_online", "rmia_offline"):
        with pytest.raises(ValueError, match="population points z that no model trained on"):
            run_attack(name, None, sig, 0)


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("rmia_online", {"gamma": 0}, "gamma"),
        ("rmia_online", {"temperature": -1.0}, "temperature"),
        ("rmia_online", {"num_z": 0}, "num_z"),
        ("rmia_online", {"a": 0.3}, "a"),  # the online attack has no offline correction
        ("rmia_offline", {"a": 1.5}, "a"),
        ("rmia_offline", {"a": -0.1}, "a"),
        ("rmia_offline", {"nope": 1}, "nope"),
    ],
)
def test_bad_params_raise_spec_error(name: str, params: dict, field: str) -> None:
    sig = _hand_signals()
    with pytest.raises(SpecError) as e:
        run_attack(name, params, sig, 0, where="attacks.2")
    assert e.value.where == "attacks.2.params"
    assert str(e.value).startswith(f"attacks.2.params: {field}:")


def test_registered_with_documented_defaults() -> None:
    assert {"rmia_online", "rmia_offline"} <= set(ATTACKS.names())
    off = ATTACKS.get("rmia_offline").parse(None, where="p")
    assert (off.gamma, off.temperature, off.a, off.num_z) == (2.0, 1.0, 0.3, None)
