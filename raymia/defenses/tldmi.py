"""TL-DMI (Ho et al., CVPR 2024): transfer learning as a defense against model inversion.

The architecture is first trained on PUBLIC data (here: the training-split points outside the audited
population, which no bank model trains on); every bank model starts from those weights, keeps its first
layers frozen and fine-tunes only the last layers on its private members with plain cross-entropy. Fewer
trainable parameters touch the private data, so less about it can be recovered (or inferred) from the model.

Choices made here:
- a "parameterised layer" is a module owning parameters, in module order from the input side; a norm layer
  (BatchNorm, GroupNorm, LayerNorm, InstanceNorm) belongs to the layer before it, so ``freeze_depth``
  counts conv / linear layers as the paper does (VGG16-BN: 8 of 13 convs frozen);
- ``freeze: fraction`` freezes the layer prefix whose parameter count is closest to ``freeze_fraction`` of
  the total (ties: fewer frozen), so the reached fraction differs by at most one layer's share; the last
  layer always stays trainable; the reached fraction is reported per model as ``frozen_fraction``;
- frozen norm layers are kept in eval mode while fine-tuning (``freeze_bn_stats``), so their running
  statistics stay the pretrained ones too;
- pretraining: Adam (``pretrain_lr``, default 1e-3), plain cross-entropy, full shuffled batches, no
  augmentation, from the spec's model as its builder draws it from the seed (its own initialisation, such
  as airbench's identity convolutions), so every worker pretrains the same network whichever bank model it
  builds first; layers that initialise from data (airbench's whitening stem) are fitted to the public
  split, never to a bank model's members. The result is cached on disk (keyed by the model's name, params
  and parameter shapes, the data, the public indices, the pretraining parameters, the seed and the device
  type) and every bank model loads it;
- fine-tuning (``fit``): the spec's recipe (optimizer, schedule, epochs, batch, augmentation; ``lr`` replaces
  its learning rate when set) over the trainable parameters only, so frozen parameters stay bit-identical
  whatever the weight decay.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raymia.cache import data_digest, key_digest, load_state, save_state
from raymia.datainfo import DataInfo
from raymia.defenses.base import (
    DEFENSES,
    Defense,
    FitJob,
    meta_model,
    public_indices,
    require_public,
    train_plain,
)
from raymia.device import resolve_device
from raymia.errors import DataError, SpecError, not_found
from raymia.models.base import build_model, data_init_modules
from raymia.registry import MAX_EPOCHS, ActsWhen, Params
from raymia.seeding import derive_seed
from raymia.space import Categorical, Domain, Float, Int
from raymia.spec import TrainSpec
from raymia.storage import store_dir
from raymia.train.loop import member_batches, module_net, run_steps

log = logging.getLogger("raymia")

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class TlDmiParams(Params):
    """Parameters of TL-DMI (see the module docstring)."""

    freeze: Literal["depth", "fraction"] = Field(
        "fraction", description="choose the frozen layers by count (freeze_depth) or by parameter share")
    freeze_fraction: float = Field(
        0.6, ge=0.0, lt=1.0, description="share of the parameters frozen (by count, input side first); the "
        "nearest layer boundary is used")
    freeze_depth: int = Field(
        1, ge=0, description="freeze: depth: number of leading conv / linear layers frozen (with their "
        "norms)")
    pretrain_epochs: int = Field(20, ge=1, le=MAX_EPOCHS, description="pretraining epochs over the public split")
    pretrain_lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate of the pretraining")
    pretrain_batch_size: int = Field(128, ge=1, validation_alias="pretrain_batch",
                                     description="public points per pretraining step")
    public_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="share of the public split (training points outside the population) "
        "used for pretraining")
    weights: str | None = Field(
        None, description="path of a local .pt state_dict to start from instead of pretraining (loaded with "
        "weights_only=True)")
    init_trainable: Literal["pretrained", "fresh"] = Field(
        "pretrained", description="the fine-tuned layers start from the pretrained weights or from each "
        "model's own initialisation")
    freeze_bn_stats: bool = Field(True, description="keep frozen norm layers in eval mode while fine-tuning")
    lr: float | None = Field(
        None, gt=0.0, le=10.0, description="learning rate of the fine-tuning; None: the recipe's lr (the paper searches "
        "[1e-3, 1e-1] with SGD)")
    pretrain_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where pretraining runs (auto: CUDA when visible); part of the cache key")

    acts_when = {"freeze_depth": ActsWhen("freeze", ("depth",)),
                 "freeze_fraction": ActsWhen("freeze", ("fraction",)),
                 **{k: ActsWhen("weights", (None,)) for k in ("pretrain_epochs", "pretrain_lr", "pretrain_batch_size",
                                                               "public_fraction", "pretrain_device")}}


# ---------------------------------------------------------------------------------------------------------
# layers and freezing


def layer_groups(model: nn.Module) -> list[tuple[list[str], list[str]]]:
    """The model's parameterised layers in module order: (module names, parameter names) per layer, a norm
    layer joining the layer before it. Shared parameters are counted once."""
    groups: list[tuple[list[str], list[str]]] = []
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        names = []
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                names.append(f"{mname}.{pname}" if mname else pname)
        if not names:
            continue
        if isinstance(mod, _NORMS) and groups:
            groups[-1][0].append(mname)
            groups[-1][1].extend(names)
        else:
            groups.append(([mname], names))
    return groups


def frozen_prefix(model: nn.Module, p: TlDmiParams) -> int:
    """How many leading layer groups to freeze under the parameters (never all of them)."""
    groups = layer_groups(model)
    n = len(groups)
    if n < 2:
        raise SpecError(f"tl_dmi needs at least two parameterised layers; the model has {n}",
                        where="model.name")
    if p.freeze == "depth":
        if p.freeze_depth >= n:
            raise SpecError(f"freeze_depth {p.freeze_depth} leaves nothing to fine-tune: the model has {n} "
                            f"parameterised layers; accepted: 0 to {n - 1}",
                            where="defense.params.freeze_depth")
        return p.freeze_depth
    sizes = dict(model.named_parameters())
    counts = [sum(sizes[name].numel() for name in g[1]) for g in groups]
    total = sum(counts)
    cum = np.cumsum([0, *counts])
    # Nearest boundary to the requested share among 0..n-1 frozen layers (ties: fewer frozen).
    return int(np.argmin([abs(c / total - p.freeze_fraction) for c in cum[:n]]))


def frozen_fraction(model: nn.Module) -> float:
    """Share of the parameters (by count) with requires_grad False."""
    params = list(model.parameters())
    total = sum(t.numel() for t in params)
    return sum(t.numel() for t in params if not t.requires_grad) / max(1, total)


def pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: TlDmiParams, seed: int,
             device: torch.device) -> dict[str, torch.Tensor]:
    """Train `model` (modified in place) on (x, y) with Adam (constant lr, no weight decay), cross-entropy
    and full shuffled batches, on the step loop; its CPU state_dict."""
    model.to(device).train()
    x, y = x.to(device), y.to(device)
    n = x.shape[0]
    batch = min(p.pretrain_batch_size, n)
    recipe = TrainSpec(optimizer="adam", lr=p.pretrain_lr, epochs=p.pretrain_epochs, batch_size=batch)
    per_epoch = -(-n // batch)
    batches = member_batches(x, y, recipe, torch.Generator().manual_seed(derive_seed(seed, "order")),
                             torch.Generator())  # no augmentation: the second generator is never drawn from
    run_steps(module_net(model), batches, lambda logits, yb, step: F.cross_entropy(logits, yb), recipe,
              p.pretrain_epochs * per_epoch, per_epoch, names=["tl_dmi pretraining"], remedy="lower pretrain_lr")
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# the defense


@DEFENSES.register(
    "tl_dmi",
    TlDmiParams,
    doc="TL-DMI (CVPR 2024): pretrain on public data, freeze the first layers, fine-tune the last ones.",
)
class TlDmi(Defense):
    """Pretrain on the public split once, then fine-tune only the last layers of every bank model."""

    params: TlDmiParams

    def __init__(self, params: TlDmiParams, info: DataInfo, label_smoothing: float = 0.0):
        super().__init__(params, info, label_smoothing)
        self.public_index: np.ndarray | None = None
        self.pretrained: dict[str, torch.Tensor] | None = None
        self.cache_path: Path | None = None
        self.loaded_from_cache = False
        self.frozen_params: list[str] = []
        self.frozen_modules: list[str] = []
        self.frozen_layers = 0
        self._data: Any = None
        self._cache_dir: Path | None = None
        self._seed = 0
        self._model: tuple[str, dict[str, Any]] | None = None  # the spec's model (name, params), from check

    # --- shared state --------------------------------------------------------------------------------
    def check_data(self, data: Any, population: Any) -> None:
        """`weights` must name a file; without it, some training points must lie outside the population
        (the public data the backbone pretrains on)."""
        if self.params.weights is not None:
            path = Path(self.params.weights).expanduser()
            if not path.is_file():
                raise DataError(f"tl_dmi weights: {not_found(path)}", where=str(path))
            return
        require_public(self.name, data, population, "to pretrain on", ", or give defense.params.weights")

    def check(self, model_name: str, info: DataInfo, model_params: dict | None = None, recipe: Any = None) -> None:
        """Any registered model can be pretrained; its name and params are kept to build the network that
        pretraining starts from. Its layers (counted on the meta device) must leave something to fine-tune
        under `freeze_depth`: found otherwise only after pretraining."""
        self._model = (model_name, dict(model_params or {}))
        model = meta_model(model_name, model_params, info)
        if model is not None:
            frozen_prefix(model, self.params)

    def setup(self, data: Any, population: Any, cache_dir: Any, seed: int) -> None:
        """Record the public split (training points outside `population`) and check `weights`; the
        pretraining itself waits for the first model (prepare_model), whose architecture it needs."""
        self.check_data(data, population)
        p = self.params
        self._data, self._cache_dir, self._seed = data, store_dir(cache_dir), seed
        self.pretrained = None
        if p.weights is not None:
            self.public_index = np.empty(0, dtype=np.int64)
            return
        public = public_indices(data.x_train.shape[0], population)
        if p.public_fraction < 1.0:
            k = max(1, round(p.public_fraction * public.size))
            rng = np.random.default_rng(derive_seed(seed, "tl_dmi", "public"))
            public = np.sort(rng.permutation(public)[:k])
        self.public_index = public

    def _cache_key(self, model: nn.Module, device: torch.device) -> str:
        p = self.params
        return key_digest({
            "model": f"{type(model).__module__}.{type(model).__qualname__}", "spec_model": self._model,
            "shapes": [(k, list(v.shape)) for k, v in model.state_dict().items()],
            "data": data_digest(self._data),
            "public": key_digest({"index": np.asarray(self.public_index).tolist()}),
            "seed": self._seed, "device": device.type,
            **{k: getattr(p, k) for k in ("pretrain_epochs", "pretrain_lr", "public_fraction")},
            "pretrain_batch": p.pretrain_batch_size,  # its name before the rename: cached backbones stay found
        })

    def _load_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        path = Path(self.params.weights or "").expanduser()
        if not path.is_file():
            raise DataError(f"tl_dmi weights: {not_found(path)}", where=str(path))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(f"cannot read the tl_dmi weights ({type(e).__name__}: {e})",
                            where=str(path)) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DataError("tl_dmi weights must be a state_dict (a dict of tensors)", where=str(path))
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        if missing or unexpected or shapes:
            parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                     for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("shape mismatch", shapes)) if keys]
            raise DataError(f"tl_dmi weights do not fit {type(model).__name__} ({'; '.join(parts)})",
                            where=str(path))
        return {k: v.detach().clone() for k, v in state.items()}

    def _pretrained_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weights every bank model starts from: the `weights` file, the disk cache, or pretraining."""
        if self.params.weights is not None:
            return self._load_weights(model)
        if self.public_index is None or self._cache_dir is None:
            raise RuntimeError("tl_dmi: setup() has not run")
        device = resolve_device(self.params.pretrain_device, where="defense.params.pretrain_device")
        key = self._cache_key(model, device)
        self.cache_path = self._cache_dir / f"tl_dmi-{key}.pt"
        state = load_state(self.cache_path, key)
        if state is not None and set(state) == set(model.state_dict()):
            self.loaded_from_cache = True
            return state
        self.loaded_from_cache = False
        seed = derive_seed(self._seed, "tl_dmi")
        idx = torch.from_numpy(self.public_index)
        x, y = self._data.x_train[idx], self._data.y_train[idx]
        base = self._initial_model(x, derive_seed(seed, "init"))
        log.info("tl_dmi: pretraining %s on %d public points (%s)", type(model).__name__, idx.numel(), device)
        state = pretrain(base, x, y, self.params, seed, device)
        save_state(self.cache_path, key, state)
        return state

    def _initial_model(self, public_x: torch.Tensor, seed: int) -> nn.Module:
        """The network pretraining starts from: the spec's model drawn by its builder from `seed` (global
        RNG untouched), its data-initialised layers fitted to the public inputs."""
        if self._model is None:
            raise RuntimeError("tl_dmi: check() has not run")
        name, params = self._model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(name, params, self.info)
        for layer in data_init_modules(model):
            layer.init_from_data(public_x)
        return model

    # --- per model -----------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Load the pretrained weights (all of them, or only the frozen layers' with init_trainable:
        fresh) and set requires_grad False on the frozen layers' parameters."""
        if self.pretrained is None:
            self.pretrained = self._pretrained_state(model)
        k = frozen_prefix(model, self.params)
        groups = layer_groups(model)[:k]
        self.frozen_layers = k
        self.frozen_modules = [m for g in groups for m in g[0]]
        self.frozen_params = [n for g in groups for n in g[1]]
        if self.params.init_trainable == "pretrained":
            model.load_state_dict(self.pretrained)
        else:
            # Parameters and buffers (norm statistics) owned by the frozen modules come from pretraining.
            mods = set(self.frozen_modules)
            own = model.state_dict()
            own.update({n: v for n, v in self.pretrained.items()
                        if (n.rsplit(".", 1)[0] if "." in n else "") in mods})
            model.load_state_dict(own)
        frozen = set(self.frozen_params)
        for name, t in model.named_parameters():
            t.requires_grad_(name not in frozen)
        return model

    def _freeze_norm_stats(self, model: nn.Module) -> None:
        if not self.params.freeze_bn_stats:
            return
        frozen = set(self.frozen_modules)
        for name, mod in model.named_modules():
            if name in frozen and isinstance(mod, _NORMS):
                mod.eval()

    def fit(self, job: FitJob) -> nn.Module:
        """Fine-tune the trainable parameters with the recipe: the step loop over them only (`module_net`
        leaves out the frozen ones), frozen norm layers in eval mode."""
        if not any(t.requires_grad for t in job.model.parameters()):
            raise SpecError("tl_dmi froze every parameter; lower freeze_fraction", where="defense.params")
        model = train_plain(self, job, prepare=self._freeze_norm_stats)
        job.report.update(frozen_fraction=frozen_fraction(model), frozen_layers=float(self.frozen_layers))
        return model

    def modify_recipe(self, recipe: Any) -> Any:
        return recipe if self.params.lr is None else recipe.model_copy(update={"lr": self.params.lr})

    # --- declarations ------------------------------------------------------------------------------
    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        # lr is left out: its range depends on the recipe's optimizer (the paper's [1e-3, 1e-1] is SGD's);
        # sweeps/cifar10-tl_dmi.yaml, an SGD recipe, searches it
        return {
            "freeze_fraction": Float(0.0, 0.95),
            "pretrain_epochs": Int(5, 50),
            "init_trainable": Categorical(("pretrained", "fresh")),
        }


__all__ = ["TlDmi", "TlDmiParams", "frozen_fraction", "frozen_prefix", "layer_groups", "pretrain"]
