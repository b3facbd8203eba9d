"""Membership inference attacks, and the numerically stable output transforms they share.

All transforms widen to float64 before any arithmetic and work on logits directly, so that confident
outputs (p_y within float32 epsilon of 1) keep their information instead of collapsing to log(0). log p is
computed as (z - max) - log1p(sum of the other classes' exp(z_j - max)), never as z - logsumexp(z): the latter
rounds to a multiple of ulp(max), so it is 0.6% off at a margin of 30 and exactly 0 from about 34 (p within
float64 epsilon of 1), and the loss would tie every such point at 0 although
-log p_y ~ sum_{j != y} e^(z_j - z_y) is a normal float64 number.
"""

from __future__ import annotations

import numpy as np


def _as_index(labels: np.ndarray, batch_shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """labels broadcast to batch_shape + (1,), as an index array for take/put_along_axis."""
    y = np.asarray(labels)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return np.broadcast_to(y, batch_shape)[..., None].astype(np.intp, copy=False)


def _logsumexp(z: np.ndarray) -> np.ndarray:
    """log(sum(exp(z), axis=-1)) with the max subtracted first (z float64, last axis reduced)."""
    mx = np.max(z, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    return mx[..., 0] + np.log(np.sum(np.exp(z - mx), axis=-1))


def _shifted(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z - max, log1p(s)) for float64 z, s = sum of exp(z_j - max) over every class but the argmax, so
    that log softmax = (z - max) - log1p(s) holds to float64 precision also where p is within float64
    epsilon of 1: there z - logsumexp(z) cancels (logsumexp rounds to the max once s is below half its
    ulp, from a margin of about 34 on), while log p_top = -log1p(s) is still a normal number (-2.9e-20 at a
    margin of 45 over two classes)."""
    mx = np.max(z, axis=-1, keepdims=True)
    d = z - np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(d)
    np.put_along_axis(e, np.argmax(z, axis=-1)[..., None], 0.0, axis=-1)
    return d, np.log1p(np.sum(e, axis=-1))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64, accurate also for p within float64 epsilon of 1."""
    d, l1p = _shifted(np.asarray(logits, dtype=np.float64))
    return d - l1p[..., None]


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy -log p_y = logsumexp(z) - z_y, float64 of shape logits.shape[:-1], computed
    as log1p(s) - (z_y - max z) (see `_shifted`), so a confident output keeps its loss (about sum_{j != y}
    e^(z_j - z_y)) instead of rounding to 0.

    labels broadcast against logits.shape[:-1] (e.g. labels [P] with logits [Q, P, C]).
    """
    z = np.asarray(logits, dtype=np.float64)
    idx = _as_index(labels, z.shape[:-1], z.shape[-1])
    d, l1p = _shifted(z)
    return l1p - np.take_along_axis(d, idx, axis=-1)[..., 0]


def per_model(fn, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """fn(logits[m], labels) for every model m, float64 [M, ...]: one model at a time, so a transform's
    float64 working copies are one model's outputs, never the bank's (8/4 = 2 bytes per logit each)."""
    z = np.asarray(logits)
    first = np.asarray(fn(z[0], labels), dtype=np.float64)
    out = np.empty((z.shape[0], *first.shape), dtype=np.float64)
    out[0] = first
    for m in range(1, z.shape[0]):
        out[m] = fn(z[m], labels)
    return out


def _phi_block(z: np.ndarray, idx: np.ndarray) -> np.ndarray:
    z = np.array(z, dtype=np.float64)  # always a private copy: the label column is overwritten below
    zy = np.take_along_axis(z, idx, axis=-1)[..., 0]
    np.put_along_axis(z, idx, -np.inf, axis=-1)
    return zy - _logsumexp(z)


def logit_scaled_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's statistic phi = log p_y - log(1 - p_y) = z_y - logsumexp_{j != y} z_j, float64.

    logits [..., P, C], labels broadcastable to [..., P]; returns [..., P]. Arrays with leading axes are
    processed one leading slice at a time, so the float64 working copy stays the size of one slice.
    """
    z = np.asarray(logits)
    if z.ndim < 1 or z.shape[-1] < 2:
        raise ValueError(f"logit-scaled confidence needs at least 2 classes, got logits of shape {z.shape}")
    idx = _as_index(labels, z.shape[:-1], z.shape[-1])
    if z.ndim <= 2:
        return _phi_block(z, idx)
    out = np.empty(z.shape[:-1], dtype=np.float64)
    for i in range(z.shape[0]):
        out[i] = _phi_block(z[i], idx[i])
    return out
