"""Threshold attacks: one statistic of the target's output per point, compared to a threshold.

Statistics (float64, from logits, one query; higher = more member-like):

- loss (Yeom et al.):            -CE(p, y) = log p_y
- confidence:                    p_y
- max_confidence:                max_j p_j (no label: Hintersdorf et al.'s threshold attack, Salem et al.'s
  label-free baseline)
- entropy:                       -H(p) = sum_j p_j log p_j
- modified_entropy (Song & Mittal): -Mentr, Mentr = -(1 - p_y) log p_y - sum_{j != y} p_j log(1 - p_j), with
  the arguments of every log clipped to [1e-30, 1] as in the authors' code
- correctness:                   1 if argmax_j z_j == y else 0 (ties go to the lowest class index)

Calibration on the shadow models: the raw statistic of every shadow on every audited point, labelled by the
shadow's (known) membership, gives IN and OUT samples. The threshold tau is the one maximising TPR - FPR
(balanced accuracy) of the rule `statistic > tau => member` on those samples, as in Hintersdorf et al.
("To Trust or Not To Trust Prediction Scores"); candidates are the observed values and ties go to the
smallest tau. `global` fits one tau; `per_class` fits one per true class, and a class whose shadow samples
lack IN or OUT observations falls back to the global tau. If the shadows hold no IN or no OUT observation at
all, no threshold can be fitted and tau = 0 (the raw statistic is returned).

The score is statistic - tau[class of the point], so 0 is the attack's own decision threshold (score > 0 =>
member). With global calibration the ranking, hence the ROC, is the raw statistic's: subtracting a constant
never reorders values (it can only merge values closer than float64 resolution at tau's scale, such as
confidences below 1e-17, or losses log p_y above about -1e-17 |tau|: margins beyond about 40 with tau near
-0.05, which the raw log p_y still tells apart). The target's own membership row is never read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import Field

from raymia.attacks.mia import cross_entropy, log_softmax, per_model
from raymia.attacks.registry import ATTACKS
from raymia.registry import Params
from raymia.signals import Signals

# Song & Mittal clip every log argument at this value (their `_log_value`).
MENTR_CLIP = 1e-30


class ThresholdParams(Params):
    query: int = Field(
        0, ge=0, description="Index of the query augmentation to score (0 = the original input)."
    )
    calibration: Literal["global", "per_class"] = Field(
        "global",
        description="Threshold fitted on the shadow models (maximising TPR - FPR): one for all points "
        "('global') or one per true class ('per_class', classes missing in the shadows use the global one). "
        "Scores are statistic - threshold, so score > 0 means 'member'.",
    )


# ---------------------------------------------------------------------------------------------- statistics
def loss_stat(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-CE(softmax(z), y) = log p_y, float64 [..., P]."""
    return -cross_entropy(logits, labels)


def confidence_stat(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p_y, the softmax probability of the true label, float64 [..., P]."""
    return np.exp(loss_stat(logits, labels))


def max_confidence_stat(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """max_j p_j, the largest softmax probability, float64 [..., P] (labels unused)."""
    return np.exp(log_softmax(logits).max(axis=-1))


def entropy_stat(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-H(p) = sum_j p_j log p_j, float64 [..., P] (labels unused; 0 log 0 = 0)."""
    ls = log_softmax(logits)
    p = np.exp(ls)
    return np.sum(np.where(p > 0, p * ls, 0.0), axis=-1)


def _log1m_softmax(z: np.ndarray, ls: np.ndarray) -> np.ndarray:
    """log(1 - p_j) for every class, float64 [..., C], accurate also where p_j is close to 1.

    For p_j <= 1/2, log1p(-p_j) is accurate. At most one class per row has p_j > 1/2 (the argmax); there
    1 - p_j = sum_{k != j} p_k, so log(1 - p_j) = logsumexp_{k != j} z_k - logsumexp_k z_k.
    """
    p = np.exp(ls)
    out = np.log1p(-np.minimum(p, 0.5))
    top = np.argmax(z, axis=-1)[..., None]
    p_top = np.take_along_axis(p, top, axis=-1)[..., 0]
    rest = np.array(z, dtype=np.float64)
    np.put_along_axis(rest, top, -np.inf, axis=-1)
    mx = np.max(rest, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(divide="ignore"):  # a single class: 1 - p = 0, log = -inf (clipped by the caller)
        lse_rest = mx[..., 0] + np.log(np.sum(np.exp(rest - mx), axis=-1))
    lse_all = np.take_along_axis(z, top, axis=-1)[..., 0] - np.take_along_axis(ls, top, axis=-1)[..., 0]
    exact = lse_rest - lse_all
    cur = np.take_along_axis(out, top, axis=-1)[..., 0]
    np.put_along_axis(out, top, np.where(p_top > 0.5, exact, cur)[..., None], axis=-1)
    return out


def modified_entropy_stat(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-Mentr (Song & Mittal 2021), float64 [..., P]; log arguments clipped to [1e-30, 1].

    Mentr = -(1 - p_y) log p_y - sum_{j != y} p_j log(1 - p_j): low for confident, correct outputs and high
    for confident, wrong ones (which plain entropy cannot tell apart).
    """
    z = np.asarray(logits, dtype=np.float64)
    ls = log_softmax(z)
    p = np.exp(ls)
    log_1mp = _log1m_softmax(z, ls)
    idx = np.broadcast_to(np.asarray(labels), z.shape[:-1])[..., None].astype(np.intp)
    # weights w_j = p_j and log terms l_j = log(1 - p_j), except at j = y: w_y = 1 - p_y, l_y = log p_y
    w = p.copy()
    np.put_along_axis(w, idx, np.exp(np.take_along_axis(log_1mp, idx, axis=-1)), axis=-1)
    lg = log_1mp
    np.put_along_axis(lg, idx, np.take_along_axis(ls, idx, axis=-1), axis=-1)
    np.clip(lg, np.log(MENTR_CLIP), 0.0, out=lg)
    return np.sum(w * lg, axis=-1)  # = -Mentr


def correctness_stat(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1.0 where the predicted label (argmax of the logits) is the true label, else 0.0, float64 [..., P]."""
    return (np.argmax(np.asarray(logits), axis=-1) == np.asarray(labels)).astype(np.float64)


# ---------------------------------------------------------------------------------------------- calibration
def best_threshold(scores: np.ndarray, is_in: np.ndarray) -> float | None:
    """tau maximising TPR - FPR of `score > tau => member` over the observed values (ties: smallest tau).

    None when the samples lack IN or OUT observations (TPR - FPR is undefined). Counts are compared in exact
    integer arithmetic, so ties between equal-balanced-accuracy thresholds are ties, not rounding noise.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    k = np.asarray(is_in, dtype=np.bool_).ravel()
    n_in = int(k.sum())
    n_out = int(k.size - n_in)
    if n_in == 0 or n_out == 0:
        return None
    values, inv = np.unique(s, return_inverse=True)
    cum_in = np.cumsum(np.bincount(inv, weights=k, minlength=values.size).astype(np.int64))
    cum_out = np.cumsum(np.bincount(inv, weights=~k, minlength=values.size).astype(np.int64))
    # (TPR - FPR) * n_in * n_out at tau = values[i]: members are the samples strictly above values[i]
    gain = (n_in - cum_in) * n_out - (n_out - cum_out) * n_in
    return float(values[int(np.argmax(gain))])


def thresholds(stat: np.ndarray, keep: np.ndarray, labels: np.ndarray, calibration: str, shadow: np.ndarray,
               fit: np.ndarray | None = None) -> np.ndarray:
    """The taus fitted on the shadows' stat [M, P] and keep [M, P] (see module doc): 0-d for global, [P]
    (each point's class's) for per_class; a target's scores are stat[target] - tau. `shadow` (bool [M])
    selects the shadow models, `fit` (int64 indices) the points the taus are fitted on (default: all)."""
    fit = np.arange(stat.shape[1]) if fit is None else fit
    sh_stat = stat[shadow][:, fit]
    sh_in = np.asarray(keep)[shadow][:, fit]
    fit_labels = np.asarray(labels)[fit]
    tau_global = best_threshold(sh_stat, sh_in)
    if tau_global is None:
        tau_global = 0.0
    if calibration == "global":
        return np.asarray(tau_global, dtype=np.float64)
    if calibration != "per_class":
        raise ValueError(f"unknown calibration {calibration!r}")
    tau = np.full(labels.shape, tau_global, dtype=np.float64)
    for c in np.unique(labels):
        cols = fit_labels == c
        t = best_threshold(sh_stat[:, cols], sh_in[:, cols])
        if t is not None:
            tau[labels == c] = t
    return tau


def check_query(signals: Signals, query: int) -> None:
    """ValueError naming the query when it is not one of the signals' queries."""
    if query >= signals.num_queries:
        raise ValueError(f"query {query} out of range: the signals hold {signals.num_queries} queries")


StatFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def threshold_attack(signals: Signals, target: int, params: ThresholdParams, stat_fn: StatFn) -> np.ndarray:
    """Statistic of every model on one query (one model at a time, float64), calibrated on the shadows."""
    shadow = signals.shadow_mask(target)
    check_query(signals, params.query)

    stat = signals.derived((stat_fn, params.query),
                           lambda: per_model(stat_fn, signals.logits[:, params.query], signals.labels))
    tau = signals.derived((stat_fn, params.query, params.calibration, shadow.tobytes()), lambda: thresholds(
        stat, signals.keep, signals.labels, params.calibration, shadow, signals.fit_index))
    return stat[target] - tau


# ---------------------------------------------------------------------------------------------- registrations
@ATTACKS.register(
    "loss", ThresholdParams, doc="Yeom et al. loss threshold: score = -cross-entropy of the target - tau."
)
def loss_attack(signals: Signals, target: int, params: ThresholdParams) -> np.ndarray:
    """-CE(softmax(z), y) of the target minus the shadow-calibrated threshold: members have lower loss."""
    return threshold_attack(signals, target, params, loss_stat)


@ATTACKS.register("confidence", ThresholdParams, doc="Confidence threshold: score = p_y of the target - tau.")
def confidence_attack(signals: Signals, target: int, params: ThresholdParams) -> np.ndarray:
    """p_y minus the shadow-calibrated threshold: members get more confident predictions."""
    return threshold_attack(signals, target, params, confidence_stat)


@ATTACKS.register("max_confidence", ThresholdParams,
                  doc="Max-softmax threshold (no label; Hintersdorf et al.'s threshold attack): score = max_j p_j - tau.")
def max_confidence_attack(signals: Signals, target: int, params: ThresholdParams) -> np.ndarray:
    """The largest softmax probability minus the shadow-calibrated threshold: members get more confident
    predictions, whatever their label (the attack an input with a wrong or random label cannot fool)."""
    return threshold_attack(signals, target, params, max_confidence_stat)


@ATTACKS.register("entropy", ThresholdParams, doc="Entropy threshold: score = -H(p) of the target - tau.")
def entropy_attack(signals: Signals, target: int, params: ThresholdParams) -> np.ndarray:
    """-H(softmax(z)) minus the shadow-calibrated threshold: members get lower-entropy predictions."""
    return threshold_attack(signals, target, params, entropy_stat)


@ATTACKS.register(
    "modified_entropy",
    ThresholdParams,
    doc="Song & Mittal modified-entropy threshold: score = -Mentr(p, y) of the target - tau.",
)
def modified_entropy_attack(signals: Signals, target: int, params: ThresholdParams) -> np.ndarray:
    """-Mentr minus the shadow-calibrated threshold (label-aware entropy: wrong, confident outputs score low)."""
    return threshold_attack(signals, target, params, modified_entropy_stat)


@ATTACKS.register(
    "correctness",
    ThresholdParams,
    doc="Correctness (Yeom et al. gap attack): score = 1[argmax == y] of the target - tau.",
)
def correctness_attack(signals: Signals, target: int, params: ThresholdParams) -> np.ndarray:
    """1[predicted label == y] minus the shadow-calibrated threshold: members are more often classified right."""
    return threshold_attack(signals, target, params, correctness_stat)
