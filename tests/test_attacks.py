"""Known-answer and statistical tests of the membership inference attacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from raymia.attacks import ATTACKS, run_attack
from raymia.attacks.mia import cross_entropy, log_softmax, logit_scaled_confidence
from raymia.errors import SpecError
from raymia.metrics import attack_metrics
from raymia.signals import Signals

DDOF = 0  # LiRA's per-point std convention (np.std default, as in the reference code)


def signals_from_phi(phi: np.ndarray, keep: np.ndarray, seed: int = 0) -> tuple[Signals, np.ndarray]:
    """Two-class Signals whose logit-scaled confidence is exactly float32(phi) [M, Q, P].

    z_y = phi and z_other = 0, so phi = z_y - logsumexp_{j != y} z_j = z_y. Returns the signals and the
    float64 phi the attack sees (float32-rounded), for closed forms.
    """
    m, q, p = phi.shape
    labels = np.random.default_rng(seed).integers(0, 2, size=p).astype(np.int64)
    phi32 = phi.astype(np.float32)
    logits = np.zeros((m, q, p, 2), dtype=np.float32)
    idx = np.broadcast_to(labels, (m, q, p))[..., None]
    np.put_along_axis(logits, idx, phi32[..., None], axis=-1)
    return Signals(logits=logits, labels=labels, keep=keep), phi32.astype(np.float64)


def test_signals_from_phi_roundtrip() -> None:
    rng = np.random.default_rng(1)
    phi = rng.normal(size=(3, 2, 7))
    sig, phi64 = signals_from_phi(phi, rng.random((3, 7)) < 0.5)
    np.testing.assert_array_equal(logit_scaled_confidence(sig.logits, sig.labels), phi64)


# ---------------------------------------------------------------------------------------------- helpers
def test_logit_scaled_confidence_and_ce_by_hand() -> None:
    z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    y = np.array([0, 2])
    # phi = z_y - log(sum_{j != y} e^{z_j}); point 0: 1 - log(e^2 + e^3); point 1: 0 - log 2
    np.testing.assert_allclose(
        logit_scaled_confidence(z, y), [1 - math.log(math.e**2 + math.e**3), -math.log(2)], rtol=1e-12
    )
    # CE = log(e + e^2 + e^3) - 1 = 2.40760596...; point 1: log 3
    np.testing.assert_allclose(cross_entropy(z, y), [2.4076059644443806, math.log(3)], rtol=1e-12)
    np.testing.assert_allclose(np.exp(log_softmax(z)).sum(-1), 1.0, rtol=1e-12)


def test_logit_scaled_confidence_is_stable() -> None:
    # p_y = 1 - 1e-40 is 1.0 in float64, yet phi = 92.1 must survive; and huge logits must not overflow
    z = np.array([[92.103, 0.0], [1e4, -1e4], [-1e4, 1e4]], dtype=np.float32)
    phi = logit_scaled_confidence(z, np.array([0, 0, 0]))
    np.testing.assert_allclose(phi, [np.float32(92.103), 2e4, -2e4], rtol=1e-7)
    assert phi.dtype == np.float64


def test_log_probabilities_keep_confident_outputs() -> None:
    # p_y = 1 / (1 + 2 e^-m) for z = [m, 0, 0]: log p_y = -log1p(2 e^-m), about -2 e^-m, far below float64's
    # resolution next to m (lse - z_y cancels to exactly 0 from m = 38 on), yet a normal float64 number.
    margins = np.array([20.0, 40.0, 45.0, 60.0, 300.0])
    z = np.zeros((margins.size, 3), dtype=np.float32)
    z[:, 0] = margins
    y = np.zeros(margins.size, dtype=np.int64)
    want = np.log1p(2.0 * np.exp(-margins))
    np.testing.assert_allclose(cross_entropy(z, y), want, rtol=1e-12)
    np.testing.assert_allclose(-log_softmax(z)[:, 0], want, rtol=1e-12)
    # the other classes: log p_j = -m - log1p(2 e^-m)
    np.testing.assert_allclose(log_softmax(z)[:, 1], -margins - want, rtol=1e-12)
    # and the loss attack's statistic orders them as phi does (no ties among the confident ones)
    assert np.all(np.diff(-cross_entropy(z, y)) > 0)
    # an argmax that is not the label: CE = m + log1p(2 e^-m) for z = [m, 0, 0], y = 1
    np.testing.assert_allclose(cross_entropy(z, np.ones(margins.size, dtype=np.int64)), margins + want,
                               rtol=1e-12)


# ---------------------------------------------------------------------------------------------- loss
def test_loss_attack_by_hand() -> None:
    logits = np.zeros((2, 2, 2, 3), dtype=np.float32)
    logits[1, 0, 0] = [1.0, 2.0, 3.0]
    logits[1, 0, 1] = [0.0, 0.0, 0.0]
    logits[1, 1, 0] = [5.0, 5.0, 5.0]
    labels = np.array([0, 2])
    sig = Signals(logits=logits, labels=labels, keep=np.zeros((2, 2), bool))
    # -CE = z_y - logsumexp(z): -(log(e + e^2 + e^3) - 1) = -2.40760596..., -(log 3)
    np.testing.assert_allclose(
        run_attack("loss", None, sig, 1), [-2.4076059644443806, -math.log(3)], rtol=1e-12
    )
    np.testing.assert_allclose(run_attack("loss", {"query": 1}, sig, 1)[0], -math.log(3), rtol=1e-12)
    with pytest.raises(ValueError, match="query"):
        run_attack("loss", {"query": 2}, sig, 1)


def test_an_attack_returning_the_wrong_shape_is_one_line_naming_its_entry() -> None:
    from raymia.attacks.registry import ATTACKS
    from raymia.errors import SpecError
    from raymia.registry import Params

    sig = Signals(logits=np.zeros((2, 1, 3, 2), dtype=np.float32), labels=np.zeros(3, int),
                  keep=np.zeros((2, 3), bool))
    ATTACKS.register("test_bad_shape", Params, doc="returns one score too few")(
        lambda signals, target, p: np.zeros(signals.num_points - 1))
    try:
        with pytest.raises(SpecError, match=r"^attacks.2: attack 'test_bad_shape' returned scores of shape \(2,\); "
                                            r"an attack returns one score per audited point, shape \(3,\)$"):
            run_attack("test_bad_shape", None, sig, 0, where="attacks.2")
    finally:
        ATTACKS._entries.pop("test_bad_shape")


# ---------------------------------------------------------------------------------------------- LiRA closed forms
def _random_case(seed: int, m: int = 9, q: int = 3, p: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keep = np.zeros((m, p), dtype=bool)
    for i in range(p):  # every point IN for 4 of the 8 shadows (models 1..8); target 0 random
        keep[1 + rng.permutation(m - 1)[:4], i] = True
    keep[0] = rng.random(p) < 0.5
    phi = rng.normal(size=(m, q, p)) * rng.uniform(0.5, 2, size=(1, 1, p)) + 2.0 * keep[:, None, :]
    return phi, keep


def _closed_form(phi: np.ndarray, keep: np.ndarray, target: int, online: bool, fixed: bool) -> np.ndarray:
    """Point-by-point loop with np.mean / np.std(ddof=DDOF) and scipy.stats.norm (independent of lira.py)."""
    m, q, p = phi.shape
    sh = np.array([j for j in range(m) if j != target])
    ins = [[phi[sh[keep[sh, i]], k, i] for i in range(p)] for k in range(q)]
    outs = [[phi[sh[~keep[sh, i]], k, i] for i in range(p)] for k in range(q)]

    def pooled(groups: list[np.ndarray]) -> float:
        dev = np.concatenate([g - g.mean() for g in groups])
        return float(np.sqrt(np.mean(dev**2)))

    scores = np.zeros(p)
    for k in range(q):
        s_in_fixed, s_out_fixed = pooled(ins[k]), pooled(outs[k])
        for i in range(p):
            x = phi[target, k, i]
            a, b = ins[k][i], outs[k][i]
            s_in = s_in_fixed if fixed else np.std(a, ddof=DDOF)
            s_out = s_out_fixed if fixed else np.std(b, ddof=DDOF)
            if online:
                scores[i] += norm.logpdf(x, a.mean(), s_in) - norm.logpdf(x, b.mean(), s_out)
            else:
                scores[i] += norm.logcdf(x, b.mean(), s_out)
    return scores / q


@pytest.mark.parametrize("name", ["lira_online", "lira_offline"])
@pytest.mark.parametrize("fixed", [False, True])
def test_lira_matches_closed_form(name: str, fixed: bool) -> None:
    phi, keep = _random_case(seed=3)
    sig, phi64 = signals_from_phi(phi, keep)
    for target in (0, 5):
        got = run_attack(name, {"fixed_variance": fixed}, sig, target)
        want = _closed_form(phi64, keep, target, online=name == "lira_online", fixed=fixed)
        assert got.dtype == np.float64 and got.shape == (phi.shape[2],)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_lira_single_query_online_by_hand() -> None:
    # one point, shadows IN: 1, 3 (mean 2, std 1); OUT: -1, 0, 1 (mean 0, std sqrt(2/3)); target phi = 1.5
    phi = np.array([1.5, 1.0, 3.0, -1.0, 0.0, 1.0]).reshape(6, 1, 1)
    keep = np.array([[True], [True], [True], [False], [False], [False]])
    sig, _ = signals_from_phi(phi, keep)
    s_out = math.sqrt(2 / 3)
    want = norm.logpdf(1.5, 2.0, 1.0) - norm.logpdf(1.5, 0.0, s_out)
    np.testing.assert_allclose(run_attack("lira_online", None, sig, 0), [want], rtol=1e-12)
    np.testing.assert_allclose(
        run_attack("lira_offline", None, sig, 0), [norm.logcdf(1.5 / s_out)], rtol=1e-12
    )


def test_lira_fallbacks() -> None:
    phi, keep = _random_case(seed=4, q=2)
    keep[1:, 0] = False  # point 0: no IN shadow -> online score = offline score
    keep[1:, 1] = True  # point 1: no OUT shadow -> OUT mean over all points, pooled OUT std
    sig, phi64 = signals_from_phi(phi, keep)
    per_point = {"fixed_variance": False}
    online = run_attack("lira_online", per_point, sig, 0)
    offline = run_attack("lira_offline", per_point, sig, 0)
    assert online[0] == pytest.approx(offline[0], rel=1e-12)
    assert np.all(np.isfinite(online)) and np.all(np.isfinite(offline))
    want_off = want_on = 0.0
    for k in range(2):
        ins = phi64[1:, k, 1]  # all 8 shadows are IN for point 1
        outs = [phi64[1:, k, i][~keep[1:, i]] for i in range(phi.shape[2]) if i != 1]
        mu_all = np.concatenate(outs).mean()  # OUT mean over every (shadow, point) observation
        s_pool = np.sqrt(np.mean(np.concatenate([o - o.mean() for o in outs]) ** 2))  # pooled, ddof 0
        x = phi64[0, k, 1]
        want_off += norm.logcdf(x, mu_all, s_pool) / 2
        want_on += (norm.logpdf(x, ins.mean(), ins.std(ddof=DDOF)) - norm.logpdf(x, mu_all, s_pool)) / 2
    assert offline[1] == pytest.approx(want_off, rel=1e-9)
    assert online[1] == pytest.approx(want_on, rel=1e-9)


def test_lira_min_std_floor_and_errors() -> None:
    phi = np.zeros((3, 1, 2))  # all shadows agree exactly: std 0 is floored at min_std
    phi[0, 0, 0] = 1e-6
    keep = np.array([[True, False], [True, True], [False, False]])
    sig, _ = signals_from_phi(phi, keep)
    s = run_attack("lira_online", {"min_std": 1e-3}, sig, 0)
    assert np.all(np.isfinite(s))
    with pytest.raises(ValueError, match="OUT"):
        run_attack("lira_offline", None, Signals(sig.logits, sig.labels, np.ones((3, 2), bool)), 0)
    with pytest.raises(ValueError, match="shadow"):
        run_attack("lira_online", None, Signals(sig.logits[:1], sig.labels, keep[:1]), 0)
    with pytest.raises(ValueError, match="target"):
        run_attack("lira_online", None, sig, 3)


# ---------------------------------------------------------------------------------------------- statistics
def _gaussian_bank(seed: int, offset_std: float, m: int = 65, p: int = 2000) -> tuple[Signals, np.ndarray]:
    """Target 0 plus 64 shadows; each point IN for 32 models; phi = offset_i + 1[member] + N(0, 1)."""
    rng = np.random.default_rng(seed)
    keep = np.zeros((m, p), dtype=bool)
    for i in range(p):
        keep[rng.permutation(m)[:32], i] = True
    offsets = rng.normal(size=p) * offset_std
    phi = offsets[None, None, :] + keep[:, None, :] + rng.normal(size=(m, 1, p))
    sig, _ = signals_from_phi(phi, keep, seed=seed)
    return sig, keep[0]


def test_lira_online_reaches_analytic_auc() -> None:
    analytic = norm.cdf(1 / math.sqrt(2))  # AUC of N(1, 1) vs N(0, 1) = Phi(1 / sqrt 2) = 0.760
    for offset_std in (0.0, 3.0):  # LiRA is invariant to per-point shifts
        sig, member = _gaussian_bank(seed=0, offset_std=offset_std)
        for fixed in (False, True):
            auc = attack_metrics(run_attack("lira_online", {"fixed_variance": fixed}, sig, 0), member)["auc"]
            assert abs(auc - analytic) < 0.03, (offset_std, fixed, auc)


def test_lira_beats_loss_with_per_point_offsets() -> None:
    sig, member = _gaussian_bank(seed=0, offset_std=3.0)
    lira = attack_metrics(run_attack("lira_online", None, sig, 0), member)
    offline = attack_metrics(run_attack("lira_offline", None, sig, 0), member)
    loss = attack_metrics(run_attack("loss", None, sig, 0), member)
    # loss sees offset + membership: AUC ~ Phi(1 / sqrt(2 * (1 + 9))) = 0.62; LiRA removes the offsets
    assert loss["auc"] < 0.66 < lira["auc"]
    assert lira["tpr_fpr_0.01"] > 1.5 * loss["tpr_fpr_0.01"]
    assert offline["auc"] > 0.7


# ---------------------------------------------------------------------------------------------- registry / params
def test_registry_entries_are_documented() -> None:
    assert {"loss", "lira_online", "lira_offline"} <= set(ATTACKS.names())
    for entry in ATTACKS.entries():
        assert entry.doc
        for field in entry.params.model_fields.values():
            assert field.description


def test_bad_params_raise_spec_error() -> None:
    sig, _ = signals_from_phi(np.zeros((2, 1, 3)), np.array([[True, False, True], [False, True, False]]))
    with pytest.raises(SpecError, match="bogus") as e:
        run_attack("loss", {"bogus": 1}, sig, 0, where="attacks[0]")
    assert "attacks[0].params" in str(e.value)
    with pytest.raises(SpecError, match="query"):
        run_attack("loss", {"query": -1}, sig, 0)
    with pytest.raises(SpecError, match="min_std"):
        run_attack("lira_online", {"min_std": 0}, sig, 0)
    with pytest.raises(SpecError, match="fixed_variance"):
        run_attack("lira_offline", {"fixed_variance": "maybe"}, sig, 0)
    with pytest.raises(SpecError, match="attacks\\[1\\].name"):
        run_attack("nope", None, sig, 0, where="attacks[1]")


def test_lira_variance_auto_mode() -> None:
    """fixed_variance=None pools the variance below 64 shadows (the LiRA paper's advice), per point above."""
    for m, pooled in ((9, True), (65, False)):
        rng = np.random.default_rng(m)
        phi = rng.normal(size=(m, 1, 40))
        keep = np.argsort(rng.random((m - 1, 40)), axis=0) < (m - 1) // 2
        keep = np.vstack([rng.random((1, 40)) < 0.5, keep])
        sig, _ = signals_from_phi(phi, keep)
        auto = run_attack("lira_online", None, sig, 0)
        explicit = run_attack("lira_online", {"fixed_variance": pooled}, sig, 0)
        other = run_attack("lira_online", {"fixed_variance": not pooled}, sig, 0)
        np.testing.assert_array_equal(auto, explicit)
        assert not np.allclose(auto, other)


# ---------------------------------------------------------------------------------------------- LiRA variants
def _paired_case(seed: int, m: int = 10, q: int = 2, p: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Complementary pairs (models 2j, 2j + 1), as raymia's plans: with the target's pair left out every
    point has the same number of IN and OUT shadows, so the reference's truncation to equal counts is moot."""
    rng = np.random.default_rng(seed)
    keep = np.zeros((m, p), dtype=bool)
    for j in range(m // 2):
        keep[2 * j, rng.permutation(p)[: p // 2]] = True
        keep[2 * j + 1] = ~keep[2 * j]
    phi = rng.normal(size=(m, q, p)) * rng.uniform(0.5, 2, size=(1, 1, p)) + 1.5 * keep[:, None, :]
    phi[:, 1] += 3.0  # the second query sits elsewhere (a global std mixes the two)
    return phi, keep


def _reference_lira(phi: np.ndarray, keep: np.ndarray, target: int, shadows: np.ndarray, online: bool,
                    fix_variance: bool) -> np.ndarray:
    """Carlini et al.'s plot.py (generate_ours, generate_ours_offline), re-written on [M, Q, P] arrays:
    dat_in / dat_out [P, n, Q] truncated to the smallest count, np.median centers, np.std (per point, or
    of the whole array with fix_variance). Online it scores log N_in - log N_out; raymia's global variance
    gives each side its own std (the reference's online code takes np.std(dat_in) for both), so this
    re-write does the same. Offline: the reference's -logpdf is two-sided; raymia's test is one-sided
    (log CDF), re-written here as such."""
    scores, kp = np.moveaxis(phi[shadows], 1, 2), keep[shadows]  # [S, P, Q]
    dat_in = [scores[kp[:, j], j, :] for j in range(scores.shape[1])]
    dat_out = [scores[~kp[:, j], j, :] for j in range(scores.shape[1])]
    in_size, out_size = min(map(len, dat_in)), min(map(len, dat_out))
    dat_in = np.array([x[:in_size] for x in dat_in])
    dat_out = np.array([x[:out_size] for x in dat_out])
    mean_in, mean_out = np.median(dat_in, 1), np.median(dat_out, 1)
    std_in = np.std(dat_in) if fix_variance else np.std(dat_in, 1)
    std_out = np.std(dat_out) if fix_variance else np.std(dat_out, 1)
    sc = phi[target].T  # [P, Q]
    if online:
        s = norm.logpdf(sc, mean_in, std_in) - norm.logpdf(sc, mean_out, std_out)
    else:
        s = norm.logcdf(sc, mean_out, std_out)
    return s.mean(1)


@pytest.mark.parametrize("name", ["lira_online", "lira_offline"])
@pytest.mark.parametrize("variance", ["per_point", "global"])
def test_lira_matches_reference_code(name: str, variance: str) -> None:
    phi, keep = _paired_case(seed=5)
    sig, phi64 = signals_from_phi(phi, keep)
    for target in (0, 3):
        shadows = sig.shadow_mask(target)
        assert (keep[shadows].sum(axis=0) == shadows.sum() // 2).all()  # equal IN/OUT counts per point
        got = run_attack(name, {"variance": variance, "center": "median"}, sig, target)
        want = _reference_lira(phi64, keep, target, shadows, name == "lira_online", variance == "global")
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_lira_global_std_is_np_std_of_every_value() -> None:
    """variance: global is np.std of every IN (resp. OUT) value over points, shadows and queries, around
    their common mean, whatever the per-point counts; pooled uses within-point deviations per query."""
    from raymia.attacks.mia.lira import _fit_side

    phi, keep = _random_case(seed=6, q=2)  # unequal counts: target 0 random, 4 of 8 shadows IN per point
    w_out = (~keep).astype(np.float64)
    w_out[0] = 0.0
    outs = np.concatenate([phi[w_out[:, i] > 0, :, i].ravel() for i in range(phi.shape[2])])
    side = _fit_side(phi, w_out, "global", 1e-12)
    np.testing.assert_allclose(side.std, np.std(outs), rtol=1e-12)
    pooled = _fit_side(phi, w_out, "pooled", 1e-12).std
    for k in range(2):
        dev = np.concatenate([phi[w_out[:, i] > 0, k, i] - phi[w_out[:, i] > 0, k, i].mean()
                              for i in range(phi.shape[2])])
        np.testing.assert_allclose(pooled[k], np.sqrt(np.mean(dev**2)), rtol=1e-12)
    assert pooled.max() < side.std.min()  # global also counts how far the points' means spread


def test_one_shadow_per_side_falls_back_to_the_global_std() -> None:
    """A bank of 4 models: leave-one-out leaves each point one IN and one OUT shadow, so there is no
    within-point spread to pool; the side's global std stands in, and offline LiRA's scores stay distinct
    instead of saturating at the top (244 of 400 tied with a zero pooled std, floored)."""
    from raymia.attacks.mia.lira import _fit_side
    from raymia.data.plan import paired_keep

    rng = np.random.default_rng(0)
    m, p, c = 4, 400, 10
    keep = paired_keep(m, p, rng)
    labels = rng.integers(0, c, p)
    logits = rng.normal(0, 1, (m, 1, p, c)).astype(np.float32)
    difficulty = rng.normal(0, 2, p)
    for j in range(m):
        logits[j, 0, np.arange(p), labels] += difficulty + 1.0 * keep[j]
    sig = Signals(logits=logits, labels=labels, keep=keep)
    for name in ("lira_offline", "lira_online"):
        scores = run_attack(name, None, sig, 0)
        assert np.unique(scores).size == p, name
    assert attack_metrics(run_attack("lira_offline", None, sig, 0), keep[0])["auc"] > 0.65
    phi = logit_scaled_confidence(logits, labels)  # [M, Q, P]
    w_out = (~keep).astype(np.float64)
    w_out[:2] = 0.0  # the target and its pair left out: one OUT shadow per point
    outs = np.concatenate([phi[w_out[:, i] > 0, :, i].ravel() for i in range(p)])
    for variance in ("pooled", "per_point", "global"):
        np.testing.assert_allclose(_fit_side(phi, w_out, variance, 1e-6).std, np.std(outs), rtol=1e-12)


def test_lira_variance_params() -> None:
    phi, keep = _paired_case(seed=7)
    sig, _ = signals_from_phi(phi, keep)
    for name in ("lira_online", "lira_offline"):
        entry = ATTACKS.get(name).parse(None, where="p")
        assert (entry.variance, entry.center) == (None, "mean")
        runs = {v: run_attack(name, {"variance": v}, sig, 0) for v in ("per_point", "pooled", "global")}
        assert not np.allclose(runs["per_point"], runs["pooled"])
        assert not np.allclose(runs["pooled"], runs["global"])
        np.testing.assert_array_equal(run_attack(name, {"fixed_variance": True}, sig, 0), runs["pooled"])
        np.testing.assert_array_equal(run_attack(name, {"fixed_variance": False}, sig, 0), runs["per_point"])
        np.testing.assert_array_equal(run_attack(name, None, sig, 0), runs["pooled"])  # 8 shadows < 64
    with pytest.raises(SpecError, match="variance"):
        run_attack("lira_online", {"variance": "pooled", "fixed_variance": True}, sig, 0)
    with pytest.raises(SpecError, match="variance"):
        run_attack("lira_online", {"variance": "fixed"}, sig, 0)
    with pytest.raises(SpecError, match="center"):
        run_attack("lira_online", {"center": "mode"}, sig, 0)


# ---------------------------------------------------------------------------------------------- many targets
def _paired_bank(m: int = 8, p: int = 240, q: int = 2, z: int = 90, seed: int = 5) -> Signals:
    """Paired models (2j, 2j+1 on complementary halves) whose members' true-class logit is raised."""
    rng = np.random.default_rng(seed)
    half = rng.random((m // 2, p)) < 0.5
    keep = np.repeat(half, 2, axis=0)
    keep[1::2] = ~keep[1::2]
    labels = rng.integers(0, 5, p)
    logits = rng.normal(size=(m, q, p, 5)).astype(np.float32)
    logits[:, :, np.arange(p), labels] += 1.0 + keep[:, None, :].astype(np.float32)
    pop_labels = rng.integers(0, 5, z)
    pop = rng.normal(size=(m, q, z, 5)).astype(np.float32)
    pop[:, :, np.arange(z), pop_labels] += 1.0
    return Signals(logits=logits, labels=labels, keep=keep, pop_logits=pop, pop_labels=pop_labels)


FAST = {"shokri": {"max_iter": 15}, "salem": {"max_iter": 15}}


@pytest.mark.parametrize("name", sorted(ATTACKS.names()))
def test_targets_sharing_one_signals_score_as_on_fresh_copies(name: str) -> None:
    """An audit attacks every target on one Signals object, whose per-model transforms (LiRA's phi, RMIA's
    log p_y, a threshold statistic) the targets share, and what is fitted on the shadows a target shares
    with its paired model (LiRA's Gaussians, RMIA's a and references, a threshold): the scores are those
    of each target attacked on a fresh copy, bit for bit."""
    import dataclasses

    sig = _paired_bank()
    shared = [run_attack(name, FAST.get(name), sig, t) for t in range(sig.num_models)]
    for t in range(sig.num_models):
        np.testing.assert_array_equal(shared[t], run_attack(name, FAST.get(name), dataclasses.replace(sig), t))


def test_a_per_model_transform_is_computed_once_for_every_target(monkeypatch: pytest.MonkeyPatch) -> None:
    import raymia.attacks.mia.lira as lira

    calls = []

    def counted(logits, labels):
        calls.append(1)
        return logit_scaled_confidence(logits, labels)

    monkeypatch.setattr(lira, "logit_scaled_confidence", counted)
    sig = _paired_bank()
    for t in range(sig.num_models):
        run_attack("lira_online", None, sig, t)
        run_attack("lira_offline", None, sig, t)
    assert len(calls) == 1
    kept = sig.derived("phi", lambda: pytest.fail("not kept"))
    with pytest.raises(ValueError, match="read-only"):
        kept[0, 0, 0] = 1.0  # shared by every target: no attack may change it
    sig.forget_derived()
    run_attack("lira_online", None, sig, 0)
    assert len(calls) == 2


def test_the_audits_attack_loop_gives_the_memory_back_after_each_attack() -> None:
    from raymia.audit import run_attacks
    from raymia.spec import AttackSpec, AuditSpec

    sig = _paired_bank()
    spec = AuditSpec.model_validate({"plan": {"num_models": 8, "targets": "all"}})
    seen = []
    original = Signals.forget_derived

    def forget(self):
        seen.append(len(self._derived))
        original(self)

    attacks = [AttackSpec(name=n) for n in ("loss", "lira_online", "rmia_offline")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Signals, "forget_derived", forget)
        run_attacks(spec, attacks, sig, list(range(8)))
    # the per-model transform (loss's statistic, LiRA's phi, RMIA's log p_y of x and z), loss's statistic
    # sorted over the shadow pool and, once per target pair (the same shadows), what is fitted on them: loss's
    # tau, LiRA's Gaussians, RMIA's a and references
    assert seen == [1 + 1 + 4, 1 + 4, 2 + 4 + 4]
    assert not sig._derived


def test_a_long_attack_phase_says_where_it_is(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Quiet while the attacks are quick; past ATTACK_PROGRESS_AFTER_S a line names the attack and the
    target it starts (here both limits are 0: a line for every target)."""
    import logging

    import raymia.audit as audit
    from raymia.spec import AttackSpec, AuditSpec

    sig = _paired_bank()
    spec = AuditSpec.model_validate({"plan": {"num_models": 8, "targets": "all"}})
    attacks = [AttackSpec(name=n) for n in ("loss", "lira_online")]
    with caplog.at_level(logging.INFO, logger="raymia"):
        audit.run_attacks(spec, attacks, sig, [0, 1, 2])
    assert not [r for r in caplog.records if "attacks:" in r.getMessage()]
    monkeypatch.setattr(audit, "ATTACK_PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(audit, "ATTACK_PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="raymia"):
        audit.run_attacks(spec, attacks, sig, [0, 1, 2])
    lines = [r.getMessage() for r in caplog.records if "attacks:" in r.getMessage()]
    assert len(lines) == 6
    assert lines[0].startswith("attacks: loss on target 1 of 3 (attack 1 of 2), ") and lines[0].endswith("s so far")
    assert lines[5].startswith("attacks: lira_online on target 3 of 3 (attack 2 of 2), ")


def test_salems_features_are_the_three_largest_probabilities_descending():
    """A sort the wrong way round still separated members on 5 classes: the hand example decides."""
    from raymia.attacks.mia.learned import top3

    assert top3(np.array([[0.1, 0.6, 0.3, 0.0]])).tolist() == [[0.6, 0.3, 0.1]]
    assert top3(np.array([[0.2, 0.8]])).tolist() == [[0.8, 0.2, 0.0]]  # fewer than 3 classes: zero-padded
