"""RelaxLoss (Chen, Yu & Fritz, ICLR 2022): keep the training loss near a target level alpha.

Members are told apart from non-members by their lower loss; RelaxLoss stops training from driving the
members' loss towards 0. While the batch's mean cross-entropy is above alpha it is minimised as usual;
below alpha the loss is pushed back up (gradient ascent) and the posteriors of correctly classified
samples are flattened (their non-true-class probabilities made equal, the true-class probability kept),
so members' outputs resemble non-members' in both loss and shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from raymia.defenses.base import DEFENSES, Defense
from raymia.registry import Params
from raymia.space import Domain, Float


class RelaxLossParams(Params):
    alpha: float = Field(0.5, gt=0.0, le=10.0, description="target level of the mean training cross-entropy")


def relaxloss(logits: torch.Tensor, y: torch.Tensor, alpha: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """|mean CE - alpha| plus, when the mean CE is below alpha, the posterior-flattening loss of the
    correctly classified samples: soft cross-entropy against targets t with t_y = p_y (detached) and
    t_j = (1 - p_y) / (C - 1) elsewhere, averaged over the batch. Without Python control flow on tensors
    (vmap-friendly)."""
    num_classes = logits.shape[1]
    log_p = F.log_softmax(logits, dim=1)
    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    is_true = torch.arange(num_classes, device=logits.device)[None, :] == y[:, None]  # [B, C] bool
    p_true = torch.where(is_true, log_p.exp(), torch.zeros_like(log_p)).sum(dim=1).detach()  # [B]
    others = ((1.0 - p_true) / (num_classes - 1))[:, None]
    target = torch.where(is_true, p_true[:, None], others)
    correct = (logits.argmax(dim=1) == y).to(logits.dtype)
    flatten = (correct * -(target * log_p).sum(dim=1)).mean()
    below = (ce < alpha).to(logits.dtype).detach()
    return (ce - alpha).abs() + below * flatten


@DEFENSES.register(
    "relaxloss",
    RelaxLossParams,
    doc="RelaxLoss (ICLR 2022): hold the training loss near alpha (ascent below it) + posterior flattening.",
)
class RelaxLoss(Defense):
    """RelaxLoss as one vmap-friendly loss.

    The published algorithm alternates, once the batch loss is below alpha, gradient-ascent epochs and
    posterior-flattening epochs; the loss hook sees no step or epoch counter, so both updates are applied
    together: |CE - alpha| (descent above alpha, ascent below it, as in the paper's ascent epochs) plus the
    flattening term when below alpha. The flattening's true-class confidence is detached so that the term
    moves only the non-true-class probabilities (its gradient on the true-class logit is zero). Hard
    labels only (the defense keeps the data as it is); the recipe's label smoothing enters the CE.
    """

    name = "relaxloss"
    vectorizable = True
    params: RelaxLossParams

    def loss(self, logits: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
        return relaxloss(logits, y_target, self.params.alpha, self.label_smoothing)

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {"alpha": Float(0.01, 3.0, log=True)}
