"""Known-answer and statistical tests of RMIA (raymia.attacks.mia.rmia), and checks against the reference
formulas: the paper's code (per-query ratios, majority vote over queries) and Privacy Meter's tuning of a."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from raymia.attacks import ATTACKS, run_attack
from raymia.attacks.mia.rmia import (
    A_GRID,
    combine_queries,
    count_below_both,
    log_prob_true_label,
    pairwise_fraction,
    rmia_log_ratios,
    tune_offline_a,
)
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


def _logs(sig: Signals, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """log Pr(.|model) [M, Q, P] and [M, Q, Z] of the hand examples (their probabilities are at T = 1)."""
    return (log_prob_true_label(sig.logits, sig.labels, temperature),
            log_prob_true_label(sig.pop_logits, sig.pop_labels, temperature))


T1 = {"temperature": 1.0}  # the hand examples give p_y at temperature 1


def paired_keep(m: int, p: int, rng: np.random.Generator) -> np.ndarray:
    """Complementary pairs as raymia's plans draw them: row 2j a random half, row 2j + 1 the rest."""
    keep = np.zeros((m, p), dtype=bool)
    for j in range(m // 2):
        keep[2 * j, rng.permutation(p)[: p // 2]] = True
        keep[2 * j + 1] = ~keep[2 * j]
    return keep


def test_online_by_hand() -> None:
    # Online Pr(x) = mean over both shadows:
    #   x0 (.6+.2)/2 = .4 -> ratio .9/.4 = 2.25;  x1 .6 -> .36/.6 = .6;  x2 .3 -> .96/.3 = 3.2;  x3 .5 -> 1.2
    #   z0 .4 -> 1.0;  z1 .4 -> .5;  z2 .2 -> 3.0;  z3 .4 -> .25;  z4 .3 -> 1.5
    # gamma = 2: count z with Ratio_z < Ratio_x / 2:
    #   x0 1.125 -> {1.0, .5, .25} = 3/5;  x1 .3 -> {.25} = 1/5;  x2 1.6 -> {1.0, .5, .25, 1.5} = 4/5;
    #   x3 .6 -> {.5, .25} = 2/5
    sig = _hand_signals()
    logp, logp_pop = _logs(sig)
    lx, lz = rmia_log_ratios(logp, sig.keep, logp_pop, 0, online=True)  # [Q=1, P], [Q=1, Z]
    np.testing.assert_allclose(np.exp(lx), [[2.25, 0.6, 3.2, 1.2]], rtol=1e-6)
    np.testing.assert_allclose(np.exp(lz), [[1.0, 0.5, 3.0, 0.25, 1.5]], rtol=1e-6)
    np.testing.assert_allclose(run_attack("rmia_online", {**T1, "gamma": 2.0}, sig, 0), [0.6, 0.2, 0.8, 0.4])
    # gamma = 1 (default): x0 2.25 -> {1, .5, .25, 1.5} = 4/5; x1 .6 -> {.5, .25} = 2/5; x2 3.2 -> 5/5;
    # x3 1.2 -> 3/5
    np.testing.assert_allclose(run_attack("rmia_online", T1, sig, 0), [0.8, 0.4, 1.0, 0.6])
    # one query given as [M, P]: the same ratios as 1-D arrays
    lx1, lz1 = rmia_log_ratios(logp[:, 0], sig.keep, logp_pop[:, 0], 0, online=True)
    np.testing.assert_allclose(lx1, lx[0], rtol=1e-12)
    np.testing.assert_allclose(lz1, lz[0], rtol=1e-12)


def test_offline_by_hand() -> None:
    # Pr_OUT(x) over OUT shadows only: x0 .2 (m2), x1 .4 (m1), x2 (.3+.3)/2 = .3, x3 .5 (m2).
    # Pr_OUT(z) over both shadows: z0 .4, z1 .4, z2 .2, z3 .4, z4 .3.
    sig = _hand_signals()
    # a = 0.5: Pr = (1.5 Pr_OUT + .5) / 2 = .75 Pr_OUT + .25
    #   x: .4 .55 .475 .625 -> ratios .9/.4 = 2.25, .36/.55 = .654545, .96/.475 = 2.021053, .6/.625 = .96
    #   z: .55 .55 .4 .55 .475 -> ratios .727273, .363636, 1.5, .181818, .947368
    #   gamma 2: x0 1.125 -> 4 (all but 1.5); x1 .327 -> {.18} 1; x2 1.0105 -> 4; x3 .48 -> {.36, .18} 2
    logp, logp_pop = _logs(sig)
    lx, lz = rmia_log_ratios(logp, sig.keep, logp_pop, 0, online=False, a=0.5)
    np.testing.assert_allclose(np.exp(lx[0]), [0.9 / 0.4, 0.36 / 0.55, 0.96 / 0.475, 0.6 / 0.625], rtol=1e-6)
    np.testing.assert_allclose(np.exp(lz[0]), [0.4 / 0.55, 0.2 / 0.55, 1.5, 0.1 / 0.55, 0.45 / 0.475],
                               rtol=1e-6)
    np.testing.assert_allclose(run_attack("rmia_offline", {**T1, "a": 0.5, "gamma": 2.0}, sig, 0),
                               [0.8, 0.2, 0.8, 0.4])
    # a = 0: Pr = (Pr_OUT + 1) / 2
    #   x: .6 .7 .65 .75 -> ratios 1.5, .514286, 1.476923, .8
    #   z: .7 .7 .6 .7 .65 -> ratios .571429, .285714, 1.0, .142857, .692308
    #   gamma 2: x0 .75 -> 4 (all but 1.0); x1 .2571 -> {.14} 1; x2 .7385 -> 4; x3 .4 -> {.29, .14} 2
    #   gamma 1: x0 1.5 -> 5; x1 .514 -> {.29, .14} 2; x2 1.477 -> 5; x3 .8 -> {.57, .29, .14, .69} 4
    lx, lz = rmia_log_ratios(logp, sig.keep, logp_pop, 0, online=False, a=0.0)
    np.testing.assert_allclose(np.exp(lx[0]), [0.9 / 0.6, 0.36 / 0.7, 0.96 / 0.65, 0.6 / 0.75], rtol=1e-6)
    np.testing.assert_allclose(np.exp(lz[0]), [0.4 / 0.7, 0.2 / 0.7, 1.0, 0.1 / 0.7, 0.45 / 0.65], rtol=1e-6)
    np.testing.assert_allclose(run_attack("rmia_offline", {**T1, "a": 0.0, "gamma": 2.0}, sig, 0),
                               [0.8, 0.2, 0.8, 0.4])
    np.testing.assert_allclose(run_attack("rmia_offline", {**T1, "a": 0.0}, sig, 0), [1, 0.4, 1, 0.8])
    # a = 1: Pr(x) = Pr_OUT(x) exactly: x0 .9/.2 = 4.5
    lx, _ = rmia_log_ratios(logp, sig.keep, logp_pop, 0, online=False, a=1.0)
    np.testing.assert_allclose(np.exp(lx[0]), [4.5, 0.9, 3.2, 1.2], rtol=1e-6)


# Per-query combination by hand: 2 models (target 0, shadow 1), 3 queries, 1 audited point x, 2 z; gamma 1.
#   x:  target (.5, .5, .5),  shadow (.25, .25, .8)  -> Ratio_x,k = 2, 2, .625
#   z0: target (.4, .4, .4),  shadow (.4, .4, .4)    -> Ratio_z0,k = 1, 1, 1
#   z1: target (.6, .3, .3),  shadow (.2, .6, .6)    -> Ratio_z1,k = 3, .5, .5
# Tests Ratio_x,k / Ratio_z,k > 1:  z0: T T F (2 of 3: won);  z1: F T T (2 of 3: won)  -> vote 2/2 = 1
# Per-query fractions: q0 1/2, q1 2/2, q2 1/2 -> mean 2/3.
VOTE_P = np.array([[[0.5], [0.5], [0.5]], [[0.25], [0.25], [0.8]]])  # [M=2, Q=3, P=1]
VOTE_Z = np.array([[[0.4, 0.6], [0.4, 0.3], [0.4, 0.3]], [[0.4, 0.2], [0.4, 0.6], [0.4, 0.6]]])  # [2, 3, 2]


def test_queries_combine_per_query_by_vote_or_mean() -> None:
    sig = signals_from_probs(VOTE_P, np.array([[True], [True]]), VOTE_Z)
    logp, logp_pop = _logs(sig)
    lx, lz = rmia_log_ratios(logp, sig.keep, logp_pop, 0, online=True)
    np.testing.assert_allclose(np.exp(lx), [[2.0], [2.0], [0.625]], rtol=1e-6)  # one ratio per query
    np.testing.assert_allclose(np.exp(lz), [[1.0, 3.0], [1.0, 0.5], [1.0, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(run_attack("rmia_online", T1, sig, 0), [1.0])
    np.testing.assert_allclose(run_attack("rmia_online", {**T1, "combine": "mean"}, sig, 0), [2 / 3])
    np.testing.assert_allclose(combine_queries(lx, lz, 1.0, "vote"), [1.0])
    np.testing.assert_allclose(combine_queries(lx, lz, 1.0, "mean"), [2 / 3])


def test_vote_tie_loses() -> None:
    # Two queries that disagree on (x, z) are a tie: torch.mode in the paper's code returns False for it.
    lx = np.log([[2.0], [0.5]])  # Ratio_x per query
    lz = np.log([[1.0, 0.25], [1.0, 0.25]])  # z0 ties (T, F); z1 wins both (8 > 1, 2 > 1)
    np.testing.assert_allclose(combine_queries(lx, lz, 1.0, "vote"), [0.5])
    np.testing.assert_allclose(combine_queries(lx, lz, 1.0, "mean"), [0.75])


def test_temperature_softens_the_probabilities_and_defaults_to_two() -> None:
    logits = np.array([[[[2.0, 0.0, -1.0]]], [[[0.5, 0.0, 0.0]]]], dtype=np.float32)  # [M=2, Q=1, P=1, C=3]
    labels = np.array([0])
    got = np.exp(log_prob_true_label(logits, labels, temperature=2.0))[:, 0, 0]
    want = [math.exp(1) / (math.exp(1) + 1 + math.exp(-0.5)), math.exp(0.25) / (math.exp(0.25) + 2)]
    np.testing.assert_allclose(got, want, rtol=1e-7)
    np.testing.assert_array_equal(log_prob_true_label(logits, labels),
                                  log_prob_true_label(logits, labels, 2.0))
    for name in ("rmia_online", "rmia_offline"):
        assert ATTACKS.get(name).parse(None, where="p").temperature == 2.0


def _paper_rmia(p: np.ndarray, keep: np.ndarray, p_pop: np.ndarray, target: int, shadows: np.ndarray,
                online: bool, a: float, gamma: float) -> np.ndarray:
    """The paper's code (research/2023_rmia/main.py, aggregate_signals, augmented branch, trimmed mean cut
    0), re-written in probability space: per query k the outer product of Ratio_x and 1 / Ratio_z,
    thresholded > gamma, majority vote over queries (a tie loses, as torch.mode), mean over z."""
    q = p.shape[1]
    votes = []
    for k in range(q):
        ref, ref_pop = p[shadows, k], p_pop[shadows, k]  # [S, P], [S, Z]
        if online:
            mean_x, mean_z = ref.mean(0), ref_pop.mean(0)
        else:
            out = ~keep[shadows]
            mean_x = (ref * out).sum(0) / out.sum(0)
            mean_x = (1 + a) / 2 * mean_x + (1 - a) / 2
            mean_z = (1 + a) / 2 * ref_pop.mean(0) + (1 - a) / 2
        ratio_x = p[target, k] / mean_x
        ratio_z_rev = 1 / (p_pop[target, k] / mean_z)
        votes.append(np.outer(ratio_x, ratio_z_rev) > gamma)
    won = np.sum(votes, axis=0) > q / 2
    return won.mean(1)


def test_matches_the_papers_code_with_brute_force_votes() -> None:
    rng = np.random.default_rng(3)
    for gamma in (1.0, 1.5, 2.0):
        lx, lz = rng.normal(size=300), rng.normal(size=211)
        brute = np.mean(np.exp(lx)[:, None] / np.exp(lz)[None, :] > gamma, axis=1)
        np.testing.assert_array_equal(pairwise_fraction(lx, lz, gamma), brute)
    m, q, p, z = 8, 3, 120, 90
    probs, probs_pop = rng.uniform(0.05, 0.95, (m, q, p)), rng.uniform(0.05, 0.95, (m, q, z))
    keep = paired_keep(m, p, rng)
    sig = signals_from_probs(probs, keep, probs_pop)
    t = 2
    shadows = sig.shadow_mask(t)
    for online, name, params in ((True, "rmia_online", {}), (False, "rmia_offline", {"a": 0.3})):
        for gamma in (1.0, 1.7):
            want = _paper_rmia(probs, keep, probs_pop, t, shadows, online, 0.3, gamma)
            got = run_attack(name, {**T1, **params, "gamma": gamma}, sig, t)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # two queries (ties possible) and the soft vote
    want = _paper_rmia(probs[:, :2], keep, probs_pop[:, :2], t, shadows, False, 0.6, 1.0)
    sig2 = signals_from_probs(probs[:, :2], keep, probs_pop[:, :2])
    np.testing.assert_allclose(run_attack("rmia_offline", {**T1, "a": 0.6}, sig2, t), want, atol=1e-12)
    per_query = np.mean([_paper_rmia(probs[:, k:k + 1], keep, probs_pop[:, k:k + 1], t, shadows, False, 0.6,
                                     1.0) for k in range(2)], axis=0)
    np.testing.assert_allclose(run_attack("rmia_offline", {**T1, "a": 0.6, "combine": "mean"}, sig2, t),
                               per_query, atol=1e-12)


def test_vote_blocks_equal_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import raymia.attacks.mia.rmia as rmia

    rng = np.random.default_rng(8)
    lx, lz = rng.normal(size=(3, 257)), rng.normal(size=(3, 101))
    whole = combine_queries(lx, lz, 1.2, "vote")
    monkeypatch.setattr(rmia, "_BLOCK_ELEMENTS", 500)  # blocks of 4 x
    np.testing.assert_array_equal(combine_queries(lx, lz, 1.2, "vote"), whole)
    brute = (np.sum(lx[:, :, None] - math.log(1.2) > lz[:, None, :], axis=0) >= 2).mean(1)
    np.testing.assert_array_equal(whole, brute)


def test_two_query_vote_counts_exactly_the_pairs_that_pass_both() -> None:
    """The default two queries count z below both thresholds by sorted blocks, not by comparing every
    (x, z) pair: the same integers as the pairwise count, with ties, infinities and NaN (which never
    passes), for sizes below, at and between the block sizes."""
    rng = np.random.default_rng(3)
    for i in range(120):
        z, p = int(rng.integers(1, 260)), int(rng.integers(1, 90))
        if i % 3 == 0:
            a, t = rng.normal(size=(2, z)), rng.normal(size=(2, p))
        else:  # few distinct values: ties everywhere
            a, t = rng.integers(0, 5, (2, z)).astype(float), rng.integers(0, 6, (2, p)).astype(float)
        if i % 3 == 2:
            for arr in (a, t):
                arr[rng.random(arr.shape) < 0.1] = np.nan
                arr[rng.random(arr.shape) < 0.05] = np.inf
                arr[rng.random(arr.shape) < 0.05] = -np.inf
        pairwise = ((a[0][None] < t[0][:, None]) & (a[1][None] < t[1][:, None])).sum(axis=1)
        np.testing.assert_array_equal(count_below_both(a[0], a[1], t[0], t[1]), pairwise)
    lx, lz = rng.normal(size=(2, 300)), rng.normal(size=(2, 77))
    brute = (np.sum(lx[:, :, None] - math.log(1.3) > lz[:, None, :], axis=0) >= 2).mean(1)
    np.testing.assert_array_equal(combine_queries(lx, lz, 1.3, "vote"), brute)


def _synthetic_probs(seed: int, m: int, q: int, p: int, z: int, shift: float, noise: float):
    """(keep, p_y [M, Q, P], p_y of z [M, Q, Z]) of a paired bank: logit = per-point hardness + `shift` for
    members + `noise` per model and query; population points z are never members."""
    rng = np.random.default_rng(seed)
    keep = paired_keep(m, p, rng)
    hard = rng.normal(size=p)
    logit = hard[None, None] + shift * keep[:, None, :] + noise * rng.normal(size=(m, q, p))
    logit_pop = rng.normal(size=z)[None, None] + noise * rng.normal(size=(m, q, z))
    return keep, 1 / (1 + np.exp(-logit)), 1 / (1 + np.exp(-logit_pop))


def test_auto_a_picks_the_grid_value_of_best_reference_auc() -> None:
    m, p = 8, 200
    keep, probs, probs_pop = _synthetic_probs(11, m, 2, p, 120, shift=1.0, noise=0.7)
    sig = signals_from_probs(probs, keep, probs_pop)
    target = 0
    shadows = sig.shadow_mask(target)  # 2..7 (the target's pair, model 1, is left out)
    # Expected, independently: the first shadow (2) attacked by the others but its pair (3): models 4..7
    r, refs = 2, np.isin(np.arange(m), [4, 5, 6, 7])
    aucs = {a: roc_auc_score(keep[r], _paper_rmia(probs, keep, probs_pop, r, refs, False, a, 1.0))
            for a in A_GRID}
    best = max(A_GRID, key=lambda a: (aucs[a], -a))  # highest AUC, the smallest a among ties
    logp, logp_pop = _logs(sig)
    got, got_aucs = tune_offline_a(logp, keep, logp_pop, shadows, 1.0, "vote")
    assert got == best
    assert got_aucs == pytest.approx(aucs, abs=1e-12)
    assert len(set(np.round(list(aucs.values()), 6))) > 3  # the grid matters on this bank
    # the attack with a: auto is the attack with the tuned a
    np.testing.assert_array_equal(run_attack("rmia_offline", T1, sig, target),
                                  run_attack("rmia_offline", {**T1, "a": best}, sig, target))
    # tuning reads shadow rows only: any target row gives the same a
    for row in (~keep[target], np.zeros(p, bool), np.random.default_rng(12).random(p) < 0.5):
        other = keep.copy()
        other[target] = row
        assert tune_offline_a(logp, other, logp_pop, shadows, 1.0, "vote")[0] == best


def test_auto_a_needs_references_besides_the_tuning_model() -> None:
    rng = np.random.default_rng(12)
    keep = paired_keep(4, 30, rng)  # target 0: shadows 2 and 3, a pair: nothing left to attack 2 with
    sig = signals_from_probs(rng.uniform(0.1, 0.9, (4, 1, 30)), keep, rng.uniform(0.1, 0.9, (4, 1, 20)))
    shadows = np.array([False, False, True, True])
    logp, logp_pop = _logs(sig)
    with pytest.raises(ValueError, match="set a to a number"):
        tune_offline_a(logp, keep, logp_pop, shadows, 1.0)
    assert np.all(np.isfinite(run_attack("rmia_offline", {"a": 0.3}, sig, 0)))


@pytest.mark.parametrize(("num_models", "own_target", "refused"),
                         [(4, False, True), (6, False, False), (2, True, True), (4, True, False)])
def test_auto_a_without_references_is_refused_before_training(num_models, own_target, refused) -> None:
    """The attack found it after the bank trained; `raymia check` and every run now refuse it first, at the
    bank sizes where tuning has no shadow pair left (leave-one-out: the target's pair is no shadow)."""
    from raymia.resolve import validate_spec
    from raymia.spec import AuditSpec

    raw = {"plan": {"num_models": num_models}, "attacks": [{"name": "rmia_offline"}]}
    if own_target:
        raw["target"] = {"outputs": "missing.npz", "members": "missing.npy"}
    try:
        validate_spec(raw, AuditSpec)
    except SpecError as e:
        assert refused and str(e).startswith("attacks.0.params: a='auto' tunes a on a shadow model"), e
        assert f"plan.num_models >= {num_models + 2}" in str(e)
    else:
        assert not refused
    raw["attacks"][0]["params"] = {"a": 0.3}  # a given: nothing to tune
    if not own_target:
        validate_spec(raw, AuditSpec)


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
    for name in ("rmia_online", "rmia_offline"):  # rmia_offline tunes a (auto) on a shadow
        np.testing.assert_array_equal(run_attack(name, None, a, 1), run_attack(name, None, b, 1))


def test_point_without_out_shadow_falls_back() -> None:
    # x1 is IN for every shadow: offline Pr_OUT(x1) falls back to the mean over all OUT pairs (x0's .2, .4)
    p = np.array([[[0.5, 0.9]], [[0.2, 0.8]], [[0.4, 0.7]]])
    keep = np.array([[False, False], [False, True], [False, True]])
    sig = signals_from_probs(p, keep, np.full((3, 1, 3), 0.5))
    logp, logp_pop = _logs(sig)
    lx, _ = rmia_log_ratios(logp, sig.keep, logp_pop, 0, online=False, a=1.0)
    np.testing.assert_allclose(np.exp(lx), [[0.5 / 0.3, 0.9 / 0.3]], rtol=1e-6)


def test_separates_members_on_synthetic_signals() -> None:
    keep, probs, probs_pop = _synthetic_probs(6, 8, 2, 600, 600, shift=2.0, noise=0.5)
    sig = signals_from_probs(probs, keep, probs_pop)
    for name in ("rmia_online", "rmia_offline"):
        for t in (0, 3):
            auc = attack_metrics(run_attack(name, None, sig, t), keep[t])["auc"]
            assert auc > 0.85, (name, t, auc)


def _leaky_bank(seed: int, m: int = 8, p: int = 2000, z: int = 1000, q: int = 2, c: int = 10) -> Signals:
    """A paired bank of 10-class logits whose true-class logit is a per-point hardness plus 1 for members,
    plus noise (so members' phi is shifted by about 1)."""
    rng = np.random.default_rng(seed)
    keep = paired_keep(m, p, rng)

    def draw(n: int, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = rng.normal(0.0, 1.0, (m, q, n, c))
        labels = rng.integers(0, c, n)
        hard = rng.normal(0.0, 2.0, n)
        logits[:, :, np.arange(n), labels] = 2.0 + hard + member[:, None, :] + rng.normal(size=(m, q, n))
        return logits.astype(np.float32), labels

    x, y = draw(p, keep.astype(np.float64))
    zx, zy = draw(z, np.zeros((m, z)))
    return Signals(x, y, keep, zx, zy)


def test_offline_rmia_with_auto_a_at_least_as_strong_as_offline_lira() -> None:
    """Few references (8 models: 6 shadows, 3 OUT per point), members' phi shifted by 1: measured AUC over
    targets 0-3, RMIA offline 0.767 against LiRA offline 0.764 (the RMIA paper's claim for few references);
    a fixed a = 0.3 would give 0.665 on this bank."""
    sig = _leaky_bank(seed=1)
    auc = {name: np.mean([roc_auc_score(sig.keep[t], run_attack(name, None, sig, t)) for t in range(4)])
           for name in ("rmia_offline", "lira_offline")}
    assert auc["rmia_offline"] >= auc["lira_offline"] > 0.7, auc


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
        ("rmia_online", {"num_z": 2, "seed": -1}, "seed"),  # numpy's generators take no negative seed
        ("rmia_online", {"combine": "max"}, "combine"),
        ("rmia_online", {"a": 0.3}, "a"),  # the online attack has no offline correction
        ("rmia_offline", {"a": 1.5}, "a"),
        ("rmia_offline", {"a": -0.1}, "a"),
        ("rmia_offline", {"a": "tuned"}, "a"),
        ("rmia_offline", {"nope": 1}, "nope"),
    ],
)
def test_bad_params_raise_spec_error(name: str, params: dict, field: str) -> None:
    sig = _hand_signals()
    with pytest.raises(SpecError) as e:
        run_attack(name, params, sig, 0, where="attacks.2")
    assert e.value.where == "attacks.2.params"
    assert str(e.value).startswith(f"attacks.2.params: {field}")


def test_registered_with_documented_defaults() -> None:
    assert {"rmia_online", "rmia_offline"} <= set(ATTACKS.names())
    off = ATTACKS.get("rmia_offline").parse(None, where="p")
    assert (off.gamma, off.temperature, off.a, off.combine, off.num_z) == (1.0, 2.0, "auto", "vote", None)
    on = ATTACKS.get("rmia_online").parse(None, where="p")
    assert (on.gamma, on.temperature, on.combine) == (1.0, 2.0, "vote")
    assert A_GRID == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_rmia_ties_follow_the_papers_strict_inequalities():
    """Ratio_x / Ratio_z > gamma counts z strictly above (rounded outputs make ties common), and a vote of an
    even number of queries that ties is not a win."""
    assert pairwise_fraction(np.log([1.0]), np.log([1.0, 0.5]), 1.0).tolist() == [0.5]
    lx = np.log(np.array([[1.0], [1.0], [1.0], [1.0]]))  # 4 queries, one x
    lz = np.log(np.array([[0.5], [0.5], [2.0], [2.0]]))  # one z: 2 queries pass, 2 fail
    assert combine_queries(lx, lz, 1.0, "vote").tolist() == [0.0]
    lz[2, 0] = math.log(0.5)  # 3 of 4 pass: a strict majority
    assert combine_queries(lx, lz, 1.0, "vote").tolist() == [1.0]


def test_offline_a_keeps_the_first_grid_value_of_the_highest_auc():
    """Privacy Meter keeps the first a of highest AUC: when every a scores the same, the grid's first."""
    from raymia.data.plan import paired_keep

    keep = paired_keep(6, 8, np.random.default_rng(0))
    logp = np.full((6, 1, 8), -0.1)
    pop = np.full((6, 1, 5), -0.1)
    a, aucs = tune_offline_a(logp, keep, pop, np.arange(6) != 0, 1.0)
    assert len(set(aucs.values())) == 1 and a == A_GRID[0]


def test_confident_outputs_keep_their_ratios() -> None:
    """Every model gives both the point x and the population point z p_y within 1e-17 of 1 (two classes,
    z = [m, 0] at T = 1, so 1 - p_y = expit(-m)): the ratios are 1 + O(1e-18), normal float64 numbers once
    written as logs, and must come out to float64 precision, online and offline, not as the max over the
    references (a log-mean-exp whose exp rounds to 1) or with Pr_OUT's deviation from 1 lost in the
    a-correction."""
    from scipy.special import expit

    m_x = np.array([45.0, 40.0, 42.0])  # target, shadow 1 (OUT for x), shadow 2 (IN for x)
    m_z = np.array([43.0, 41.0, 44.0])
    keep = np.array([[True], [False], [True]])
    logits = np.zeros((3, 1, 1, 2), dtype=np.float32)
    logits[:, 0, 0, 0] = m_x
    pop = np.zeros((3, 1, 1, 2), dtype=np.float32)
    pop[:, 0, 0, 0] = m_z
    sig = Signals(logits, np.zeros(1, dtype=np.int64), keep, pop, np.zeros(1, dtype=np.int64))
    logp, logp_pop = _logs(sig)
    np.testing.assert_allclose(logp[:, 0, 0], -np.log1p(np.exp(-m_x)), rtol=1e-12)
    eps_x, eps_z = expit(-m_x), expit(-m_z)  # 1 - p_y, exactly
    # online: Pr = 1 - mean(eps) over both shadows
    lx, lz = rmia_log_ratios(logp, keep, logp_pop, 0, online=True)
    want_x = np.log1p(-eps_x[0]) - np.log1p(-eps_x[1:].mean())
    want_z = np.log1p(-eps_z[0]) - np.log1p(-eps_z[1:].mean())
    assert want_x == pytest.approx(2.38e-18, rel=0.01) and want_z == pytest.approx(6.0e-19, rel=0.02)
    np.testing.assert_allclose([lx[0, 0], lz[0, 0]], [want_x, want_z], rtol=1e-9)
    # offline, a = 0.3: Pr = 0.65 Pr_OUT + 0.35 = 1 - 0.65 mean(eps over OUT shadows); x's OUT shadow is 1
    lx, lz = rmia_log_ratios(logp, keep, logp_pop, 0, online=False, a=0.3)
    want_x = np.log1p(-eps_x[0]) - np.log1p(-0.65 * eps_x[1])
    want_z = np.log1p(-eps_z[0]) - np.log1p(-0.65 * eps_z[1:].mean())
    np.testing.assert_allclose([lx[0, 0], lz[0, 0]], [want_x, want_z], rtol=1e-9)
