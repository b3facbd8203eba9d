"""The reference attack (Ye et al. 2022, Attack R) against Privacy Meter's rule and by hand."""

from __future__ import annotations

import numpy as np
import pytest

from raymia.attacks import run_attack
from raymia.attacks.mia import cross_entropy
from raymia.attacks.mia.reference import out_cdf
from raymia.signals import Signals


def _paired_signals(m: int = 8, p: int = 300, q: int = 1, c: int = 4, seed: int = 0) -> Signals:
    """Random logits of M models in complementary pairs (model 2j+1 trained on what 2j did not)."""
    rng = np.random.default_rng(seed)
    half = rng.random((m // 2, p)) < 0.5
    keep = np.empty((m, p), dtype=bool)
    keep[0::2], keep[1::2] = half, ~half
    logits = rng.normal(0, 2, (m, q, p, c)).astype(np.float32)
    logits[..., 0] += 1.5 * keep[:, None, :]  # members fit their label (0) better
    return Signals(logits=logits, labels=np.zeros(p, dtype=np.int64), keep=keep)


def test_cdf_by_hand():
    # one point, OUT losses 1, 2, 3: the CDF goes through 0, 1, 2, 3, 1000 at levels 0, 1/4, 2/4, 3/4, 1
    losses = np.array([2.0, 9.0, 1.0, 3.0, 2.0])[:, None, None]  # [S, Q=1, P=1]; the IN ones do not count
    out = np.array([[True], [False], [True], [True], [False]])
    f = [out_cdf(np.array([[x]]), losses, out)[0, 0] for x in (0.0, 0.5, 1.0, 2.5, 3.0, 501.5, 1000.0, 2000.0)]
    np.testing.assert_allclose(f, [0, 0.125, 0.25, 0.625, 0.75, 0.875, 1.0, 1.0])
    # tied OUT losses: the CDF steps over them (0, 2, 2, 2, 1000 at levels 0, 1/4, 2/4, 3/4, 1)
    tied = out_cdf(np.array([[1.0, 2.0, 3.0]]), np.full((3, 1, 3), 2.0), np.ones((3, 3), dtype=bool))
    np.testing.assert_allclose(tied[0], [0.125, 0.25, 0.75 + 0.25 / 998])
    assert np.quantile([0, 2, 2, 2, 1000], 0.25, method="linear") == 2.0  # so 2.0 is flagged at alpha 1/4


@pytest.mark.parametrize("target", [0, 3, 6])
def test_scores_flag_exactly_what_privacy_meter_flags_at_every_alpha(target):
    """Privacy Meter's ReferenceMetric flags point i at tolerance alpha when the target's loss is at most
    np.quantile([0, its OUT shadows' losses..., 1000], alpha, method linear). The score flags the same points
    as `score >= -alpha`, for every alpha."""
    sig = _paired_signals()
    scores = run_attack("reference", {}, sig, target)
    loss = cross_entropy(sig.logits, sig.labels)[:, 0]  # [M, P]
    out = sig.shadow_mask(target)[:, None] & ~sig.keep
    assert out.sum(axis=0).min() == 3  # the 6 shadows outside the target's pair, half of them OUT
    for alpha in np.random.default_rng(1).uniform(0.01, 0.99, 40):
        flagged = np.array([loss[target, i] <= np.quantile(np.r_[0.0, loss[out[:, i], i], 1000.0], alpha,
                                                           method="linear") for i in range(sig.labels.size)])
        np.testing.assert_array_equal(scores >= -alpha, flagged)


def test_members_score_higher_and_queries_are_averaged():
    sig = _paired_signals(q=2)
    scores = run_attack("reference", {}, sig, 0)
    assert scores.shape == (300,) and -1 <= scores.min() and scores.max() <= 0
    assert scores[sig.keep[0]].mean() > scores[~sig.keep[0]].mean() + 0.1
    one = [run_attack("reference", {}, Signals(logits=sig.logits[:, [k]], labels=sig.labels, keep=sig.keep), 0)
           for k in (0, 1)]
    np.testing.assert_allclose(scores, (one[0] + one[1]) / 2)
    # the target's own membership row is never read (nor its pair's, flipped with it to stay its complement)
    flipped = sig.keep.copy()
    flipped[:2] = ~flipped[:2]
    same = run_attack("reference", {}, Signals(logits=sig.logits, labels=sig.labels, keep=flipped), 0)
    np.testing.assert_array_equal(same, scores)


def test_confident_outputs_keep_their_losses():
    """Every model fits both points with margins of 40 to 45 (loss e^-m, far below float64's resolution next
    to m): the target's loss still lies where it does among the OUT shadows' losses, instead of every loss
    rounding to 0 and every point scoring at the top (F = 0)."""
    keep = np.array([[True, False], [False, True], [True, False], [False, True]])  # pairs (0, 1), (2, 3)
    margin = np.array([[45.0, 40.0], [0.0, 0.0], [0.0, 42.0], [41.0, 0.0]])  # [M, P]; model 1 is never read
    logits = np.zeros((4, 1, 2, 2), dtype=np.float32)
    logits[:, 0, :, 0] = margin
    sig = Signals(logits=logits, labels=np.zeros(2, dtype=np.int64), keep=keep)
    loss = np.log1p(np.exp(-margin))  # exact
    # point 0 (a member of target 0): OUT shadow 3, loss e^-41; the target's e^-45 lies below it
    # point 1 (a non-member): OUT shadow 2, loss e^-42; the target's e^-40 lies above it, below 1000
    f0 = (loss[0, 0] / loss[3, 0]) / 2
    f1 = (1 + (loss[0, 1] - loss[2, 1]) / (1000.0 - loss[2, 1])) / 2
    np.testing.assert_allclose(run_attack("reference", {}, sig, 0), [-f0, -f1], rtol=1e-9)
    assert f0 == pytest.approx(np.exp(-4) / 2, rel=1e-9) and f1 == pytest.approx(0.5, rel=1e-9)
