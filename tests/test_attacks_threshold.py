"""Known-answer tests of the threshold, learned (Shokri, Salem) and label-only membership inference attacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raymia.attacks import run_attack
from raymia.attacks.mia.threshold import (
    PoolFit,
    best_threshold,
    confidence_stat,
    correctness_stat,
    entropy_stat,
    loss_stat,
    max_confidence_stat,
    modified_entropy_stat,
)
from raymia.data.plan import paired_keep
from raymia.errors import SpecError
from raymia.metrics import attack_metrics
from raymia.signals import Signals

THRESHOLD_ATTACKS = ["loss", "confidence", "max_confidence", "entropy", "modified_entropy", "correctness"]
STATS = {
    "loss": loss_stat,
    "confidence": confidence_stat,
    "max_confidence": max_confidence_stat,
    "entropy": entropy_stat,
    "modified_entropy": modified_entropy_stat,
    "correctness": correctness_stat,
}


# ---------------------------------------------------------------------------------------------- statistics by hand
# Four 3-class outputs with exactly representable logits. With E = 1 + e + e^2:
#   row 0: z = [0, 0, 0], y = 0: p = [1/3, 1/3, 1/3]
#       confidence 1/3; -H = -log 3; Mentr = -(2/3) log(1/3) - 2 (1/3) log(2/3) = (2/3) log 4.5
#   row 1: z = [0, 1, 2], y = 2: p = [1, e, e^2] / E = [0.0900306, 0.2447285, 0.6652410] (correct)
#       confidence e^2/E; Mentr = -(1 - p2) log p2 - p0 log(1 - p0) - p1 log(1 - p1)
#   row 2: z = [0, 1, 2], y = 0: the same p, wrong label: confidence 1/E = 0.0900306
#       Mentr = -(1 - p0) log p0 - p1 log(1 - p1) - p2 log(1 - p2)
#             = 0.909969 * 2.407606 + 0.244728 * 0.280683 + 0.665241 * 1.094329 = 2.98754
#   row 3: z = [3, 0, 0], y = 1: p = [e^3, 1, 1] / (e^3 + 2), confidently wrong (p0 = 0.909 > 1/2)
Z = np.array([[0, 0, 0], [0, 1, 2], [0, 1, 2], [3, 0, 0]], dtype=np.float32)
Y = np.array([0, 2, 0, 1])


def _probs_by_hand(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _mentr_by_hand(p: list[float], y: int) -> float:
    """Song & Mittal's Mentr written out term by term, log arguments clipped to [1e-30, 1]."""
    total = -(1 - p[y]) * math.log(max(p[y], 1e-30))
    for j in range(len(p)):
        if j != y:
            total -= p[j] * math.log(max(1 - p[j], 1e-30))
    return total


def test_statistics_match_hand_formulas() -> None:
    e = math.e
    big_e = 1 + e + e**2
    want_conf = [1 / 3, e**2 / big_e, 1 / big_e, 1 / (e**3 + 2)]
    np.testing.assert_allclose(confidence_stat(Z, Y), want_conf, rtol=1e-12)
    np.testing.assert_allclose(loss_stat(Z, Y), np.log(want_conf), rtol=1e-12)
    # closed form of row 0: Mentr = (2/3) log 4.5 = 1.0027102...; entropy of row 0 = log 3
    assert _mentr_by_hand([1 / 3] * 3, 0) == pytest.approx(2 / 3 * math.log(4.5), rel=1e-14)
    want_ent, want_mentr = [], []
    for z, y in zip(Z.tolist(), Y.tolist()):
        p = _probs_by_hand(z)
        want_ent.append(sum(pj * math.log(pj) for pj in p))
        want_mentr.append(-_mentr_by_hand(p, y))
    np.testing.assert_allclose(entropy_stat(Z, Y), want_ent, rtol=1e-12)
    assert want_ent[0] == pytest.approx(-math.log(3), rel=1e-14)
    np.testing.assert_allclose(modified_entropy_stat(Z, Y), want_mentr, rtol=1e-12)
    assert want_mentr[2] == pytest.approx(-2.98754, abs=1e-5)
    # max_j p_j ignores the label: rows 1 and 2 (same logits, other labels) score the same
    np.testing.assert_allclose(max_confidence_stat(Z, Y), [1 / 3, e**2 / big_e, e**2 / big_e, e**3 / (e**3 + 2)],
                               rtol=1e-12)
    np.testing.assert_array_equal(max_confidence_stat(Z, Y), max_confidence_stat(Z, np.zeros(4, dtype=int)))
    # argmax ties go to the lowest class: row 0 predicts class 0 (= y)
    np.testing.assert_array_equal(correctness_stat(Z, Y), [1.0, 1.0, 0.0, 0.0])
    for fn in STATS.values():
        assert fn(Z, Y).dtype == np.float64


def test_modified_entropy_is_stable_for_confident_outputs() -> None:
    # z = [50, 0, 0], y = 1: p0 = e^50 / (e^50 + 2) rounds to 1.0, yet 1 - p0 = 2 / (e^50 + 2) = 3.9e-22, so
    # Mentr = (1 - p1) L - p0 (log 2 - L) - p2 log(1 - p2) with L = log(e^50 + 2) ~= 2L - log 2 = 99.307.
    # A naive 1 - p0 = 0 would be clipped to 1e-30 and give 50 + 69.08 = 119.08 instead.
    z = np.array([[50.0, 0.0, 0.0]], dtype=np.float32)
    big_l = 50 + math.log1p(2 * math.exp(-50))
    p0, p1 = math.exp(50 - big_l), math.exp(-big_l)
    p2 = p1
    mentr = (1 - p1) * big_l - p0 * (math.log(2) - big_l) - p2 * math.log1p(-p2)
    np.testing.assert_allclose(modified_entropy_stat(z, np.array([1])), [-mentr], rtol=1e-12)
    # clipping: p1 = e^-200 / ... is below 1e-30, so log p1 is clipped at log 1e-30
    z = np.array([[200.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(modified_entropy_stat(z, np.array([1])), [2 * math.log(1e-30)], rtol=1e-12)


# ---------------------------------------------------------------------------------------------- thresholds
def _brute_tau(s: np.ndarray, k: np.ndarray) -> float:
    """Smallest observed tau maximising mean(s_in > tau) - mean(s_out > tau), by a loop over candidates."""
    best, best_j = None, -np.inf
    for t in sorted(set(s.tolist())):
        j = np.mean(s[k] > t) - np.mean(s[~k] > t)
        if j > best_j + 1e-12:
            best, best_j = t, j
    return best


def test_best_threshold_by_hand_and_ties() -> None:
    # separable: members >= 0.8, non-members <= 0.5 -> tau = 0.5 (score > 0.5 => member)
    s = np.array([0.1, 0.3, 0.5, 0.8, 0.9, 1.0])
    assert best_threshold(s, s > 0.6) == 0.5
    # scores 0, 1, 2, 3 with IN = {1, 3}: tau 0 -> TPR 1, FPR 1/2; tau 2 -> TPR 1/2, FPR 0: tie, smallest wins
    assert best_threshold(np.array([0.0, 1.0, 2.0, 3.0]), np.array([False, True, False, True])) == 0.0
    assert best_threshold(s, np.ones(6, bool)) is None
    assert best_threshold(s, np.zeros(6, bool)) is None
    rng = np.random.default_rng(0)
    for _ in range(20):  # heavy ties (integers) against the brute-force loop
        s = rng.integers(0, 6, size=50).astype(np.float64)
        k = rng.random(50) < 1 / (1 + np.exp(-(s - 2.5)))
        assert best_threshold(s, k) == _brute_tau(s, k)


def _refit_thresholds(stat: np.ndarray, keep: np.ndarray, labels: np.ndarray, calibration: str,
                      shadow: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """The taus by definition: best_threshold on the shadows' own samples, sorted again for every target."""
    sh_stat, sh_in, fit_labels = stat[shadow][:, fit], keep[shadow][:, fit], labels[fit]
    tau_global = best_threshold(sh_stat, sh_in)
    tau_global = 0.0 if tau_global is None else tau_global
    if calibration == "global":
        return np.asarray(tau_global, dtype=np.float64)
    tau = np.full(labels.shape, tau_global, dtype=np.float64)
    for c in np.unique(labels):
        t = best_threshold(sh_stat[:, fit_labels == c], sh_in[:, fit_labels == c])
        if t is not None:
            tau[labels == c] = t
    return tau


def _fit_case(rng: np.random.Generator, case: int) -> tuple[np.ndarray, Signals]:
    """A statistic [M, P] and Signals whose keep, shadow pool, fit points and rows vary with the case."""
    m, p, c = 2 * int(rng.integers(2, 5)), int(rng.integers(5, 50)), int(rng.integers(1, 4))
    keep = paired_keep(m, p, rng) if case % 2 == 0 else rng.random((m, p)) < rng.uniform(0.1, 0.9)
    if case % 7 == 3:
        keep[:] = case % 14 == 3  # every shadow sample IN, or every one OUT: no threshold (tau 0)
    stat = [rng.integers(0, int(rng.integers(1, 6)), (m, p)).astype(np.float64),  # heavy ties
            rng.normal(size=(m, p)), np.round(rng.normal(size=(m, p)), 1) + 0.0][case % 3]
    if case % 11 == 5:
        stat[rng.random((m, p)) < 0.1] = np.nan  # a diverged model's outputs: np.unique holds NaN as one value
    labels = rng.integers(0, c + 1, p)  # class c is rare: some draws hold it only outside the fit points
    fit = None
    if case % 5 == 1:
        fit = rng.random(p) < 0.7
        fit[0] = True
        keep[:, ~fit] = False
    pool = rng.random(m) < 0.7 if case % 4 == 2 else None
    if case % 6 == 4:  # a `target:` audit's external model, appended as row M with no pair
        stat = np.vstack([stat, rng.normal(size=p)])
        keep = np.vstack([keep, rng.random(p) < 0.5])
        keep[-1, ~(np.ones(p, bool) if fit is None else fit)] = False
        pool = None if pool is None else np.append(pool, True)
        m += 1
    sig = Signals(logits=np.zeros((m, 1, p, c + 1), np.float32), labels=labels, keep=keep, shadow_pool=pool,
                  fit_mask=fit)
    return stat, sig


def test_pooled_fit_equals_a_refit_per_target_bit_for_bit() -> None:
    """Every target's taus from the pool's one sort are the refit's, to the bit: ties, NaN, a fit mask, a
    shadow pool, an unpaired external target, classes without IN or OUT shadows and banks without either."""
    rng = np.random.default_rng(12)
    compared = {"global": 0, "per_class": 0, "none": 0}
    for case in range(150):
        stat, sig = _fit_case(rng, case)
        pool = PoolFit(stat, sig.keep, sig.labels, sig.pool_mask, sig.fit_index)
        for target in range(sig.num_models):
            try:
                shadow = sig.shadow_mask(target)
            except ValueError:  # a pool this small leaves some targets no shadow
                continue
            for calibration in ("global", "per_class"):
                want = _refit_thresholds(stat, sig.keep, sig.labels, calibration, shadow, sig.fit_index)
                got = pool.thresholds(calibration, shadow)
                assert got.shape == want.shape and got.tobytes() == want.tobytes(), (case, target, calibration)
                compared[calibration] += 1
            compared["none"] += best_threshold(stat[shadow][:, sig.fit_index], sig.keep[shadow][:, sig.fit_index]) is None
    assert min(compared.values()) > 20, compared


@pytest.mark.parametrize("calibration", ["global", "per_class"])
def test_every_target_scores_the_refit_tau(calibration: str) -> None:
    """Through the attack, on one Signals as an audit runs it: every target's score is its statistic less
    the refit tau, to the bit, whether its pair's tau was asked for before or not."""
    rng = np.random.default_rng(13)
    keep = paired_keep(8, 120, rng)
    sig = _random_signals(seed=14, m=8, q=1, p=120, c=3)
    sig = Signals(sig.logits, sig.labels, keep)
    stat = np.stack([loss_stat(sig.logits[j, 0], sig.labels) for j in range(8)])
    for target in (3, 0, 1, 7, 2):
        want = stat[target] - _refit_thresholds(stat, keep, sig.labels, calibration, sig.shadow_mask(target),
                                                sig.fit_index)
        got = run_attack("loss", {"calibration": calibration}, sig, target)
        assert got.tobytes() == want.tobytes()


def _song_mittal_threshold(tr: np.ndarray, te: np.ndarray) -> float:
    """Song & Mittal's `_thre_setting` (inspire-group/membership-inference-evaluation), re-written: candidates
    are the member values then the non-member values in their given order; the rule is `value >= t => member`;
    the first candidate with a strictly larger (TPR + TNR) / 2 wins, starting from (t = 0, accuracy 0)."""
    thre, best = 0.0, 0.0
    for v in np.concatenate([tr, te]):
        acc = 0.5 * (np.mean(tr >= v) + np.mean(te < v))
        if acc > best:
            thre, best = float(v), acc
    return thre


def test_threshold_rule_against_song_mittal() -> None:
    # by hand: members 0.9, 0.7; non-members 0.2, 0.5. Both rules split the samples the same way (members =
    # {0.7, 0.9}); raymia puts the boundary at the largest value below the cut (score > 0.5), the reference at
    # the smallest value above it (score >= 0.7), so a target value in the gap, 0.6, is a member only for raymia
    tr, te = np.array([0.9, 0.7]), np.array([0.2, 0.5])
    s, k = np.concatenate([tr, te]), np.array([True, True, False, False])
    assert best_threshold(s, k) == 0.5 and _song_mittal_threshold(tr, te) == 0.7
    # ties in (TPR + TNR) / 2: the reference keeps the first candidate in data order, raymia the smallest tau
    # (values 0..3, IN = {1, 3}: cuts {1, 2, 3} and {3} both give 0.75)
    assert _song_mittal_threshold(np.array([3.0, 1.0]), np.array([0.0, 2.0])) == 3.0
    assert best_threshold(np.array([3.0, 1.0, 0.0, 2.0]), np.array([True, True, False, False])) == 0.0
    # continuous statistics (no ties): per class, the same partition of the shadow samples and the same
    # balanced accuracy in 200 draws of 20 to 400 samples
    rng = np.random.default_rng(11)
    for _ in range(200):
        n = int(rng.integers(20, 400))
        k = rng.random(n) < 0.5
        k[:2] = [True, False]
        s = rng.normal(size=n) + rng.uniform(0, 2) * k
        tau, thre = best_threshold(s, k), _song_mittal_threshold(s[k], s[~k])
        ba_raymia = 0.5 * (np.mean(s[k] > tau) + np.mean(s[~k] <= tau))
        ba_ref = 0.5 * (np.mean(s[k] >= thre) + np.mean(s[~k] < thre))
        assert ba_raymia == pytest.approx(ba_ref, abs=1e-12)
        gain = np.array([np.mean(s[k] >= v) - np.mean(s[~k] >= v) for v in s])
        if np.sum(gain >= gain.max() - 1e-12) == 1:  # a unique best cut: identical partitions
            np.testing.assert_array_equal(s > tau, s >= thre)


def _signals_with_confidence(conf: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> Signals:
    """3-class Signals [M, 1, P, 3] whose p_y is conf [M, P] (up to float32 rounding of the logits)."""
    m, p = conf.shape
    logits = np.repeat(np.log((1 - conf) / 2)[..., None], 3, axis=-1)
    np.put_along_axis(logits, np.broadcast_to(labels, (m, p))[..., None], np.log(conf)[..., None], axis=-1)
    return Signals(logits=logits[:, None].astype(np.float32), labels=labels, keep=keep)


def test_global_calibration_obvious_threshold() -> None:
    rng = np.random.default_rng(1)
    m, p = 5, 40
    keep = rng.random((m, p)) < 0.5
    conf = np.where(keep, rng.uniform(0.8, 0.99, (m, p)), rng.uniform(0.05, 0.5, (m, p)))
    sig = _signals_with_confidence(conf, np.zeros(p, np.int64), keep)
    raw = np.stack([confidence_stat(sig.logits[j, 0], sig.labels) for j in range(m)])
    target = 2
    sh = np.arange(m) != target
    tau = raw[sh][~keep[sh]].max()  # every tau in [max OUT, min IN) separates perfectly; the smallest wins
    assert 0.05 < tau <= 0.5 + 1e-6 and tau < raw[sh][keep[sh]].min()
    scores = run_attack("confidence", None, sig, target)
    np.testing.assert_allclose(scores, raw[target] - tau, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(scores > 0, keep[target])  # the attack's own decision is right
    # global calibration keeps the raw ranking
    assert attack_metrics(scores, keep[target])["auc"] == attack_metrics(raw[target], keep[target])["auc"]
    # loss: same threshold rule on -CE = log p_y
    loss_raw = np.log(raw)
    loss_tau = loss_raw[sh][~keep[sh]].max()
    np.testing.assert_allclose(run_attack("loss", None, sig, target), loss_raw[target] - loss_tau, rtol=1e-12)


def test_per_class_thresholds_and_absent_class_fallback() -> None:
    rng = np.random.default_rng(2)
    m, per = 6, 30
    labels = np.repeat(np.arange(3), per)
    p = labels.size
    keep = rng.random((m, p)) < 0.5
    keep[:, labels == 2] = False  # class 2: no IN shadow -> falls back to the global threshold
    keep[0, labels == 2] = True  # ... whatever the target's (unread) row says
    # OUT / IN confidences per class: 0: [0.6, 0.7] / [0.8, 0.99]; 1: [0.2, 0.3] / [0.4, 0.5]; 2: [0.31, 0.36] / -
    # global best: tau = max class-2 OUT (TPR 1, FPR = class-0 OUT share ~ 1/4) beats tau = max class-0 OUT
    lo = np.array([0.60, 0.20, 0.31])[labels]
    hi_out = np.array([0.70, 0.30, 0.36])[labels]
    lo_in = np.array([0.80, 0.40, 0.9])[labels]
    hi_in = np.array([0.99, 0.50, 0.95])[labels]
    conf = np.where(keep, rng.uniform(lo_in, hi_in, (m, p)), rng.uniform(lo, hi_out, (m, p)))
    sig = _signals_with_confidence(conf, labels, keep)
    raw = np.stack([confidence_stat(sig.logits[j, 0], labels) for j in range(m)])
    sh_raw, sh_keep = raw[1:], keep[1:]
    tau_global = _brute_tau(sh_raw.ravel(), sh_keep.ravel())
    tau = {c: sh_raw[:, labels == c][~sh_keep[:, labels == c]].max() for c in (0, 1)}  # separable classes
    tau[2] = tau_global
    assert abs(tau[0] - tau[1]) > 0.3 and tau[0] != tau_global != tau[1]
    got = run_attack("confidence", {"calibration": "per_class"}, sig, 0)
    want = raw[0] - np.array([tau[c] for c in labels])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(got[labels < 2] > 0, keep[0, labels < 2])
    glob = run_attack("confidence", {"calibration": "global"}, sig, 0)
    np.testing.assert_allclose(glob, raw[0] - tau_global, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", THRESHOLD_ATTACKS)
@pytest.mark.parametrize("calibration", ["global", "per_class"])
def test_threshold_attacks_match_stat_minus_brute_tau(name: str, calibration: str) -> None:
    sig = _random_signals(seed=3, m=4, q=2, p=60, c=3)
    stat = np.stack([STATS[name](sig.logits[j, 1], sig.labels) for j in range(4)])
    target = 1
    sh = np.arange(4) != target
    g = _brute_tau(stat[sh].ravel(), sig.keep[sh].ravel())
    tau = np.full(sig.num_points, g)
    if calibration == "per_class":
        for c in range(3):
            cols = sig.labels == c
            tau[cols] = _brute_tau(stat[sh][:, cols].ravel(), sig.keep[sh][:, cols].ravel())
    got = run_attack(name, {"query": 1, "calibration": calibration}, sig, target)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, stat[target] - tau, rtol=0, atol=1e-12)


def test_uncalibratable_threshold_is_zero() -> None:
    sig = _random_signals(seed=4, m=3, q=1, p=10, c=3)
    none_in = Signals(sig.logits, sig.labels, np.zeros_like(sig.keep))
    np.testing.assert_array_equal(
        run_attack("entropy", None, none_in, 0), entropy_stat(sig.logits[0, 0], sig.labels)
    )


# ---------------------------------------------------------------------------------------------- synthetic banks
def _random_signals(seed: int, m: int, q: int, p: int, c: int, effect: float = 1.0) -> Signals:
    """Logits N(0, 1) with z_y raised by 1 + effect * member + N(0, 1/2); keep random halves."""
    rng = np.random.default_rng(seed)
    keep = rng.random((m, p)) < 0.5
    labels = rng.integers(0, c, size=p)
    logits = rng.normal(size=(m, q, p, c))
    bump = 1.0 + effect * keep[:, None, :] + 0.5 * rng.normal(size=(m, q, p))
    idx = np.broadcast_to(labels, (m, q, p))[..., None]
    np.put_along_axis(logits, idx, np.take_along_axis(logits, idx, axis=-1) + bump[..., None], axis=-1)
    return Signals(logits=logits.astype(np.float32), labels=labels, keep=keep)


FAST = {"max_train": 3000, "max_iter": 60}


@pytest.mark.parametrize(
    "name,params",
    [("shokri", {"mode": "class_input"}), ("shokri", {"mode": "per_class"}), ("salem", {})],
)
def test_learned_attacks_separable_and_null(name: str, params: dict) -> None:
    sep = _random_signals(seed=5, m=5, q=1, p=1000, c=5, effect=3.0)
    auc = attack_metrics(run_attack(name, {**FAST, **params}, sep, 0), sep.keep[0])["auc"]
    assert auc > 0.9, auc
    null = _random_signals(seed=6, m=5, q=1, p=1500, c=5, effect=0.0)
    auc = attack_metrics(run_attack(name, {**FAST, **params}, null, 0), null.keep[0])["auc"]
    assert abs(auc - 0.5) < 0.06, auc


def test_learned_attacks_are_deterministic() -> None:
    sig = _random_signals(seed=7, m=4, q=2, p=300, c=4)
    for name in ("shokri", "salem"):
        a = run_attack(name, {**FAST, "seed": 3, "query": 1}, sig, 2)
        b = run_attack(name, {**FAST, "seed": 3, "query": 1}, sig, 2)
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float64 and np.all((a >= 0) & (a <= 1))
        assert not np.array_equal(a, run_attack(name, {**FAST, "seed": 4, "query": 1}, sig, 2))


# ---------------------------------------------------------------------------------------------- label-only
def _label_signals() -> Signals:
    """3 models x 4 queries x 3 points x 3 classes; pred[m, q, i] is the predicted label (one-hot logits)."""
    pred = np.array(
        [
            # target (model 0): point 0 right on queries 0, 1, 2; point 1 on 0, 1; point 2 on all four
            [[0, 1, 2], [0, 1, 2], [0, 0, 2], [1, 0, 2]],
            # shadow 1: point 0 right on 0, 1; point 1 on 0, 1, 2, 3; point 2 on none (agreement 2, 4, 0)
            [[0, 1, 0], [0, 1, 0], [2, 1, 0], [2, 1, 0]],
            # shadow 2: point 0 right on 0; point 1 on 2; point 2 on 0, 1 (agreement 1, 1, 2)
            [[0, 0, 2], [1, 0, 2], [1, 1, 0], [1, 0, 0]],
        ]
    )
    logits = np.eye(3, dtype=np.float32)[pred] * 5.0
    labels = np.array([0, 1, 2])
    # no row is the complement of its pair's (models 0 and 1), so every other model is a shadow
    keep = np.array([[True, False, False], [False, True, False], [False, True, True]])
    return Signals(logits=logits, labels=labels, keep=keep)


def test_label_only_counts_by_hand() -> None:
    sig = _label_signals()
    np.testing.assert_array_equal(run_attack("label_only", None, sig, 0), [3.0, 2.0, 4.0])
    # queries 0 and 2 only: point 0 right on both, point 1 on query 0, point 2 on both
    np.testing.assert_array_equal(run_attack("label_only", {"queries": [0, 2]}, sig, 0), [2.0, 1.0, 2.0])
    # calibrated: OUT shadows of point 0 are 1, 2 (agreement 2, 1 -> 1.5); point 2: shadow 1 only (0);
    # point 1 has no OUT shadow: mean over all OUT (shadow, point) pairs = (2 + 1 + 0) / 3 = 1
    np.testing.assert_allclose(
        run_attack("label_only", {"calibrated": True}, sig, 0), [3 - 1.5, 2 - 1.0, 4 - 0.0], rtol=1e-15
    )
    # target 1 (agreement 2, 4, 0), shadows 0, 2: point 0 is OUT for shadow 2 (agreement 1), point 1 for
    # shadow 0 (agreement 2), point 2 for shadow 0 (agreement 4)
    np.testing.assert_array_equal(run_attack("label_only", None, sig, 1), [2.0, 4.0, 0.0])
    np.testing.assert_allclose(
        run_attack("label_only", {"calibrated": True}, sig, 1), [2 - 1.0, 4 - 2.0, 0 - 4.0], rtol=1e-15
    )
    with pytest.raises(ValueError, match="out of range"):
        run_attack("label_only", {"queries": [1, 4]}, sig, 0)


def test_shift_queries_equal_the_label_only_reference_translation() -> None:
    """Choquette-Choo et al.'s augmentation attack translates with scipy.ndimage.shift(mode='nearest') by
    the identity and the 4d unit-norm-d shifts (d = 1: 5 queries); raymia's `shift:dx:dy` query is the same
    image (edge pixels replicated)."""
    from scipy.ndimage import shift

    from raymia.train.infer import augment

    x = torch.randn(3, 2, 6, 7, generator=torch.Generator().manual_seed(0))
    for dx, dy in [(1, 0), (-1, 0), (0, 1), (0, -1), (2, -1)]:
        want = shift(x.numpy(), (0, 0, dy, dx), order=0, mode="nearest")
        np.testing.assert_array_equal(augment(x, f"shift:{dx}:{dy}").numpy(), want)


def test_label_only_uses_labels_only() -> None:
    sig = _label_signals()
    scaled = Signals(sig.logits * 7.0 - 3.0, sig.labels, sig.keep)  # same argmax, different scores
    for p in (None, {"calibrated": True}):
        np.testing.assert_array_equal(
            run_attack("label_only", p, sig, 0), run_attack("label_only", p, scaled, 0)
        )


# ---------------------------------------------------------------------------------------------- contract
ALL_CASES = [
    *[(n, {"calibration": c}) for n in THRESHOLD_ATTACKS for c in ("global", "per_class")],
    ("shokri", {**FAST, "mode": "class_input"}),
    ("shokri", {**FAST, "mode": "per_class"}),
    ("salem", FAST),
    ("label_only", {"calibrated": False}),
    ("label_only", {"calibrated": True}),
]


@pytest.mark.parametrize("name,params", ALL_CASES)
def test_attacks_never_read_the_target_keep_row(name: str, params: dict) -> None:
    sig = _random_signals(seed=8, m=4, q=3, p=200, c=3)
    flipped = sig.keep.copy()
    flipped[1] = ~flipped[1]
    other = Signals(sig.logits, sig.labels, flipped)
    a = run_attack(name, params, sig, 1)
    np.testing.assert_array_equal(a, run_attack(name, params, other, 1))
    assert a.dtype == np.float64 and a.shape == (200,)


@pytest.mark.parametrize(
    "name,params,field",
    [
        ("confidence", {"calibration": "bogus"}, "calibration"),
        ("loss", {"calibration": "per-class"}, "calibration"),
        ("entropy", {"query": -1}, "query"),
        ("modified_entropy", {"bogus": 1}, "bogus"),
        ("correctness", {"query": "x"}, "query"),
        ("shokri", {"mode": "sorted"}, "mode"),
        ("shokri", {"hidden": 0}, "hidden"),
        ("shokri", {"max_train": 1}, "max_train"),
        ("salem", {"seed": -1}, "seed"),
        ("salem", {"max_iter": 0}, "max_iter"),
        ("label_only", {"queries": [-1]}, "queries"),
        ("label_only", {"queries": []}, "queries"),
        ("label_only", {"queries": [0, 0]}, "queries"),
        ("label_only", {"calibrated": "maybe"}, "calibrated"),
    ],
)
def test_bad_params_raise_spec_error(name: str, params: dict, field: str) -> None:
    sig = _label_signals()
    with pytest.raises(SpecError, match=field) as e:
        run_attack(name, params, sig, 0, where="attacks.3")
    assert "attacks.3.params" in str(e.value)


def test_query_out_of_range() -> None:
    sig = _label_signals()
    for name in (*THRESHOLD_ATTACKS, "shokri", "salem"):
        with pytest.raises(ValueError, match="query 4 out of range"):
            run_attack(name, {"query": 4}, sig, 0)
