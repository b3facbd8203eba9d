"""Membership-inference metrics over score arrays (REFERENCE.md section 3).

Every function takes one score per audited point (higher = more likely a member) and the ground truth.
Scores are handled in float64 throughout: low-FPR metrics depend on the order of a few extreme scores,
and casting to float32 would create ties that do not exist.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import auc, roc_curve

DEFAULT_FPR_LEVELS: tuple[float, ...] = (0.01, 0.001)


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


_LABELS = {"auc": "AUC", "balanced_accuracy": "Bal. acc", "accuracy": "Accuracy"}


def metric_label(key: str) -> str:
    """Display name of a metric key: 'tpr_fpr_0.001' -> 'TPR@0.1%FPR', 'auc' -> 'AUC'; others unchanged."""
    if key in _LABELS:
        return _LABELS[key]
    if key.startswith("tpr_fpr_"):
        try:
            level = float(key[len("tpr_fpr_") :])
        except ValueError:
            return key
        return f"TPR@{level * 100:.6g}%FPR"
    return key


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of logits [N, C] (or probabilities: argmax is the same) against labels [N]."""
    z = np.asarray(logits)
    y = np.asarray(labels)
    if z.ndim != 2 or y.ndim != 1 or z.shape[0] != y.shape[0]:
        raise ValueError(f"expected logits [N, C] and labels [N], got {z.shape} and {y.shape}")
    if z.shape[0] == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(np.argmax(z, axis=1) == y))
