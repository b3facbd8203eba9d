"""Known-answer tests of raymia.metrics."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve

from raymia.metrics import (
    _cp_lower,
    _cp_upper,
    _weighted_stats,
    accuracy,
    attack_metrics,
    balanced_accuracy,
    bootstrap_ci,
    ece,
    epsilon_lower_bound,
    full_metrics,
    metric_label,
    roc,
    roc_auc,
    tnr_at_fnr,
    tpr_at_fpr,
)

# 4 members and 4 non-members. Sorted by score (descending): M .9, N .8, M .7, M .6, N .5, N .3, M .2, N .1
MEMBER_SCORES = [0.9, 0.7, 0.6, 0.2]
NONMEMBER_SCORES = [0.8, 0.5, 0.3, 0.1]


def _small() -> tuple[np.ndarray, np.ndarray]:
    scores = np.array(MEMBER_SCORES + NONMEMBER_SCORES)
    is_member = np.array([True] * 4 + [False] * 4)
    return scores, is_member


def test_auc_matches_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = 500
        is_member = rng.random(n) < 0.4
        scores = rng.normal(size=n) + 0.7 * is_member
        scores[:50] = np.round(scores[:50], 1)  # some ties
        m = attack_metrics(scores, is_member)
        assert m["auc"] == pytest.approx(roc_auc_score(is_member, scores), abs=1e-12)


def test_roc_is_sklearns_roc_curve_point_for_point() -> None:
    """raymia's ROC (kept free of scikit-learn's import) equals sklearn's with every point kept, ties and
    integer scores included."""
    rng = np.random.default_rng(1)
    cases = [(rng.normal(size=400), rng.random(400) < 0.3),
             (np.round(rng.normal(size=300), 1), rng.random(300) < 0.5),  # many ties
             (rng.integers(0, 4, size=200), rng.random(200) < 0.5),  # four distinct scores
             (np.array(MEMBER_SCORES + NONMEMBER_SCORES), np.array([True] * 4 + [False] * 4))]
    for scores, is_member in cases:
        got = roc(scores, is_member)
        want = roc_curve(is_member, scores.astype(np.float64), drop_intermediate=False)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_clopper_pearson_bounds_are_beta_quantiles() -> None:
    k = np.arange(0, 21)
    np.testing.assert_allclose(_cp_lower(k, 20, 0.95)[1:], beta.ppf(0.05, k[1:], 20 - k[1:] + 1), rtol=1e-12)
    np.testing.assert_allclose(_cp_upper(k, 20, 0.95)[:-1], beta.ppf(0.95, k[:-1] + 1, 20 - k[:-1]), rtol=1e-12)
    assert _cp_lower(k, 20, 0.95)[0] == 0.0 and _cp_upper(k, 20, 0.95)[-1] == 1.0


def test_epsilon_bounds_come_from_one_table_per_count_for_every_target() -> None:
    """The bounds are read from a table over every count of n (per n and confidence), the same numbers as
    betaincinv at each count, computed once for every target and attack of an audit."""
    from scipy import special

    from raymia.metrics import _cp_table

    rng = np.random.default_rng(5)
    k = rng.integers(0, 3001, 500)
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, special.betaincinv(k.astype(float), 3000 - k + 1.0, 1 - 0.975), 0.0)
        upper = np.where(k < 3000, special.betaincinv(k + 1.0, 3000.0 - k, 0.975), 1.0)
    np.testing.assert_array_equal(_cp_lower(k, 3000, 0.975), lower)
    np.testing.assert_array_equal(_cp_upper(k, 3000, 0.975), upper)
    member = rng.random(4000) < 0.5
    _cp_table.cache_clear()
    for _ in range(4):  # four targets
        full_metrics(rng.standard_normal(4000) + member, member)
    info = _cp_table.cache_info()
    assert info.misses <= 8 and info.hits >= 3 * info.misses  # four tables (two sides, two halves) at most


def test_small_example_by_hand() -> None:
    scores, is_member = _small()
    # AUC = P(member score > non-member score) over the 16 pairs:
    #   .9 beats 4, .7 beats 3 (.5 .3 .1), .6 beats 3, .2 beats 1 (.1)  ->  11 / 16 = 0.6875
    # ROC points (fpr, tpr) walking down the sorted scores:
    #   (0,0) (0,.25) (.25,.25) (.25,.5) (.25,.75) (.5,.75) (.75,.75) (.75,1) (1,1)
    # Balanced accuracy = max (1 + tpr - fpr) / 2 = (1 + .75 - .25) / 2 = 0.75 (threshold .6)
    # TPR@FPR<=.25 = .75; TPR@FPR<=.2 = .25 (only the fpr=0 points); TPR@FPR<=.5 = .75
    m = attack_metrics(scores, is_member, fpr_levels=(0.25, 0.2, 0.5, 0.01))
    assert m["auc"] == pytest.approx(11 / 16)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["tpr_fpr_0.25"] == pytest.approx(0.75)
    assert m["tpr_fpr_0.2"] is None  # 4 non-members < 1 / 0.2 = 5: level not resolvable
    assert m["tpr_fpr_0.5"] == pytest.approx(0.75)
    assert m["tpr_fpr_0.01"] is None
    fpr, tpr, thr = roc(scores, is_member)
    np.testing.assert_allclose(fpr, [0, 0, 0.25, 0.25, 0.25, 0.5, 0.75, 0.75, 1])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.25, 0.5, 0.75, 0.75, 0.75, 1, 1])
    assert balanced_accuracy(fpr, tpr) == pytest.approx(0.75)
    assert tpr_at_fpr(fpr, tpr, 0.25, n_nonmembers=4) == pytest.approx(0.75)
    # with enough non-members declared, the zero-FPR corner answers a level below 1/4
    assert tpr_at_fpr(fpr, tpr, 0.2, n_nonmembers=5) == pytest.approx(0.25)


def test_tpr_at_fpr_na_threshold() -> None:
    fpr = np.array([0.0, 0.0, 0.001, 1.0])
    tpr = np.array([0.0, 0.3, 0.6, 1.0])
    assert tpr_at_fpr(fpr, tpr, 0.001, n_nonmembers=999) is None
    assert tpr_at_fpr(fpr, tpr, 0.001, n_nonmembers=1000) == pytest.approx(0.6)
    assert tpr_at_fpr(fpr, tpr, 1e-5, n_nonmembers=100_000) == pytest.approx(0.3)  # 1/1e-5 rounding
    assert tpr_at_fpr(fpr, tpr, 1e-5, n_nonmembers=99_999) is None
    with pytest.raises(ValueError):
        tpr_at_fpr(fpr, tpr, 0.0, n_nonmembers=10)


def test_metric_keys_and_labels() -> None:
    scores, is_member = _small()
    m = attack_metrics(scores, is_member)
    assert set(m) == {"auc", "balanced_accuracy", *(f"tpr_fpr_{f:g}" for f in (0.1, 0.01, 0.001, 0.0001, 0.00001))}
    from raymia.spec import MetricsSpec

    assert MetricsSpec().fpr_levels == [0.1, 0.01, 0.001, 0.0001, 0.00001]  # an audit's columns are the API's
    assert metric_label("auc") == "AUC"
    assert metric_label("tpr_fpr_0.01") == "TPR@1%FPR"
    assert metric_label("tpr_fpr_0.001") == "TPR@0.1%FPR"
    assert metric_label("tpr_fpr_1e-05") == "TPR@0.001%FPR"
    assert metric_label("balanced_accuracy") == "Bal. acc"
    from raymia.metrics import shown_as_percent

    assert [k for k in ("auc", "balanced_accuracy", "tpr_fpr_0.01", "tnr_fnr_0.001", "epsilon_lb", "ece",
                        "test_accuracy", "generalization_gap", "test_ece", "balanced_accuracy_ci_low")
            if shown_as_percent(k)] == ["balanced_accuracy", "tpr_fpr_0.01", "tnr_fnr_0.001", "test_accuracy",
                                        "generalization_gap", "balanced_accuracy_ci_low"]
    assert metric_label("something_else") == "something_else"


def test_perfect_separation_at_low_fpr() -> None:
    is_member = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    scores = np.r_[np.linspace(1, 2, 1000), np.linspace(-1, 0, 1000)]
    m = attack_metrics(scores, is_member, (0.01, 0.001))
    assert m == {"auc": 1.0, "balanced_accuracy": 1.0, "tpr_fpr_0.01": 1.0, "tpr_fpr_0.001": 1.0}


def test_float64_precision_is_kept() -> None:
    # members exceed non-members by 1e-12: identical in float32, perfectly separable in float64
    is_member = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    scores = 1.0 + np.r_[np.full(200, 2e-12), np.arange(200) * 1e-15]
    assert np.all(scores.astype(np.float32) == np.float32(1.0))
    m = attack_metrics(scores, is_member)
    assert m["auc"] == 1.0 and m["tpr_fpr_0.01"] == 1.0


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="length"):
        attack_metrics(np.zeros(3), np.array([True, False]))
    with pytest.raises(ValueError, match="both"):
        attack_metrics(np.zeros(3), np.ones(3, bool))
    with pytest.raises(ValueError, match="finite"):
        attack_metrics(np.array([0.0, np.nan, 1.0]), np.array([True, False, True]))
    with pytest.raises(ValueError, match="boolean"):
        attack_metrics(np.zeros(3), np.array([0, 2, 1]))
    # 0/1 integers are accepted as membership
    assert attack_metrics(np.array([1.0, 0.0]), np.array([1, 0]))["auc"] == 1.0


def test_accuracy() -> None:
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 5.0], [1.0, 0.0, 0.0]])
    labels = np.array([0, 1, 0, 1])
    assert accuracy(logits, labels) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        accuracy(logits, labels[:3])



def test_accuracy_and_ece_refuse_outputs_without_a_top_class() -> None:
    """A NaN logit was taken for the top class (accuracy 1.0 below) and made the ECE NaN; -inf beside
    finite entries is a log-probability of 0 and is read as one."""
    nan = np.array([[np.nan, 1.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"^logits must be finite or -inf, .*: 1 of 2 rows are not$"):
        accuracy(nan, np.array([0, 1]))
    for bad in (nan, np.array([[np.inf, 1.0], [0.0, 1.0]]), np.array([[-np.inf, -np.inf], [0.0, 1.0]])):
        with pytest.raises(ValueError, match=r"^outputs must be finite or -inf, .*: 1 of 2 rows are not$"):
            ece(bad, np.array([0, 1]))
    # log([[1, 0], [0, 1]]): both confidence 1, one right: ECE 0.5; accuracy 0.5
    logp = np.array([[0.0, -np.inf], [-np.inf, 0.0]])
    assert ece(logp, np.array([0, 0])) == 0.5 and accuracy(logp, np.array([0, 0])) == 0.5


# ---------------------------------------------------------------------------------------------- TNR at FNR
def test_tnr_at_fnr_small_example_by_hand() -> None:
    scores, is_member = _small()
    # ROC points (fpr, tpr) as above; (fnr, tnr) = (1 - tpr, 1 - fpr):
    #   (1,1) (.75,1) (.75,.75) (.5,.75) (.25,.75) (.25,.5) (.25,.25) (0,.25) (0,0)
    # TNR@FNR<=.25 = .75 (threshold .6); <=.5 = .75; <=.2 needs >= 5 members (n/a with 4), with 5 declared
    # only FNR = 0 qualifies: TNR .25; <= 1: the (0, 0) corner, TNR 1
    fpr, tpr, _ = roc(scores, is_member)
    assert tnr_at_fnr(fpr, tpr, 0.25, n_members=4) == pytest.approx(0.75)
    assert tnr_at_fnr(fpr, tpr, 0.5, n_members=4) == pytest.approx(0.75)
    assert tnr_at_fnr(fpr, tpr, 0.2, n_members=4) is None
    assert tnr_at_fnr(fpr, tpr, 0.2, n_members=5) == pytest.approx(0.25)
    assert tnr_at_fnr(fpr, tpr, 1.0, n_members=4) == pytest.approx(1.0)
    m = full_metrics(scores, is_member, fpr_levels=(0.25,), fnr_levels=(0.25, 0.5, 0.2))
    assert (m["tnr_fnr_0.25"], m["tnr_fnr_0.5"], m["tnr_fnr_0.2"]) == (0.75, 0.75, None)
    with pytest.raises(ValueError):
        tnr_at_fnr(fpr, tpr, 0.0, n_members=10)


def test_tnr_at_fnr_is_tpr_at_fpr_with_classes_swapped() -> None:
    rng = np.random.default_rng(2)
    is_member = rng.random(5000) < 0.5
    scores = rng.normal(size=5000) + 0.5 * is_member  # continuous: no ties
    m = full_metrics(scores, is_member, fpr_levels=(0.01,), fnr_levels=(0.01, 0.001))
    swapped = attack_metrics(-scores, ~is_member, fpr_levels=(0.01, 0.001))
    assert m["tnr_fnr_0.01"] == pytest.approx(swapped["tpr_fpr_0.01"], abs=1e-12)  # 1 - fpr rounds
    assert m["tnr_fnr_0.001"] == pytest.approx(swapped["tpr_fpr_0.001"], abs=1e-12)


# ---------------------------------------------------------------------------------------------- full_metrics
def test_full_metrics_keys_and_labels() -> None:
    scores, is_member = _small()
    base = attack_metrics(scores, is_member)
    m = full_metrics(scores, is_member)
    assert set(m) == set(base) | {"tnr_fnr_0.001", "epsilon_lb"}
    assert {k: m[k] for k in base} == base  # attack_metrics' values unchanged
    m = full_metrics(scores, is_member, fpr_levels=(0.25,), n_boot=50)
    assert set(m) == {"auc", "balanced_accuracy", "tpr_fpr_0.25", "tnr_fnr_0.001", "epsilon_lb", "auc_ci_low",
                      "auc_ci_high", "tpr_fpr_0.25_ci_low", "tpr_fpr_0.25_ci_high"}
    assert m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"]
    # a negative n_boot gave no intervals without a word; one level for a list, numpy's "not iterable"
    with pytest.raises(ValueError, match=r"^n_boot is the number of bootstrap resamples, an int >= 0"):
        full_metrics(scores, is_member, n_boot=-3)
    with pytest.raises(TypeError, match=r"^fpr_levels is a list of levels in \(0, 1\]"):
        full_metrics(scores, is_member, fpr_levels=0.1)
    assert metric_label("tnr_fnr_0.001") == "TNR@0.1%FNR"
    assert metric_label("tnr_fnr_0.01") == "TNR@1%FNR"
    assert metric_label("epsilon_lb") == "eps LB"
    assert metric_label("ece") == "ECE"
    assert metric_label("auc_ci_low") == "AUC CI low"
    assert metric_label("auc_ci_high") == "AUC CI high"
    assert metric_label("tpr_fpr_0.01_ci_high") == "TPR@1%FPR CI high"
    assert metric_label("something_ci_low") == "something_ci_low"
    assert metric_label("tnr_fnr_x") == "tnr_fnr_x"


# ---------------------------------------------------------------------------------------------- bootstrap
def test_vectorised_resample_stats_match_attack_metrics() -> None:
    rng = np.random.default_rng(3)
    for _ in range(10):
        n_in, n_out = int(rng.integers(5, 200)), int(rng.integers(10, 1200))
        s_in = np.sort(np.round(rng.normal(0.5, 1, n_in), 1))  # rounded: many ties
        s_out = np.sort(np.round(rng.normal(0.0, 1, n_out), 1))
        i_in, i_out = rng.integers(0, n_in, (4, n_in)), rng.integers(0, n_out, (4, n_out))
        w_in = np.stack([np.bincount(r, minlength=n_in) for r in i_in])
        w_out = np.stack([np.bincount(r, minlength=n_out) for r in i_out])
        levels = [f for f in (0.5, 0.1, 0.01, 0.001) if n_out * f >= 1]
        stats = _weighted_stats(s_in, s_out, w_in, w_out, levels)
        for b in range(4):
            is_member = np.r_[np.ones(n_in, bool), np.zeros(n_out, bool)]
            want = attack_metrics(np.r_[s_in[i_in[b]], s_out[i_out[b]]], is_member, levels)
            for key, got in stats.items():
                assert got[b] == pytest.approx(want[key], abs=1e-12), key


def _shifted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    is_member = np.r_[np.ones(n // 2, bool), np.zeros(n // 2, bool)]
    return rng.normal(size=n) + is_member, is_member


def test_bootstrap_ci_contains_estimate_and_shrinks_as_one_over_sqrt_n() -> None:
    widths = {}
    for n in (400, 6400):
        scores, is_member = _shifted(n, seed=1)
        point = attack_metrics(scores, is_member, (0.1,))
        ci = bootstrap_ci(scores, is_member, (0.1, 1e-4), n_boot=1000, seed=0)
        for key in ("auc", "tpr_fpr_0.1"):
            lo, hi = ci[key]
            assert lo <= point[key] <= hi, (n, key, lo, point[key], hi)
        assert ci["tpr_fpr_0.0001"] == (None, None)  # fewer than 10,000 non-members
        widths[n] = {k: ci[k][1] - ci[k][0] for k in ("auc", "tpr_fpr_0.1")}
    for key in ("auc", "tpr_fpr_0.1"):
        assert 2.5 <= widths[400][key] / widths[6400][key] <= 6.0  # sqrt(6400 / 400) = 4
    scores, is_member = _shifted(400, seed=1)
    same = bootstrap_ci(scores, is_member, n_boot=200, seed=5)
    assert bootstrap_ci(scores, is_member, n_boot=200, seed=5) == same  # deterministic per seed


def test_bootstrap_ci_of_perfect_separation() -> None:
    is_member = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    scores = np.r_[np.linspace(1, 2, 300), np.linspace(-1, 0, 300)]
    ci = bootstrap_ci(scores, is_member, (0.01,), n_boot=300)
    assert ci["auc"] == (1.0, 1.0)
    assert ci["tpr_fpr_0.01"] == (1.0, 1.0)


def test_bootstrap_ci_is_fast() -> None:
    scores, is_member = _shifted(10_000, seed=2)
    t0 = time.perf_counter()
    bootstrap_ci(scores, is_member, (0.01, 0.001), n_boot=1000)
    assert time.perf_counter() - t0 < 6.0  # about 0.2 s on one CPU core


# ---------------------------------------------------------------------------------------------- epsilon LB
def _binomial_case() -> tuple[np.ndarray, np.ndarray]:
    # 1000 members all scored 1; 1000 non-members, k = 10 of them scored 1, the rest 0
    is_member = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    scores = np.r_[np.ones(1000), np.ones(10), np.zeros(990)]
    return scores, is_member


def test_epsilon_lower_bound_binomial_by_hand() -> None:
    scores, is_member = _binomial_case()
    # Threshold 1: TP = 1000 / 1000, FP = 10 / 1000, TN = 990, FN = 0. (Threshold 0 flags everyone: TPR = FPR
    # = 1 and TN = 0, no positive term.) method="union": every one-sided Clopper-Pearson bound at
    # c = 1 - .05 / (1000 + 1000), valid over both thresholds and both sides at once:
    #   TPR_low  = beta.ppf(1 - c, 1000, 1) = (1 - c) ** (1 / 1000)   (all successes)
    #   FPR_high = beta.ppf(c, 11, 990)
    #   TNR_low  = beta.ppf(1 - c, 990, 11)
    #   FNR_high = beta.ppf(c, 1, 1000) = 1 - (1 - c) ** (1 / 1000)   (no success)
    a = 0.05 / 2000
    tpr_low, fpr_high = a ** (1 / 1000), beta.ppf(1 - a, 11, 990)
    tnr_low, fnr_high = beta.ppf(a, 990, 11), 1 - a ** (1 / 1000)
    e_tpr = math.log(tpr_low / fpr_high)  # 3.51
    e_tnr = math.log(tnr_low / fnr_high)  # 4.52: the symmetric form wins here
    r = epsilon_lower_bound(scores, is_member, method="union")
    assert r["epsilon_lb"] == pytest.approx(max(e_tpr, e_tnr), abs=1e-9)
    assert r["threshold"] == 1.0 and r["side"] == "tnr/fnr" and r["method"] == "union"
    assert r["tpr_low"] == pytest.approx(tpr_low, abs=1e-12)
    assert r["fpr_high"] == pytest.approx(fpr_high, abs=1e-12)
    assert r["tnr_low"] == pytest.approx(tnr_low, abs=1e-12)
    assert r["fnr_high"] == pytest.approx(fnr_high, abs=1e-12)
    assert r["confidence"] == 0.95 and r["bound_confidence"] == pytest.approx(1 - a, abs=1e-15)
    # the same data under the uncorrected 95%-per-bound maximum gave 5.79: far more than is supported
    assert r["epsilon_lb"] < math.log(beta.ppf(0.05, 990, 11) / (1 - 0.05 ** (1 / 1000))) - 1.0
    # with delta: both numerators lose delta
    d = 1e-3
    r = epsilon_lower_bound(scores, is_member, delta=d, method="union")
    want = max(math.log((tpr_low - d) / fpr_high), math.log((tnr_low - d) / fnr_high))
    assert r["epsilon_lb"] == pytest.approx(want, abs=1e-9)
    assert r["delta"] == d
    # method="split" (the default): threshold and side chosen on 500 + 500 points, the bound computed at
    # 1 - .05 / 2 per bound on the other 500 + 500, whose members all score 1 (FNR_high = 1 - .025 ** (1/500))
    # and whose non-members hold k of the 10 ones, 0 <= k <= 10
    r = epsilon_lower_bound(scores, is_member)
    assert r["method"] == "split" and r["bound_confidence"] == 0.975 and r["confidence"] == 0.95
    assert r["threshold"] == 1.0 and r["side"] == "tnr/fnr"
    assert r["fnr_high"] == pytest.approx(1 - 0.025 ** (1 / 500), abs=1e-12)
    k = [j for j in range(11) if abs(beta.ppf(0.025, 500 - j, j + 1) - r["tnr_low"]) < 1e-12]
    assert len(k) == 1
    assert r["epsilon_lb"] == pytest.approx(math.log(r["tnr_low"] / r["fnr_high"]), abs=1e-12)
    assert r["fpr_high"] == pytest.approx(beta.ppf(0.975, k[0] + 1, 500 - k[0]), abs=1e-12)
    assert epsilon_lower_bound(scores, is_member) == r  # seeded: deterministic
    assert 4.0 < r["epsilon_lb"] < 5.79


def test_epsilon_lower_bound_split_by_hand() -> None:
    # Perfect separation, 1001 members (score 1) and 1000 non-members (score 0): whatever the split, the
    # held-out half has 501 members with TP = 501 and 500 non-members with FP = 0, so at 97.5% per bound
    #   TPR_low = .025 ** (1 / 501), FPR_high = 1 - .025 ** (1 / 500)
    is_member = np.r_[np.ones(1001, bool), np.zeros(1000, bool)]
    scores = is_member.astype(float)
    want = math.log(0.025 ** (1 / 501) / (1 - 0.025 ** (1 / 500)))  # 4.91
    for seed in range(3):
        r = epsilon_lower_bound(scores, is_member, seed=seed)
        assert r["epsilon_lb"] == pytest.approx(want, abs=1e-9)
        assert r["side"] == "tpr/fpr" and r["threshold"] == 1.0
    # delta enters the numerator of the chosen side only
    r = epsilon_lower_bound(scores, is_member, delta=0.5)
    assert r["epsilon_lb"] == pytest.approx(math.log((0.025 ** (1 / 501) - 0.5) / (1 - 0.025 ** (1 / 500))))
    # full_metrics reports the default (split) bound, seeded by its seed
    m = full_metrics(scores, is_member, fpr_levels=(0.01,), seed=5)
    assert m["epsilon_lb"] == pytest.approx(want, abs=1e-9)
    m = full_metrics(scores, is_member, fpr_levels=(0.01,), epsilon_method="union", confidence=0.9)
    assert m["epsilon_lb"] == epsilon_lower_bound(scores, is_member, confidence=0.9, method="union")["epsilon_lb"]


def test_epsilon_lower_bound_tpr_side_by_hand() -> None:
    # 1000 members of which 10 score 0, all 1000 non-members score 0: mirror image of the binomial case, so
    # TPR_low = beta.ppf(a, 990, 11) and FPR_high = 1 - a ** (1 / 1000) win on the TPR/FPR side
    is_member = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    scores = np.r_[np.ones(990), np.zeros(10), np.zeros(1000)]
    a = 0.05 / 2000
    r = epsilon_lower_bound(scores, is_member, method="union")
    want = math.log(beta.ppf(a, 990, 11) / (1 - a ** (1 / 1000)))
    assert r["epsilon_lb"] == pytest.approx(want, abs=1e-9)
    assert r["side"] == "tpr/fpr" and r["threshold"] == 1.0
    r = epsilon_lower_bound(scores, is_member)
    assert r["side"] == "tpr/fpr" and r["threshold"] == 1.0
    assert r["fpr_high"] == pytest.approx(1 - 0.025 ** (1 / 500), abs=1e-12)
    assert r["epsilon_lb"] == pytest.approx(math.log(r["tpr_low"] / r["fpr_high"]), abs=1e-12)


def test_epsilon_lower_bound_of_independent_score_is_zero() -> None:
    rng = np.random.default_rng(4)
    is_member = np.r_[np.ones(20_000, bool), np.zeros(20_000, bool)]
    scores = rng.normal(size=40_000)
    for method in ("split", "union"):
        r = epsilon_lower_bound(scores, is_member, method=method)
        assert r["epsilon_lb"] == 0.0 and r["threshold"] is None and r["side"] is None
        r = epsilon_lower_bound(np.zeros(40_000), is_member, method=method)  # one threshold, flags everyone
        assert r["epsilon_lb"] == 0.0 and r["threshold"] is None
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(np.zeros(4), np.array([1, 0, 1, 0]), confidence=1.0)


# ---------------------------------------------------------------------------------------------- ECE
def test_ece_perfectly_calibrated() -> None:
    rng = np.random.default_rng(5)
    n = 100_000
    conf = rng.uniform(0.5, 1.0, n)
    pred = rng.integers(0, 2, n)
    probs = np.where(pred[:, None] == 0, np.c_[conf, 1 - conf], np.c_[1 - conf, conf])
    labels = np.where(rng.random(n) < conf, pred, 1 - pred)  # correct with probability = confidence
    assert ece(probs, labels) < 0.02


def test_ece_two_bins_by_hand() -> None:
    probs = np.array([
        [0.40, 0.30, 0.30],  # conf .4, correct        bin 1: (0, .5]
        [0.40, 0.35, 0.25],  # conf .4, wrong           bin 1
        [0.80, 0.10, 0.10],  # conf .8, correct        bin 2: (.5, 1]
        [0.05, 0.90, 0.05],  # conf .9, correct        bin 2
        [0.15, 0.15, 0.70],  # conf .7, wrong           bin 2
    ])
    labels = np.array([0, 1, 0, 1, 0])
    # bin 1: acc .5, conf .4 -> 2/5 * .1 = .04; bin 2: acc 2/3, conf .8 -> 3/5 * 2/15 = .08; ECE = .12
    assert ece(probs, labels, n_bins=2) == pytest.approx(0.12, abs=1e-12)
    assert ece(np.log(probs), labels, n_bins=2, from_logits=True) == pytest.approx(0.12, abs=1e-12)
    assert ece(np.log(probs), labels, n_bins=2) == pytest.approx(0.12, abs=1e-12)  # detected as logits


def test_ece_confident_but_half_right() -> None:
    labels = np.arange(1000) % 2
    probs = np.tile([1.0, 0.0], (1000, 1))  # always class 0 with confidence 1, right half of the time
    assert ece(probs, labels) == pytest.approx(0.5, abs=1e-12)
    assert ece(np.tile(np.array([60.0, 0.0], dtype=np.float32), (1000, 1)), labels) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ece(probs, labels[:10])


def test_attack_tables_leave_out_levels_no_attack_resolves():
    from raymia.metrics import table_columns, unresolved_note

    attacks = {"loss": {"auc": 0.6, "tpr_fpr_0.01": 0.02, "tpr_fpr_0.001": None, "tnr_fnr_0.001": None,
                        "auc_ci_low": 0.5, "epsilon_lb": None},
               "lira": {"auc": 0.7, "tpr_fpr_0.01": None, "tpr_fpr_0.001": None, "tnr_fnr_0.001": 0.1,
                        "auc_ci_low": 0.6, "epsilon_lb": None}}
    keys, gone = table_columns(attacks)
    # a level one attack resolves stays; only FPR/FNR levels are left out (eps LB n/a is shown as such)
    assert keys == ["auc", "tpr_fpr_0.01", "tnr_fnr_0.001", "epsilon_lb"] and gone == ["tpr_fpr_0.001"]
    assert unresolved_note(gone).startswith("n/a for every attack, not shown: TPR@0.1%FPR (")
    assert unresolved_note([]) == ""


def test_bootstrap_ci_has_its_nominal_width_and_follows_its_seed() -> None:
    """The 95% interval of the AUC against DeLong's standard error (the analytic one for the same data):
    width / (2 x 1.96 x SE) near 1 (an interval read at alpha instead of alpha/2 gives about 0.84); another
    seed, other resamples."""
    rng = np.random.default_rng(3)
    n = 2000
    is_member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    scores = np.r_[rng.normal(0.5, 1, n), rng.normal(0, 1, n)]
    s_in, s_out = scores[is_member], scores[~is_member]
    wins = (s_in[:, None] > s_out[None, :]) + 0.5 * (s_in[:, None] == s_out[None, :])
    se = math.sqrt(wins.mean(1).var(ddof=1) / n + wins.mean(0).var(ddof=1) / n)  # DeLong
    lo, hi = bootstrap_ci(scores, is_member, (0.1,), n_boot=2000, seed=1)["auc"]
    assert 0.9 < (hi - lo) / (2 * 1.96 * se) < 1.1
    assert bootstrap_ci(scores, is_member, (0.1,), n_boot=200, seed=2)["auc"] != \
        bootstrap_ci(scores, is_member, (0.1,), n_boot=200, seed=1)["auc"]


# ---------------------------------------------------------------------------------------------- known answers
def test_equal_scores_give_the_diagonal_and_bad_scores_one_line() -> None:
    """Scores that carry nothing: the ROC is sklearn's two-point diagonal, AUC and balanced accuracy 0.5, and
    TPR 0 at every level below 1. One class, NaN and inf are refused in one line (sklearn refuses them too)."""
    is_member = np.r_[np.ones(30, bool), np.zeros(70, bool)]
    scores = np.full(100, 0.3)
    want = roc_curve(is_member, scores, drop_intermediate=False)
    for g, w in zip(roc(scores, is_member), want, strict=True):
        np.testing.assert_array_equal(g, w)
    m = attack_metrics(scores, is_member, (0.5, 0.1, 0.02, 1.0))
    assert m == {"auc": 0.5, "balanced_accuracy": 0.5, "tpr_fpr_0.5": 0.0, "tpr_fpr_0.1": 0.0,
                 "tpr_fpr_0.02": 0.0, "tpr_fpr_1": 1.0}
    assert roc_auc_score(is_member, scores) == 0.5
    for s, y, needle in [(scores, np.ones(100, bool), "both members and non-members, got 100 members of 100"),
                         (scores, np.zeros(100, bool), "got 0 members of 100"),
                         (np.r_[np.inf, scores[1:]], is_member, "finite: 1 of 100 are NaN or infinite"),
                         (np.r_[-np.inf, np.nan, scores[2:]], is_member, "finite: 2 of 100")]:
        with pytest.raises(ValueError, match=needle) as e:
            roc_auc(s, y)
        assert "\n" not in str(e.value)


def _tpr_by_counting(scores: np.ndarray, is_member: np.ndarray, allowed_fp: int) -> float:
    """The definition, without an ROC curve: the most members flagged by `score >= t` over every t that
    flags at most `allowed_fp` non-members."""
    best = 0
    for t in np.unique(scores):
        if np.count_nonzero(scores[~is_member] >= t) <= allowed_fp:
            best = max(best, int(np.count_nonzero(scores[is_member] >= t)))
    return best / int(is_member.sum())


def test_tpr_at_the_default_levels_is_the_definition_counted_out() -> None:
    """With 1,000 non-members each default level is hit exactly (1, 10 and 100 false positives allowed):
    `<=` takes that ROC point; LiRA's `fpr < level` (docs/validity.md) stops one false positive short."""
    rng = np.random.default_rng(7)
    for rounding in (None, 1, 0):  # continuous, tied, heavily tied scores
        is_member = np.r_[np.ones(400, bool), np.zeros(1000, bool)]
        scores = rng.normal(size=1400) + 1.5 * is_member
        if rounding is not None:
            scores = np.round(scores, rounding)
        m = attack_metrics(scores, is_member, (0.1, 0.01, 0.001))
        fpr, tpr, _ = roc(scores, is_member)
        for level, k in ((0.1, 100), (0.01, 10), (0.001, 1)):
            assert m[f"tpr_fpr_{level:g}"] == _tpr_by_counting(scores, is_member, k)
            assert tpr[np.flatnonzero(fpr < level)[-1]] == _tpr_by_counting(scores, is_member, k - 1)
    # one non-member short of 1 / level: no FPR between 0 and the level exists, so n/a
    assert attack_metrics(scores[:1399], is_member[:1399], (0.001,))["tpr_fpr_0.001"] is None


def test_ece_bins_are_guo_et_als_at_every_bin_edge() -> None:
    """Confidence exactly on a bin edge goes to the bin below, as Guo et al.'s `conf > lower & conf <= upper`
    over np.linspace(0, 1, n_bins + 1)."""
    def guo(p: np.ndarray, y: np.ndarray, n_bins: int) -> float:
        conf, right = p.max(1), p.argmax(1) == y
        edges = np.linspace(0, 1, n_bins + 1)
        out = 0.0
        for lo, hi in zip(edges[:-1], edges[1:]):
            b = (conf > lo) & (conf <= hi)
            if b.any():
                out += b.mean() * abs(right[b].mean() - conf[b].mean())
        return out

    for n_bins in (2, 3, 5, 10, 15):
        conf = np.arange(1, n_bins + 1) / n_bins  # every upper edge, 1/n_bins .. 1
        c = 100  # enough classes that the largest is the edge itself
        p = np.tile((1 - conf)[:, None] / (c - 1), (1, c))
        p[:, 0] = conf
        y = np.arange(n_bins) % 2  # every other one right
        assert ece(p, y, n_bins=n_bins, from_logits=False) == pytest.approx(guo(p, y, n_bins), abs=1e-12)


def test_bootstrap_intervals_cover_the_analytic_auc() -> None:
    """Two unit Gaussians d = 1 apart: AUC = Phi(d / sqrt 2) = 0.760 and TPR at 10% FPR = 1 - Phi(z_0.9 - d)
    = 0.389. Over 200 data sets of 300 + 300 points, the 95% intervals hold them about 95% of the time
    (measured 0.94 and 0.95; binomial sd 0.015)."""
    from scipy.stats import norm

    d, n = 1.0, 300
    auc, tpr = norm.cdf(d / math.sqrt(2)), 1 - norm.cdf(norm.ppf(0.9) - d)
    rng = np.random.default_rng(0)
    is_member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    hit = {"auc": 0, "tpr_fpr_0.1": 0}
    for r in range(200):
        ci = bootstrap_ci(np.r_[rng.normal(d, 1, n), rng.normal(0, 1, n)], is_member, (0.1,), n_boot=300, seed=r)
        hit["auc"] += ci["auc"][0] <= auc <= ci["auc"][1]
        hit["tpr_fpr_0.1"] += ci["tpr_fpr_0.1"][0] <= tpr <= ci["tpr_fpr_0.1"][1]
    assert 0.9 <= hit["auc"] / 200 <= 0.99 and 0.9 <= hit["tpr_fpr_0.1"] / 200 <= 0.99


def test_two_gaussians_give_the_analytic_auc_advantage_and_tpr() -> None:
    """Members N(1, 1), non-members N(0, 1), 20,000 each: AUC = Phi(1 / sqrt 2) = 0.760; the best threshold
    is the midpoint, so balanced accuracy = Phi(1/2) = 0.691 (membership advantage 2 x 0.691 - 1 = 0.383);
    TPR at FPR f = 1 - Phi(z_(1-f) - 1): 0.389 at 10%, 0.092 at 1%, 0.017 at 0.1%. Tolerances are 4 sd of each
    estimate (measured over 40 seeds: 0.0022, 0.0023, 0.0050, 0.0049, 0.0031)."""
    from scipy.stats import norm

    rng = np.random.default_rng(11)
    n = 20_000
    is_member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    m = attack_metrics(np.r_[rng.normal(1, 1, n), rng.normal(0, 1, n)], is_member, (0.1, 0.01, 0.001))
    assert m["auc"] == pytest.approx(norm.cdf(1 / math.sqrt(2)), abs=0.009)
    assert m["balanced_accuracy"] == pytest.approx(norm.cdf(0.5), abs=0.01)
    for f, tol in ((0.1, 0.02), (0.01, 0.02), (0.001, 0.012)):
        assert m[f"tpr_fpr_{f:g}"] == pytest.approx(1 - norm.cdf(norm.ppf(1 - f) - 1), abs=tol), f
