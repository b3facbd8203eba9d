"""Label-only attack of Choquette-Choo et al. (2021), data-augmentation variant.

Only predicted labels are used (argmax of the logits; ties go to the lowest class index), never scores: the
attack applies to models that return labels alone. Each query of the signals is one augmentation of the
input (identity, hflip, shift:1:0, noise:0.1, ...). A model that trained on a point tends to classify it
correctly under more augmentations, so the score is

    agreement(i) = number of the selected queries on which the target predicts the true label y_i.

With `calibrated`, a per-point difficulty calibration from the shadows is subtracted: the mean agreement of
the shadows that did NOT train on the point (OUT). Points that every model gets right (easy) or wrong (hard)
then score near 0 whatever their membership. A point without any OUT shadow takes the mean agreement over
all OUT (shadow, point) pairs. The target's own membership row is never read.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, field_validator

from raymia.attacks.mia import per_model
from raymia.attacks.registry import ATTACKS
from raymia.registry import Params
from raymia.signals import Signals


class LabelOnlyParams(Params):
    queries: list[int] | None = Field(
        None,
        min_length=1,
        description="Indices of the query augmentations to count agreement on (None = every query).",
    )
    calibrated: bool = Field(
        False,
        description="Subtract, per point, the mean agreement of the shadow models that did not train on it.",
    )

    @field_validator("queries")
    @classmethod
    def _distinct_non_negative(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if any(q < 0 for q in v):
            raise ValueError("query indices must be >= 0")
        if len(set(v)) != len(v):
            raise ValueError("query indices must be distinct")
        return v


def agreement(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Number of queries whose predicted label is the true label: logits [..., Q, P, C] -> float64 [..., P]."""
    return np.sum(np.argmax(logits, axis=-1) == labels, axis=-2).astype(np.float64)


@ATTACKS.register(
    "label_only",
    LabelOnlyParams,
    doc="Choquette-Choo et al. label-only attack: number of augmentations the target classifies correctly.",
)
def label_only_attack(signals: Signals, target: int, params: LabelOnlyParams) -> np.ndarray:
    """Agreement count of the target, optionally minus the OUT shadows' mean agreement (see module doc)."""
    shadows = signals.shadows_of(target)
    queries = list(range(signals.num_queries)) if params.queries is None else params.queries
    bad = [q for q in queries if q >= signals.num_queries]
    if bad:
        raise ValueError(f"queries {bad} out of range: the signals hold {signals.num_queries} queries")
    qs = np.asarray(queries, dtype=np.intp)
    agree = signals.derived(("label_only agreement", tuple(queries)),  # [M, P]
                            lambda: per_model(lambda z, y: agreement(z[qs], y), signals.logits, signals.labels))
    score = agree[target]
    if not params.calibrated:
        return score.copy()  # agree is shared by every target, read-only
    out = ~np.asarray(signals.keep[shadows], dtype=np.bool_)  # [S, P]
    if not out.any():
        raise ValueError("calibrated label_only needs OUT shadows: every shadow trained on every point")
    sh_agree = agree[shadows]  # [S, P]
    n_out = out.sum(axis=0)
    sums = np.sum(np.where(out, sh_agree, 0.0), axis=0)
    pooled = float(sums.sum() / n_out.sum())
    ref = np.where(n_out > 0, sums / np.maximum(n_out, 1), pooled)
    return score - ref
