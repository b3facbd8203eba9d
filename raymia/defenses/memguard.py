"""A simplified MemGuard (Jia et al., CCS 2019): bounded, label-preserving noise on released confidences.

MemGuard adds to each confidence vector the noise, found by optimisation against a defender's own
attack model, that fools the attack while keeping the predicted label and bounding the distortion. This
simplified version keeps the two constraints (argmax unchanged, L1 distortion of the probability vector
<= epsilon) but uses a fixed rule instead of the attack-driven search:

- ``flatten``: take delta <= epsilon / 2 of probability from the top class and spread it evenly over the
  other classes, the largest such delta that keeps the top class strictly first (confidence reduction);
- ``random``: mix p with a uniformly random point q of the simplex, p' = (1 - t) p + t q, with the largest
  t whose distortion t * ||q - p||_1 is <= epsilon and that keeps the top class strictly first.

Training is untouched; every query's logits become log(max(p', 1e-30)).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from raymia.defenses.base import DEFENSES, Defense
from raymia.registry import Params
from raymia.space import Categorical, Domain, Float

_MARGIN = 1e-6  # fraction of the feasible move left unused, so the top class stays strictly first
_FLOOR = 1e-30


class MemGuardParams(Params):
    epsilon: float = Field(0.5, ge=0.0, le=2.0, description="L1 budget of the change of each probability "
                           "vector (2 is the largest possible L1 distance)")
    mode: Literal["flatten", "random"] = Field(
        "flatten", description="flatten: move mass from the top class to the others; random: mix with a "
        "random probability vector")


def _flatten(p: torch.Tensor, top: torch.Tensor, epsilon: float) -> torch.Tensor:
    c = p.shape[1]
    p_top = p.gather(1, top[:, None]).squeeze(1)
    second = p.scatter(1, top[:, None], -1.0).max(dim=1).values
    # p_top - d > second + d / (C - 1)  <=>  d < (p_top - second) * (C - 1) / C
    room = ((p_top - second) * (c - 1) / c * (1.0 - _MARGIN)).clamp_min(0.0)
    delta = torch.minimum(room, torch.full_like(room, epsilon / 2.0))
    is_top = torch.zeros_like(p, dtype=torch.bool).scatter(1, top[:, None], True)
    return torch.where(is_top, p - delta[:, None], p + (delta / (c - 1))[:, None])


def _mix_random(p: torch.Tensor, top: torch.Tensor, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    # A uniform point of the simplex: normalised exponential draws (Dirichlet(1, ..., 1)).
    u = torch.rand(p.shape, generator=generator, dtype=torch.float64).clamp_min(1e-12)
    q = -u.log()
    q = (q / q.sum(dim=1, keepdim=True)).to(p.device, p.dtype)
    dist = (q - p).abs().sum(dim=1)
    t = torch.where(dist > 0, epsilon / dist.clamp_min(1e-300), torch.ones_like(dist)).clamp(max=1.0)
    # keep p'_top > p'_j: (1 - t)(p_top - p_j) + t (q_top - q_j) > 0 for every j
    gap_p = p.gather(1, top[:, None]) - p  # >= 0
    gap_q = q.gather(1, top[:, None]) - q
    bad = gap_q < 0
    bound = torch.where(bad, gap_p / (gap_p - gap_q).clamp_min(1e-300), torch.ones_like(p))
    t = torch.minimum(t, bound.min(dim=1).values * (1.0 - _MARGIN))
    return (1.0 - t[:, None]) * p + t[:, None] * q


@DEFENSES.register(
    "memguard",
    MemGuardParams,
    doc="MemGuard-style output perturbation (simplified): bounded L1 noise that keeps the predicted label.",
)
class MemGuard(Defense):
    """Label-preserving confidence perturbation with an L1 budget (simplified MemGuard, no attack model).

    Computed in float64; a row whose argmax would still change after the round trip to float32 logits
    (ties in the probabilities) is released unchanged, so the predicted label never changes.
    """

    name = "memguard"
    params: MemGuardParams

    def postprocess_logits(
        self, model: torch.nn.Module, logits: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        if logits.shape[0] == 0 or logits.shape[1] < 2 or self.params.epsilon == 0:
            return logits
        p = logits.double().softmax(dim=1)
        top = logits.argmax(dim=1)
        if self.params.mode == "flatten":
            p_new = _flatten(p, top, self.params.epsilon)
        else:
            p_new = _mix_random(p, top, self.params.epsilon, generator)
        out = p_new.clamp_min(_FLOOR).log().to(logits.dtype)
        keep = out.argmax(dim=1) == top
        return torch.where(keep[:, None], out, logits)

    @property
    def modifies_outputs(self) -> bool:
        return self.params.epsilon > 0

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {"epsilon": Float(0.0, 1.0), "mode": Categorical(("flatten", "random"))}
