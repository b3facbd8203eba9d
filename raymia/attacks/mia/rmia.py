"""RMIA, the robust membership inference attack of Zarifzadeh et al. (2024), online and offline.

RMIA compares how much the target model raises the probability of x, relative to reference models, with how
much it raises that of population points z that no model trained on. Conventions, fixed here after the
authors' code (research/2023_rmia/main.py in github.com/privacytrustlab/ml_privacy_meter, "the paper's code")
and Privacy Meter's maintained implementation (modules/mia/attacks/rmia.py and attacks.py there):

- Pr(x|theta) = p_y, the softmax probability of the true label, logits divided by `temperature` first.
  Defaults: temperature 2, the paper's code's (its README and every RMIA config; Privacy Meter's library
  queries at temperature 1), and gamma 1, Privacy Meter's (run_rmia counts Ratio_x / Ratio_z > 1; the paper's
  code defaults to 2, the paper reports 1 to 2). Measured on digits with 32 models (docs/validity.md), gamma 2
  loses 0.01 to 0.04 AUC against gamma 1 and temperature 1 loses 0.003 to 0.03 against 2: models that are
  not very confident rarely raise a probability ratio twofold, so gamma 2 leaves most x with a score near 0.
- Reference models are the target's shadows, `Signals.shadow_mask(target)` (the target's own keep row is
  never read here). Online: Pr(x) = mean of Pr(x|ref) over all shadows, IN and OUT. Offline: Pr_OUT(x) =
  mean over the shadows that did not train on x, and Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2, the paper's
  linear approximation of the missing IN half. A point with no OUT shadow (none with a paired plan) takes the
  mean Pr over all OUT (shadow, point) pairs of the same query. Means are plain means (the paper's code
  takes a 20%-trimmed mean, Privacy Meter a plain one).
- Population points z are OUT for every model: online Pr(z) = mean over all shadows; offline the same mean
  with the same a-correction (both reference codes correct z as x).
- Query augmentations are combined per query, as the paper's code does: every query k has its own ratios
  Ratio_x,k = Pr_k(x|target) / Pr_k(x) and Ratio_z,k, and its own pairwise test Ratio_x,k / Ratio_z,k > gamma;
  `combine: vote` (default, the paper's code) takes the majority of the Q tests for every (x, z) pair (a tie
  is not a win: torch.mode, which that code uses, returns the smaller value), then Score(x) = fraction of z
  won. `combine: mean` averages the Q per-query fractions instead (a soft vote, O((P + Z) log Z) per query).
  Probabilities of differently shifted inputs are never averaged before a ratio.
- Offline `a`: a number in [0, 1], or "auto" (default). Auto tunes a as Privacy Meter does (tune_offline_a:
  the grid 0, 0.1, ..., 1, keeping the first a of highest AUC when a reference model is attacked), with one
  reference model taken among the target's shadows, never the target: the first shadow r is attacked
  offline, with the same gamma, temperature and combination, by the other shadows except any whose keep row
  is the complement of r's (r's pair, left out as the target's pair is), and its AUC against keep[r] scores
  each a. Privacy Meter attacks the target's paired model instead, whose membership is the complement of the
  target's; raymia reads no row of the target. Auto is the default because the best a depends on the data
  and the model (the paper's 0.33 is CIFAR-10's) and a wrong one costs up to 0.06 AUC (digits, 32 models:
  a = 1 against the best a; docs/validity.md); a number skips the 11 extra attacks on the shadow.
- Score(x) counts z with Ratio_x / Ratio_z strictly above gamma, as both reference codes do.

All probabilities are handled as float64 logs (log p_y = -cross-entropy of the tempered logits, averages as
log-mean-exp), so confident outputs whose p_y underflows keep finite ratios. Probabilities within float64
epsilon of 1 keep theirs too: the means are max + log1p(mean(expm1(. - max))) and the a-correction
log1p((1 + a) / 2 * expm1(log Pr_OUT)), both exact rewrites that do not round 1 - p away (the paper's code,
in float32 probabilities, has every such ratio 1). With one query (or
`combine: mean`) the pairwise count sorts the log Ratio_z once and binary-searches every x: O((P + Z) log Z)
time and O(P + Z) memory. The vote over two queries (the default identity and hflip) counts the z below
both thresholds by sorted blocks: O(P sqrt(Z) + Z^1.5 log Z) time (`count_below_both`). Over three or more it
compares every (x, z) pair in blocks of x: O(Q P Z) time, O(Z * block) memory.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from raymia.attacks.mia import cross_entropy, per_model
from raymia.attacks.registry import ATTACKS
from raymia.metrics import roc_auc
from raymia.registry import ActsWhen, Params
from raymia.signals import Signals

log = logging.getLogger(__name__)

# Privacy Meter's grid for the offline a (np.arange(0, 1.1, 0.1)).
A_GRID = tuple(round(0.1 * i, 1) for i in range(11))
_BLOCK_ELEMENTS = 1 << 22  # (x, z) pairs compared at once by the vote


class RmiaOnlineParams(Params):
    gamma: float = Field(
        1.0,
        gt=0,
        description="Pairwise threshold: z counts when Ratio_x / Ratio_z > gamma (Privacy Meter: 1; the "
        "paper's code: 2).",
    )
    temperature: float = Field(
        2.0,
        gt=0,
        description="Softmax temperature applied to the logits (paper's code: 2; Privacy Meter: 1).",
    )
    combine: Literal["vote", "mean"] = Field(
        "vote",
        description="How query augmentations combine, each with its own ratios: vote (majority of the "
        "per-query tests for every (x, z) pair, the paper's code) or mean (mean of the per-query scores).",
    )
    num_z: int | None = Field(
        None, ge=1, description="Use a random subset of this many population points z (None: all of them)."
    )
    seed: int = Field(0, ge=0, description="Seed of the z subset drawn when num_z is set.")

    acts_when = {"seed": ActsWhen("num_z", given=True)}


class RmiaOfflineParams(RmiaOnlineParams):
    a: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
        "auto",
        description="Offline correction Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2; auto: the grid value "
        "0, 0.1, ..., 1 of best AUC on a shadow attacked by the other shadows (Privacy Meter's tuning).",
    )


def _log_mean_exp(x: np.ndarray, axis: int) -> np.ndarray:
    """log(mean(exp(x), axis)) for float64 x with finite entries, as max + log1p(mean(expm1(x - max))):
    accurate also for probabilities within float64 epsilon of 1 (log p about -1e-20), where exp(x - max)
    rounds to 1 and the plain form returns the max."""
    mx = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(mx, axis=axis) + np.log1p(np.mean(np.expm1(x - mx), axis=axis))


def log_prob_true_label(logits: np.ndarray, labels: np.ndarray, temperature: float = 2.0) -> np.ndarray:
    """log Pr(x|theta) float64 [M, Q, P]: log softmax(logits / T)_y for every model and query.

    logits [M, Q, P, C], labels [P]. One model is widened to float64 at a time.
    """
    return per_model(lambda z, y: -cross_entropy(np.asarray(z, dtype=np.float64) / temperature, y), logits, labels)


def _offline_correction(log_pr_out: np.ndarray, a: float) -> np.ndarray:
    """log(((1 + a) * Pr_OUT + (1 - a)) / 2) from log Pr_OUT, as log1p((1 + a) / 2 * expm1(log Pr_OUT)): the
    same number, without losing Pr_OUT's distance from 1 when it is below float64's resolution next to 1."""
    if a >= 1.0:
        return log_pr_out
    return np.log1p((1.0 + a) / 2.0 * np.expm1(log_pr_out))


def reference_logs(
    logp: np.ndarray, keep: np.ndarray, logp_pop: np.ndarray, shadows: np.ndarray, online: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(log Pr(x) or log Pr_OUT(x) [Q, P], log Pr(z) [Q, Z]) over the shadows, before any a-correction."""
    ref, ref_pop = logp[shadows], logp_pop[shadows]  # [S, Q, P], [S, Q, Z]
    log_pr_z = _log_mean_exp(ref_pop, axis=0)
    if online:
        return _log_mean_exp(ref, axis=0), log_pr_z
    out = ~keep[shadows]  # [S, P]
    if not out.any():
        raise ValueError("offline RMIA needs OUT references: every shadow trained on every audited point")
    n_out = out.sum(axis=0)  # [P]
    masked = np.where(out[:, None, :], ref, -np.inf)  # [S, Q, P]
    mx = np.max(masked, axis=0)  # per point and query max over OUT shadows, -inf where there is none
    mx = np.where(n_out > 0, mx, 0.0)
    # log mean over OUT shadows as in _log_mean_exp (points without OUT shadow: 0, replaced below)
    per_point = mx + np.log1p(np.sum(np.where(out[:, None, :], np.expm1(masked - mx), 0.0), axis=0)
                              / np.maximum(n_out, 1))
    # mean Pr over all OUT (shadow, point) pairs, per query
    fallback = _log_mean_exp(np.moveaxis(ref, 1, 0)[:, out], axis=1)[:, None]  # [Q, 1]
    return np.where(n_out > 0, per_point, fallback), log_pr_z


def rmia_log_ratios(
    logp: np.ndarray,
    keep: np.ndarray,
    logp_pop: np.ndarray,
    target: int,
    online: bool,
    a: float = 0.3,
    shadow: np.ndarray | None = None,
    reference: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(log Ratio_x, log Ratio_z) per query from log Pr(.|model) of audited points and of population z.

    logp [M, Q, P] and logp_pop [M, Q, Z] give [Q, P] and [Q, Z]; logp [M, P] and logp_pop [M, Z] (one
    query) give [P] and [Z]. keep [M, P] selects the OUT shadows in the offline attack; its target row is
    never read. `shadow` (bool [M]): the reference models (default: every model but the target).
    `reference`: their `reference_logs`, when already computed (a target's paired model has the same).
    """
    logp = np.asarray(logp, dtype=np.float64)
    logp_pop = np.asarray(logp_pop, dtype=np.float64)
    keep = np.asarray(keep, dtype=np.bool_)
    single = logp.ndim == 2
    if single:
        logp, logp_pop = logp[:, None], (logp_pop[:, None] if logp_pop.ndim == 2 else logp_pop)
    m = logp.shape[0]
    if (logp.ndim != 3 or logp_pop.ndim != 3 or logp_pop.shape[:2] != logp.shape[:2]
            or keep.shape != (m, logp.shape[2])):
        raise ValueError(
            f"expected logp [M, Q, P], keep [M, P] and logp_pop [M, Q, Z], got {logp.shape}, {keep.shape} "
            f"and {logp_pop.shape}"
        )
    if not 0 <= target < m:
        raise ValueError(f"target {target} out of range [0, {m})")
    if logp_pop.shape[2] == 0:
        raise ValueError("RMIA needs at least one population point z")
    shadows = np.arange(m) != target if shadow is None else np.asarray(shadow, dtype=bool)
    if not shadows.any():
        raise ValueError("RMIA needs at least one reference model besides the target")
    log_pr_x, log_pr_z = reference_logs(logp, keep, logp_pop, shadows, online) if reference is None else reference
    if not online:
        log_pr_x, log_pr_z = _offline_correction(log_pr_x, a), _offline_correction(log_pr_z, a)
    lx, lz = logp[target] - log_pr_x, logp_pop[target] - log_pr_z
    return (lx[0], lz[0]) if single else (lx, lz)


def pairwise_fraction(log_ratio_x: np.ndarray, log_ratio_z: np.ndarray, gamma: float) -> np.ndarray:
    """Fraction of z with Ratio_x / Ratio_z > gamma for every x, i.e. log Ratio_z < log Ratio_x - log gamma.

    Sorts log Ratio_z once and binary-searches every x: O(P + Z) memory.
    """
    lz = np.sort(np.asarray(log_ratio_z, dtype=np.float64))
    if lz.size == 0:
        raise ValueError("RMIA needs at least one population point z")
    lx = np.asarray(log_ratio_x, dtype=np.float64)
    counts = np.searchsorted(lz, lx - math.log(gamma), side="left")
    return counts / lz.size


def combine_queries(
    log_ratio_x: np.ndarray, log_ratio_z: np.ndarray, gamma: float, combine: str = "vote"
) -> np.ndarray:
    """Score(x) [P] from per-query log Ratio_x [Q, P] and log Ratio_z [Q, Z].

    vote: fraction of z for which more than half of the Q queries pass Ratio_x,k / Ratio_z,k > gamma (a tie
    loses); mean: mean over queries of the per-query fraction. One query: both are pairwise_fraction.
    """
    lx = np.asarray(log_ratio_x, dtype=np.float64)
    lz = np.asarray(log_ratio_z, dtype=np.float64)
    if lx.ndim != 2 or lz.ndim != 2 or lx.shape[0] != lz.shape[0]:
        raise ValueError(f"expected log ratios [Q, P] and [Q, Z], got {lx.shape} and {lz.shape}")
    q, p = lx.shape
    if lz.shape[1] == 0:
        raise ValueError("RMIA needs at least one population point z")
    if combine == "mean" or q == 1:
        return np.mean([pairwise_fraction(lx[k], lz[k], gamma) for k in range(q)], axis=0)
    if combine != "vote":
        raise ValueError(f"unknown combine {combine!r}; accepted: vote, mean")
    thr = lx - math.log(gamma)  # [Q, P]: query k passes for z when lz[k, z] < thr[k, x]
    z = lz.shape[1]
    if q == 2:  # the default queries (identity, hflip): a z wins when both pass, a 2-D dominance count
        return count_below_both(lz[0], lz[1], thr[0], thr[1]) / z
    block = max(1, _BLOCK_ELEMENTS // z)
    need = q // 2 + 1  # strict majority
    out = np.empty(p, dtype=np.float64)
    for s in range(0, p, block):
        e = min(p, s + block)
        wins = np.zeros((e - s, z), dtype=np.int16)
        for k in range(q):
            wins += lz[k][None, :] < thr[k, s:e, None]
        out[s:e] = np.count_nonzero(wins >= need, axis=1) / z
    return out


def count_below_both(a0: np.ndarray, a1: np.ndarray, t0: np.ndarray, t1: np.ndarray) -> np.ndarray:
    """For every x, the number of z with a0[z] < t0[x] and a1[z] < t1[x] (int64 [P]), NaN never counting.

    Sorted by a0, the z below t0[x] are a prefix; the z below t1[x] in it are counted by binary search in
    the sorted a1 of the prefix's whole blocks (one sorted copy per block boundary, blocks of about sqrt(Z))
    plus a direct comparison with the rest of the prefix: O(P sqrt(Z) + Z^1.5 log Z) time instead of the
    pairwise O(P Z), and memory for one sorted prefix and one chunk of x at a time.
    """
    a0, a1 = np.asarray(a0, dtype=np.float64), np.asarray(a1, dtype=np.float64)
    t0, t1 = np.asarray(t0, dtype=np.float64), np.asarray(t1, dtype=np.float64)
    valid = ~(np.isnan(a0) | np.isnan(a1))
    a0, a1 = a0[valid], a1[valid]
    order = np.argsort(a0, kind="stable")
    s0, s1 = a0[order], a1[order]
    z = s0.size
    counts = np.zeros(t0.size, dtype=np.int64)
    if z == 0:
        return counts
    n0 = np.searchsorted(s0, t0, side="left")  # the prefix of z below t0 (NaN thresholds: fixed below)
    block = max(1, math.isqrt(z))
    full = n0 // block  # whole blocks in each x's prefix
    by_full = np.argsort(full, kind="stable")
    starts = np.searchsorted(full[by_full], np.arange(z // block + 2), side="left")
    prefix = np.empty(0, dtype=np.float64)
    for k in range(z // block + 1):
        if k:
            # two sorted runs: the stable sort (timsort) merges them in linear time; quicksort re-sorts
            prefix = np.sort(np.concatenate([prefix, np.sort(s1[(k - 1) * block:k * block])]), kind="stable")
        rows = by_full[starts[k]:starts[k + 1]]
        counts[rows] = np.searchsorted(prefix, t1[rows], side="left")
    offsets = np.arange(block)
    step = max(1, _BLOCK_ELEMENTS // block)
    for s in range(0, t0.size, step):  # the partial block after each prefix's whole ones
        e = min(t0.size, s + step)
        idx = full[s:e, None] * block + offsets
        inside = offsets < (n0[s:e] - full[s:e] * block)[:, None]
        counts[s:e] += np.count_nonzero(inside & (s1[np.minimum(idx, z - 1)] < t1[s:e, None]), axis=1)
    counts[np.isnan(t0) | np.isnan(t1)] = 0
    return counts


def tune_offline_a(
    logp: np.ndarray,
    keep: np.ndarray,
    logp_pop: np.ndarray,
    shadow: np.ndarray,
    gamma: float,
    combine: str = "vote",
    grid: tuple[float, ...] = A_GRID,
) -> tuple[float, dict[float, float]]:
    """(a, {a: AUC}): the first grid value of highest AUC when the first shadow r is attacked offline by
    the other shadows, those whose keep row is the complement of r's left out. Reads shadow rows only.

    logp [M, Q, P], keep [M, P], logp_pop [M, Q, Z], shadow bool [M] (the target is not in it).
    """
    keep = np.asarray(keep, dtype=np.bool_)
    shadow = np.asarray(shadow, dtype=bool)
    idx = np.flatnonzero(shadow)
    if idx.size == 0:
        raise ValueError("RMIA needs at least one reference model besides the target")
    r = int(idx[0])
    refs = shadow.copy()
    refs[r] = False
    refs &= ~np.all(keep == ~keep[r], axis=1)  # r's paired model, if any
    member = keep[r]
    if not refs.any() or member.all() or not member.any() or not (~keep[refs]).any():
        raise ValueError(
            f"rmia_offline a='auto' attacks shadow model {r} with the other shadows (its paired model left "
            "out) and finds none to attack it with, or no member and non-member of it: set a to a number "
            "in [0, 1], or use more models (plan.num_models >= 6)"
        )
    log_pr_out_x, log_pr_out_z = reference_logs(logp, keep, logp_pop, refs, online=False)
    aucs = {}
    for a in grid:
        lx = logp[r] - _offline_correction(log_pr_out_x, a)
        lz = logp_pop[r] - _offline_correction(log_pr_out_z, a)
        aucs[a] = roc_auc(combine_queries(lx, lz, gamma, combine), member)
    best = grid[0]
    for a in grid[1:]:  # strict: the first a of highest AUC, as Privacy Meter keeps it
        if aucs[a] > aucs[best]:
            best = a
    log.debug("rmia_offline: a = %s tuned on shadow %d (AUC %.4f)", best, r, aucs[best])
    return best, aucs


def _rmia(signals: Signals, target: int, params: RmiaOnlineParams, online: bool) -> np.ndarray:
    shadow = signals.shadow_mask(target)
    if signals.pop_logits is None or signals.pop_labels is None:
        raise ValueError(
            "RMIA needs population points z that no model trained on (signals.pop_logits is None)"
        )
    z_total = signals.pop_logits.shape[2]
    if params.num_z is not None and params.num_z > z_total:
        raise ValueError(f"num_z={params.num_z} exceeds the {z_total} population points in the signals")
    subset = (params.num_z, params.seed) if params.num_z is not None and params.num_z < z_total else None

    def pop_log_p() -> np.ndarray:
        pop_logits, pop_labels = signals.pop_logits, signals.pop_labels
        if subset is not None:
            idx = np.sort(np.random.default_rng(params.seed).choice(z_total, size=params.num_z, replace=False))
            pop_logits, pop_labels = pop_logits[:, :, idx], pop_labels[idx]
        return log_prob_true_label(pop_logits, pop_labels, params.temperature)

    t = params.temperature
    logp = signals.derived(("rmia log p_y", t), lambda: log_prob_true_label(signals.logits, signals.labels, t))
    logp_pop = signals.derived(("rmia log p_y of z", t, subset), pop_log_p)
    a = 0.0
    if isinstance(params, RmiaOfflineParams):
        a = params.a
        if a == "auto":  # tuned on a shadow: the same a for every target with the same shadows (a pair)
            # tuned on the points attacks may fit on (all of them unless OOD points were appended: no copy)
            fit = slice(None) if signals.fit_mask is None else signals.fit_index
            key = ("rmia a", t, subset, params.gamma, params.combine, shadow.tobytes())
            a = float(signals.derived(key, lambda: np.array(tune_offline_a(
                logp[:, :, fit], signals.keep[:, fit], logp_pop, shadow, params.gamma, params.combine)[0])))
    reference = signals.derived(("rmia reference", t, subset, online, shadow.tobytes()),
                                lambda: reference_logs(logp, signals.keep, logp_pop, shadow, online))
    lx, lz = rmia_log_ratios(logp, signals.keep, logp_pop, target, online, a, shadow, reference)
    return combine_queries(lx, lz, params.gamma, params.combine)


@ATTACKS.register(
    "rmia_online",
    RmiaOnlineParams,
    doc="RMIA online (Zarifzadeh et al. 2024): pairwise likelihood ratio vs population z, IN+OUT references.",
)
def rmia_online(signals: Signals, target: int, params: RmiaOnlineParams) -> np.ndarray:
    """Fraction of population points z with Ratio_x / Ratio_z > gamma (per-query vote), Pr(x) over all
    shadows."""
    return _rmia(signals, target, params, online=True)


def check_offline_plan(params: RmiaOfflineParams, num_models: int, own_target: bool) -> None:
    """Before training: a='auto' tunes a on a shadow attacked by the shadows outside its pair, which a
    leave-one-out bank of 4 models (a target's 2 shadows are one pair) does not have."""
    shadows = num_models if own_target else num_models - 2
    if params.a == "auto" and shadows - 2 < 1:
        need = 4 if own_target else 6
        raise ValueError(f"a='auto' tunes a on a shadow model with the shadows outside its pair, and {num_models} "
                         f"models leave none: set a to a number in [0, 1], or use plan.num_models >= {need}")


@ATTACKS.register(
    "rmia_offline",
    RmiaOfflineParams,
    doc="RMIA offline (Zarifzadeh et al. 2024): pairwise likelihood ratio vs population z, OUT references.",
)
def rmia_offline(signals: Signals, target: int, params: RmiaOfflineParams) -> np.ndarray:
    """Fraction of z with Ratio_x / Ratio_z > gamma (per-query vote), with
    Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2, a tuned on a shadow by default."""
    return _rmia(signals, target, params, online=False)


rmia_offline.check_plan = check_offline_plan  # type: ignore[attr-defined]  # resolve.check_names
