"""Global-threshold attacks that look at the target's output only (no shadow models needed)."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from raymia.attacks.mia import cross_entropy
from raymia.attacks.registry import ATTACKS
from raymia.registry import Params
from raymia.signals import Signals


class LossParams(Params):
    query: int = Field(
        0, ge=0, description="Index of the query augmentation to score (0 = the original input)."
    )


@ATTACKS.register("loss", LossParams, doc="Yeom et al. loss threshold: score = -cross-entropy of the target.")
def loss_attack(signals: Signals, target: int, params: LossParams) -> np.ndarray:
    """Score = -CE(softmax(z), y) of the target model on one query: members tend to have lower loss."""
    signals.shadows_of(target)  # range check of `target`
    if params.query >= signals.num_queries:
        raise ValueError(f"query {params.query} out of range: the signals hold {signals.num_queries} queries")
    return -cross_entropy(signals.logits[target, params.query], signals.labels)
