"""Standard baselines that change one thing: the targets (label smoothing), the recipe (weight decay,
early stopping), or what a querier sees (confidence post-processing)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from raymia.datainfo import DataInfo
from raymia.defenses.base import DEFENSES, Defense
from raymia.registry import ActsWhen, Params
from raymia.space import Categorical, Domain, Float


class LabelSmoothingParams(Params):
    smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="label smoothing epsilon of the cross-entropy")


@DEFENSES.register("label_smoothing", LabelSmoothingParams,
                   doc="Cross-entropy against smoothed labels (Szegedy et al.); the recipe's own smoothing is replaced")
class LabelSmoothing(Defense):
    params: LabelSmoothingParams

    def __init__(self, params: LabelSmoothingParams, info: DataInfo, label_smoothing: float = 0.0):
        super().__init__(params, info, label_smoothing=params.smoothing)

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {"smoothing": Float(0.0, 0.5)}

    def inert(self, recipe: Any) -> str | None:
        if self.params.smoothing == recipe.label_smoothing:
            return f"smoothing {self.params.smoothing:g} is the recipe's own train.label_smoothing"
        return None


class WeightDecayParams(Params):
    weight_decay: float = Field(5e-4, ge=0.0, description="L2 penalty (the optimizer's weight_decay)")


@DEFENSES.register("weight_decay", WeightDecayParams, doc="L2 regularisation: the recipe's weight decay replaced")
class WeightDecay(Defense):
    params: WeightDecayParams

    def modify_recipe(self, recipe: Any) -> Any:
        return recipe.model_copy(update={"weight_decay": self.params.weight_decay})

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {"weight_decay": Float(1e-5, 1e-1, log=True)}

    def inert(self, recipe: Any) -> str | None:
        if self.params.weight_decay == recipe.weight_decay:
            return f"weight_decay {self.params.weight_decay:g} is the recipe's own train.weight_decay"
        return None


class EarlyStoppingParams(Params):
    fraction: float = Field(0.5, gt=0.0, le=1.0, description="share of the recipe's epochs trained")


@DEFENSES.register("early_stopping", EarlyStoppingParams,
                   doc="Stop training after a fraction of the recipe's epochs (a fixed budget, the same for every model)")
class EarlyStopping(Defense):
    """Early stopping as a fixed budget: every bank model stops after `fraction` of the epochs. (Stopping on
    a validation signal would give each model its own length; a fixed budget keeps target and shadows on
    the same recipe, which the adaptive attacker assumes.)"""

    params: EarlyStoppingParams

    def modify_recipe(self, recipe: Any) -> Any:
        return recipe.model_copy(update={"epochs": max(1, round(recipe.epochs * self.params.fraction))})

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {"fraction": Float(0.05, 1.0)}

    def inert(self, recipe: Any) -> str | None:
        if self.modify_recipe(recipe).epochs == recipe.epochs:
            return f"fraction {self.params.fraction:g} of the recipe's {recipe.epochs} epochs trains all of them"
        return None


class ConfidenceParams(Params):
    temperature: float = Field(1.0, gt=0.0, description="divide the logits by T before the softmax (T > 1 flattens)")
    top_k: int | None = Field(None, ge=1, description="release only the k largest probabilities (renormalised)")
    decimals: int | None = Field(None, ge=0, le=8, description="round released probabilities to this many decimals")

    # top_k 1 releases a one-hot vector, which neither the temperature nor the rounding changes
    acts_when = {"temperature": ActsWhen("top_k", unless=(1,)), "decimals": ActsWhen("top_k", unless=(1,))}


# Released zeros are stored as this log-probability so that scores stay finite.
LOG_FLOOR = -69.0  # log(1e-30)


@DEFENSES.register("confidence", ConfidenceParams,
                   doc="Confidence post-processing of every query: temperature, top-k, rounding (label kept)")
class ConfidenceMasking(Defense):
    """Post-process the released score vector. Temperature keeps the ranking; top-k zeroes all but the k
    largest probabilities and renormalises; rounding rounds to `decimals` (the top class is kept at least at
    the rounding step so the predicted label never changes). Released logits are log-probabilities with
    zeros stored as LOG_FLOOR."""

    params: ConfidenceParams

    def postprocess_logits(self, model: torch.nn.Module, logits: torch.Tensor, generator: torch.Generator
                           ) -> torch.Tensor:
        p = F.softmax(logits / self.params.temperature, dim=1)
        top = p.argmax(dim=1, keepdim=True)
        if self.params.top_k is not None and self.params.top_k < p.shape[1]:
            kth = p.topk(self.params.top_k, dim=1).values[:, -1:]
            p = torch.where(p >= kth, p, torch.zeros_like(p))
            p = p / p.sum(dim=1, keepdim=True)
        if self.params.decimals is not None:
            scale = 10.0 ** self.params.decimals
            r = torch.round(p * scale) / scale
            # keep the predicted class strictly on top: give it one rounding step above the runner-up if needed
            others = r.scatter(1, top, float("-inf")).max(dim=1, keepdim=True).values
            r = r.scatter(1, top, torch.maximum(r.gather(1, top), others + 1.0 / scale))
            p = r
        return torch.log(p.clamp_min(1e-30)).clamp_min(LOG_FLOOR)

    @property
    def modifies_outputs(self) -> bool:
        p = self.params  # a softmax's log is the logits' information: the defaults release what the model says
        return p.temperature != 1.0 or (p.top_k is not None and p.top_k < self.info.num_classes) \
            or p.decimals is not None

    def inert(self, recipe: Any) -> str | None:
        if self.modifies_outputs:
            return None
        p = self.params
        return ("temperature 1, no decimals and " + ("no top_k" if p.top_k is None else
                f"top_k {p.top_k} of {self.info.num_classes} classes") + " release the outputs unchanged")

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {"temperature": Float(0.1, 10.0, log=True), "top_k": Categorical((1, 3, None)),
                "decimals": Categorical((None, 1, 2, 3))}
