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

from raymia.attacks.mia import cross_entropy
from raymia.attacks.registry import ATTACKS
from raymia.registry import NoParams
from raymia.signals import Signals

# Privacy Meter's signal_min and signal_max: the bounds it adds to every point's reference losses.
LOSS_MIN, LOSS_MAX = 0.0, 1000.0


def out_loss_grid(losses: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per point and query, the sorted values the CDF goes through: float64 [Q, P, S + 2] (0, the OUT
    losses, 1000, then +inf padding) from losses [M, Q, P] and out bool [M, P], and n [P], each point's
    number of OUT losses."""
    clipped = np.clip(losses, LOSS_MIN, LOSS_MAX)
    rows = np.flatnonzero(out.any(axis=1))  # only models that are OUT somewhere take a column
    vals = np.where(out[rows][:, None, :], clipped[rows], np.inf).transpose(1, 2, 0)  # [Q, P, S]
    q, p = vals.shape[:2]
    bounds = np.broadcast_to(np.array([LOSS_MIN, LOSS_MAX]), (q, p, 2))
    grid = np.sort(np.concatenate([bounds, vals], axis=2), axis=2)
    return grid, out.sum(axis=0)


def out_cdf(x: np.ndarray, grid: np.ndarray, n: np.ndarray) -> np.ndarray:
    """F(x) [Q, P] for the target's losses x [Q, P]: with e the point's values (0, sorted OUT losses,
    1000) and j the number of them below x, F = (j - 1 + (x - e[j-1]) / (e[j] - e[j-1])) / (n + 1)."""
    x = np.clip(x, LOSS_MIN, LOSS_MAX)
    j = (grid < x[..., None]).sum(axis=2)  # e[j-1] < x <= e[j]; +inf padding is never below x
    inside = j > 0  # x = 0: level 0
    jj = np.maximum(j, 1)
    lo = np.take_along_axis(grid, (jj - 1)[..., None], axis=2)[..., 0]
    hi = np.take_along_axis(grid, jj[..., None], axis=2)[..., 0]
    frac = np.where(inside, (x - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    return np.where(inside, (jj - 1 + frac) / (n + 1), 0.0)


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
    losses = signals.derived("cross-entropy", lambda: cross_entropy(signals.logits, signals.labels))  # [M, Q, P]
    grid, n = signals.derived(("reference grid", shadow.tobytes()),
                              lambda: out_loss_grid(losses, shadow[:, None] & ~signals.keep))
    return -out_cdf(losses[target], grid, n).mean(axis=0)
