"""RMIA, the robust membership inference attack of Zarifzadeh et al. (2024), online and offline.

RMIA compares how much the target model raises the probability of x, relative to reference models, with how
much it raises that of population points z that no model trained on. Conventions, fixed here:

- Pr(x|theta) = p_y, the softmax probability of the true label, with logits divided by `temperature` first.
  The default 1.0 scores the outputs a querier sees; the authors' code uses a softening temperature of 2.
- With several query augmentations, Pr(x|theta) is the mean of p_y over the queries, taken before any ratio
  (the authors' convention: they average probabilities over augmentations).
- Reference models are the shadows of the target (every other bank model; the target's own keep row is
  never read). Online: Pr(x) = mean of Pr(x|ref) over all shadows, IN and OUT (the paper's online setting
  with balanced references). Offline: Pr_OUT(x) = mean over the shadows that did not train on x, and
  Pr(x) = ((1 + a) * Pr_OUT(x) + (1 - a)) / 2, the paper's linear approximation of the missing IN half.
  A point with no OUT shadow (rare with a balanced keep matrix) takes the mean Pr over all OUT
  (shadow, point) pairs.
- Population points z are OUT for every model: online Pr(z) = mean over all shadows; offline the same mean
  with the same a-correction.
- Ratio_x = Pr(x|target) / Pr(x), Ratio_z likewise; Score(x) = fraction of z with Ratio_x / Ratio_z >= gamma.
  The default gamma = 2 follows the authors' code (the paper reports gamma between 1 and 2).

All probabilities are handled as float64 logs (log p_y = -cross-entropy of the tempered logits, averages as
log-mean-exp), so confident outputs whose p_y underflows keep finite ratios. The pairwise count is computed
by sorting the log Ratio_z once and binary-searching log Ratio_x - log gamma: O((P + Z) log Z) time and
O(P + Z) memory instead of a [P, Z] matrix.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from raymia.attacks.mia import cross_entropy
from raymia.attacks.registry import ATTACKS
from raymia.registry import Params
from raymia.signals import Signals


class RmiaOnlineParams(Params):
    gamma: float = Field(
        2.0,
        gt=0,
        description="Pairwise threshold: z counts when Ratio_x / Ratio_z >= gamma (authors' code: 2).",
    )
    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature applied to the logits (authors' code: 2)."
    )
    num_z: int | None = Field(
        None, ge=1, description="Use a random subset of this many population points z (None: all of them)."
    )
    seed: int = Field(0, description="Seed of the z subset drawn when num_z is set.")


class RmiaOfflineParams(RmiaOnlineParams):
    a: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Offline correction Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2 (about 0.3 for CIFAR-10).",
    )


def _log_mean_exp(x: np.ndarray, axis: int) -> np.ndarray:
    """log(mean(exp(x), axis)) for float64 x with finite entries."""
    mx = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(mx, axis=axis) + np.log(np.mean(np.exp(x - mx), axis=axis))


def log_prob_true_label(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log Pr(x|theta) float64 [M, P]: log of the mean over queries of softmax(logits / T)_y.

    logits [M, Q, P, C], labels [P]. One model is widened to float64 at a time.
    """
    z = np.asarray(logits)
    out = np.empty((z.shape[0], z.shape[2]), dtype=np.float64)
    for m in range(z.shape[0]):
        logp = -cross_entropy(np.asarray(z[m], dtype=np.float64) / temperature, labels)  # [Q, P]
        out[m] = _log_mean_exp(logp, axis=0)
    return out


def _offline_correction(log_pr_out: np.ndarray, a: float) -> np.ndarray:
    """log(((1 + a) * Pr_OUT + (1 - a)) / 2) from log Pr_OUT."""
    if a >= 1.0:
        return log_pr_out
    return np.logaddexp(math.log((1.0 + a) / 2.0) + log_pr_out, math.log((1.0 - a) / 2.0))


def rmia_log_ratios(
    logp: np.ndarray,
    keep: np.ndarray,
    logp_pop: np.ndarray,
    target: int,
    online: bool,
    a: float = 0.3,
    shadow: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(log Ratio_x [P], log Ratio_z [Z]) from log Pr(.|model) of audited points [M, P] and of z [M, Z].

    keep [M, P] selects the OUT shadows in the offline attack; its target row is never read.
    """
    logp = np.asarray(logp, dtype=np.float64)
    logp_pop = np.asarray(logp_pop, dtype=np.float64)
    keep = np.asarray(keep, dtype=np.bool_)
    m = logp.shape[0]
    if logp.ndim != 2 or logp_pop.ndim != 2 or logp_pop.shape[0] != m or keep.shape != logp.shape:
        raise ValueError(
            f"expected logp [M, P], keep [M, P] and logp_pop [M, Z], got {logp.shape}, {keep.shape} and "
            f"{logp_pop.shape}"
        )
    if not 0 <= target < m:
        raise ValueError(f"target {target} out of range [0, {m})")
    if logp_pop.shape[1] == 0:
        raise ValueError("RMIA needs at least one population point z")
    shadows = np.arange(m) != target if shadow is None else np.asarray(shadow, dtype=bool)
    if not shadows.any():
        raise ValueError("RMIA needs at least one reference model besides the target")
    ref, ref_pop = logp[shadows], logp_pop[shadows]
    log_pr_z = _log_mean_exp(ref_pop, axis=0)
    if online:
        log_pr_x = _log_mean_exp(ref, axis=0)
    else:
        out = ~keep[shadows]  # [S, P]
        n_out = out.sum(axis=0)
        if not out.any():
            raise ValueError("offline RMIA needs OUT references: every shadow trained on every audited point")
        masked = np.where(out, ref, -np.inf)
        mx = np.max(masked, axis=0)  # per-point max over OUT shadows, -inf where there is none
        mx = np.where(n_out > 0, mx, 0.0)
        with np.errstate(divide="ignore"):  # log(0) for points without OUT shadow, replaced below
            per_point = mx + np.log(np.sum(np.exp(masked - mx), axis=0) / np.maximum(n_out, 1))
        fallback = _log_mean_exp(ref[out], axis=0)  # mean Pr over all OUT (shadow, point) pairs
        log_pr_x = _offline_correction(np.where(n_out > 0, per_point, fallback), a)
        log_pr_z = _offline_correction(log_pr_z, a)
    return logp[target] - log_pr_x, logp_pop[target] - log_pr_z


def pairwise_fraction(log_ratio_x: np.ndarray, log_ratio_z: np.ndarray, gamma: float) -> np.ndarray:
    """Fraction of z with Ratio_x / Ratio_z >= gamma for every x, i.e. log Ratio_z <= log Ratio_x - log gamma.

    Sorts log Ratio_z once and binary-searches every x: O(P + Z) memory.
    """
    lz = np.sort(np.asarray(log_ratio_z, dtype=np.float64))
    if lz.size == 0:
        raise ValueError("RMIA needs at least one population point z")
    lx = np.asarray(log_ratio_x, dtype=np.float64)
    counts = np.searchsorted(lz, lx - math.log(gamma), side="right")
    return counts / lz.size


def _rmia(signals: Signals, target: int, params: RmiaOnlineParams, online: bool) -> np.ndarray:
    shadow = signals.shadow_mask(target)
    if signals.pop_logits is None or signals.pop_labels is None:
        raise ValueError(
            "RMIA needs population points z that no model trained on (signals.pop_logits is None)"
        )
    pop_logits, pop_labels = signals.pop_logits, signals.pop_labels
    z_total = pop_logits.shape[2]
    if params.num_z is not None and params.num_z < z_total:
        idx = np.sort(np.random.default_rng(params.seed).choice(z_total, size=params.num_z, replace=False))
        pop_logits, pop_labels = pop_logits[:, :, idx], pop_labels[idx]
    elif params.num_z is not None and params.num_z > z_total:
        raise ValueError(f"num_z={params.num_z} exceeds the {z_total} population points in the signals")
    logp = log_prob_true_label(signals.logits, signals.labels, params.temperature)
    logp_pop = log_prob_true_label(pop_logits, pop_labels, params.temperature)
    a = params.a if isinstance(params, RmiaOfflineParams) else 0.0
    lx, lz = rmia_log_ratios(logp, signals.keep, logp_pop, target, online, a, shadow)
    return pairwise_fraction(lx, lz, params.gamma)


@ATTACKS.register(
    "rmia_online",
    RmiaOnlineParams,
    doc="RMIA online (Zarifzadeh et al. 2024): pairwise likelihood ratio vs population z, IN+OUT references.",
)
def rmia_online(signals: Signals, target: int, params: RmiaOnlineParams) -> np.ndarray:
    """Fraction of population points z with Ratio_x / Ratio_z >= gamma, Pr(x) over all shadows."""
    return _rmia(signals, target, params, online=True)


@ATTACKS.register(
    "rmia_offline",
    RmiaOfflineParams,
    doc="RMIA offline (Zarifzadeh et al. 2024): pairwise likelihood ratio vs population z, OUT references.",
)
def rmia_offline(signals: Signals, target: int, params: RmiaOfflineParams) -> np.ndarray:
    """Fraction of z with Ratio_x / Ratio_z >= gamma, Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2."""
    return _rmia(signals, target, params, online=False)
