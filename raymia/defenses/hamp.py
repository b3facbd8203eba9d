"""HAMP (Chen & Pattabiraman, NDSS 2024): high-entropy soft labels, an entropy regulariser, and
test-time output modification.

Training replaces each one-hot label with a soft label whose entropy is at least ``gamma * ln K`` and
fits it with a KL loss minus ``alpha`` times the mean prediction entropy, so the model is never
over-confident on its members. At query time the released logits are those of a random input, re-ordered
so that the query's class ranking (hence accuracy) is kept while the confidence carries no membership
signal.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from raymia.datainfo import DataInfo
from raymia.defenses.base import DEFENSES, Defense
from raymia.registry import Params
from raymia.space import Categorical, Domain, Float

# The paper's per-data-set (gamma, alpha), from its train-all.sh (docs/validity.md).
HAMP_DEFAULTS: dict[str, tuple[float, float]] = {
    "cifar10": (0.95, 0.001),
    "cifar100": (0.5, 0.005),
    "purchase100": (0.8, 0.01),
    "texas100": (0.6, 0.01),
    "location30": (0.5, 0.001),
}

_STEPS = 100  # the soft-label search moves true-class mass in steps of 1/_STEPS = 0.01


class HampParams(Params):
    """HAMP's parameters.

    ``kl_reduction``: the official code uses ``torch.nn.functional.kl_div``'s default ``'mean'``, which
    divides the summed KL by batch * K; ``'batchmean'`` divides by the batch only (the true mean KL), so
    the KL term is K times larger and ``alpha`` should be multiplied by K to keep the same balance.
    """

    gamma: float | None = Field(
        None, gt=0.0, lt=1.0, description="target entropy of the soft labels, as a fraction of ln K; None: the "
        "paper's setting for the data set (" + ", ".join(f"{k} {g}" for k, (g, _) in HAMP_DEFAULTS.items())
        + "), CIFAR-10's for any other"
    )
    alpha: float | None = Field(
        None, ge=0.0, description="weight of the entropy regulariser (subtracted); None: the paper's setting "
        "for the data set (" + ", ".join(f"{k} {a}" for k, (_, a) in HAMP_DEFAULTS.items())
        + "), CIFAR-10's for any other"
    )
    output_modification: bool = Field(
        True, description="release a random input's logits re-ordered to the query's class ranking"
    )
    kl_reduction: Literal["mean", "batchmean"] = Field(
        "mean",
        description="kl_div reduction: 'mean' (official code, / batch*K) or 'batchmean' (/ batch; scale "
        "alpha by K)",
    )


def _entropy_of_step(num_classes: int, k: int) -> float:
    """Entropy (nats) of the soft label after k steps: true mass (100-k)/100, rest spread evenly."""
    p = (_STEPS - k) / _STEPS
    q = (k / _STEPS) / (num_classes - 1)
    h = 0.0
    if p > 0:
        h -= p * math.log(p)
    if q > 0:
        h -= (num_classes - 1) * q * math.log(q)
    return h


def soft_label_true_mass(num_classes: int, gamma: float) -> float:
    """True-class probability of HAMP's soft label: starting from one-hot, move 0.01 of mass per step
    from the true class to the other K-1 classes (evenly), and stop at the first step whose entropy is
    >= gamma * ln K. Steps are counted as integers so the mass is exactly (100-k)/100."""
    if num_classes < 2:
        raise ValueError(f"HAMP needs at least 2 classes, got {num_classes}")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    target = gamma * math.log(num_classes)
    for k in range(_STEPS + 1):
        if _entropy_of_step(num_classes, k) >= target:
            return (_STEPS - k) / _STEPS
    raise ValueError(f"no 0.01-step soft label reaches entropy {gamma} * ln {num_classes}")


def soft_labels(y: torch.Tensor, num_classes: int, gamma: float) -> torch.Tensor:
    """HAMP soft labels for hard labels y (int [n]): float32 [n, K] on y's device, rows summing to 1."""
    y = torch.as_tensor(y).long()
    p = soft_label_true_mass(num_classes, gamma)
    q = (1.0 - p) / (num_classes - 1)
    out = torch.full((y.shape[0], num_classes), q, dtype=torch.float32, device=y.device)
    out.scatter_(1, y.view(-1, 1), p)
    return out


def rearrange_logits(query: torch.Tensor, random: torch.Tensor) -> torch.Tensor:
    """Put random's j-th largest logit where query's j-th largest logit is, per row. A stable sort keeps
    the query's order among ties, so argmax (first maximum) and ranking are unchanged."""
    order = torch.argsort(query, dim=1, descending=True, stable=True)
    values = torch.sort(random, dim=1, descending=True).values.to(query.dtype)
    return torch.empty_like(query).scatter_(1, order, values)


@DEFENSES.register(
    "hamp",
    HampParams,
    doc="HAMP (NDSS 2024): high-entropy soft labels + entropy regulariser + rank-preserving output "
    "modification.",
)
class Hamp(Defense):
    """HAMP: soft-label KL training with an entropy bonus, and random-input output modification."""

    params: HampParams

    def __init__(self, params: HampParams, info: DataInfo, label_smoothing: float = 0.0):
        # HAMP's soft labels replace the recipe's label smoothing.
        gamma, alpha = HAMP_DEFAULTS.get(info.name, HAMP_DEFAULTS["cifar10"])
        # the setting in use, in the params that check and the console print
        params = params.model_copy(update={"gamma": gamma if params.gamma is None else params.gamma,
                                           "alpha": alpha if params.alpha is None else params.alpha})
        super().__init__(params, info, label_smoothing)

    # --- training ----------------------------------------------------------------------------------
    def transform_train_data(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, soft_labels(y, self.info.num_classes, self.params.gamma)

    def loss(self, logits: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
        """KL(y_soft || softmax(logits)) with the chosen reduction, minus alpha * mean entropy."""
        if not torch.is_floating_point(y_target):
            y_target = soft_labels(y_target, logits.shape[1], self.params.gamma)
        y_target = y_target.to(device=logits.device, dtype=logits.dtype)
        log_probs = F.log_softmax(logits, dim=1)
        # KL summed over the batch, spelt out (torch.kl_div has no vmap batching rule, and its 'mean'
        # reduction, sum / (batch * K), is deprecated); xlogy makes 0 * log 0 = 0.
        kl = (torch.xlogy(y_target, y_target) - y_target * log_probs).sum()
        kl = kl / (logits.numel() if self.params.kl_reduction == "mean" else logits.shape[0])
        entropy = -(log_probs.exp() * log_probs).sum(dim=1).mean()
        return kl - self.params.alpha * entropy

    # --- queries -----------------------------------------------------------------------------------
    def postprocess_logits(
        self, model: torch.nn.Module, logits: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Replace each query's logits by a random input's logits, re-ordered to the query's ranking.
        The model's train/eval mode is left as the caller set it."""
        if not self.params.output_modification:
            return logits
        n = logits.shape[0]
        if n == 0:
            return logits
        x_rand = self.info.random_inputs(n, generator, device=logits.device)
        with torch.no_grad():
            rand_logits = model(x_rand)
        return rearrange_logits(logits, rand_logits)

    @property
    def modifies_outputs(self) -> bool:
        return self.params.output_modification

    # --- declarations ------------------------------------------------------------------------------
    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {
            "gamma": Float(0.3, 0.99),
            "alpha": Float(1e-4, 5e-2, log=True),
            "output_modification": Categorical((True, False)),
        }
