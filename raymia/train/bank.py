"""The model bank: M models (target(s) + shadows) trained with the same recipe and defense.

The bank is cut into packs of K consecutive models; a pack is the unit of work and of storage. A pack is
trained at once: the K models' parameters and buffers are stacked, all K forward/backward passes run as
batched kernels (`raymia.train.packed.PackedSequential` for sequential architectures, one `torch.func.vmap`
over `functional_call` for the others), and one optimizer steps the stacked tensors (SGD, Adam and AdamW
are elementwise, so this is K independent optimizers). `train_model`
trains one model with exactly the same batches, augmentation draws and schedule: the reference that pack
training must match (tests/test_bank.py), and the baseline of the benchmark. Both run the one step loop,
`raymia.train.loop.run_steps`, as does every defense that trains its models itself (`Defense.fit`).

This module is the compute core: it needs torch only (no Ray), so it runs directly on a GPU machine; the
warm pool in raymia.engine hands packs to its Ray workers, which call `train_pack` on each.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from raymia.data import Dataset, load_dataset
from raymia.data.plan import MembershipPlan, make_plan
from raymia.defenses import Defense, build_defense
from raymia.defenses.base import FitJob, public_indices
from raymia.errors import SpecError
from raymia.models import build_model
from raymia.models.base import check_forward, data_init_modules, param_lr_scales, param_train_epochs
from raymia.seeding import derive_seed
from raymia.spec import AuditSpec, TrainSpec
from raymia.storage import store_dir
from raymia.store import num_packs, pack_models
from raymia.train.infer import augment as query_augment
from raymia.train.infer import query_logits
from raymia.train.loop import (
    Loss,
    Net,
    autocast_dtype,
    member_batches,
    memory_format,
    module_net,
    pack_batches,
    run_steps,
)
from raymia.train.packed import maybe_packed, runs_packed

log = logging.getLogger("raymia")


MIN_POPULATION = 4  # the fewest audited points: every metric needs two members and two non-members per model


@dataclass
class BankContext:
    """Everything a worker needs to train any model of the bank, rebuilt from the spec on each worker."""

    spec: AuditSpec
    data: Dataset
    plan: MembershipPlan
    defense: Defense
    recipe: TrainSpec  # spec.train after the defense's modify_recipe: what every model trains with
    undefended: BankContext | None = None  # non-adaptive attacker: the context of the shadows (no defense)
    ood: Any = None  # raymia.data.ood.OodInputs: the spec's non-member sets, queried beside the audited points

    def defended(self, m: int) -> bool:
        return self.undefended is None or m in self.plan.targets

    @classmethod
    def from_spec(cls, spec: AuditSpec, setup: bool = True, data: Dataset | None = None,
                  check_model: bool = True) -> BankContext:
        """Load the data, draw the plan and build the defense, checking them against each other. With
        `setup=False` the defense only checks the data (`Defense.check_data`) and fits nothing: the
        context then serves to validate and describe the bank (`raymia check`), not to train it. `data`
        is spec.data already loaded (a warm bank worker keeps it between banks; nothing here changes it).
        `check_model=False` skips the model's trial forward pass (`check_forward`) where the process that
        handed over the spec already ran it: its first use costs every process about a second of imports."""
        if data is None:
            data = load_dataset(spec.data.name, spec.data.params)
        n_train = data.x_train.shape[0]
        private = spec.data.private_classes
        if private is not None:  # the bank trains on the private classes; the public ones are the public split
            from raymia.data.split import class_split, resolve_classes

            priv, pub = resolve_classes(private, spec.data.public_classes, data.info.num_classes)
            data, n_train = class_split(data, priv, pub)
        if spec.plan.population is not None and spec.plan.population > n_train:
            what = "training points of the private classes" if private is not None else "training points"
            raise SpecError(f"{spec.plan.population} exceeds the {n_train} {what} of {data.name!r}",
                            where="plan.population")
        if (spec.plan.population or n_train) < MIN_POPULATION:  # each model's 2 members and 2 non-members
            raise SpecError(f"{spec.plan.population or n_train} audited points; an audit needs at least "
                            f"{MIN_POPULATION} (each model's members are half of them, its non-members the other half)",
                            where="plan.population" if spec.plan.population else f"data {data.name}")
        if spec.train.batch_size > (spec.plan.population or n_train):  # the batch stream would cycle for ever
            raise SpecError(f"{spec.train.batch_size} exceeds the {spec.plan.population or n_train} audited points, of "
                            f"which each model trains on half; accepted: 1 to {spec.plan.population or n_train}",
                            where="train.batch_size")
        if data.info.kind != "image":
            if any(q != "identity" for q in spec.queries):
                raise SpecError(f"{data.name!r} is not an image data set; accepted: [identity]", where="queries")
            if spec.train.augment.hflip or spec.train.augment.crop:
                raise SpecError(f"{data.name!r} is not an image data set; flips and crops need images",
                                where="train.augment")
        if data.info.kind == "image":
            _check_query_shifts(spec.queries, data.info.input_shape)
        _check_num_z(spec, data.x_test.shape[0])
        if check_model:
            check_forward(spec.model.name, spec.model.params, data.info)
        plan = make_plan(n_train, spec.plan.num_models, spec.plan.population, spec.plan.target_list, spec.seed)
        if private is not None:
            from raymia.data.split import drop_unaudited

            data, population = drop_unaudited(data, plan.population, n_train)
            plan = replace(plan, population=population)
        defense = build_defense(spec.defense.name, spec.defense.params, data.info,
                                label_smoothing=spec.train.label_smoothing)
        defense.check(spec.model.name, data.info, spec.model.params, spec.train)

        if setup:
            defense.setup(data, plan.population, store_dir(spec.store_root, "cache"), spec.seed)
        else:
            defense.check_data(data, plan.population)
        ood = None
        if spec.ood is not None:  # built where the bank trains; GAN fakes fitted (cached) only with setup
            from raymia.data.ood import build_sets
            from raymia.device import resolve_device

            device = resolve_device(spec.bank.device, where="bank.device") if setup else torch.device("cpu")
            ood = build_sets(spec.ood.sets, spec.ood.size, spec.ood.seed, data,
                             public_indices(data.x_train.shape[0], plan.population), store_dir(spec.store_root, "cache"),
                             device, fit=setup)
        ctx = cls(spec=spec, data=data, plan=plan, defense=defense, recipe=defense.modify_recipe(spec.train),
                  ood=ood)
        if spec.attacker == "non_adaptive":
            plain = build_defense("none", {}, data.info, label_smoothing=spec.train.label_smoothing)
            ctx.undefended = cls(spec=spec, data=data, plan=plan, defense=plain, recipe=spec.train, ood=ood)
        return ctx

    @property
    def num_packs(self) -> int:
        return num_packs(self.plan.num_models, self.spec.bank.pack_size)

    def pack_models(self, pack: int) -> list[int]:
        return pack_models(pack, self.spec.bank.pack_size, self.plan.num_models)

    @property
    def audited_x(self) -> torch.Tensor:
        return self.data.x_train[torch.from_numpy(self.plan.population)]

    @property
    def audited_y(self) -> np.ndarray:
        return self.data.y_train.numpy()[self.plan.population]

    @property
    def public_index(self) -> np.ndarray:
        """The public split (`public_indices`): training points outside the audited population."""
        return public_indices(self.data.x_train.shape[0], self.plan.population)

    @property
    def trains_itself(self) -> bool:
        """Whether each model trains outside the bank's loop (the defense's `fit`, or `train.function`): one
        model at a time, never in a pack."""
        return self.defense.trains_itself() or self.spec.train.function is not None

    @property
    def steps_per_epoch(self) -> int:
        """Every model takes ceil((P/2) / batch) steps per epoch: P/2 is the expected member count."""
        half = max(1, self.plan.keep.shape[1] // 2)
        return math.ceil(half / self.recipe.batch_size)


def _check_num_z(spec: AuditSpec, n_test: int) -> None:
    """RMIA's `num_z` population points are drawn from the test split: more than it holds failed when the
    attack ran, after training."""
    from raymia.plugins import is_import_path

    for i, a in enumerate(spec.attacks):
        num_z = a.params.get("num_z")
        if not is_import_path(a.name) and isinstance(num_z, int) and num_z > n_test:
            raise SpecError(f"num_z: {num_z} exceeds the {n_test} test points the population z is drawn from; "
                            f"accepted: at most {n_test}, or null for all of them", where=f"attacks.{i}.params")


def _check_query_shifts(queries: list[str], input_shape: tuple[int, ...]) -> None:
    """A shift query must move the image by less than its size (it would otherwise show only the border)."""
    from raymia.spec import parse_query

    h, w = input_shape[-2], input_shape[-1]
    for i, text in enumerate(queries):
        q = parse_query(text)
        if q.kind == "shift" and (abs(q.dx) >= w or abs(q.dy) >= h):
            raise SpecError(f"{text!r} shifts by as much as the {h}x{w} image; accepted: |DX| < {w}, |DY| < {h}",
                            where=f"queries.{i}")


# ---------------------------------------------------------------------------------------------------------
# per-model data, batches and initial weights: shared by the pack trainer and the reference loop


@dataclass
class ModelData:
    """Model m's training set after the defense's transform. `x` is None when the defense kept the inputs:
    batches are then gathered from the shared training split through `index`."""

    index: torch.Tensor  # int64 [n]: indices into the training split
    y: torch.Tensor  # int64 [n] or float32 [n, C] (soft labels)
    x: torch.Tensor | None


def model_data(ctx: BankContext, m: int) -> ModelData:
    index = torch.from_numpy(ctx.plan.members_of(m))
    x, y = ctx.data.x_train[index], ctx.data.y_train[index]
    gen = torch.Generator().manual_seed(derive_seed(ctx.spec.seed, "defense-data", m))
    x_t, y_t = ctx.defense.transform_train_data(x, y, gen)
    if x_t.shape[0] != y_t.shape[0]:
        raise ValueError(f"defense {ctx.defense.name!r} returned {x_t.shape[0]} inputs and {y_t.shape[0]} targets")
    if x_t is x:
        return ModelData(index=index, y=y_t, x=None)
    return ModelData(index=torch.arange(x_t.shape[0]), y=y_t, x=x_t)


def check_data_init(ctx: BankContext, model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's layers that initialise from its members' data; refused under a defense that does not
    account for that (DP-SGD's guarantee, for one, covers only its own training)."""
    fitted = data_init_modules(model)
    if fitted and not ctx.defense.data_dependent_init:
        raise SpecError(f"defense {ctx.defense.name!r} cannot train model {ctx.spec.model.name!r}: its "
                        f"{type(fitted[0]).__name__} initialises from the members' data, outside what the "
                        "defense accounts for; switch that layer off in model.params",
                        where="model.params")
    return fitted


def init_model(ctx: BankContext, m: int, md: ModelData | None = None) -> torch.nn.Module:
    """Bank model m, initialised from its own seed; layers that initialise from data (airbench's whitening
    stem) see model m's own training inputs (`md`, its `model_data`, after the defense's transform), so the
    target and every shadow get the same treatment."""
    torch.manual_seed(derive_seed(ctx.spec.seed, "init", m))
    model = build_model(ctx.spec.model.name, ctx.spec.model.params, ctx.data.info)
    fitted = check_data_init(ctx, model)
    if fitted:
        md = model_data(ctx, m) if md is None else md
        x = md.x if md.x is not None else ctx.data.x_train[md.index]
        for layer in fitted:
            layer.init_from_data(x)
    return ctx.defense.prepare_model(model)


# ---------------------------------------------------------------------------------------------------------
# the reference: one model


def train_model(
    ctx: BankContext, m: int, device: torch.device, max_steps: int | None = None,
    report: dict[str, float] | None = None, cpu_autocast: bool = False,
) -> torch.nn.Module:
    """Train bank model m alone with the recipe and defense (`run_steps`, or the defense's `fit`, which
    trains through it too); returns it in eval mode. `max_steps` cuts training short (used only to time
    the loop); `report` receives the defense's per-model facts; `cpu_autocast` applies
    `bank.precision: bf16` on a CPU too (tests; a CPU run is otherwise fp32)."""
    spec, recipe = ctx.spec, ctx.recipe
    md = model_data(ctx, m)
    fmt = memory_format(spec.bank.channels_last, device, ctx.data.info.input_shape)
    precision = autocast_dtype(device, spec.bank.precision, cpu_autocast)
    xs = (md.x if md.x is not None else ctx.data.x_train).to(device)
    index, y = md.index.to(device), md.y.to(device)
    model = init_model(ctx, m, md).to(device, memory_format=fmt)
    if ctx.trains_itself:
        return _fit_with_defense(ctx, m, model, xs[index], y, device, report, precision, fmt)
    batches = member_batches(xs, y, recipe, torch.Generator().manual_seed(derive_seed(spec.seed, "order", m)),
                             torch.Generator().manual_seed(derive_seed(spec.seed, "augment", m)), index, fmt)
    model.train()
    run_steps(module_net(model), batches, _defense_loss(ctx.defense), recipe, recipe.epochs * ctx.steps_per_epoch,
              ctx.steps_per_epoch, precision=precision, max_steps=max_steps, names=[f"model {m}"])
    return model.eval()


def _defense_loss(defense: Defense) -> Loss:
    """The loop's loss from the defense's `loss` hook (which does not see the step)."""
    return lambda logits, y, step: defense.loss(logits, y)


def reference_index(ctx: BankContext, m: int, n: int) -> np.ndarray:
    """Model m's reference non-members for min-max games (`FitJob.reference_x`): public points only, never
    an audited point (an audited non-member of m fitted against would hide the leakage the audit measures):
    a seeded subset of `n` of them (m's member count; seed role ("reference", m)) when there are more,
    else all of them. Empty when the plan leaves no public point (the defenses that need one refuse
    such a plan in `check_data`)."""
    public = ctx.public_index
    if public.size > n:
        rng = np.random.default_rng(derive_seed(ctx.spec.seed, "reference", m))
        public = np.sort(rng.choice(public, size=n, replace=False))
    return public


def _fit_with_defense(ctx: BankContext, m: int, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                      device: torch.device, report: dict[str, float] | None, precision: torch.dtype | None,
                      fmt: torch.memory_format) -> torch.nn.Module:
    """Hand model m's training to the defense (DP-SGD, min-max games, pruning, transfer learning,
    RelaxLoss, MemGuard), which runs `run_steps` with its hooks at the bank's precision and layout, or to
    the user's `train.function`."""
    ref = torch.from_numpy(reference_index(ctx, m, x.shape[0]))
    ref_x = ctx.data.x_train[ref].to(device) if ref.numel() else None
    ref_y = ctx.data.y_train[ref].to(device) if ref.numel() else None
    choice = ctx.spec.bank.vectorize
    job = FitJob(m=m, model=model, x=x, y=y, recipe=ctx.recipe, device=device,
                 seed=derive_seed(ctx.spec.seed, "defense-fit", m), steps_per_epoch=ctx.steps_per_epoch,
                 reference_x=ref_x, reference_y=ref_y, precision=precision, memory_format=fmt,
                 vectorize=usual_vectorize(ctx, device) if choice == "auto" else bool(choice),
                 pack_size=ctx.spec.bank.pack_size)
    function = ctx.spec.train.function
    if function is not None:
        from raymia.train.function import TRAINERS

        entry = TRAINERS.get(function.name, where="train.function.name")
        trained = entry.obj(job, entry.parse(function.params, where="train.function.params"))
        if not isinstance(trained, torch.nn.Module):
            raise SpecError(f"{function.name} returned {type(trained).__name__}, not the trained model",
                            where="train.function.name")
    else:
        trained = ctx.defense.fit(job)
        if trained is None:
            raise RuntimeError(f"defense {ctx.defense.name!r}: fit() returned no model")
    if report is not None:
        report.update(job.report)
    return trained.eval()


class PackedModels:
    """K models of one architecture as stacked parameters and buffers, run as a PackedSequential or with
    vmap(functional_call)."""

    def __init__(self, models: list[torch.nn.Module], input_shape: tuple[int, ...] | None = None,
                 channels_last: bool = False):
        """With `input_shape` (one example), plain sequential architectures run as a `PackedSequential`
        (grouped kernels, channels_last grouped maps when `channels_last`); everything else with vmap."""
        self.k = len(models)
        params, buffers = stack_module_state(models)
        self.params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        self.buffers = {n: b.detach().clone() for n, b in buffers.items()}
        self.base = copy.deepcopy(models[0]).to("meta")
        self.sequential = None if input_shape is None else maybe_packed(
            self.base, self.params, self.buffers, self.k, input_shape, channels_last)

        def one(p, b, x):
            return functional_call(self.base, (p, b), (x,))

        self._one = one

    @property
    def engine(self) -> str:
        return "vmap" if self.sequential is None else "packed"

    def train(self, mode: bool = True) -> PackedModels:
        self.base.train(mode)
        if self.sequential is not None:
            self.sequential.train(mode)
        return self

    def eval(self) -> PackedModels:
        return self.train(False)

    def __call__(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        """x: [K, B, ...] (one batch per model) or [B, ...] with shared_input. Returns [K, B, C]."""
        if self.sequential is not None:
            return self.sequential.forward(x.unsqueeze(0).expand(self.k, *x.shape) if shared_input else x)
        return vmap(self._one, in_dims=(0, 0, None if shared_input else 0), randomness="different")(
            self.params, self.buffers, x)

    def member(self, k: int) -> torch.nn.Module:
        """Model k of the pack as an ordinary module (its tensors are views of the stack)."""
        return _PackMember(self, k)


class _PackMember(torch.nn.Module):
    def __init__(self, pack: PackedModels, k: int):
        super().__init__()
        self._pack, self._k = pack, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = {n: t[self._k] for n, t in self._pack.params.items()}
        b = {n: t[self._k] for n, t in self._pack.buffers.items()}
        return functional_call(self._pack.base, (p, b), (x,))


def train_models_packed(
    ctx: BankContext, models: list[int], device: torch.device, max_steps: int | None = None,
    engine: str = "auto", compile: bool = False, cpu_autocast: bool = False,
) -> PackedModels:
    """Train the given bank models at once through `run_steps` (their losses summed); returns them in eval
    mode. `engine`: auto (a PackedSequential where the architecture allows, else vmap) or vmap.
    `max_steps` cuts training short (used only to time the pack). `compile` runs the pack's forward and
    its loss through torch.compile (benchmarks only: it is not in the spec until a GPU measurement shows
    where it helps; on this project's CPU it halved the speed). `cpu_autocast`: as for `train_model`."""
    if engine not in ("auto", "vmap"):
        raise ValueError(f"engine {engine!r}: accepted auto, vmap")
    spec, recipe = ctx.spec, ctx.recipe
    datas = [model_data(ctx, m) for m in models]
    shared = all(d.x is None for d in datas)
    n_max = max(d.index.numel() for d in datas)
    index = torch.stack([torch.nn.functional.pad(d.index, (0, n_max - d.index.numel())) for d in datas]).to(device)
    y_pad = [torch.nn.functional.pad(d.y, (0, 0) * (d.y.ndim - 1) + (0, n_max - d.y.shape[0])) for d in datas]
    ys = torch.stack(y_pad).to(device)  # [K, n_max(, C)]
    if shared:
        x_src = ctx.data.x_train.to(device)
    else:
        x_src = torch.stack([torch.nn.functional.pad(
            (d.x if d.x is not None else ctx.data.x_train[d.index]),
            (0, 0) * (ctx.data.x_train.ndim - 1) + (0, n_max - d.index.numel())) for d in datas]).to(device)

    fmt = memory_format(spec.bank.channels_last, device, ctx.data.info.input_shape)
    return train_modules_packed(
        [init_model(ctx, m, d).to(device, memory_format=fmt) for m, d in zip(models, datas)],
        x_src, ys, index, [d.index.numel() for d in datas], recipe, ctx.defense.loss,
        [derive_seed(spec.seed, "order", m) for m in models], [derive_seed(spec.seed, "augment", m) for m in models],
        shared, ctx.steps_per_epoch, device, fmt, autocast_dtype(device, spec.bank.precision, cpu_autocast),
        ctx.data.info.input_shape if engine == "auto" else None, [f"model {m}" for m in models],
        max_steps=max_steps, compile=compile)


def train_modules_packed(
    modules: list[torch.nn.Module], x: torch.Tensor, ys: torch.Tensor, index: torch.Tensor, counts: list[int],
    recipe, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], order_seeds: list[int],
    augment_seeds: list[int], shared: bool, steps_per_epoch: int, device: torch.device, fmt: torch.memory_format,
    precision: torch.dtype | None, input_shape: tuple[int, ...] | None, names: list[str],
    max_steps: int | None = None, compile: bool = False,
) -> PackedModels:
    """Train K modules of one architecture (initialised, on `device` in `fmt`) as one pack through
    `run_steps`, `recipe.epochs * steps_per_epoch` steps, their losses (`loss(logits, y)` per model, under
    vmap) summed; returns the pack in eval mode. Module k's members are the rows `index[k, :counts[k]]` of
    x (the shared set, `shared`) or of x[k]; its targets ys[k]; its batch order and augmentation come from
    `order_seeds[k]` and `augment_seeds[k]`, so it draws exactly what it would draw alone (`member_batches`).
    `input_shape` (one example): a PackedSequential where the architecture allows (None: vmap). The bank
    trains its packs here; SELENA its sub-models."""
    # The packed sequential path keeps grouped maps channels_last on a CPU (oneDNN's native layout, measured
    # faster there) and follows bank.channels_last on CUDA.
    pack = PackedModels(modules, input_shape=input_shape, channels_last=fmt is torch.channels_last or device.type == "cpu")
    scales, limits = param_lr_scales(pack.base), param_train_epochs(pack.base)
    net = Net(pack, list(pack.params.values()), [scales.get(n, 1.0) for n in pack.params],
              [limits.get(n) for n in pack.params], [*pack.params.values(), *pack.buffers.values()], pack=True)
    batches = pack_batches(
        x, ys, index, counts, recipe, [torch.Generator().manual_seed(s) for s in order_seeds],
        [torch.Generator().manual_seed(s) for s in augment_seeds],
        shared, fmt if pack.sequential is None else torch.contiguous_format)
    batched_loss = vmap(lambda logits, y: loss(logits.float(), y), randomness="different")
    if compile:
        net.forward, batched_loss = torch.compile(pack.__call__), torch.compile(batched_loss)
    pack.train()
    run_steps(net, batches, lambda logits, y, step: batched_loss(logits, y), recipe,
              recipe.epochs * steps_per_epoch, steps_per_epoch, precision=precision, max_steps=max_steps,
              names=names)
    return pack.eval()


@torch.no_grad()
def pack_query_logits(
    pack: PackedModels,
    defense: Defense,
    x: torch.Tensor,
    queries: list[str],
    generators: list[torch.Generator],
    device: torch.device,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Eval-mode logits of every model of the pack: float32 [K, Q, N, C], post-processing applied per model."""
    pack.eval()
    out = []
    for q in queries:
        parts = []
        xq = query_augment(x, q)
        for i in range(0, x.shape[0], batch_size):
            xb = xq[i : i + batch_size].to(device)
            logits = pack(xb, shared_input=True).float()  # [K, B, C]
            if defense.modifies_outputs:
                logits = torch.stack([defense.postprocess_logits(pack.member(k), logits[k], generators[k])
                                      for k in range(pack.k)])
            parts.append(logits.cpu())
        out.append(torch.cat(parts, dim=1))
    return torch.stack(out, dim=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROBE_SHARE = 0.03  # at most this share of a worker's training goes into timing the two paths
PROBE_ROUNDS = 3  # each path is timed this many times, its fastest kept (a busy moment slows one round)
# The two paths give the same models to float tolerance, not bit for bit: a timing that flips between runs
# would change a bank's outputs in their last digits (seen: a quickstart's probe timed while Tune started
# its trial processes). The architecture's usual way is kept unless the other is this much faster.
PROBE_MARGIN = 1.25


def usual_vectorize(ctx: BankContext, device: torch.device) -> bool:
    """The way a bank trains unless timing says otherwise: packs on CUDA; on a CPU, packs for the
    sequential architectures that run as a `PackedSequential` (the vmap pack of a convolutional net is
    slower than one by one there)."""
    return device.type == "cuda" or runs_packed(ctx.defense.prepare_model(build_model(
        ctx.spec.model.name, ctx.spec.model.params, ctx.data.info)), ctx.data.info.input_shape)


def decide_vectorize(pack_s: float, loop_s: float, usual: bool, margin: float = PROBE_MARGIN) -> bool:
    """Packs or one model at a time from the timed seconds per model-step: the usual way unless the other
    is at least `margin` times faster."""
    if usual:
        return pack_s < margin * loop_s  # packs, unless one by one is `margin` times faster
    return margin * pack_s <= loop_s


def choose_vectorize(
    ctx: BankContext, models: list[int], device: torch.device, worker_models: int | None = None,
    probe_steps: int = 16, say: Callable[[str], None] | None = None, choice: bool | str | None = None,
) -> bool:
    """Whether to train these models as one pack. With `bank.vectorize: auto`, times a few steps of the
    pack and of the one-model loop (after a 2-step warm-up of each; the fastest of PROBE_ROUNDS rounds) and
    keeps `usual_vectorize` unless the other way is PROBE_MARGIN times faster per model. The probe is kept
    under PROBE_SHARE of the `worker_models` models' training; when that is too short to time, the usual
    way is kept. The choice is said in one line through `say` (default: the raymia log). `choice` is the
    setting, when it is not the context's (a pool's run passes the one choice its first worker made)."""
    say = say or log.info
    choice = ctx.spec.bank.vectorize if choice is None else choice
    if len(models) < 2 or ctx.trains_itself:
        return False
    if choice != "auto":
        return bool(choice)
    total = ctx.recipe.epochs * ctx.steps_per_epoch
    budget = int(PROBE_SHARE * total * (worker_models or len(models)) / len(models)) - 2
    n = min(probe_steps, total, budget // PROBE_ROUNDS)
    usual = usual_vectorize(ctx, device)
    if n < 3:
        say(f"bank: {'vectorised packs' if usual else 'one model at a time'} (training too short to time both paths)")
        return usual

    def per_step(fn) -> float:
        fn(2)
        _sync(device)
        best = math.inf
        for _ in range(PROBE_ROUNDS):
            t0 = time.perf_counter()
            fn(n)
            _sync(device)
            best = min(best, (time.perf_counter() - t0) / n)
        return best

    pack = per_step(lambda s: train_models_packed(ctx, models, device, max_steps=s)) / len(models)
    loop = per_step(lambda s: train_model(ctx, models[0], device, max_steps=s))
    vectorize = decide_vectorize(pack, loop, usual)
    say(f"bank: {'vectorised packs' if vectorize else 'one model at a time'} (per model-step: pack of "
        f"{len(models)} {1e3 * pack:.2f} ms, one by one {1e3 * loop:.2f} ms"
        + ("" if vectorize == usual else f"; {max(pack, loop) / min(pack, loop):.1f}x faster than the usual way")
        + ")")
    return vectorize


def raw_sets(ctx: BankContext) -> int:
    """How many of the queried sets (the audited points, then the test split) are queried a second time
    without the defense's post-processing (`metrics.raw_outputs`): 2, or 0 where nothing is post-processed."""
    return 2 if ctx.spec.metrics.raw_outputs and ctx.defense.modifies_outputs else 0


def _train_group(ctx: BankContext, models: list[int], device: torch.device, vectorize: bool):
    """Train models that share one defense; returns per-model logits [Q, P, C], test logits [Q, T, C],
    the non-member sets' logits where the spec has them, the first `raw_sets` of these again before
    post-processing, and the defense's reports."""
    spec = ctx.spec
    # the audited points, the test split and the non-member sets, queried in this order (each model's query
    # generator runs through them in turn, so adding sets leaves the first two as they were); the raw
    # queries draw nothing from it, so the released outputs are those of a bank without them
    sets = [ctx.audited_x, ctx.data.x_test] + ([ctx.ood.x] if ctx.ood is not None else [])
    raw = build_defense("none", {}, ctx.data.info)  # post-processes nothing: the outputs as they leave a model
    queried = [(x, ctx.defense) for x in sets] + [(x, raw) for x in sets[:raw_sets(ctx)]]
    gens = [torch.Generator().manual_seed(derive_seed(spec.seed, "query", m)) for m in models]
    if vectorize and len(models) > 1:
        packed = train_models_packed(ctx, models, device)
        outs = [pack_query_logits(packed, d, x, spec.queries, gens, device) for x, d in queried]
        return [list(o) for o in outs], [{} for _ in models]
    outs, reports = [[] for _ in queried], []
    for m, g in zip(models, gens):
        reports.append({})
        model = train_model(ctx, m, device, report=reports[-1])
        for out, (x, d) in zip(outs, queried):
            out.append(query_logits(model, d, x, spec.queries, g, device=device))
    return outs, reports


def train_pack(
    ctx: BankContext, pack: int, device: torch.device, vectorize: bool | None = None
) -> tuple[dict[str, np.ndarray], list[dict[str, float]]]:
    """Train the models of one pack and query them. Returns the arrays stored for the pack:

    logits      float32 [K, Q, P, C]  audited population under every query augmentation
    test_logits float32 [K, Q, T, C]  the test split under every query (utility; RMIA's population z)
    ood_logits  float32 [K, Q, N, C]  with `ood:` in the spec, its non-member sets (ctx.ood) in order
    raw_logits, raw_test_logits       with `metrics.raw_outputs`, the first two before the defense's
                                      post-processing, where some model of the pack post-processes (the
                                      others' are their released ones); absent: the released ones are raw
    models      int64   [K]           bank indices of the pack's models

    and the defense's per-model reports (one dict per model, in pack order; empty when it reports nothing).
    """
    models = ctx.pack_models(pack)
    t0 = time.perf_counter()
    if vectorize is None:
        vectorize = choose_vectorize(ctx, models, device)
    # A non-adaptive bank defends only the targets: train each group with its own defense and recipe.
    groups = [(ctx, [m for m in models if ctx.defended(m)])]
    if ctx.undefended is not None:
        groups.append((ctx.undefended, [m for m in models if not ctx.defended(m)]))
    parts: dict[int, tuple[list[torch.Tensor], dict[str, float]]] = {}
    raw = max((raw_sets(gctx) for gctx, gmodels in groups if gmodels), default=0)
    for gctx, gmodels in groups:
        if gmodels:
            vec = vectorize and not gctx.trains_itself
            outs, reps = _train_group(gctx, gmodels, device, vec)
            if raw and not raw_sets(gctx):  # nothing post-processed: the released outputs are the raw ones
                outs += outs[:raw]
            for i, m in enumerate(gmodels):
                parts[m] = ([o[i] for o in outs], reps[i])
    reports = [parts[m][1] for m in models]
    log.debug("pack %d: trained %d models in %.1fs", pack, len(models), time.perf_counter() - t0)
    names = (["logits", "test_logits"] + (["ood_logits"] if ctx.ood is not None else [])
             + ["raw_logits", "raw_test_logits"][:raw])
    arrays = {name: torch.stack([parts[m][0][i] for m in models]).numpy().astype(np.float32)
              for i, name in enumerate(names)}
    arrays["models"] = np.asarray(models, dtype=np.int64)
    return arrays, reports
