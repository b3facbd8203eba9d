"""The reference attack of Ye et al. (2022, "Enhanced Membership Inference Attacks against Machine Learning
Models", Attack R), as Privacy Meter implements it (its `ReferenceMetric` with `linear_itp_threshold_func`).

Each audited point gets its own threshold: the alpha-quantile of the losses that the OUT shadows (the
shadows that never trained on it) give it. The target is taken to have trained on the point when its own
loss lies at or below that threshold, so alpha is the false-positive rate the test allows on each point.
Privacy Meter adds the bounds 0 and 1000 to every point's losses and reads the quantile by linear
interpolation (np.quantile, method "linear"). Fewer than 1/alpha shadows then still give a threshold below
the smallest OUT loss.

raymia returns the level at which that test starts to flag the point, instead of a decision per alpha:
score = -F(loss_t), where F is the piecewise-linear CDF through the sorted values 0, OUT losses, 1000
(value k at level k / (n + 1)), the inverse of that quantile. So `score >= -alpha` holds exactly when
`loss_t <= np.quantile([0, *out_losses, 1000], alpha, method="linear")`. One ROC over every alpha then
replaces Privacy Meter's list of FPR tolerances (tests/test_reference_attack.py checks the equivalence).
With several query augmentations the score is the mean over queries, as LiRA's is. Losses are clipped to
[0, 1000], the bounds' range.

Like LiRA offline, the attack needs only OUT shadows. LiRA offline fits a Gaussian to them and reads a
tail probability; this attack reads their empirical distribution. A point with no OUT shadow (possible only
in a keep matrix built by hand) is scored against the bounds alone: F = loss / 1000.
"""

from __future__ import annotations

import numpy as np

from raymia.attacks.mia import cross_entropy, per_model
from raymia.attacks.registry import ATTACKS
from raymia.registry import NoParams
from raymia.signals import Signals

# Privacy Meter's signal_min and signal_max: the bounds it adds to every point's reference losses.
LOSS_MIN, LOSS_MAX = 0.0, 1000.0


def out_cdf(x: np.ndarray, losses: np.ndarray, out: np.ndarray) -> np.ndarray:
    """F(x) [Q, P] for the target's losses x [Q, P], from the shadows' losses [S, Q, P] and out bool
    [S, P] (the shadows that did not train on the point). With e the point's sorted values (0, its OUT
    losses, 1000) and e[j-1] < x <= e[j]: F = (j - 1 + (x - e[j-1]) / (e[j] - e[j-1])) / (n + 1), n its
    number of OUT losses. Only e[j-1] and e[j] matter, a masked max and min over the shadows: nothing is
    sorted, and nothing larger than the losses is kept (a grid per target pair would be, for every pair)."""
    x = np.clip(x, LOSS_MIN, LOSS_MAX)
    losses = np.clip(losses, LOSS_MIN, LOSS_MAX)
    out = out[:, None, :]
    below = out & (losses < x)
    lo = np.where(below, losses, LOSS_MIN).max(axis=0)  # e[j-1]: the bound 0 when no OUT loss is below x
    hi = np.where(out & ~below, losses, LOSS_MAX).min(axis=0)  # e[j]: the bound 1000 when none is at or above
    n = out.sum(axis=0)
    inside = x > LOSS_MIN  # x = 0: level 0 (and lo = hi = 0)
    frac = np.where(inside, (x - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    return np.where(inside, (below.sum(axis=0) + frac) / (n + 1), 0.0)


@ATTACKS.register(
    "reference",
    NoParams,
    doc="Reference attack (Ye et al. 2022, Attack R; Privacy Meter's reference metric): the target's loss "
        "against each point's OUT shadow losses.",
)
def reference(signals: Signals, target: int, params: NoParams) -> np.ndarray:
    """-mean over queries of F(loss_t): the per-point false-positive level at which the target's loss
    falls below the OUT shadows' quantile."""
    shadow = signals.shadow_mask(target)
    losses = signals.derived("cross-entropy", lambda: per_model(cross_entropy, signals.logits, signals.labels))  # [M, Q, P]
    return -out_cdf(losses[target], losses[shadow], ~signals.keep[shadow]).mean(axis=0)
