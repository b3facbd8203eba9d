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

An audit attacks every model with the others as shadows, so each target pair has its own shadows. The
statistic over the whole shadow pool is sorted once per attack (`PoolFit`), and a pair's tau comes from the
pool's counts less its two rows' (`PooledCounts.tau`): the tau that sorting the pair's shadows again gives,
to the bit (tests/test_attacks_threshold.py), at a cost per pair of one pass over the pool's distinct values.

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


class PooledCounts:
    """A statistic's samples over the shadow pool on some points, sorted once: the distinct values (as
    np.unique gives them) and how many IN and all samples lie at or below each. A target's shadows are the
    pool less at most two rows (the target and its pair), so its tau is `best_threshold` of the pool's
    samples less those rows' (`tau`), found without sorting again.

    With S the shadows' samples, n_in and n_out their IN and OUT counts and C_in(v), C_out(v) the samples at
    or below v, best_threshold's gain is n_in C_out(v) - n_out C_in(v). The pool's counts less the removed
    rows' give C: gain(v) = H(v) - d(v), with H(v) = n_in A_out(v) - n_out A_in(v) over the pool's counts A
    and d(v) a step function that changes only at the removed rows' values. Between two such values d is
    constant, so the best value there is H's first maximum: one pass over H (np.maximum.reduceat) per target
    pair, and H itself is shared by every pair with the same (n_in, n_out), which is all of them when the
    models come in complementary pairs. -0.0 and 0.0 are one value, as np.unique holds them; samples holding
    both could be represented by the other zero than a sort of the shadows alone picks, but no statistic here
    produces both.
    """

    def __init__(self, samples: np.ndarray, is_in: np.ndarray) -> None:
        s = np.asarray(samples, dtype=np.float64).ravel()
        self.values, counts = np.unique(s, return_counts=True)  # float64 [V]
        self.cum_all = np.cumsum(counts)  # int64 [V]: samples <= values[v]
        self.cum_in = np.searchsorted(np.sort(s[np.asarray(is_in, dtype=np.bool_).ravel()]), self.values,
                                      side="right").astype(np.int64, copy=False)  # IN samples <= values[v]
        self._h: tuple[int, int, np.ndarray] | None = None  # (n_in, n_out, H) of the last fit

    def _gain_base(self, n_in: int, n_out: int) -> np.ndarray:
        """H = n_in A_out - n_out A_in over the pool's counts, int64 [V] (the last one kept)."""
        if self._h is None or self._h[:2] != (n_in, n_out):
            self._h = (n_in, n_out, n_in * self.cum_all - (n_in + n_out) * self.cum_in)
        return self._h[2]

    def tau(self, removed: np.ndarray, removed_in: np.ndarray) -> float | None:
        """best_threshold(pool samples less `removed`, their membership less `removed_in`): `removed` are
        pool samples (values a row of the pool holds), `removed_in` their IN flags (bool, same shape)."""
        rs = np.asarray(removed, dtype=np.float64).ravel()
        order = np.argsort(rs)
        rs, r_is_in = rs[order], np.asarray(removed_in, dtype=np.bool_).ravel()[order]
        total = int(self.cum_all[-1]) if self.values.size else 0
        n_in = (int(self.cum_in[-1]) if self.values.size else 0) - int(r_is_in.sum())
        n_out = total - rs.size - n_in
        if n_in <= 0 or n_out <= 0:
            return None
        rv = np.searchsorted(self.values, rs)  # each removed sample's value, in increasing order
        first = np.flatnonzero(np.diff(rv, prepend=-1))
        u = rv[first]  # the values the removed samples hold
        r_all = np.diff(np.append(first, rv.size))
        r_in = np.add.reduceat(r_is_in.astype(np.int64), first)
        h = self._gain_base(n_in, n_out)
        # pieces of the value axis on which d is constant: each removed value alone, and the runs between
        size = self.values.size
        starts = np.concatenate(([0], np.stack((u, u + 1), axis=1).ravel()))  # nondecreasing
        starts = starts[(np.diff(starts, prepend=-1) != 0) & (starts < size)]
        k = np.searchsorted(u, starts, side="right")  # removed values <= each piece's start
        cum_r_in = np.concatenate(([0], np.cumsum(r_in)))[k]
        cum_r_out = np.concatenate(([0], np.cumsum(r_all - r_in)))[k]
        gain = np.maximum.reduceat(h, starts) - (n_in * cum_r_out - n_out * cum_r_in)
        # a value only the removed rows hold is no candidate (a run between them holds other rows' values)
        alone = np.concatenate(([-1], u))[k] == starts
        held = self.cum_all[starts] - np.where(starts > 0, self.cum_all[np.maximum(starts - 1, 0)], 0)
        gain[alone & (held == np.concatenate(([0], r_all))[k])] = np.iinfo(np.int64).min
        best = int(np.argmax(gain))  # the first piece of the highest gain, then its first value: smallest tau
        lo = int(starts[best])
        hi = int(starts[best + 1]) if best + 1 < starts.size else size
        return float(self.values[lo + int(np.argmax(h[lo:hi]))])


class PoolFit:
    """The thresholds of every target's shadows from one sort of the statistic over the shadow pool.

    stat and keep [M, P], labels [P], pool (bool [M]) the models that may be shadows, fit (int64) the points
    the taus are fitted on. The pool's counts are built per group of points (all fit points, or one class's)
    the first time a tau of that group is asked for.
    """

    def __init__(self, stat: np.ndarray, keep: np.ndarray, labels: np.ndarray, pool: np.ndarray,
                 fit: np.ndarray) -> None:
        self.stat, self.keep, self.labels = stat, np.asarray(keep), np.asarray(labels)
        self.pool, self.fit = np.asarray(pool, dtype=np.bool_), fit
        self._counts: dict[int | None, PooledCounts] = {}

    def _tau(self, group: int | None, removed: np.ndarray) -> float | None:
        """The tau of the pool less the `removed` rows on the fit points of class `group` (None: all)."""
        cols = self.fit if group is None else self.fit[self.labels[self.fit] == group]
        if group not in self._counts:
            rows = np.ix_(np.flatnonzero(self.pool), cols)
            self._counts[group] = PooledCounts(self.stat[rows], self.keep[rows])
        rows = np.ix_(removed, cols)
        return self._counts[group].tau(self.stat[rows], self.keep[rows])

    def thresholds(self, calibration: str, shadow: np.ndarray) -> np.ndarray:
        """The taus fitted on the shadows (bool [M], within the pool; see module doc): 0-d for global, [P]
        (each point's class's) for per_class; a target's scores are stat[target] - tau."""
        if calibration not in ("global", "per_class"):
            raise ValueError(f"unknown calibration {calibration!r}")
        removed = np.flatnonzero(self.pool & ~np.asarray(shadow, dtype=np.bool_))
        per_class = {}
        if calibration == "per_class":
            per_class = {c: self._tau(int(c), removed) for c in np.unique(self.labels)}
        if calibration == "global" or None in per_class.values():
            tau_global = self._tau(None, removed)
            tau_global = 0.0 if tau_global is None else tau_global
        if calibration == "global":
            return np.asarray(tau_global, dtype=np.float64)
        tau = np.empty(self.labels.shape, dtype=np.float64)
        for c, t in per_class.items():
            tau[self.labels == c] = tau_global if t is None else t
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
    pool = signals.derived((stat_fn, params.query, "pool", signals.pool_mask.tobytes()), lambda: PoolFit(
        stat, signals.keep, signals.labels, signals.pool_mask, signals.fit_index))
    tau = signals.derived((stat_fn, params.query, params.calibration, shadow.tobytes()),
                          lambda: pool.thresholds(params.calibration, shadow))
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
