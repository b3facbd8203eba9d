"""Pruning against membership inference (MCMIA: Wang et al., IJCAI 2021, "Against Membership Inference
Attack: Pruning is All You Need"), optionally with the min-max game during retraining.

A sparse model has fewer parameters with which to memorise its members. Training is: dense pretraining,
pruning to the requested sparsity (by magnitude at once, or by ADMM, which first steers the weights
towards a sparse point), then masked retraining in which pruned weights stay exactly zero. With
``minmax_lambda`` > 0 the retraining also plays Nasr et al.'s membership game (raymia.defenses.advreg).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from raymia.datainfo import DataInfo
from raymia.defenses.advreg import Masks, apply_masks, minmax_train
from raymia.defenses.base import DEFENSES, Defense, FitJob, meta_model, require_public
from raymia.errors import SpecError
from raymia.registry import MAX_EPOCHS, ActsWhen, Params
from raymia.seeding import derive_seed
from raymia.space import Categorical, Domain, Float
from raymia.spec import LOOKAHEAD_START_EPOCHS

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class PruningParams(Params):
    sparsity: float = Field(0.7, gt=0.0, lt=1.0, description="fraction of the prunable weights set to zero")
    structure: Literal["unstructured", "filter"] = Field(
        "unstructured", description="unstructured: single weights (magnitude: one global threshold; admm: per "
        "layer); filter: whole conv output filters / linear rows, per layer")
    method: Literal["magnitude", "admm"] = Field(
        "magnitude", description="magnitude: prune the pretrained weights at once; admm: ADMM-regularised "
        "training towards the sparse set first")
    rho: float = Field(1e-3, gt=0.0, le=10.0, description="ADMM penalty rho of rho/2 ||W - Z + U||^2")
    admm_epochs: int | None = Field(
        None, ge=0, le=MAX_EPOCHS, description="ADMM epochs, on top of the recipe's (None: a third of the recipe's epochs)")
    retrain_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="share of the recipe's epochs spent on masked retraining (dense "
        "pretraining takes the rest)")
    minmax_lambda: float = Field(
        0.0, ge=0.0, description="> 0: adversarial regularisation with this lambda during masked retraining")
    inference_steps: int = Field(1, ge=1, le=100, description="min-max: inference-model steps per classifier "
                                 "step")
    inference_lr: float = Field(1e-3, gt=0.0, le=1.0, description="min-max: Adam lr of the inference model")

    acts_when = {"rho": ActsWhen("method", ("admm",)), "admm_epochs": ActsWhen("method", ("admm",)),
                 "inference_steps": ActsWhen("minmax_lambda", above=0.0),
                 "inference_lr": ActsWhen("minmax_lambda", above=0.0)}


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv / linear layer but the last one in module order (the classifier,
    whose rows are the classes: pruning it costs accuracy out of proportion to its size)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _PRUNABLE)]
    return layers[:-1]


def _layer_mask(w: torch.Tensor, structure: str, sparsity: float) -> torch.Tensor:
    """Per-layer mask keeping the largest entries (unstructured) or output filters by L1 norm (filter)."""
    if structure == "filter":
        n = w.shape[0]
        k = round(sparsity * n)
        norms = w.detach().abs().reshape(n, -1).sum(dim=1)
        keep = torch.ones(n, dtype=w.dtype, device=w.device)
        keep[torch.argsort(norms, stable=True)[:k]] = 0.0
        return keep.view(n, *([1] * (w.ndim - 1))).expand_as(w).clone()
    k = round(sparsity * w.numel())
    mask = torch.ones(w.numel(), dtype=w.dtype, device=w.device)
    mask[torch.argsort(w.detach().abs().flatten(), stable=True)[:k]] = 0.0
    return mask.view_as(w)


def compute_masks(layers: list[tuple[str, nn.Module]], structure: str, sparsity: float,
                  scope: Literal["global", "layer"] = "global",
                  weights: dict[str, torch.Tensor] | None = None) -> Masks:
    """Masks (keyed by parameter name) of the weights of `layers`, from `weights` (default: the layers'
    own). Unstructured with scope 'global': one magnitude threshold over all layers (exactly
    round(s * total) zeros); 'layer' (ADMM's projection) or filter structure: the sparsity in every layer.
    A pruned filter's bias is masked too (the filter is removed)."""
    ws = {n: (weights[n] if weights is not None else m.weight) for n, m in layers}
    masks: Masks = {}
    if structure == "unstructured" and scope == "global":
        flat = torch.cat([w.detach().abs().flatten() for w in ws.values()])
        k = round(sparsity * flat.numel())
        keep = torch.ones_like(flat)
        keep[torch.argsort(flat, stable=True)[:k]] = 0.0
        i = 0
        for n, w in ws.items():
            masks[f"{n}.weight"] = keep[i:i + w.numel()].view_as(w).clone()
            i += w.numel()
        return masks
    for n, m in layers:
        mask = _layer_mask(ws[n], structure, sparsity)
        masks[f"{n}.weight"] = mask
        if structure == "filter" and getattr(m, "bias", None) is not None:
            masks[f"{n}.bias"] = mask.reshape(mask.shape[0], -1)[:, 0].clone()
    return masks


def weight_sparsity(layers: list[tuple[str, nn.Module]]) -> float:
    """Fraction of exactly-zero weights over the prunable layers' weights (biases not counted)."""
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    total = sum(m.weight.numel() for _, m in layers)
    return zeros / max(1, total)


@DEFENSES.register(
    "pruning",
    PruningParams,
    doc="MCMIA (IJCAI 2021): dense pretraining, magnitude or ADMM pruning, masked retraining (+ min-max).",
)
class Pruning(Defense):
    """Pretrain, prune, retrain with the mask; optionally the min-max game during retraining.

    Inferred choices (the paper's algorithm text was not available):
    - prunable: the weights of every conv / linear layer but the last (the classifier); biases are not
      pruned, except the bias of a pruned filter/row (a BatchNorm after a pruned conv filter keeps its
      shift: a constant channel, foldable into the next layer); sparsity is measured over those weights;
    - unstructured magnitude pruning uses one global threshold; filter pruning removes the output filters
      (linear: rows) of lowest L1 norm in every layer, round(s * filters) per layer, so the reached
      sparsity can differ from s by up to half a filter per layer;
    - ADMM (W-step: the recipe's optimizer on CE + rho/2 sum ||W - Z + U||^2; Z = per-layer projection
      of W + U to the sparse set; U += W - Z; Z and U updated once per epoch) runs `admm_epochs` on top
      of the recipe's epochs, starting from the dense model; the final Z's mask is then applied;
    - every phase (dense, ADMM, retraining) restarts the recipe's optimizer, schedule and lookahead over its
      steps (the step loop, through `minmax_train`); with `train.lookahead` a retraining phase too short
      for lookahead to start is refused;
    - masked retraining zeroes the pruned coordinates' gradients and re-applies the mask after every
      optimizer step, so momentum or weight decay cannot revive them;
    - the min-max game's reference set is drawn from the public split (training points outside the audited
      population, as for advreg), never from the audited non-members; with minmax_lambda > 0 a plan that
      leaves no public point is refused.
    """

    params: PruningParams

    def check_data(self, data: Any, population: Any) -> None:
        """With the min-max game, its reference set comes from the public split: refuse a plan with none."""
        if self.params.minmax_lambda > 0:
            require_public(self.name, data, population, "for the min-max game's reference set",
                           ", or set defense.params.minmax_lambda: 0")

    def retrain_epochs(self, epochs: int) -> int:
        """The masked retraining's share of the recipe's `epochs` (at least one); dense pretraining takes the rest."""
        return min(epochs, max(1, round(self.params.retrain_fraction * epochs)))

    def check(self, model_name: str, info: DataInfo, model_params: dict | None = None, recipe: Any = None) -> None:
        """Before any training (the model on the meta device): a model with nothing to prune, and lookahead
        that the masked retraining's restarted schedule would end before it starts."""
        model = meta_model(model_name, model_params, info)
        if model is not None and not prunable_layers(model):
            raise SpecError(f"pruning needs a conv or linear layer before the classifier layer; model {model_name!r} "
                            "has none", where="defense.name")
        retrain = self.retrain_epochs(recipe.epochs) if recipe is not None else None
        if recipe is not None and recipe.lookahead and retrain <= LOOKAHEAD_START_EPOCHS:
            raise SpecError(f"pruning restarts the schedule for its {retrain}-epoch masked "
                            f"retraining, which ends before lookahead starts (after epoch {LOOKAHEAD_START_EPOCHS}); "
                            "raise train.epochs or retrain_fraction, or set lookahead: false", where="train.lookahead")

    def fit(self, job: FitJob) -> nn.Module:
        p, recipe, model = self.params, job.recipe, job.model
        layers = prunable_layers(model)
        spe, epochs = job.steps_per_epoch, recipe.epochs
        retrain_epochs = self.retrain_epochs(epochs)
        dense_epochs = epochs - retrain_epochs
        admm_epochs = p.admm_epochs if p.admm_epochs is not None else math.ceil(epochs / 3)
        nc = self.info.num_classes

        def phase(name: str, epochs_: int, **kw) -> dict[str, float]:
            return minmax_train(model, job.x, job.y, job.reference_x, job.reference_y, recipe, epochs_ * spe,
                                kw.pop("lam", 0.0), num_classes=nc, seed=derive_seed(job.seed, name),
                                steps_per_epoch=spe, loss=self.loss, precision=job.precision,
                                memory_format=job.memory_format, **kw)

        if dense_epochs > 0:
            phase("dense", dense_epochs)
        if p.method == "admm" and admm_epochs > 0:
            masks = self._admm(layers, phase, admm_epochs, spe)
        else:
            masks = compute_masks(layers, p.structure, p.sparsity, scope="global")
        apply_masks(model, masks)
        facts = phase("retrain", retrain_epochs, lam=p.minmax_lambda, inference_steps=p.inference_steps,
                      inference_lr=p.inference_lr, param_mask=masks)
        job.report["sparsity"] = weight_sparsity(layers)
        if "inference_accuracy" in facts:
            job.report["inference_accuracy"] = facts["inference_accuracy"]
        return model

    def _admm(self, layers: list[tuple[str, nn.Module]], phase, epochs: int,
              spe: int) -> Masks:
        """ADMM towards the sparse set; returns the mask of the final Z."""
        p = self.params
        weights = {n: m.weight for n, m in layers}

        def project(v: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Masks]:
            masks = compute_masks(layers, p.structure, p.sparsity, scope="layer", weights=v)
            return {n: v[n] * masks[f"{n}.weight"] for n in v}, masks

        with torch.no_grad():
            z, masks = project({n: w.detach().clone() for n, w in weights.items()})
            u = {n: torch.zeros_like(w) for n, w in weights.items()}
        state = {"z": z, "u": u, "masks": masks}

        def proximal() -> torch.Tensor:
            return 0.5 * p.rho * sum(((weights[n] - state["z"][n] + state["u"][n]) ** 2).sum() for n in weights)

        @torch.no_grad()
        def update(step: int) -> None:
            if (step + 1) % spe:
                return
            z_new, masks_new = project({n: weights[n].detach() + state["u"][n] for n in weights})
            state["u"] = {n: state["u"][n] + weights[n].detach() - z_new[n] for n in weights}
            state["z"], state["masks"] = z_new, masks_new

        phase("admm", epochs, extra_loss=proximal, after_step=update)
        return state["masks"]

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {
            "sparsity": Float(0.5, 0.95),
            "method": Categorical(("magnitude", "admm")),
            "rho": Float(1e-4, 1e-2, log=True),
            "structure": Categorical(("unstructured", "filter")),
            "minmax_lambda": Categorical((0.0, 0.5, 1.0, 3.0, 6.0, 10.0)),
        }
