"""Membership-inference metrics over score arrays (REFERENCE.md section 3).

Every function takes one score per audited point (higher = more likely a member) and the ground truth.
Scores are handled in float64 throughout: low-FPR metrics depend on the order of a few extreme scores,
and casting to float32 would create ties that do not exist. Only numpy and scipy.special are imported at
module level: this module is loaded by every sweep trial's process, where scikit-learn's metrics and
scipy.stats would cost about a second of start-up each (the ROC curve is sklearn's algorithm, checked
against it in tests/test_metrics.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy import special

# The levels an audit reports unless its spec says otherwise (`metrics.fpr_levels`, `metrics.fnr_levels`), and
# the Python API's defaults: one set of columns whichever way the metrics are asked for.
DEFAULT_FPR_LEVELS: tuple[float, ...] = (0.1, 0.01, 0.001, 0.0001, 0.00001)
DEFAULT_FNR_LEVELS: tuple[float, ...] = (0.001,)


def _validate(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores float64 [N], is_member bool [N]) or raise ValueError saying what is wrong."""
    s = np.asarray(scores)
    y = np.asarray(is_member)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and is_member must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"scores and is_member differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    # Widen only: float64 keeps every value of float16/32/64 and of integers up to 2**53 exactly.
    s = s.astype(np.float64, copy=False)
    if not np.all(np.isfinite(s)):
        bad = int(np.count_nonzero(~np.isfinite(s)))
        raise ValueError(f"scores must be finite: {bad} of {s.shape[0]} are NaN or infinite")
    if y.dtype != np.bool_:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("is_member must be boolean (or 0/1)")
        y = y.astype(np.bool_)
    n_in = int(y.sum())
    if n_in == 0 or n_in == y.shape[0]:
        raise ValueError(
            f"is_member must contain both members and non-members, got {n_in} members of {y.shape[0]}"
        )
    return s, y


def _roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sklearn.metrics.roc_curve(y, s, drop_intermediate=False) on validated input: one point per distinct
    score (tied scores move together), from (0, 0) at threshold +inf to (1, 1)."""
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last index of each run of tied scores
    tps = np.cumsum(y, dtype=np.float64)[last]
    fps = 1.0 + last - tps
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, s[last]]


def _auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC curve by trapezoids: the Mann-Whitney statistic, ties counted 1/2."""
    return float((np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0).sum())


def roc(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve (fpr, tpr, thresholds) of the rule `score >= threshold => member`, all points kept."""
    s, y = _validate(scores, is_member)
    return _roc_curve(y, s)


def roc_auc(scores: np.ndarray, is_member: np.ndarray) -> float:
    """ROC AUC of the scores (ties counted 1/2), as sklearn's roc_auc_score."""
    fpr, tpr, _ = roc(scores, is_member)
    return _auc(fpr, tpr)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, level: float, n_nonmembers: int) -> float | None:
    """Largest TPR among ROC points whose FPR <= level.

    None ("n/a") when fewer than 1/level non-members were audited: the smallest non-zero FPR is then above
    the level, so the value would only reflect the zero-FPR corner, not the attack at that level.
    """
    if not 0.0 < level <= 1.0:
        raise ValueError(f"FPR level must lie in (0, 1], got {level}")
    # A relative tolerance absorbs 1/level rounding (1/1e-5 == 99999.99999999999 in float64).
    if n_nonmembers * level < 1.0 - 1e-9:
        return None
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    ok = fpr <= level
    if not np.any(ok):
        return None
    return float(np.max(tpr[ok]))


def balanced_accuracy(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Best balanced attack accuracy over thresholds: max of 1 - (FPR + FNR) / 2."""
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    return float(np.max(1.0 - (fpr + (1.0 - tpr)) / 2.0))


def fpr_key(level: float) -> str:
    """Metric key of TPR at a FPR level, e.g. 0.01 -> 'tpr_fpr_0.01'."""
    return f"tpr_fpr_{level:g}"


def attack_metrics(
    scores: np.ndarray, is_member: np.ndarray, fpr_levels: Sequence[float] = DEFAULT_FPR_LEVELS
) -> dict[str, float | None]:
    """AUC, balanced accuracy and TPR at each FPR level (None where the level can't be resolved).

    Keys: "auc", "balanced_accuracy", and fpr_key(f) for each level f ("tpr_fpr_0.01", ...).
    """
    s, y = _validate(scores, is_member)
    for f in fpr_levels:
        if not 0.0 < float(f) <= 1.0:
            raise ValueError(f"FPR level must lie in (0, 1], got {f}")
    fpr, tpr, _ = _roc_curve(y, s)
    n_out = int(np.count_nonzero(~y))
    out: dict[str, float | None] = {
        "auc": _auc(fpr, tpr),
        "balanced_accuracy": balanced_accuracy(fpr, tpr),
    }
    for f in fpr_levels:
        out[fpr_key(float(f))] = tpr_at_fpr(fpr, tpr, float(f), n_out)
    return out


def _check_outputs(z: np.ndarray, what: str) -> None:
    """ValueError when a row of outputs holds NaN or +inf, or only -inf: argmax takes a NaN for the top
    class, and a softmax over such a row is NaN, so the metric would be a number that means nothing. (-inf
    beside finite entries is a log-probability of 0 and stays.)"""
    bad = np.isnan(z).any(axis=1) | np.isposinf(z).any(axis=1) | np.isneginf(z).all(axis=1)
    if bad.any():
        raise ValueError(f"{what} must be finite or -inf, with a finite entry in every row: "
                         f"{int(bad.sum())} of {z.shape[0]} rows are not")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of logits [N, C] (or probabilities: argmax is the same) against labels [N]."""
    z = np.asarray(logits)
    y = np.asarray(labels)
    if z.ndim != 2 or y.ndim != 1 or z.shape[0] != y.shape[0]:
        raise ValueError(f"expected logits [N, C] and labels [N], got {z.shape} and {y.shape}")
    if z.shape[0] == 0:
        raise ValueError("accuracy of an empty set is undefined")
    _check_outputs(z, "logits")
    return float(np.mean(np.argmax(z, axis=1) == y))


def ece(outputs: np.ndarray, labels: np.ndarray, n_bins: int = 15, from_logits: bool | None = None) -> float:
    """Expected calibration error with `n_bins` equal-width confidence bins (Guo et al. 2017).

    outputs [N, C] are probabilities or logits; from_logits=None treats them as probabilities when every
    entry lies in [0, 1] and every row sums to 1 (within 1e-4), else applies a softmax. Confidence is the
    largest probability, bin b holds confidences in (b / n_bins, (b + 1) / n_bins], and
    ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|.
    """
    z = np.asarray(outputs, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or y.ndim != 1 or z.shape[0] != y.shape[0]:
        raise ValueError(f"expected outputs [N, C] and labels [N], got {z.shape} and {y.shape}")
    if z.shape[0] == 0:
        raise ValueError("ECE of an empty set is undefined")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    _check_outputs(z, "outputs")
    if from_logits is None:
        from_logits = not (np.all((z >= 0) & (z <= 1)) and np.allclose(z.sum(axis=1), 1.0, rtol=0, atol=1e-4))
    if from_logits:
        z = np.exp(z - np.max(z, axis=1, keepdims=True))
        z /= z.sum(axis=1, keepdims=True)
    conf = np.max(z, axis=1)
    correct = (np.argmax(z, axis=1) == y).astype(np.float64)
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    # sum_b (n_b / N) |acc_b - conf_b| = sum_b |sum of correct in b - sum of conf in b| / N
    gap = np.bincount(b, weights=correct, minlength=n_bins) - np.bincount(b, weights=conf, minlength=n_bins)
    return float(np.abs(gap).sum() / z.shape[0])


def as_number(v: object) -> float | None:
    """A metric's value as a float (infinities kept), or None when missing, boolean, non-numeric or NaN."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def spread_key(metric: str) -> str:
    """Name of the std over targets of a flat metric: 'lira_online/auc' -> 'std/lira_online/auc'."""
    return f"std/{metric}"


def fnr_key(level: float) -> str:
    """Metric key of TNR at a FNR level, e.g. 0.001 -> 'tnr_fnr_0.001'."""
    return f"tnr_fnr_{level:g}"


def tnr_at_fnr(fpr: np.ndarray, tpr: np.ndarray, level: float, n_members: int) -> float | None:
    """Largest TNR among ROC points whose FNR <= level: TPR at FPR with the roles of the classes swapped.

    None ("n/a") when fewer than 1/level members were audited (the level can't be resolved).
    """
    if not 0.0 < level <= 1.0:
        raise ValueError(f"FNR level must lie in (0, 1], got {level}")
    if n_members * level < 1.0 - 1e-9:
        return None
    fnr = 1.0 - np.asarray(tpr, dtype=np.float64)
    tnr = 1.0 - np.asarray(fpr, dtype=np.float64)
    ok = fnr <= level + 1e-12  # 1 - tpr is inexact: tpr = 0.75 gives fnr 0.25 exactly, others may not
    if not np.any(ok):
        return None
    return float(np.max(tnr[ok]))


def _allowed(level: float, n: int) -> int:
    """Largest count k with k / n <= level (the relative tolerance absorbs 1/level rounding)."""
    return int(math.floor(level * n * (1.0 + 1e-9)))


def _padded_cumsum(w: np.ndarray) -> np.ndarray:
    """Row-wise cumulative counts with a leading 0 column: out[b, k] = sum of w[b, :k]."""
    out = np.zeros((w.shape[0], w.shape[1] + 1), dtype=np.int64)
    np.cumsum(w, axis=1, out=out[:, 1:])
    return out


def _weighted_stats(
    s_in: np.ndarray, s_out: np.ndarray, w_in: np.ndarray, w_out: np.ndarray, fpr_levels: Sequence[float]
) -> dict[str, np.ndarray]:
    """AUC and TPR at each FPR level of B reweighted samples, without sorting any resample.

    s_in [n_in] and s_out [n_out] are the ascending member / non-member scores; w_in [B, n_in] and
    w_out [B, n_out] are how often each point was drawn in each resample (rows sum to n_in / n_out).
    AUC is the Mann-Whitney statistic (ties count 1/2), computed from cumulative counts of the resampled
    non-members below and at each member score. TPR at FPR <= f is the fraction of resampled members above
    the (k + 1)-th largest resampled non-member score, k = floor(f * n_out), which is what the ROC gives.
    """
    n_in, n_out = s_in.shape[0], s_out.shape[0]
    b = w_in.shape[0]
    c_out = _padded_cumsum(w_out)  # [B, n_out + 1]
    lo = np.searchsorted(s_out, s_in, side="left")  # non-members strictly below each member
    hi = np.searchsorted(s_out, s_in, side="right")  # ... below or tied
    wins = c_out[:, lo] + c_out[:, hi]  # 2 * (less + ties / 2)
    res: dict[str, np.ndarray] = {"auc": np.einsum("bi,bi->b", w_in, wins) / (2.0 * n_in * n_out)}
    c_in = _padded_cumsum(w_in)
    rows = np.arange(b)
    # offset row b by b * (n_out + 1): the flattened counts are sorted, so one searchsorted serves every row
    flat = (c_out[:, 1:] + rows[:, None] * (n_out + 1)).ravel()
    for f in fpr_levels:
        k = _allowed(float(f), n_out)
        if k >= n_out:
            res[fpr_key(float(f))] = np.ones(b)
            continue
        # the (k + 1)-th largest of n_out values is the (n_out - k)-th smallest: first j, count >= n_out - k
        j = np.searchsorted(flat, (n_out - k) + rows * (n_out + 1), side="left") - rows * n_out
        v = s_out[j]
        at_most_v = c_in[rows, np.searchsorted(s_in, v, side="right")]
        res[fpr_key(float(f))] = (n_in - at_most_v) / n_in
    return res


def _draw_counts(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """[b, n] multiplicities of n points in b resamples of size n drawn with replacement."""
    idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)


def bootstrap_ci(
    scores: np.ndarray,
    is_member: np.ndarray,
    fpr_levels: Sequence[float] = DEFAULT_FPR_LEVELS,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float | None, float | None]]:
    """Percentile bootstrap (1 - alpha) intervals of "auc" and each fpr_key(f) -> (low, high).

    Members and non-members are resampled separately (stratified), so every resample keeps the audit's class
    sizes; a level the non-member count can't resolve gets (None, None). Resamples are processed in chunks
    as count matrices, so 1000 resamples of 10,000 points take well under a second.
    """
    s, y = _validate(scores, is_member)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    levels = [float(f) for f in fpr_levels]
    for f in levels:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"FPR level must lie in (0, 1], got {f}")
    s_in, s_out = np.sort(s[y]), np.sort(s[~y])
    n_in, n_out = s_in.shape[0], s_out.shape[0]
    ok = [f for f in levels if n_out * f >= 1.0 - 1e-9]
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 4_000_000 // (n_in + n_out)))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        stats = _weighted_stats(s_in, s_out, _draw_counts(rng, n_in, b), _draw_counts(rng, n_out, b), ok)
        for k, v in stats.items():
            parts.setdefault(k, []).append(v)
    out: dict[str, tuple[float | None, float | None]] = {}
    for key in ["auc", *(fpr_key(f) for f in levels)]:
        if key not in parts:
            out[key] = (None, None)
            continue
        lo, hi = np.quantile(np.concatenate(parts[key]), [alpha / 2.0, 1.0 - alpha / 2.0])
        out[key] = (float(lo), float(hi))
    return out


@functools.lru_cache(maxsize=64)
def _cp_table(n: int, confidence: float, upper: bool) -> np.ndarray:
    """The one-sided Clopper-Pearson bound for every count k = 0..n of n, read-only: an audit bounds every
    target and attack with the same n and confidence, and betaincinv at each distinct threshold took most
    of full_metrics' time (0.25 of 0.28 s at 60,000 points)."""
    k = np.arange(n + 1, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        if upper:  # 1 when k = n
            table = np.where(k < n, special.betaincinv(k + 1.0, n - k, confidence), 1.0)
        else:  # the Beta(k, n-k+1) quantile; 0 when k = 0
            table = np.where(k > 0, special.betaincinv(k, n - k + 1.0, 1.0 - confidence), 0.0)
    table.flags.writeable = False
    return table


def _cp_lower(k: np.ndarray, n: int, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of a proportion with k successes (int, 0..n) of n."""
    return _cp_table(int(n), float(confidence), False)[np.asarray(k, dtype=np.int64)]


def _cp_upper(k: np.ndarray, n: int, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound of a proportion with k successes (int, 0..n) of n."""
    return _cp_table(int(n), float(confidence), True)[np.asarray(k, dtype=np.int64)]


EPSILON_METHODS: tuple[str, ...] = ("split", "union")


def _threshold_counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores t (decreasing) and the member / non-member counts with score >= t (int64)."""
    u, inv = np.unique(s, return_inverse=True)
    c_in = np.bincount(inv[y], minlength=u.shape[0])
    c_out = np.bincount(inv[~y], minlength=u.shape[0])
    return u[::-1], np.cumsum(c_in[::-1]), np.cumsum(c_out[::-1])


def _eps_terms(
    tp: np.ndarray, fp: np.ndarray, n_in: int, n_out: int, bound_conf: float, delta: float
) -> dict[str, np.ndarray]:
    """Both sides of the bound at each (tp, fp): e1 = log((TPR_low - delta) / FPR_high) and
    e2 = log((TNR_low - delta) / FNR_high), -inf where the numerator is not positive.

    TNR_low = 1 - FPR_high and FNR_high = 1 - TPR_low (Clopper-Pearson is symmetric), so both sides rest on
    the same two one-sided bounds, each at bound_conf; they are computed separately only for precision.
    """
    tpr_low, fpr_high = _cp_lower(tp, n_in, bound_conf), _cp_upper(fp, n_out, bound_conf)
    tnr_low, fnr_high = _cp_lower(n_out - fp, n_out, bound_conf), _cp_upper(n_in - tp, n_in, bound_conf)
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.where(tpr_low - delta > 0, np.log((tpr_low - delta) / fpr_high), -np.inf)
        e2 = np.where(tnr_low - delta > 0, np.log((tnr_low - delta) / fnr_high), -np.inf)
    return {"e1": e1, "e2": e2, "tpr_low": tpr_low, "fpr_high": fpr_high, "tnr_low": tnr_low,
            "fnr_high": fnr_high}


# Over 60 lines for its docstring (the bound, both methods and their references); the body is ~50 lines.
def epsilon_lower_bound(
    scores: np.ndarray,
    is_member: np.ndarray,
    delta: float = 0.0,
    confidence: float = 0.95,
    method: str = "split",
    seed: int = 0,
) -> dict[str, float | str | None]:
    """Empirical (epsilon, delta)-DP lower bound of the attack `score >= t => member`, valid at `confidence`.

    Privacy auditing as in Jagielski, Ullman, Oprea 2020 ("Auditing Differentially Private Machine
    Learning: How Private is Private SGD?") and Nasr, Song, Thakurta, Papernot, Carlini 2021 ("Adversary
    Instantiation: Lower Bounds for Differentially Private Machine Learning"): an (eps, delta)-DP mechanism
    has TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta for every threshold t, so with one-sided
    Clopper-Pearson bounds TPR_low <= TPR and FPR_high >= FPR (TNR_low = 1 - FPR_high, FNR_high = 1 - TPR_low)
        eps >= log((TPR_low - delta) / FPR_high)   ("tpr/fpr" side)   and
        eps >= log((TNR_low - delta) / FNR_high)   ("tnr/fnr" side).
    A bound holds at its confidence for a threshold and side fixed in advance; taking the best of many on the
    same points does not (on member/non-member scores with no signal at all, the uncorrected maximum at 95%
    per bound is above 0 in about 13% of audits). The two valid methods:

    - "split" (default): members and non-members are each shuffled (seeded by `seed`, so deterministic) and
      cut in half. The threshold and side are the best bound on the first half; the bound is then computed
      once, on the second half only, with TPR_low and FPR_high each at 1 - (1 - confidence) / 2
      (Bonferroni over the two). It pays a factor 2 in sample size but no multiplicity, and is the tighter
      of the two where it matters (measured means: randomised response at eps = 1 with 1e4 / 1e5 trials
      0.92 / 0.97 against 0.87 / 0.95; 5,000 + 5,000 points, 1% of members shifted by 8 sd: 1.21 against
      0.74).
    - "union": the best threshold and side over all points, every one-sided bound at
      1 - (1 - confidence) / (n_in + n_out). Valid simultaneously over every threshold t and both sides:
      TPR_low is only evaluated at member counts 1..n_in and FPR_high at non-member counts 0..n_out - 1,
      and the bound at each count fails with probability at most its level whatever t the count came from
      (an order-statistic argument), so n_in + n_out events cover everything tried. Tighter than "split"
      with few points and every member's score shifted (200 + 200 points, members shifted by 1 sd: 0.51
      against 0.40), looser with many points or a signal carried by a few members (the usual attack).

    Both assume the Clopper-Pearson model: each member and non-member score is an independent trial (one
    audited point per trained model, as in the two papers). Many points scored by one model are not
    independent: for that setting see one_run_audit. A correct DP-SGD model exceeds its accounted epsilon
    only with probability 1 - confidence; more often is a bug in training, accounting or the attack.

    Returns {"epsilon_lb" (>= 0), "threshold" and "side" ("tpr/fpr" or "tnr/fnr"; None when the bound is
    0), "tpr_low", "fpr_high", "tnr_low", "fnr_high" (at that threshold, on the points bounded; None when
    0), "confidence" (of the whole statement), "bound_confidence" (of each one-sided bound), "delta",
    "method"}.
    """
    s, y = _validate(scores, is_member)
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must lie in [0, 1), got {delta}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if method not in EPSILON_METHODS:
        raise ValueError(f"method must be one of {EPSILON_METHODS}, got {method!r}")
    n_in, n_out = int(y.sum()), int((~y).sum())
    alpha = 1.0 - confidence
    if method == "union":
        bound_conf = 1.0 - alpha / (n_in + n_out)
        t, tp, fp = _threshold_counts(s, y)
        terms = _eps_terms(tp, fp, n_in, n_out, bound_conf, delta)
        best = np.maximum(terms["e1"], terms["e2"])
        i = int(np.argmax(best))
        side_1 = bool(terms["e1"][i] >= terms["e2"][i])
        eps, threshold = float(best[i]), float(t[i])
    else:
        if min(n_in, n_out) < 2:
            raise ValueError(
                f"method='split' needs at least 2 members and 2 non-members, got {n_in} and {n_out}"
            )
        bound_conf = 1.0 - alpha / 2.0
        rng = np.random.default_rng(seed)
        idx_in, idx_out = rng.permutation(np.flatnonzero(y)), rng.permutation(np.flatnonzero(~y))
        pick = np.r_[idx_in[: n_in // 2], idx_out[: n_out // 2]]
        held = np.r_[idx_in[n_in // 2 :], idx_out[n_out // 2 :]]
        t_a, tp_a, fp_a = _threshold_counts(s[pick], y[pick])
        sel = _eps_terms(tp_a, fp_a, n_in // 2, n_out // 2, bound_conf, delta)
        best_a = np.maximum(sel["e1"], sel["e2"])
        i_a = int(np.argmax(best_a))
        side_1 = bool(sel["e1"][i_a] >= sel["e2"][i_a])
        threshold = float(t_a[i_a])
        s_b, y_b = s[held], y[held]
        n_in, n_out = int(y_b.sum()), int((~y_b).sum())
        tp = np.array([np.count_nonzero(s_b[y_b] >= threshold)])
        fp = np.array([np.count_nonzero(s_b[~y_b] >= threshold)])
        terms = _eps_terms(tp, fp, n_in, n_out, bound_conf, delta)
        i = 0
        eps = float(terms["e1"][0] if side_1 else terms["e2"][0])
    out: dict[str, float | str | None] = {
        "epsilon_lb": 0.0, "threshold": None, "side": None, "tpr_low": None, "fpr_high": None,
        "tnr_low": None, "fnr_high": None, "confidence": float(confidence), "bound_confidence": float(bound_conf),
        "delta": float(delta), "method": method,
    }
    if eps > 0:
        out.update(
            epsilon_lb=eps, threshold=threshold, side="tpr/fpr" if side_1 else "tnr/fnr",
            **{k: float(terms[k][i]) for k in ("tpr_low", "fpr_high", "tnr_low", "fnr_high")},
        )
    return out


# ------------------------------------------------------------------------------- one-run auditing
DEFAULT_ONE_RUN_FRACTIONS: tuple[float, ...] = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


@functools.lru_cache(maxsize=1 << 16)
def _one_run_eps(r: int, v: int, beta_: float) -> float:
    """one_run_epsilon_lb without the checks, cached: choosing k_pos / k_neg asks for the same (r, v) often."""
    if v == 0:
        return 0.0  # P[W >= 0] = 1: no epsilon is rejected
    def excess(eps: float) -> float:  # P[Binomial(r, e^eps / (1 + e^eps)) >= v] - beta, increasing in eps
        return float(special.bdtrc(v - 1, r, special.expit(eps))) - beta_
    if excess(0.0) > 0.0:
        return 0.0  # not even eps = 0 is rejected: v is within chance
    if v == r:  # P[W >= r] = p^r: the root in closed form
        return float(special.logit(beta_ ** (1.0 / r)))
    hi = 1.0
    while excess(hi) <= 0.0:  # excess(eps) -> 1 - beta > 0 as eps grows: ends within a few doublings
        hi *= 2.0
    from scipy.optimize import brentq

    return float(brentq(excess, hi / 2.0 if hi > 1.0 else 0.0, hi, xtol=1e-12, rtol=1e-12))


def one_run_epsilon_lb(r: int, v: int, confidence: float = 0.95) -> float:
    """Epsilon lower bound of one-run auditing, delta = 0 (Steinke, Nasr, Jagielski 2023, "Privacy Auditing
    with One (1) Training Run", its main theorem with delta = 0).

    Canaries are each included in the training set independently with probability 1/2; the auditor makes
    r guesses (member / non-member, abstaining on the rest) from the trained model alone, and v of them are
    right. If the training is eps-DP, the number of right guesses is stochastically dominated by
    Binomial(r, e^eps / (1 + e^eps)), so every eps with P[Binomial(r, e^eps / (1 + e^eps)) >= v] <= beta =
    1 - confidence is rejected. Returns the largest such eps: the root in eps of the binomial survival
    function (scipy.special.bdtrc(v - 1, r, p) = scipy.stats.binom.sf(v - 1, r, p)) found by brentq, in closed
    form logit(beta ** (1 / r)) when v = r; or 0.0 when no eps >= 0 is rejected (v = 0, r = 0, or v within
    chance). Non-decreasing in v and in 1 - confidence, non-increasing in r for fixed v.
    """
    r, v = _check_count("r", r), _check_count("v", v)
    if v > r:
        raise ValueError(f"v (correct guesses) must not exceed r (guesses), got v={v} > r={r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return _one_run_eps(r, v, 1.0 - float(confidence))


def _validate_scores(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores must be finite: {int(np.count_nonzero(~np.isfinite(s)))} are NaN or infinite")
    return s


def _rank_order(s: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices by increasing score, ties broken at random: never by position, which may encode membership."""
    return np.lexsort((rng.random(s.shape[0]), s))


def one_run_guesses(scores: np.ndarray, k_pos: int, k_neg: int, seed: int = 0) -> np.ndarray:
    """Guesses of one-run auditing (Steinke, Nasr, Jagielski 2023): +1 ("member") for the k_pos highest
    scores, -1 ("non-member") for the k_neg lowest, 0 (abstain) for the rest. int8 [N].

    Ties are broken by a random order seeded by `seed` (independent of membership). k_pos and k_neg must
    be fixed before the membership is looked at: chosen to make the bound large on the same canaries, they
    invalidate it (one_run_audit chooses them on a held-out half instead).
    """
    s = _validate_scores(scores)
    k_pos, k_neg = _check_count("k_pos", k_pos), _check_count("k_neg", k_neg)
    if k_pos + k_neg > s.shape[0]:
        raise ValueError(f"k_pos + k_neg = {k_pos + k_neg} guesses exceed the {s.shape[0]} canaries")
    order = _rank_order(s, np.random.default_rng(seed))
    g = np.zeros(s.shape[0], dtype=np.int8)
    g[order[s.shape[0] - k_pos :]] = 1
    g[order[:k_neg]] = -1
    return g


def _right_guesses(y_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For canaries sorted by increasing score: members among the top k and non-members among the bottom k,
    for k = 0..N."""
    top = np.r_[0, np.cumsum(y_sorted[::-1])]
    bottom = np.r_[0, np.cumsum(~y_sorted)]
    return top, bottom


def one_run_audit(
    scores: np.ndarray,
    is_member: np.ndarray,
    k_pos: int | None = None,
    k_neg: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_ONE_RUN_FRACTIONS,
) -> dict[str, float | int | str]:
    """One-run epsilon lower bound (Steinke, Nasr, Jagielski 2023, delta = 0) of canaries scored by ONE model.

    scores [N] (higher = more likely a member) of N canaries, each of which was included in training
    independently with probability 1/2 (the theorem's assumption: a fixed, balanced split is close to but not
    exactly that); is_member [N] says which were. Guesses as one_run_guesses, then one_run_epsilon_lb(r, v).

    - k_pos and k_neg given: guess on all N canaries with them ("method": "given"). They must not have been
      tuned on these canaries' membership, or the bound is not valid.
    - both None: they are chosen on held-out data ("method": "split"): the canaries are cut at random into two
      halves (seeded, independent of membership); on the first, every pair of fractions (f_pos, f_neg) from
      `fractions` with f_pos + f_neg <= 1 is tried and the one with the largest bound kept; the bound is
      that of the second half guessed with k_pos = round(f_pos * n), k_neg = round(f_neg * n). Valid: given
      the first half, the second is a one-run audit with guesses fixed in advance.

    Returns {"epsilon_lb", "r" (guesses), "v" (right ones), "k_pos", "k_neg", "canaries" (the number guessed
    from), "confidence", "method"}.
    """
    s, y = _validate(scores, is_member)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if (k_pos is None) != (k_neg is None):
        raise ValueError("give both k_pos and k_neg, or neither (then they are chosen on a held-out half)")
    beta_ = 1.0 - float(confidence)
    rng = np.random.default_rng(seed)
    if k_pos is not None and k_neg is not None:
        g = one_run_guesses(s, k_pos, k_neg, seed=seed)
        r = int(k_pos) + int(k_neg)
        v = int(np.count_nonzero(g[y] == 1) + np.count_nonzero(g[~y] == -1))
        return {"epsilon_lb": one_run_epsilon_lb(r, v, confidence), "r": r, "v": v, "k_pos": int(k_pos),
                "k_neg": int(k_neg), "canaries": int(s.shape[0]), "confidence": float(confidence),
                "method": "given"}
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or fr.shape[0] == 0 or not np.all((fr >= 0.0) & (fr <= 1.0)):
        raise ValueError(f"fractions must be a non-empty list of numbers in [0, 1], got {fractions!r}")
    if s.shape[0] < 2:
        raise ValueError(f"choosing k_pos and k_neg on a held-out half needs at least 2 canaries, got {s.shape[0]}")
    perm = rng.permutation(s.shape[0])
    half_a, half_b = perm[: s.shape[0] // 2], perm[s.shape[0] // 2 :]
    n_a, n_b = half_a.shape[0], half_b.shape[0]
    top, bottom = _right_guesses(y[half_a][_rank_order(s[half_a], rng)])
    best, pick = -1.0, (0.0, 0.0)
    for f_pos in fr:
        for f_neg in fr:
            kp, kn = round(f_pos * n_a), round(f_neg * n_a)
            if f_pos + f_neg > 1.0 + 1e-12 or kp + kn > n_a:
                continue
            e = _one_run_eps(kp + kn, int(top[kp] + bottom[kn]), beta_)
            if e > best:
                best, pick = e, (float(f_pos), float(f_neg))
    kp, kn = round(pick[0] * n_b), round(pick[1] * n_b)
    kn = min(kn, n_b - kp)
    top, bottom = _right_guesses(y[half_b][_rank_order(s[half_b], rng)])
    v = int(top[kp] + bottom[kn])
    return {"epsilon_lb": one_run_epsilon_lb(kp + kn, v, confidence), "r": kp + kn, "v": v, "k_pos": kp,
            "k_neg": kn, "canaries": n_b, "confidence": float(confidence), "method": "split"}


def full_metrics(
    scores: np.ndarray,
    is_member: np.ndarray,
    fpr_levels: Sequence[float] = DEFAULT_FPR_LEVELS,
    fnr_levels: Sequence[float] = DEFAULT_FNR_LEVELS,
    n_boot: int = 0,
    seed: int = 0,
    delta: float = 0.0,
    confidence: float = 0.95,
    epsilon_method: str = "split",
) -> dict[str, float | None]:
    """attack_metrics' keys plus TNR at each FNR level, the epsilon lower bound and optional bootstrap CIs.

    "epsilon_lb" is epsilon_lower_bound(..., delta, confidence, method=epsilon_method, seed=seed)["epsilon_lb"],
    valid at `confidence` (the seed also draws the bootstrap resamples). The intervals are bootstrap_ci's
    95% percentile intervals whatever `confidence` is.

    Keys: those of attack_metrics, fnr_key(f) ("tnr_fnr_0.001", ...), "epsilon_lb" and, when n_boot > 0,
    "auc_ci_low", "auc_ci_high", "<fpr_key(f)>_ci_low", "<fpr_key(f)>_ci_high" (None where n/a).
    """
    for name, levels in (("fpr_levels", fpr_levels), ("fnr_levels", fnr_levels)):
        if isinstance(levels, int | float) or not isinstance(levels, Sequence | np.ndarray):
            raise TypeError(f"{name} is a list of levels in (0, 1], e.g. [0.01, 0.001]; got {levels!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 0:
        raise ValueError(f"n_boot is the number of bootstrap resamples, an int >= 0 (0: no intervals); got {n_boot!r}")
    out = attack_metrics(scores, is_member, fpr_levels)
    s, y = _validate(scores, is_member)
    for f in fnr_levels:
        if not 0.0 < float(f) <= 1.0:
            raise ValueError(f"FNR level must lie in (0, 1], got {f}")
    fpr, tpr, _ = _roc_curve(y, s)
    n_in = int(y.sum())
    for f in fnr_levels:
        out[fnr_key(float(f))] = tnr_at_fnr(fpr, tpr, float(f), n_in)
    out["epsilon_lb"] = float(
        epsilon_lower_bound(s, y, delta=delta, confidence=confidence, method=epsilon_method, seed=seed)["epsilon_lb"]
    )
    if n_boot > 0:
        for key, (lo, hi) in bootstrap_ci(s, y, fpr_levels, n_boot=n_boot, seed=seed).items():
            out[f"{key}_ci_low"] = lo
            out[f"{key}_ci_high"] = hi
    return out


_LABELS = {
    "auc": "AUC",
    "balanced_accuracy": "Bal. acc",
    "accuracy": "Accuracy",
    "epsilon_lb": "eps LB",
    "ece": "ECE",
}


def _level_label(key: str, prefix: str, fmt: str) -> str | None:
    if not key.startswith(prefix):
        return None
    try:
        level = float(key[len(prefix) :])
    except ValueError:
        return None
    return fmt.format(f"{level * 100:.6g}")


# The values a flat metric can take, by its last part (`loss/auc` -> auc, `ood/loss/gaussian/aupr` -> aupr):
# rates, accuracies, areas, precisions and max softmax scores are fractions; the accuracy gap a difference of
# two; the epsilon bound, the inversion's feature distances and FID are >= 0 without a top.
_FRACTIONS = ("auc", "auroc", "aupr", "precision", "recall", "fpr", "fpr_tpr95", "top1", "top5", "test_ece")
_NONNEGATIVE = ("epsilon_lb", "knn_dist", "fid")


def metric_range(name: str) -> tuple[float, float] | None:
    """(low, high): what the flat metric `name` (a sweep's objective or constraint) can take; None where it is
    not known here (`defense/KEY`, the defense's own report)."""
    if name.startswith("defense/"):
        return None
    key = name.rpartition("/")[2]
    if key == "generalization_gap":
        return (-1.0, 1.0)
    if key in _NONNEGATIVE:
        return (0.0, math.inf)
    if key in _FRACTIONS or key.endswith("accuracy") or key.startswith(("tpr_fpr_", "tnr_fnr_", "max_score_")):
        return (0.0, 1.0)
    return None


def shown_as_percent(key: str) -> bool:
    """Whether an audit's console table and page show a metric as a percent: rates and accuracies (the
    attack's TPR, TNR and balanced accuracy, the model's accuracies and gap); AUC, ECE and epsilon stay
    numbers. A sweep's objectives are fractions throughout (docs/architecture.md, report/html.py)."""
    base = key.removesuffix("_ci_low").removesuffix("_ci_high")
    return base.startswith(("tpr_", "tnr_")) or base.endswith("accuracy") or base == "generalization_gap"


def metric_label(key: str) -> str:
    """Display name of a metric key: 'tpr_fpr_0.001' -> 'TPR@0.1%FPR', 'tnr_fnr_0.001' -> 'TNR@0.1%FNR',
    'auc' -> 'AUC', 'epsilon_lb' -> 'eps LB', 'auc_ci_low' -> 'AUC CI low'; unknown keys unchanged."""
    for suffix in ("_ci_low", "_ci_high"):
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            label = metric_label(base)
            return key if label == base else f"{label} CI {suffix[len('_ci_') :]}"
    if key in _LABELS:
        return _LABELS[key]
    for prefix, fmt in (("tpr_fpr_", "TPR@{}%FPR"), ("tnr_fnr_", "TNR@{}%FNR")):
        label = _level_label(key, prefix, fmt)
        if label is not None:
            return label
    return key


def table_columns(attacks: dict[str, dict[str, float | None]]) -> tuple[list[str], list[str]]:
    """(the metric keys an attack table shows, the FPR/FNR levels it leaves out): a level that is n/a for
    every attack (fewer than 1/level non-members, or members, per target) is a column of "n/a" only, so the
    table names it once below instead. Confidence-interval keys go into their metric's cell."""
    keys = [k for k in next(iter(attacks.values()), {}) if "_ci_" not in k]
    unresolved = [k for k in keys if k.startswith(("tpr_fpr_", "tnr_fnr_"))
                  and all(ms.get(k) is None for ms in attacks.values())]
    return [k for k in keys if k not in unresolved], unresolved


def unresolved_note(unresolved: list[str]) -> str:
    """One line naming the levels a table leaves out, and why ('' when none)."""
    if not unresolved:
        return ""
    return (f"n/a for every attack, not shown: {', '.join(metric_label(k) for k in unresolved)} (a level needs "
            "at least 1/level non-members per target, members for FNR levels)")
