"""Known-answer tests of raymia.metrics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from raymia.metrics import (
    accuracy,
    attack_metrics,
    balanced_accuracy,
    metric_label,
    roc,
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
    assert set(m) == {"auc", "balanced_accuracy", "tpr_fpr_0.01", "tpr_fpr_0.001"}
    assert metric_label("auc") == "AUC"
    assert metric_label("tpr_fpr_0.01") == "TPR@1%FPR"
    assert metric_label("tpr_fpr_0.001") == "TPR@0.1%FPR"
    assert metric_label("tpr_fpr_1e-05") == "TPR@0.001%FPR"
    assert metric_label("balanced_accuracy") == "Bal. acc"
    assert metric_label("something_else") == "something_else"


def test_perfect_separation_at_low_fpr() -> None:
    is_member = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    scores = np.r_[np.linspace(1, 2, 1000), np.linspace(-1, 0, 1000)]
    m = attack_metrics(scores, is_member)
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
