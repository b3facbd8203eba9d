"""Membership-inference metrics over score arrays (REFERENCE.md section 3).

Every function takes one score per audited point (higher = more likely a member) and the ground truth.
Scores are handled in float64 throughout: low-FPR metrics depend on the order of a few extreme scores,
and casting to float32 would create ties that do not exist.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import beta
from sklearn.metrics import auc, roc_curve

DEFAULT_FPR_LEVELS: tuple[float, ...] = (0.01, 0.001)
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


def roc(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve (fpr, tpr, thresholds) of the rule `score >= threshold => member`, all points kept."""
    s, y = _validate(scores, is_member)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thresholds


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
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    n_out = int(np.count_nonzero(~y))
    out: dict[str, float | None] = {
        "auc": float(auc(fpr, tpr)),  # trapezoids = Mann-Whitney, ties count 1/2
        "balanced_accuracy": balanced_accuracy(fpr, tpr),
    }
    for f in fpr_levels:
        out[fpr_key(float(f))] = tpr_at_fpr(fpr, tpr, float(f), n_out)
    return out


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of logits [N, C] (or probabilities: argmax is the same) against labels [N]."""
    z = np.asarray(logits)
    y = np.asarray(labels)
    if z.ndim != 2 or y.ndim != 1 or z.shape[0] != y.shape[0]:
        raise ValueError(f"expected logits [N, C] and labels [N], got {z.shape} and {y.shape}")
    if z.shape[0] == 0:
        raise ValueError("accuracy of an empty set is undefined")
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


def _cp_lower(k: np.ndarray, n: int, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of a proportion with k successes of n (0 when k = 0)."""
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        lo = beta.ppf(1.0 - confidence, k, n - k + 1.0)
    return np.where(k > 0, lo, 0.0)


def _cp_upper(k: np.ndarray, n: int, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound of a proportion with k successes of n (1 when k = n)."""
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        hi = beta.ppf(confidence, k + 1.0, n - k)
    return np.where(k < n, hi, 1.0)


def epsilon_lower_bound(
    scores: np.ndarray,
    is_member: np.ndarray,
    delta: float = 0.0,
    confidence: float = 0.95,
    bonferroni: bool = False,
) -> dict[str, float | str | None]:
    """Empirical (epsilon, delta)-DP lower bound of the attack `score >= t => member` (privacy auditing).

    For every threshold t (each distinct score) the member / non-member counts give one-sided Clopper-Pearson
    bounds TPR_low, FPR_high, TNR_low, FNR_high, and
        eps_lb = max_t max(log((TPR_low - delta) / FPR_high), log((TNR_low - delta) / FNR_high)),
    terms with a non-positive numerator skipped, 0.0 when no term is positive. As in common auditing
    practice each bound holds at `confidence` for its own threshold; the maximum over thresholds is not
    corrected for that choice unless bonferroni=True, which runs every bound at
    1 - (1 - confidence) / (number of thresholds). A correct DP-SGD model must never exceed its accounted
    epsilon (up to the 1 - confidence failure chance).

    Returns {"epsilon_lb", "threshold" (None when 0), "side" ("tpr/fpr" or "tnr/fnr"), "tpr_low",
    "fpr_high", "tnr_low", "fnr_high" (at that threshold), "confidence" (per bound), "delta"}.
    """
    s, y = _validate(scores, is_member)
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must lie in [0, 1), got {delta}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    keep = np.isfinite(thresholds)  # drop the (0, 0) corner at threshold +inf: it predicts no member
    n_in, n_out = int(y.sum()), int((~y).sum())
    tp = np.rint(tpr[keep] * n_in)
    fp = np.rint(fpr[keep] * n_out)
    thresholds = thresholds[keep]
    conf = 1.0 - (1.0 - confidence) / thresholds.shape[0] if bonferroni else confidence
    tpr_low, fpr_high = _cp_lower(tp, n_in, conf), _cp_upper(fp, n_out, conf)
    tnr_low, fnr_high = _cp_lower(n_out - fp, n_out, conf), _cp_upper(n_in - tp, n_in, conf)
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.where(tpr_low - delta > 0, np.log((tpr_low - delta) / fpr_high), -np.inf)
        e2 = np.where(tnr_low - delta > 0, np.log((tnr_low - delta) / fnr_high), -np.inf)
    best = np.maximum(e1, e2)
    i = int(np.argmax(best))
    out: dict[str, float | str | None] = {
        "epsilon_lb": 0.0, "threshold": None, "side": None, "tpr_low": None, "fpr_high": None,
        "tnr_low": None, "fnr_high": None, "confidence": float(conf), "delta": float(delta),
    }
    if best[i] > 0:
        out.update(
            epsilon_lb=float(best[i]), threshold=float(thresholds[i]),
            side="tpr/fpr" if e1[i] >= e2[i] else "tnr/fnr", tpr_low=float(tpr_low[i]),
            fpr_high=float(fpr_high[i]), tnr_low=float(tnr_low[i]), fnr_high=float(fnr_high[i]),
        )
    return out


def full_metrics(
    scores: np.ndarray,
    is_member: np.ndarray,
    fpr_levels: Sequence[float] = DEFAULT_FPR_LEVELS,
    fnr_levels: Sequence[float] = DEFAULT_FNR_LEVELS,
    n_boot: int = 0,
    seed: int = 0,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> dict[str, float | None]:
    """attack_metrics' keys plus TNR at each FNR level, the epsilon lower bound and optional bootstrap CIs.

    Keys: those of attack_metrics, fnr_key(f) ("tnr_fnr_0.001", ...), "epsilon_lb" and, when n_boot > 0,
    "auc_ci_low", "auc_ci_high", "<fpr_key(f)>_ci_low", "<fpr_key(f)>_ci_high" (None where n/a).
    """
    out = attack_metrics(scores, is_member, fpr_levels)
    s, y = _validate(scores, is_member)
    for f in fnr_levels:
        if not 0.0 < float(f) <= 1.0:
            raise ValueError(f"FNR level must lie in (0, 1], got {f}")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    n_in = int(y.sum())
    for f in fnr_levels:
        out[fnr_key(float(f))] = tnr_at_fnr(fpr, tpr, float(f), n_in)
    out["epsilon_lb"] = float(epsilon_lower_bound(s, y, delta=delta, confidence=confidence)["epsilon_lb"])
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
