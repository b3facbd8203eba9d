"""LiRA, the likelihood-ratio attack of Carlini et al. (2022), online and offline.

For every audited point and query augmentation, the logit-scaled confidence phi = z_y - logsumexp_{j!=y} z_j
of the shadow models is modelled as Gaussian, separately over the shadows that trained on the point (IN) and
those that did not (OUT). Compared with the reference code (tensorflow/privacy research/mi_lira_2021/plot.py,
generate_ours and generate_ours_offline), with its conventions fixed here so results are reproducible:

- Center: `center: mean` (default) takes the per-point sample mean over the shadows of a side, the paper's
  Algorithm 1 (mu = mean); `median` the per-point median, as the reference code does (np.median(dat_in, 1)).
  The mean measured 0.005 to 0.01 AUC stronger online and within 0.003 offline (digits, 15 shadows a side).
  Standard deviations are np.std's: ddof=0, around each point's mean whatever the center. Every std is
  floored at `min_std` (the reference adds 1e-30).
- `variance`, how the std of a side is estimated:
  - per_point: each point's own std over its shadows of that side (reference: np.std(dat_in, 1)).
  - global: one std per side over every (shadow, point, query) observation of that side, around their
    common mean: np.std of the whole IN (resp. OUT) array, the reference's fix_variance=True. Its online
    code uses the IN std for both sides (std_out = np.std(dat_in)); raymia uses each side's own, as the
    reference's offline code does (std_out = np.std(dat_out)).
  - pooled: one std per side and query from within-point deviations, the root mean square of every IN
    (resp. OUT) phi minus its own point's mean. It leaves out how far the points' centers spread, which
    the global std counts as noise.
  - None (default): pooled below 64 shadows, per_point from 64 on, the LiRA paper's advice (fit
    per-example variances only with many shadows). Pooled rather than global: with several queries the
    global std mixes the queries' levels and the spread of the points' centers, and online LiRA lost 0.02
    to 0.03 AUC with it (digits, 30 shadows, identity + 1-pixel shift; the same as pooled with one query).
    The former `fixed_variance` (True: pooled, False: per_point, None: auto) is still accepted.
- Online score = mean over queries of log N(phi_t; mu_in, s_in) - log N(phi_t; mu_out, s_out) (the
  reference's score.mean(1)).
- Offline score = mean over queries of log Phi((phi_t - mu_out) / s_out), the log CDF of the OUT Gaussian
  (the paper's one-sided test 1 - Pr[Z > phi_t], Z ~ N(mu_out, s_out^2)): large when the target's phi lies
  above what models that never saw the point produce. The reference code scores -log N(phi_t; mu_out,
  s_out) instead, a two-sided test that also flags points the target fits worse than its OUT shadows
  (digits, 32 models, identity query: AUC 0.53 and 0.58 against 0.61 and 0.71 for the one-sided test).
- The reference truncates every point's IN and OUT shadows to the smallest count over all points (in_size,
  out_size) so that no point's fit depends on the target's membership; raymia's plans pair complementary
  models and `Signals.shadow_mask` leaves the target's pair out, which gives every point exactly (M-2)/2 IN
  and (M-2)/2 OUT shadows, so every shadow is used and no truncation is needed.
- A point with no OUT shadow takes the OUT center over all points and the side's fixed std (pooled for
  per_point), per query. In the online attack a point with no IN shadow gets its offline score instead.
  Neither happens with a paired plan.
- A side with one shadow per point (a bank of 4 models) has no within-point spread: pooled takes the
  side's global std there, and per_point takes pooled for every point seen by one shadow. The reference
  (per_point) would divide by a zero std, and a pooled std of 0, floored, would saturate the offline scores
  (most points tied at the top: `test_one_shadow_per_side_falls_back_to_the_global_std`).

Everything is vectorised over points: per-point statistics are weighted sums (or a masked median) over the
model axis, and the largest temporaries are the size of phi [M, Q, P].
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator
from scipy.special import log_ndtr

from raymia.attacks.mia import logit_scaled_confidence
from raymia.attacks.registry import ATTACKS
from raymia.registry import Params
from raymia.signals import Signals

# The LiRA paper fits per-example variances only with many shadows; below this count it uses a fixed one.
AUTO_FIXED_VARIANCE_BELOW = 64

Variance = Literal["per_point", "pooled", "global"]
Center = Literal["median", "mean"]


class LiraParams(Params):
    variance: Variance | None = Field(
        None,
        description="Std of each side: per_point (each point's own), pooled (one per side and query from "
        "within-point deviations), global (np.std of every value of the side, the reference's fixed "
        "variance). "
        f"None: pooled below {AUTO_FIXED_VARIANCE_BELOW} shadows, per_point from then on.",
    )
    fixed_variance: bool | None = Field(
        None, description="Former name of variance: true = pooled, false = per_point (give one or the other)."
    )
    center: Center = Field(
        "mean",
        description="Per-point center of each side: mean (the paper's) or median (the reference code's).",
    )
    min_std: float = Field(
        1e-6, gt=0, description="Floor on every fitted standard deviation (guards against zero variance)."
    )

    @model_validator(mode="before")
    @classmethod
    def _fixed_variance(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("fixed_variance") is not None:
            if v.get("variance") is not None:
                raise ValueError("give variance or its former name fixed_variance, not both")
            fixed = v["fixed_variance"]
            if isinstance(fixed, bool):
                v = {**v, "variance": "pooled" if fixed else "per_point"}
        return v


@dataclass(frozen=True)
class _Side:
    """Gaussian fit of one side (IN or OUT) for every query and point."""

    mean: np.ndarray  # float64 [Q, P]
    std: np.ndarray  # float64 [Q, P]
    present: np.ndarray  # bool [P]: the point has at least one shadow on this side
    total: int  # number of (shadow, point) pairs on this side


def _masked_median(phi: np.ndarray, w: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per-point median [Q, P] of phi [M, Q, P] over the models with w [M, P] = 1 (0 where none)."""
    masked = np.where(w[:, None, :] > 0, phi, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: points without a model on this side
        med = np.nanmedian(masked, axis=0)
    return np.where(present, med, 0.0)


def _fit_side(
    phi: np.ndarray, w: np.ndarray, variance: str, min_std: float, center: str = "mean",
    fit: np.ndarray | None = None,
) -> _Side:
    """Per-point center and ddof=0 std of phi [M, Q, P] over models with weight w [M, P] in {0, 1}.

    Points without any model on this side get the center of all points' observations and the side's
    fixed std (pooled for per_point). The side-wide values (the pooled and global std, that center) come
    from the `fit` points only (bool [P]; default all): points outside are scored, never fitted on.
    """
    if variance not in ("per_point", "pooled", "global"):
        raise ValueError(f"unknown variance {variance!r}; accepted: per_point, pooled, global")
    cols = np.ones(w.shape[1], dtype=bool) if fit is None else np.asarray(fit, dtype=bool)
    wf = w * cols[None, :]  # the observations side-wide values are fitted on
    n = w.sum(axis=0)  # [P]
    present = n > 0
    total = int(wf.sum())
    q = phi.shape[1]
    n_safe = np.maximum(n, 1.0)
    sums = np.einsum("mqp,mp->qp", phi, w)
    mean = np.where(present, sums / n_safe, 0.0)
    dev = phi - mean[None]
    np.square(dev, out=dev)
    ss = np.einsum("mqp,mp->qp", dev, w)  # sum of squared deviations from each point's own mean (np.std)
    del dev
    mid = _masked_median(phi, w, present) if center == "median" else mean
    if total == 0:  # no observation at all on this side: callers must not use these values
        std = np.ones(mean.shape)
        return _Side(mean=mean, std=std, present=present, total=total)
    # With one observation per point (a side of one shadow: 4 models) there is no within-point spread to
    # pool: the pooled std would be 0 and every score saturate at the floor, so the side's global std
    # stands in for it (and for per_point's points seen once).
    spread = total > int((n * cols).astype(bool).sum())
    if variance == "global" or not spread:
        # np.std of every observation of this side (all points, shadows and queries) around their mean
        dev = phi - sums[:, cols].sum() / (total * q)
        np.square(dev, out=dev)
        glob = np.sqrt(np.einsum("mqp,mp->", dev, wf) / (total * q))
        del dev
    pooled = np.sqrt(ss[:, cols].sum(axis=1) / total)[:, None] if spread else np.full((q, 1), glob)  # [Q, 1]
    if variance == "pooled":
        std = np.broadcast_to(pooled, mean.shape)
    elif variance == "global":
        std = np.full(mean.shape, glob)
    else:
        std = np.where(n > 1, np.sqrt(ss / n_safe), pooled)
    if not present.all():  # the center of every observation of this side, per query
        if center == "median":
            flat = np.where(wf[:, None, :] > 0, phi, np.nan).transpose(1, 0, 2).reshape(q, -1)
            everywhere = np.nanmedian(flat, axis=1)[:, None]
        else:
            everywhere = (sums[:, cols].sum(axis=1) / total)[:, None]
        mid = np.where(present, mid, everywhere)
    return _Side(mean=mid, std=np.maximum(std, min_std), present=present, total=total)


def _log_normal(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """log N(x; mean, std) without the -log(2 pi)/2 constant (it cancels in the likelihood ratio)."""
    return -0.5 * np.square((x - mean) / std) - np.log(std)


def lira_sides(phi: np.ndarray, keep: np.ndarray, shadow: np.ndarray, online: bool, variance: str,
               min_std: float, center: str, fit: np.ndarray | None) -> tuple[_Side, _Side | None]:
    """The OUT and (online) IN Gaussians of every point over the shadows (bool [M]): what a target's score
    is read against, the same for a target and its paired model."""
    out = _fit_side(phi, (shadow[:, None] & ~keep).astype(np.float64), variance, min_std, center, fit)
    if out.total == 0:
        raise ValueError("LiRA needs OUT shadows: every shadow model trained on every audited point")
    inn = _fit_side(phi, (shadow[:, None] & keep).astype(np.float64), variance, min_std, center, fit) if online else None
    return out, inn


def lira_scores(x: np.ndarray, out: _Side, inn: _Side | None) -> np.ndarray:
    """Scores [P] of the target's phi x [Q, P]: online with an IN side, else offline."""
    offline = log_ndtr((x - out.mean) / out.std)
    if inn is None:
        return offline.mean(axis=0)
    ratio = _log_normal(x, inn.mean, inn.std) - _log_normal(x, out.mean, out.std)
    return np.where(inn.present[None], ratio, offline).mean(axis=0)


def _lira(signals: Signals, target: int, params: LiraParams, online: bool) -> np.ndarray:
    shadow = signals.shadow_mask(target)
    phi = signals.derived("phi", lambda: logit_scaled_confidence(signals.logits, signals.labels))  # float64 [M, Q, P]
    variance = params.variance
    if variance is None:
        variance = "pooled" if int(shadow.sum()) < AUTO_FIXED_VARIANCE_BELOW else "per_point"
    sides = signals.derived(("lira sides", online, variance, params.min_std, params.center, shadow.tobytes()),
                            lambda: lira_sides(phi, signals.keep, shadow, online, variance, params.min_std,
                                               params.center, signals.fit_mask))
    return lira_scores(phi[target], *sides)


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
