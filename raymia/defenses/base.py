"""The defense protocol.

A defense is not a pipeline stage: it is a set of hooks that the model bank applies identically to the
target and to every shadow model (the adaptive attacker), plus an output post-processor applied to every
query. A defense overrides only the hooks it needs:

- transform_train_data(x, y, generator) -> (x, y_target): y_target is int64 [n] (hard labels) or
  float32 [n, C] (soft labels, e.g. HAMP).
- prepare_model(model) -> model
- loss(logits, y_target) -> scalar: the training objective (default: cross-entropy, hard or soft).
- postprocess_logits(model, logits, generator) -> logits: what a querier sees (default: unchanged).
- modify_recipe(recipe) -> recipe: e.g. early stopping (fewer epochs) or weight decay.
- fit(job) -> model | None: the whole training of one model, for defenses that change the training
  procedure itself (DP-SGD, adversarial regularisation, pruning with retraining, transfer learning);
  None (the default) means the bank's standard loop with the hooks above. A `fit` trains on the same step
  loop (`raymia.train.loop.run_steps`) with its own hooks (a gradient transform, an inner game, an
  extra loss, after-step actions, a trainable subset), at `job.precision` and `job.memory_format`, so
  the recipe's lookahead and the bank's bf16 apply to it. The bank trains the models of a defense that
  overrides `fit` (`Defense.trains_itself()`) one at a time; a defense whose `loss` is not vmap-friendly
  trains in `fit` too.
- search_space() -> {param: Domain}: the Tune/Optuna space, with defaults taken from the paper.
- privacy_guarantee() -> dict | None: e.g. {"epsilon": ..., "delta": ...} for DP training.
- accounted_guarantee(n, recipe) -> dict | None: the accountant's guarantee for a model of n training
  points, before training (DP-SGD's epsilon; `raymia check` prints it).
- training_cost(recipe) -> (float, str) | None: how many times the recipe's plain training of one model the
  defense's `fit` runs, and what (DMP: a teacher and a student); `raymia check` scales its FLOPs by it.
- check(model_name, info, model_params, recipe) -> None: raise SpecError before any training when the
  defense cannot apply to the model, the data or the recipe, or a setting of it could not act (e.g. a
  warm-up as long as the training).
- setup(data, population, cache_dir, seed): fit what every bank model shares (a VAE, a pretrained
  backbone), once per worker, cached on disk.
- check_data(data, population) -> None: the cheap checks of `setup` (`raymia check` runs them alone).
No audited point may reach a defense's fitting except as a member of the model being trained: what a
defense fits beyond model m's members (a shared VAE, a pretrained backbone, a min-max reference set) comes
from the PUBLIC split, `public_indices(n_train, population)`; a defense that needs it refuses a plan that
leaves none (`require_public`, from `check_data`). tests/test_defense_data.py checks every registered
defense.
Per-model facts a defense measures while training (sparsity reached, frozen fraction, accounted epsilon)
go in `FitJob.report`; the bank stores them with the pack and the audit reports their mean.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from raymia.datainfo import DataInfo
from raymia.errors import SpecError
from raymia.plugins import is_import_path
from raymia.registry import NoParams, Params, Registry
from raymia.seeding import derive_seed
from raymia.space import Domain
from raymia.train.loop import member_batches, module_net, run_steps


def public_indices(n_train: int, population: Any) -> np.ndarray:
    """The public split: sorted int64 indices of the training points outside the audited population. No
    bank model trains on them and no attack scores them, so they are the only points besides model m's own
    members that a defense may fit on (a min-max reference set, a VAE, a pretrained backbone)."""
    public = np.ones(int(n_train), dtype=bool)  # a mask, not np.setdiff1d's sort: 50,000 points in 0.1 ms, not 20
    pop = np.asarray(population, dtype=np.int64)
    public[pop[(pop >= 0) & (pop < public.size)]] = False
    return np.flatnonzero(public).astype(np.int64, copy=False)


def require_public(name: str, data: Any, population: Any, use: str, alternative: str = "") -> None:
    """Raise SpecError (where plan.population) when the plan leaves no public point for `use`; the message
    says what is accepted, then `alternative` (e.g. \", or give defense.params.weights\")."""
    n_train = int(data.x_train.shape[0])
    if public_indices(n_train, population).size == 0:
        raise SpecError(
            f"{name} needs public data (training points outside the audited population) {use}: set "
            f"plan.population below the training split size {n_train} (accepted: 1..{n_train - 1})"
            f"{alternative}", where="plan.population")


def public_has_audited_classes(data: Any, population: Any) -> bool:
    """Whether the public split holds a point of a class among the audited points' (True when the data give
    no labels): a class split (`data.private_classes`) leaves only other classes public, on which a defense
    that fits a held-out temperature or distils a student learns nothing of the model's own classes."""
    y = getattr(data, "y_train", None)
    if y is None:
        return True
    y = np.asarray(y)
    public = public_indices(y.shape[0], population)
    return bool(np.isin(y[public], y[np.asarray(population, dtype=np.int64)]).any())


@dataclass
class FitJob:
    """Everything `Defense.fit` needs to train bank model m with the spec's recipe."""

    m: int
    model: torch.nn.Module  # freshly initialised (seeded by ("init", m)), on `device`
    x: torch.Tensor  # model m's training inputs (after transform_train_data), on `device`
    y: torch.Tensor  # its targets: int64 [n] or float32 [n, C]
    recipe: Any  # raymia.spec.TrainSpec, after modify_recipe
    device: torch.device
    seed: int  # derived from the spec's seed and m: use it for every random choice of the defense
    steps_per_epoch: int
    # Reference non-members for min-max games, on `device`: public points only (`public_indices`), never an
    # audited point; None when the plan leaves no public point (see raymia.train.bank.reference_index).
    reference_x: torch.Tensor | None = None
    reference_y: torch.Tensor | None = None
    report: dict[str, float] = field(default_factory=dict)  # per-model facts to report
    # The bank's numerics, for `raymia.train.loop.run_steps` and its batches: the autocast dtype (None: fp32)
    # and the memory format of image batches (and of the model, which the bank has converted).
    precision: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format
    # How the bank trains packs on this device (`bank.vectorize`, or its usual way under auto) and their size:
    # a defense that trains several models per bank model (SELENA's sub-models) trains them so.
    vectorize: bool = False
    pack_size: int = 1


class Defense:
    """Base class: every hook is the identity / plain cross-entropy."""

    name: ClassVar[str] = "none"  # set by DEFENSES.register: a defense states its name once
    # Whether bank models may initialise layers from their members' data (airbench's whitening stem); a
    # defense whose guarantee covers only its own training (DP-SGD) says no.
    data_dependent_init: ClassVar[bool] = True

    def __init__(self, params: Params, info: DataInfo, label_smoothing: float = 0.0):
        self.params = params
        self.info = info
        # The recipe's label smoothing, used by the default cross-entropy loss.
        self.label_smoothing = label_smoothing

    # --- training-time hooks -------------------------------------------------------------------------
    def transform_train_data(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def loss(self, logits: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
        """The training objective on one model's batch. Must be vmap-friendly (the bank trains packs
        of models with torch.func.vmap): no data-dependent Python control flow, no .item()."""
        return F.cross_entropy(logits, y_target, label_smoothing=self.label_smoothing)

    def modify_recipe(self, recipe: Any) -> Any:
        return recipe

    def setup(self, data: Any, population: Any, cache_dir: Any, seed: int) -> None:
        """Called once per bank context (on every worker) before any model trains: for defenses that fit
        something shared by every bank model (a VAE, a pretrained backbone). `data` is the raymia Dataset,
        `population` the int64 indices of the audited points in its training split (the rest of the split
        is public, `public_indices`: no bank model trains on it; fit on it only, never on the population),
        `cache_dir` the folder of the store where such artefacts are cached: a pathlib.Path for a local store,
        a `raymia.storage.StoredDir` for a URI (`cache_dir / name` either way; write and read tensors only,
        through `raymia.cache.save_state` / `load_state`), `seed` the spec's seed. Must be deterministic given its
        inputs. Starts with `check_data`."""
        self.check_data(data, population)

    def check_data(self, data: Any, population: Any) -> None:
        """Raise raymia.errors.SpecError (or DataError) when this defense cannot run on this data set and
        audited population: the cheap part of `setup` (no fitting), which `raymia check` also runs."""

    def fit(self, job: FitJob) -> torch.nn.Module | None:
        return None

    @classmethod
    def trains_itself(cls) -> bool:
        """True when the defense trains each model in its own `fit` (on the step loop, with its hooks); the
        bank then trains those models one at a time, since a pack would step every stacked tensor alike."""
        return cls.fit is not Defense.fit

    def check(self, model_name: str, info: DataInfo, model_params: dict | None = None, recipe: Any = None) -> None:
        """Raise raymia.errors.SpecError when this defense cannot apply to the model (its registry name and
        params), the data or the recipe (the spec's `train`, a `TrainSpec`, before `modify_recipe`; None
        where a caller checks the model alone), or when one of its settings could not act under them."""

    def inert(self, recipe: Any) -> str | None:
        """Why these settings release the model the undefended recipe would (`recipe`: the spec's `train`,
        before `modify_recipe`), or None where they act. Not an error, since a sweep's range may end at such a
        setting: an audit says it in one warning line and `raymia check` in its defense row, because the
        audit's numbers then measure an undefended model under the defense's name."""
        return None

    # --- query-time hook ------------------------------------------------------------------------------
    def postprocess_logits(
        self, model: torch.nn.Module, logits: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        return logits

    @property
    def modifies_outputs(self) -> bool:
        return type(self).postprocess_logits is not Defense.postprocess_logits

    # --- declarations ---------------------------------------------------------------------------------
    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {}

    def privacy_guarantee(self) -> dict[str, Any] | None:
        return None

    def training_cost(self, recipe: Any) -> tuple[float, str] | None:
        """(multiple, what): the training `fit` runs per bank model as a multiple of the recipe's plain
        training of that model (its steps at the same batch size), for `raymia check`'s FLOPs. None: not
        declared (one plain training, or work that is not a multiple of it)."""
        return None

    def accounted_guarantee(self, n: int, recipe: Any) -> dict[str, float] | None:
        """What a privacy accountant gives a model trained on n points with `recipe` (after
        modify_recipe), known before training: e.g. DP-SGD's {"epsilon", "delta", ...}. None: no such
        guarantee. `raymia check` shows it."""
        return None


class _DefenseRegistry(Registry[type[Defense]]):
    """The defense registry: registering a class under a name also sets its `name`."""

    def register(self, name, params=NoParams, doc=None):
        add = super().register(name, params, doc)

        def deco(cls: type[Defense]) -> type[Defense]:
            cls.name = name
            return add(cls)

        return deco

    def get(self, name: str, where: str = "name"):
        """As `Registry.get`; a defense named by import path is a Defense subclass, named by that path."""
        entry = super().get(name, where)
        if is_import_path(name):
            if not (isinstance(entry.obj, type) and issubclass(entry.obj, Defense)):
                raise SpecError(f"{name!r} is not a subclass of raymia.defenses.base.Defense", where=where)
            entry = replace(entry, obj=type(entry.obj.__name__, (entry.obj,), {"name": name}))
        return entry


DEFENSES: Registry[type[Defense]] = _DefenseRegistry("defense", package="raymia.defenses")


def meta_model(model_name: str, model_params: dict | None, info: DataInfo) -> torch.nn.Module | None:
    """The spec's model built on the meta device (no memory, no initialisation work), for a `check` that
    looks at its layers; None when the model cannot be built, which the model's own check reports under its
    own field (`models.base.check_forward`). One module serves every check of the same model (a sweep checks
    its defenses at each end and each pair of ends of its space, and ResNet-18 takes 70 ms to build even on
    the meta device): a check reads it and never changes it."""
    from raymia.models import MODELS, build_model

    try:
        builder = MODELS.get(model_name, where="model.name").obj  # a model redefined since is built again
    except SpecError:
        return None
    key = (builder, model_name, json.dumps(model_params or {}, sort_keys=True, default=repr), repr(info))
    if key not in _META_MODELS:
        try:
            with torch.device("meta"):
                model = build_model(model_name, model_params or {}, info)
        except SpecError:
            model = None
        while len(_META_MODELS) >= 16:
            _META_MODELS.pop(next(iter(_META_MODELS)))  # the oldest
        _META_MODELS[key] = model
    return _META_MODELS[key]


_META_MODELS: dict[tuple, torch.nn.Module | None] = {}


def build_defense(
    name: str, params: dict[str, Any] | None, info: DataInfo, where: str = "defense", label_smoothing: float = 0.0
) -> Defense:
    entry = DEFENSES.get(name, where=f"{where}.name")
    parsed = entry.parse(params, where=f"{where}.params")
    return entry.obj(parsed, info, label_smoothing=label_smoothing)


# ---------------------------------------------------------------------------------------------------------
# what a defense's `fit` builds on


def train_plain(defense: Defense, job: FitJob,
                loss: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
                prepare: Callable[[torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """Model m (`job.model`) trained with the recipe and the defense's `loss` (or `loss(logits, y, step)`)
    on the step loop (`run_steps`, as the bank trains, with the batch order and augmentation draws seeded
    from the job's seed, at the bank's precision); `prepare(model)` runs once it is in training mode.
    Returns it in eval mode. MemGuard and the calibration defenses train so before fitting their
    post-processing; DMP its teacher, SELENA its sub-models and released model; RelaxLoss with its
    epoch-alternating loss, TL-DMI with its frozen layers' norm statistics held."""
    model, recipe = job.model, job.recipe
    if job.x.shape[0] == 0:
        raise ValueError(f"model {job.m}: empty training set")
    batches = member_batches(job.x, job.y, recipe, torch.Generator().manual_seed(derive_seed(job.seed, "order")),
                             torch.Generator().manual_seed(derive_seed(job.seed, "augment")), fmt=job.memory_format)
    model.train()
    if prepare is not None:
        prepare(model)
    run_steps(module_net(model), batches, loss or (lambda logits, y, step: defense.loss(logits, y)), recipe,
              recipe.epochs * job.steps_per_epoch, job.steps_per_epoch, precision=job.precision,
              names=[f"model {job.m}"])
    return model.eval()


OUTPUT_CHUNK = 1024  # rows per forward when computing a model's outputs on a whole set


@torch.no_grad()
def outputs(model: torch.nn.Module, x: torch.Tensor, chunk: int = OUTPUT_CHUNK) -> torch.Tensor:
    """The model's float32 logits on x, in eval mode (restored), in chunks."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + chunk]).float() for i in range(0, x.shape[0], chunk)])
    finally:
        model.train(was)
