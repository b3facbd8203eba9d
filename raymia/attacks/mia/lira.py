"""LiRA, the likelihood-ratio attack of Carlini et al. (2022), online and offline.

For every audited point and query augmentation, the logit-scaled confidence phi = z_y - logsumexp_{j!=y} z_j
of the shadow models is modelled as Gaussian, separately over the shadows that trained on the point (IN) and
those that did not (OUT). Conventions, fixed here so results are reproducible:

- Means are sample means and standard deviations use ddof=0 (the reference code uses np.std, ddof=0; it
  uses the median for the mean, here the mean is used). Every std is floored at `min_std`.
- fixed_variance: one std per side and per query, pooled over all points: the root mean square of every IN
  (resp. OUT) phi minus its own point's mean. Better with few shadows, where per-point stds are noisy.
- Online score = mean over queries of log N(phi_t; mu_in, s_in) - log N(phi_t; mu_out, s_out).
- Offline score = mean over queries of log Phi((phi_t - mu_out) / s_out), the log CDF of the OUT Gaussian
  (the paper's one-sided test 1 - Pr[Z > phi_t], Z ~ N(mu_out, s_out^2)): large when the target's phi lies
  above what models that never saw the point produce.
- A point with no OUT shadow takes the OUT mean and the pooled OUT std over all points (per query). In the
  online attack a point with no IN shadow gets its offline score instead. Both cases are rare with the
  balanced keep matrix the bank should use (each point IN for half the models).

Everything is vectorised over points: per-point statistics are weighted sums over the model axis, and the
largest temporary is one array the size of phi [M, Q, P].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field
from scipy.special import log_ndtr

from raymia.attacks.mia import logit_scaled_confidence
from raymia.attacks.registry import ATTACKS
from raymia.registry import Params
from raymia.signals import Signals

# The LiRA paper fits per-example variances only with many shadows; below this count it uses a global one.
AUTO_FIXED_VARIANCE_BELOW = 64


class LiraParams(Params):
    fixed_variance: bool | None = Field(
        None,
        description="Use one std per side and query, pooled over all points, instead of a per-point std "
        "(better with few shadow models). None: pooled when the bank has fewer than "
        f"{AUTO_FIXED_VARIANCE_BELOW} shadows.",
    )
    min_std: float = Field(
        1e-6, gt=0, description="Floor on every fitted standard deviation (guards against zero variance)."
    )


@dataclass(frozen=True)
class _Side:
    """Gaussian fit of one side (IN or OUT) for every query and point."""

    mean: np.ndarray  # float64 [Q, P]
    std: np.ndarray  # float64 [Q, P]
    present: np.ndarray  # bool [P]: the point has at least one shadow on this side
    total: int  # number of (shadow, point) pairs on this side


def _fit_side(phi: np.ndarray, w: np.ndarray, fixed_variance: bool, min_std: float) -> _Side:
    """Weighted per-point mean and ddof=0 std of phi [M, Q, P] over models with weight w [M, P] in {0, 1}.

    Points without any model on this side get the mean over all points' observations and the pooled std.
    """
    n = w.sum(axis=0)  # [P]
    present = n > 0
    total = int(n.sum())
    q = phi.shape[1]
    n_safe = np.maximum(n, 1.0)
    sums = np.einsum("mqp,mp->qp", phi, w)
    mean = np.where(present, sums / n_safe, 0.0)
    dev = phi - mean[None]
    np.square(dev, out=dev)
    ss = np.einsum("mqp,mp->qp", dev, w)  # sum of squared deviations from each point's own mean
    del dev
    if total > 0:
        pooled = np.sqrt(ss.sum(axis=1) / total)[:, None]  # [Q, 1]
        global_mean = (sums.sum(axis=1) / total)[:, None]
    else:  # no observation at all on this side: callers must not use these values
        pooled = np.ones((q, 1))
        global_mean = np.zeros((q, 1))
    if fixed_variance:
        std = np.broadcast_to(pooled, mean.shape)
    else:
        std = np.where(present, np.sqrt(ss / n_safe), pooled)
    mean = np.where(present, mean, global_mean)
    return _Side(mean=mean, std=np.maximum(std, min_std), present=present, total=total)


def _log_normal(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """log N(x; mean, std) without the -log(2 pi)/2 constant (it cancels in the likelihood ratio)."""
    return -0.5 * np.square((x - mean) / std) - np.log(std)


def lira_from_phi(
    phi: np.ndarray,
    keep: np.ndarray,
    target: int,
    online: bool,
    fixed_variance: bool = False,
    min_std: float = 1e-6,
    shadow: np.ndarray | None = None,
) -> np.ndarray:
    """LiRA scores float64 [P] from precomputed phi [M, Q, P] (float64) and keep [M, P]; see module doc.
    `shadow` (bool [M]) selects the shadow models; default: every model but the target."""
    phi = np.asarray(phi, dtype=np.float64)
    keep = np.asarray(keep, dtype=np.bool_)
    m = phi.shape[0]
    if phi.ndim != 3 or keep.shape != (m, phi.shape[2]):
        raise ValueError(f"expected phi [M, Q, P] and keep [M, P], got {phi.shape} and {keep.shape}")
    if not 0 <= target < m:
        raise ValueError(f"target {target} out of range [0, {m})")
    if m < 2:
        raise ValueError("LiRA needs at least one shadow model besides the target")
    shadow = (np.arange(m) != target if shadow is None else np.asarray(shadow, dtype=bool))[:, None]
    out = _fit_side(phi, (shadow & ~keep).astype(np.float64), fixed_variance, min_std)
    if out.total == 0:
        raise ValueError("LiRA needs OUT shadows: every shadow model trained on every audited point")
    x = phi[target]  # [Q, P]
    offline = log_ndtr((x - out.mean) / out.std)
    if not online:
        return offline.mean(axis=0)
    inn = _fit_side(phi, (shadow & keep).astype(np.float64), fixed_variance, min_std)
    ratio = _log_normal(x, inn.mean, inn.std) - _log_normal(x, out.mean, out.std)
    return np.where(inn.present[None], ratio, offline).mean(axis=0)


def _lira(signals: Signals, target: int, params: LiraParams, online: bool) -> np.ndarray:
    shadow = signals.shadow_mask(target)
    phi = logit_scaled_confidence(signals.logits, signals.labels)  # float64 [M, Q, P]
    fixed = params.fixed_variance
    if fixed is None:
        fixed = int(shadow.sum()) < AUTO_FIXED_VARIANCE_BELOW
    return lira_from_phi(phi, signals.keep, target, online, fixed, params.min_std, shadow)


@ATTACKS.register(
    "lira_online",
    LiraParams,
    doc="LiRA online (Carlini et al. 2022): Gaussian likelihood ratio IN vs OUT shadows.",
)
def lira_online(signals: Signals, target: int, params: LiraParams) -> np.ndarray:
    """Mean over queries of log N(phi_t; IN fit) - log N(phi_t; OUT fit)."""
    return _lira(signals, target, params, online=True)


@ATTACKS.register(
    "lira_offline",
    LiraParams,
    doc="LiRA offline (Carlini et al. 2022): one-sided test against OUT shadows only.",
)
def lira_offline(signals: Signals, target: int, params: LiraParams) -> np.ndarray:
    """Mean over queries of log Phi((phi_t - mu_out) / s_out)."""
    return _lira(signals, target, params, online=False)
