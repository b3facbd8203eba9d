"""Validity of the empirical epsilon lower bounds in raymia.metrics: the Clopper-Pearson audit
(epsilon_lower_bound, Jagielski et al. 2020 / Nasr et al. 2021) and one-run auditing (Steinke, Nasr,
Jagielski 2023).

A lower bound at 95% must exceed the true epsilon in at most 5% of audits. Checked on scores with no signal
(true epsilon 0) and on randomised response, whose epsilon is known exactly and is attained by its only
threshold (the hardest case for a bound's validity, and the one where a tight bound must reach epsilon).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit, logit
from scipy.stats import binom

from raymia.metrics import (
    _eps_terms,
    _threshold_counts,
    epsilon_lower_bound,
    one_run_audit,
    one_run_epsilon_lb,
    one_run_guesses,
)

DRAWS = 1000
IS_MEMBER = np.r_[np.ones(200, bool), np.zeros(200, bool)]  # 200 members, 200 non-members


def _null_scores(rng: np.random.Generator, kind: str, n: int = 400) -> np.ndarray:
    """Scores independent of membership: continuous (no ties) or 5 values (many ties)."""
    return rng.normal(size=n) if kind == "continuous" else rng.integers(0, 5, n).astype(float)


def _uncorrected(scores: np.ndarray, is_member: np.ndarray) -> float:
    """The old bound: the best threshold and side, each Clopper-Pearson bound at 95% on its own."""
    t, tp, fp = _threshold_counts(scores, is_member)
    e = _eps_terms(tp, fp, int(is_member.sum()), int((~is_member).sum()), 0.95, 0.0)
    return max(0.0, float(np.max(np.maximum(e["e1"], e["e2"]))))


def _randomised_response(eps: float, n: int, seed: int, bernoulli: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """n trials of eps-DP randomised response: a member answers 1 with probability e^eps / (1 + e^eps), a
    non-member with probability 1 / (1 + e^eps); the score is the answer. Half the trials are members, or
    (bernoulli=True, one-run canaries) each trial is a member with probability 1/2."""
    rng = np.random.default_rng(seed)
    if bernoulli:
        is_member = rng.random(n) < 0.5
    else:
        is_member = np.r_[np.ones(n // 2, bool), np.zeros(n - n // 2, bool)]
    p = expit(eps)
    answer = rng.random(n) < np.where(is_member, p, 1.0 - p)
    return answer.astype(float), is_member


# ------------------------------------------------------------------------------- Clopper-Pearson audit
@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_epsilon_lower_bound_is_valid_on_scores_without_signal(kind: str) -> None:
    rng = np.random.default_rng(0 if kind == "continuous" else 1)
    split, union, old = [], [], []
    for d in range(DRAWS):
        s = _null_scores(rng, kind)
        split.append(epsilon_lower_bound(s, IS_MEMBER, seed=d)["epsilon_lb"])
        union.append(epsilon_lower_bound(s, IS_MEMBER, method="union")["epsilon_lb"])
        old.append(_uncorrected(s, IS_MEMBER))
    rate = {k: float(np.mean(np.array(v) > 0)) for k, v in (("split", split), ("union", union), ("old", old))}
    print(f"\n{kind}: share of {DRAWS} null audits with eps LB > 0: {rate}")
    # measured: split 0.1% (continuous) and 0% (ties), union 0%; the uncorrected maximum 12.6% and 2.5%
    assert rate["split"] <= 0.05
    assert rate["union"] <= 0.05
    if kind == "continuous":
        assert rate["old"] > 0.08  # the test has the power to catch the uncorrected maximum


@pytest.mark.parametrize("eps", [1.0, 2.0])
def test_epsilon_lower_bound_on_randomised_response_stays_below_and_approaches_epsilon(eps: float) -> None:
    means, means_union = [], []
    for n in (1_000, 10_000, 100_000):
        vals = [epsilon_lower_bound(*_randomised_response(eps, n, seed), seed=seed)["epsilon_lb"] for seed in range(5)]
        union = [epsilon_lower_bound(*_randomised_response(eps, n, seed), method="union")["epsilon_lb"]
                 for seed in range(5)]
        print(f"\nRR eps={eps} n={n}: split {np.round(vals, 3)}, union {np.round(union, 3)}")
        assert max(vals) < eps and max(union) < eps
        means.append(float(np.mean(vals)))
        means_union.append(float(np.mean(union)))
    assert means[0] < means[1] < means[2]
    assert means_union[0] < means_union[1] < means_union[2]
    # At n = 1e5 (25,000 + 25,000 held-out trials) the normal approximation puts the split bound's expected
    # shortfall at 1.96 * (sqrt((1 - q) / (q n')) + sqrt((1 - p) / (p n'))), q = 1 - p: 0.028 for eps = 1 and
    # 0.038 for eps = 2, and the mean of 5 audits has a standard deviation of 0.005 / 0.008 (measured means
    # 0.971 and 1.961); a margin of 0.08 is over 5 standard deviations beyond the expected shortfall.
    assert means[2] > eps - 0.08
    # the default (split) is the tighter of the two here: union pays sqrt(log(n)) in its per-bound level
    assert means[1] > means_union[1] and means[2] > means_union[2]


@pytest.mark.parametrize("eps", [1.0, 2.0])
def test_epsilon_lower_bound_exceeds_randomised_response_epsilon_rarely(eps: float) -> None:
    # the DP inequality is tight for randomised response: a 95% bound exceeds eps in at most 5% of audits
    above = [epsilon_lower_bound(*_randomised_response(eps, 1000, 10_000 + d), seed=d)["epsilon_lb"] > eps
             for d in range(DRAWS)]
    print(f"\nRR eps={eps}, n=1000: split bound above eps in {np.mean(above):.2%} of {DRAWS} audits")
    assert np.mean(above) <= 0.05  # measured 0.5% (eps = 1), 1.0% (eps = 2)


def test_epsilon_lower_bound_rejects_bad_input() -> None:
    s, y = np.arange(8.0), np.array([1, 0] * 4)
    with pytest.raises(ValueError, match="method must be one of"):
        epsilon_lower_bound(s, y, method="max")
    with pytest.raises(ValueError, match="delta must lie in"):
        epsilon_lower_bound(s, y, delta=1.0)
    with pytest.raises(ValueError, match="delta must lie in"):
        epsilon_lower_bound(s, y, delta=-0.1)
    with pytest.raises(ValueError, match="confidence must lie in"):
        epsilon_lower_bound(s, y, confidence=0.0)
    with pytest.raises(ValueError, match="at least 2 members and 2 non-members, got 1 and 3"):
        epsilon_lower_bound(np.arange(4.0), np.array([1, 0, 0, 0]))
    assert epsilon_lower_bound(np.arange(4.0), np.array([1, 0, 0, 0]), method="union")["epsilon_lb"] == 0.0
    with pytest.raises(ValueError, match="both members and non-members"):
        epsilon_lower_bound(s, np.ones(8, bool))
    with pytest.raises(ValueError, match="finite"):
        epsilon_lower_bound(np.r_[s[:-1], np.nan], y)
    with pytest.raises(ValueError, match="differ in length"):
        epsilon_lower_bound(s, y[:-1])


# ------------------------------------------------------------------------------- one-run auditing
def test_one_run_epsilon_lb_solves_the_binomial_tail() -> None:
    for r, v in [(40, 26), (100, 80), (1000, 731), (100_000, 73_100), (9, 8)]:
        eps = one_run_epsilon_lb(r, v)
        assert eps > 0
        # the largest eps with P[Binomial(r, e^eps / (1 + e^eps)) >= v] <= 0.05: equality at the root
        assert binom.sf(v - 1, r, expit(eps)) == pytest.approx(0.05, rel=1e-8)
        assert binom.sf(v - 1, r, expit(eps + 1e-6)) > 0.05
    # cross-checked against the bisection of the authors' published p-value code (delta = 0), to 1e-12
    assert one_run_epsilon_lb(1000, 731) == pytest.approx(0.8806029966558, abs=1e-10)
    assert one_run_epsilon_lb(40, 26) == pytest.approx(0.0322206934810, abs=1e-10)
    # all guesses right: P[W >= r] = p^r = beta, p = beta^(1/r)
    assert one_run_epsilon_lb(10, 10) == pytest.approx(logit(0.05 ** 0.1), abs=1e-12)
    assert one_run_epsilon_lb(10, 10, confidence=0.99) == pytest.approx(logit(0.01 ** 0.1), abs=1e-12)


def test_one_run_epsilon_lb_edges_and_monotonicity() -> None:
    assert one_run_epsilon_lb(0, 0) == 0.0  # no guesses
    assert one_run_epsilon_lb(50, 0) == 0.0  # none right
    assert one_run_epsilon_lb(1, 1) == 0.0  # P[Binomial(1, p) >= 1] = p >= 1/2 > 0.05 for every eps >= 0
    assert one_run_epsilon_lb(4, 4) == 0.0  # 1/16 > 0.05: even 4 of 4 is chance at eps = 0
    assert one_run_epsilon_lb(5, 5) > 0.0  # 1/32 < 0.05
    assert one_run_epsilon_lb(40, 25) == 0.0 and one_run_epsilon_lb(40, 26) > 0.0  # P[Bin(40, .5) >= 25] = .077
    big = one_run_epsilon_lb(10**9, 10**9)
    assert math.isfinite(big) and 19.0 < big < 21.0
    by_v = [one_run_epsilon_lb(200, v) for v in range(201)]
    assert all(a <= b for a, b in zip(by_v, by_v[1:]))
    assert all(a < b for a, b in zip(by_v[115:], by_v[116:]))  # strictly, once positive
    by_r = [one_run_epsilon_lb(r, 150) for r in range(150, 301)]
    assert all(a >= b for a, b in zip(by_r, by_r[1:]))
    assert one_run_epsilon_lb(200, 170, confidence=0.99) < one_run_epsilon_lb(200, 170) < \
        one_run_epsilon_lb(200, 170, confidence=0.8)


def test_one_run_guesses_take_the_extremes_and_break_ties_at_random() -> None:
    s = np.array([0.5, 3.0, -1.0, 2.0, 0.0, 1.0])
    assert one_run_guesses(s, 2, 1).tolist() == [0, 1, -1, 1, 0, 0]
    assert one_run_guesses(s, 0, 0).tolist() == [0] * 6
    assert one_run_guesses(s, 6, 0).tolist() == [1] * 6
    assert one_run_guesses(s, 3, 3).tolist() == [-1, 1, -1, 1, -1, 1]
    # 400 equal scores, members listed first: guessing by position would call the first 100 members
    tied = np.zeros(400)
    g = one_run_guesses(tied, 100, 100, seed=3)
    assert np.count_nonzero(g == 1) == 100 and np.count_nonzero(g == -1) == 100
    assert 30 < np.count_nonzero(g[:200] == 1) < 70  # about half of the +1 among the first 200
    assert np.array_equal(g, one_run_guesses(tied, 100, 100, seed=3))  # seeded
    assert not np.array_equal(g, one_run_guesses(tied, 100, 100, seed=4))


@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_one_run_audit_is_valid_on_scores_without_signal(kind: str) -> None:
    rng = np.random.default_rng(2 if kind == "continuous" else 3)
    given, chosen = [], []
    for d in range(DRAWS):
        is_member = rng.random(400) < 0.5  # each canary included with probability 1/2
        s = _null_scores(rng, kind)
        given.append(one_run_audit(s, is_member, k_pos=20, k_neg=20, seed=d)["epsilon_lb"])
        chosen.append(one_run_audit(s, is_member, seed=d)["epsilon_lb"])
    rate_given, rate_chosen = float(np.mean(np.array(given) > 0)), float(np.mean(np.array(chosen) > 0))
    print(f"\n{kind}: one-run eps LB > 0 in {rate_given:.1%} (k = 20 + 20) and {rate_chosen:.1%} (k chosen on "
          f"a held-out half) of {DRAWS} null audits")
    # exact for k = 20 + 20: P[Binomial(40, 1/2) >= 26] = 4.0% (measured 3.9% over 20,000 draws)
    assert rate_given <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / DRAWS)  # 5% plus 3 standard errors of the rate
    assert rate_chosen <= 0.05  # measured 1.3% / 1.0%


@pytest.mark.parametrize("eps", [1.0, 2.0])
def test_one_run_audit_on_randomised_response_stays_below_and_approaches_epsilon(eps: float) -> None:
    means = []
    for m in (1_000, 10_000, 100_000):
        runs = [one_run_audit(*_randomised_response(eps, m, seed, bernoulli=True), k_pos=m // 2, k_neg=m - m // 2,
                              seed=seed) for seed in range(5)]
        vals = [r["epsilon_lb"] for r in runs]
        assert all(r["r"] == m and r["method"] == "given" for r in runs)
        chosen = [one_run_audit(*_randomised_response(eps, m, seed, bernoulli=True), seed=seed)["epsilon_lb"]
                  for seed in range(5)]
        print(f"\none-run RR eps={eps} m={m}: k = m/2 + m/2 {np.round(vals, 3)}, k chosen {np.round(chosen, 3)}")
        assert max(vals) < eps
        # k chosen on a held-out half: exceeds eps at its 5% rate (one of these 30 audits does, by 0.0004;
        # the rate is checked in test_one_run_audit_exceeds_randomised_response_epsilon_rarely)
        assert np.mean(chosen) < eps
        means.append(float(np.mean(vals)))
    assert means[0] < means[1] < means[2]
    # Guessing every canary, v ~ Binomial(m, p): the bound's expected shortfall is about
    # z_0.95 / sqrt(m p (1 - p)) = 0.012 (eps = 1) and 0.016 (eps = 2) at m = 1e5, and the mean of 5 audits
    # has a standard deviation of 0.003 / 0.004 (measured means over 20 audits: 0.983 and 1.973); a margin of
    # 0.04 is over 5 standard deviations beyond the expected shortfall.
    assert means[2] > eps - 0.04
    assert chosen[-1] > eps - 0.5  # the held-out choice costs half the canaries and a noisy choice


def test_one_run_audit_exceeds_randomised_response_epsilon_rarely() -> None:
    given, chosen = [], []
    for d in range(DRAWS):
        s, y = _randomised_response(1.0, 1000, 20_000 + d, bernoulli=True)
        given.append(one_run_audit(s, y, k_pos=500, k_neg=500, seed=d)["epsilon_lb"] > 1.0)
        chosen.append(one_run_audit(s, y, seed=d)["epsilon_lb"] > 1.0)
    print(f"\none-run RR eps=1, m=1000: bound above eps in {np.mean(given):.2%} (k = 500 + 500) and "
          f"{np.mean(chosen):.2%} (k chosen on a held-out half) of {DRAWS} audits")
    assert np.mean(given) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / DRAWS)  # 5% plus 3 standard errors
    assert np.mean(chosen) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / DRAWS)


def test_one_run_audit_given_counts_by_hand() -> None:
    # 10 canaries scored 0..9: the top 3 (scores 7, 8, 9) hold members 7 and 9, the bottom 3 (0, 1, 2)
    # non-members 0 and 2: 4 of 6 guesses right
    s = np.arange(10.0)
    y = np.array([0, 1, 0, 0, 0, 1, 1, 1, 0, 1], bool)
    r = one_run_audit(s, y, k_pos=3, k_neg=3)
    assert (r["r"], r["v"], r["k_pos"], r["k_neg"], r["canaries"]) == (6, 4, 3, 3, 10)
    assert r["epsilon_lb"] == one_run_epsilon_lb(6, 4) == 0.0  # P[Binomial(6, 1/2) >= 4] = 22/64 > 0.05
    r = one_run_audit(s, y, k_pos=5, k_neg=0)  # top 5 (scores 5..9): members 5, 6, 7, 9
    assert (r["r"], r["v"]) == (5, 4)
    y = np.r_[np.zeros(50, bool), np.ones(50, bool)]
    r = one_run_audit(np.arange(100.0), y, k_pos=20, k_neg=20)
    assert (r["r"], r["v"]) == (40, 40) and r["epsilon_lb"] == pytest.approx(logit(0.05 ** (1 / 40)))
    # chosen on a held-out half of 50 canaries (a random half: its members need not be exactly 25, so the
    # best fractions of the first half need not be perfect on the second)
    r = one_run_audit(np.arange(100.0), y)
    assert r["method"] == "split" and r["canaries"] == 50 and r["v"] >= 0.9 * r["r"] > 0
    assert 0.5 < r["epsilon_lb"] == one_run_epsilon_lb(r["r"], r["v"])
    assert one_run_audit(np.arange(100.0), y) == r  # seeded


def test_one_run_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="must not exceed r"):
        one_run_epsilon_lb(3, 4)
    with pytest.raises(ValueError, match="r must be >= 0"):
        one_run_epsilon_lb(-1, 0)
    with pytest.raises(ValueError, match="v must be an integer"):
        one_run_epsilon_lb(10, 2.5)
    with pytest.raises(ValueError, match="r must be an integer"):
        one_run_epsilon_lb(True, 0)
    for c in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence must lie in"):
            one_run_epsilon_lb(10, 5, confidence=c)
    s, y = np.arange(10.0), np.arange(10) % 2 == 0
    with pytest.raises(ValueError, match="exceed the 10 canaries"):
        one_run_guesses(s, 6, 5)
    with pytest.raises(ValueError, match="k_neg must be >= 0"):
        one_run_guesses(s, 1, -1)
    with pytest.raises(ValueError, match="1-D"):
        one_run_guesses(s.reshape(2, 5), 1, 1)
    with pytest.raises(ValueError, match="finite"):
        one_run_guesses(np.r_[s[:-1], np.inf], 1, 1)
    with pytest.raises(ValueError, match="both k_pos and k_neg, or neither"):
        one_run_audit(s, y, k_pos=3)
    with pytest.raises(ValueError, match="exceed the 10 canaries"):
        one_run_audit(s, y, k_pos=8, k_neg=8)
    with pytest.raises(ValueError, match="fractions must be"):
        one_run_audit(s, y, fractions=[0.1, 2.0])
    with pytest.raises(ValueError, match="fractions must be"):
        one_run_audit(s, y, fractions=[])
    with pytest.raises(ValueError, match="confidence must lie in"):
        one_run_audit(s, y, confidence=1.0)
    with pytest.raises(ValueError, match="both members and non-members"):
        one_run_audit(s, np.ones(10, bool))
