"""Model inversion inside an audit: the protocol of GMI / KED-MI / PLG-MI / TL-DMI (REFERENCE 1.4).

The spec's `data.private_classes` splits the data set by class (`raymia.data.split`): the bank trains on
the private classes only and the public classes are the public split. `inversion:` then names the
attacks, the classes to reconstruct, the attacker's public data (the public classes, or another data set
adapted to the input shape) and the evaluator. For each of the first `inversion.targets` targets:

1. the target's weights: bank model t retrained alone with the bank's recipe, defense and seeds
   (`train.bank.train_model`; the bank stores outputs only, and a model of a pack equals the same model
   trained alone up to float rounding, `tests/test_bank.py`), cached under
   `<output_dir>/cache/inversion/target-<fingerprint>-m<t>.pt`;
2. every attack reconstructs `per_class` images of each class, white-box (`run_inversion`), cached per
   target, attack setting and public data, so a re-run (or a resumed sweep) repeats nothing;
3. an evaluator of another architecture, trained once on every private image (the audited population and
   the private test split) and cached by content, scores them (`score_reconstructions`: top-1, top-5, KNN
   feature distance, FID of the evaluator's features); KNN distance and FID compare the reconstructions
   with the images the target trained on (`training_images`), as the official evaluation codes do, not
   with private images it never saw.

`prepare` fits what does not depend on the target (the evaluator, GMI's GAN) so that a sweep does it once
on a Ray worker before its trials. Every cached file is written atomically with a checksum and read with
`torch.load(weights_only=True)` (`raymia.cache`'s helpers). No Ray, MLflow or Optuna here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raymia.datainfo import DataInfo
from raymia.errors import SpecError
from raymia.spec import AuditSpec
from raymia.storage import StoredDir, store_dir

log = logging.getLogger("raymia")

MI_PREFIX = "mi"  # flat metric names: mi/<attack label>/<metric>, mi/worst/<metric> (the strongest attack's)
MI_METRICS = ("top1", "top5", "knn_dist", "fid")
# direction of leakage: a higher top-1/top-5 and a lower KNN distance/FID mean a stronger inversion
MI_LEAK_UP = {"top1": True, "top5": True, "knn_dist": False, "fid": False}


@dataclass(frozen=True)
class InversionData:
    """What the inversion protocol works on: the private classes to reconstruct, every private image with
    its label (the evaluator's training data and the scoring's references) and the attacker's public
    inputs (normalised as the target's)."""

    info: DataInfo
    classes: list[int]
    private_x: torch.Tensor
    private_y: torch.Tensor
    public_x: torch.Tensor


@dataclass
class InversionResult:
    """Per attack label: metric -> mean over the inverted targets, their std, one dict per target; the
    grid image of the first target's reconstructions; what scored them."""

    attacks: dict[str, dict[str, float]] = field(default_factory=dict)
    attacks_std: dict[str, dict[str, float]] = field(default_factory=dict)
    per_target: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    grids: dict[str, Path] = field(default_factory=dict)
    targets: list[int] = field(default_factory=list)
    evaluator: dict[str, Any] = field(default_factory=dict)

    def strongest(self, metric: str) -> str | None:
        """The attack whose `metric` shows the most leakage (the highest top-1/top-5, the lowest KNN
        distance/FID; `MI_LEAK_UP`), among those with a finite value."""
        vals = {a: ms[metric] for a, ms in self.attacks.items() if np.isfinite(ms.get(metric, np.nan))}
        if not vals:
            return None
        return (max if MI_LEAK_UP[metric] else min)(vals, key=vals.get)

    def flat_metrics(self) -> dict[str, float]:
        """mi/<attack>/<metric>, and mi/worst/<metric>: the strongest attack's value of each metric."""
        out = {f"{MI_PREFIX}/{a}/{k}": v for a, ms in self.attacks.items() for k, v in ms.items()}
        for k in MI_METRICS:
            if (a := self.strongest(k)) is not None:
                out[f"{MI_PREFIX}/worst/{k}"] = self.attacks[a][k]
        return out

    def flat_std(self) -> dict[str, float]:
        out = {f"{MI_PREFIX}/{a}/{k}": v for a, ms in self.attacks_std.items() for k, v in ms.items()}
        for k in MI_METRICS:
            if (a := self.strongest(k)) is not None and k in self.attacks_std.get(a, {}):
                out[f"{MI_PREFIX}/worst/{k}"] = self.attacks_std[a][k]
        return out

    def to_json(self) -> dict[str, Any]:
        """result.json's `inversion`; an undefined metric (nan: top-5 over 5 classes or fewer, FID of fewer than
        2 reconstructions) is null, as JSON has no NaN."""
        def defined(ms: dict[str, float]) -> dict[str, float | None]:
            return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in ms.items()}

        return {"targets": self.targets, "evaluator": self.evaluator,
                "attacks": {a: defined(ms) for a, ms in self.attacks.items()},
                "strongest": {k: self.strongest(k) for k in MI_METRICS},
                "attacks_std_over_targets": {a: defined(ms) for a, ms in self.attacks_std.items()},
                "attacks_per_target": {a: [defined(r) for r in rs] for a, rs in self.per_target.items()},
                "grids": {k: p.name for k, p in self.grids.items()}}


def metric_names(spec: AuditSpec) -> list[str]:
    """Every flat inversion metric an audit of `spec` reports (for sweep objectives)."""
    if spec.inversion is None:
        return []
    return [f"{MI_PREFIX}/{a}/{k}" for a in [*(a.key for a in spec.inversion.attacks), "worst"] for k in MI_METRICS]


def check_inversion(spec: AuditSpec) -> None:
    """The checks that need no data: attack names and params, the evaluator's architecture."""
    from raymia.inversion.registry import INVERSION
    from raymia.models import MODELS

    inv = spec.inversion
    if inv is None:
        return
    for i, a in enumerate(inv.attacks):
        INVERSION.get(a.name, where=f"inversion.attacks.{i}.name").parse(a.params, where=f"inversion.attacks.{i}.params")
    if inv.public != "classes":
        from raymia.data import DATASETS

        DATASETS.get(inv.public.name, where="inversion.public.name").parse(inv.public.params,
                                                                          where="inversion.public.params")
    arch, params = evaluator_arch(spec)
    MODELS.get(arch, where="inversion.evaluator.model").parse(params, where="inversion.evaluator.params")
    if arch == spec.model.name and params == spec.model.params:
        raise SpecError(f"the evaluator must be another architecture than the target ({arch}); pick another "
                        "model, see raymia list models", where="inversion.evaluator.model")
    if inv.public == "classes" and spec.data.private_classes is None:
        raise SpecError("the attacker's public data are the public classes, but data.private_classes is not "
                        "set: " + ("with target: your model's classes are all private, so give another data "
                                   "set as inversion.public" if spec.target is not None else
                                   "give data.private_classes, or another data set as inversion.public"),
                        where="inversion.public")


def check_inversion_models(spec: AuditSpec, info: DataInfo) -> None:
    """The evaluator and every attack's other models (LOMMA's students) accept the data's inputs: one
    SpecError naming the field before any training (`check_forward`)."""
    from raymia.inversion.lomma import IdentityParams
    from raymia.inversion.registry import INVERSION
    from raymia.models.base import check_forward

    arch, params = evaluator_arch(spec)
    check_forward(arch, params, info, where="inversion.evaluator.model")
    for i, a in enumerate(spec.inversion.attacks):
        parsed = INVERSION.get(a.name, where=f"inversion.attacks.{i}.name").parse(
            a.params, where=f"inversion.attacks.{i}.params")
        for j, m in enumerate(parsed.augment if isinstance(parsed, IdentityParams) else []):
            check_forward(m.name, m.params, info, where=f"inversion.attacks.{i}.params.augment.{j}")


def evaluator_arch(spec: AuditSpec) -> tuple[str, dict[str, Any]]:
    """(model name, params) of the evaluator: the spec's, else `cnn`, or an MLP when the target is a cnn."""
    ev = spec.inversion.evaluator if spec.inversion is not None else None
    if ev is not None and ev.model is not None:
        return ev.model, dict(ev.params)
    params = dict(ev.params) if ev is not None else {}  # params without a model apply to the default one
    if spec.model.name != "cnn":
        return "cnn", params
    return "mlp", params or {"hidden": [512, 256]}


def inversion_data(spec: AuditSpec, ctx) -> InversionData:
    """The protocol's data from a `BankContext` of `spec`, with one-line errors for a bad split or a model
    that does not take the data's inputs."""
    from raymia.inversion.registry import image_shape

    inv = spec.inversion
    assert inv is not None
    info = ctx.data.info
    image_shape(info, inv.attacks[0].name)
    check_inversion_models(spec, info)
    if inv.public == "classes":
        public_x = ctx.data.x_train[torch.from_numpy(ctx.public_index)]
    else:
        from raymia.data import DATASETS

        hashed = DATASETS.get(spec.data.name, where="data.name").params.hashed  # either spelling: the same data
        if inv.public.name == spec.data.name and hashed(inv.public.params) == hashed(spec.data.params):
            raise SpecError(f"the public data set {inv.public.name!r} is the audited data set, whose classes "
                            "overlap the private ones; use public: classes with data.private_classes",
                            where="inversion.public")
        from raymia.data import load_dataset
        from raymia.data.split import adapt_inputs

        other = load_dataset(inv.public.name, inv.public.params, where="inversion.public")
        public_x = adapt_inputs(other.x_train, other.info, info, where="inversion.public")
    if public_x.shape[0] < inv.min_public:
        raise SpecError(f"the attacker gets {public_x.shape[0]} public images, fewer than inversion.min_public = "
                        f"{inv.min_public}; give more public classes or another data set",
                        where="inversion.public")
    private = spec.data.private_class_list() or list(range(info.num_classes))
    if inv.classes == "all":
        classes = private
    elif isinstance(inv.classes, int):
        if inv.classes > len(private):
            raise SpecError(f"{inv.classes} classes asked, {len(private)} are private", where="inversion.classes")
        classes = private[: inv.classes]
    else:
        bad = [c for c in inv.classes if c not in private]
        if bad:
            raise SpecError(f"classes {bad} are not private; accepted: {private}", where="inversion.classes")
        classes = list(inv.classes)
    private_x = torch.cat([ctx.audited_x, ctx.data.x_test])
    private_y = torch.cat([torch.from_numpy(ctx.audited_y), ctx.data.y_test])
    return InversionData(info=info, classes=classes, private_x=private_x, private_y=private_y, public_x=public_x)


def cache_dir(spec: AuditSpec) -> StoredDir:
    return store_dir(spec.store_root, "cache", "inversion")


def _device(spec: AuditSpec) -> torch.device:
    from raymia.device import resolve_device

    return resolve_device(spec.inversion.device, where="inversion.device")


def evaluator_for(spec: AuditSpec, data: InversionData, device: torch.device):
    """The cached evaluator (`evaluation.cached_evaluator`) of this spec's private images."""
    from raymia.inversion.evaluation import cached_evaluator

    ev = spec.inversion.evaluator
    arch, params = evaluator_arch(spec)
    return cached_evaluator(cache_dir(spec), {"what": "inversion-evaluator"}, data.private_x, data.private_y,
                            data.info.num_classes, data.info.input_shape, arch=arch, params=params,
                            epochs=ev.epochs, lr=ev.lr, batch_size=ev.batch_size,
                            seed=_seed(spec, "evaluator"), device=device)


def _seed(spec: AuditSpec, *role: Any) -> int:
    from raymia.seeding import derive_seed

    return derive_seed(spec.seed, "inversion", *role)


def _context(spec: AuditSpec, data: InversionData, device: torch.device):
    from raymia.inversion.registry import InversionContext

    # one seed for every target and trial: GMI's GAN (public data only) is then shared by a whole sweep
    return InversionContext(info=data.info, x_public=data.public_x, cache_dir=cache_dir(spec), device=device,
                            seed=_seed(spec, "attacker"))


def prepare(spec: AuditSpec, ctx=None) -> dict[str, str]:
    """Fit (or find cached) what every target's inversion shares: the evaluator and each attack's
    target-independent artefacts (GMI's GAN). Returns what was done, for the log."""
    from raymia.inversion.registry import prepare_inversion

    if ctx is None:
        from raymia.train.bank import BankContext

        ctx = BankContext.from_spec(spec, setup=False)
    data = inversion_data(spec, ctx)
    device = _device(spec)
    done = {"evaluator": "cached" if evaluator_for(spec, data, device).from_cache else "trained"}
    ictx = _context(spec, data, device)
    for i, a in enumerate(spec.inversion.attacks):
        what = prepare_inversion(a.name, a.params, ictx, where=f"inversion.attacks.{i}")
        if what:
            done[a.key] = what
    return done


def target_model(spec: AuditSpec, ctx, t: int, device: torch.device) -> nn.Module:
    """Bank model t, trained alone with the bank's recipe and defense, or its cached weights."""
    from raymia.cache import key_digest, load_state, save_state
    from raymia.train.bank import init_model, train_model

    fp = spec.fingerprint()
    key = key_digest({"what": "inversion-target", "fingerprint": fp, "model": t, "device": device.type})
    path = cache_dir(spec) / f"target-{fp}-m{t}.pt"
    state = load_state(path, key)
    if state is not None:
        model = init_model(ctx, t)
        try:
            model.load_state_dict(state)
            return model.to(device).eval()
        except (RuntimeError, KeyError) as e:
            log.warning("inversion: cached target %s does not fit (%s); retraining", path, e)
    log.info("inversion: training target %d alone for the white-box attacks", t)
    model = train_model(ctx, t, device)
    save_state(path, key, model.state_dict())
    return model.eval()


def own_model(spec: AuditSpec, ctx, device: torch.device) -> nn.Module:
    """The user's target (`target.checkpoint`) in eval mode on `device`."""
    from raymia.target import checkpoint_model

    log.info("inversion: inverting your model from %s", spec.target.checkpoint)
    return checkpoint_model(spec, ctx, device)


def _reconstruct(spec: AuditSpec, i: int, target: nn.Module, t: int, data: InversionData, device: torch.device):
    """Attack i's reconstructions of target t, cached by everything they depend on."""
    from raymia.cache import data_digest, key_digest, load_state, save_state
    from raymia.inversion.registry import INVERSION, Reconstructions, run_inversion

    a = spec.inversion.attacks[i]
    public = data_digest(_Public(data.public_x), with_labels=False)
    own = {}
    if spec.target is not None:  # the bank's fingerprint leaves the user's model out: its files are the key
        from raymia.target import target_digest

        own = {"target": target_digest(spec)}
    key = key_digest({"what": "inversion-reconstructions", "fingerprint": spec.fingerprint(), "model": t, **own,
                      "attack": a.name, "classes": data.classes, "public": public,
                      # a renamed parameter under its old name: either spelling finds the reconstructions
                      "params": INVERSION.get(a.name, where=f"inversion.attacks.{i}.name").params.hashed(a.params),
                      "seed": spec.seed, "device": device.type})
    path = cache_dir(spec) / f"recon-{key}.pt"
    state = load_state(path, key)
    if state is not None and {"images", "labels"} <= set(state):
        return Reconstructions(state["images"], state["labels"])
    rec = run_inversion(a.name, a.params, target, data.classes, _context(spec, data, device),
                        where=f"inversion.attacks.{i}")
    save_state(path, key, {"images": rec.images.contiguous(), "labels": rec.labels.contiguous()})
    return rec


def training_images(spec: AuditSpec, ctx, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The private images (and labels) target t trained on: bank model t's members, or the user's model's
    `target.members` (row num_models)."""
    if spec.target is not None:
        from raymia.target import read_members

        idx = read_members(spec.target.members, ctx.data.x_train.shape[0])
    else:
        idx = ctx.plan.members_of(t)
    index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return ctx.data.x_train[index], ctx.data.y_train[index]


@dataclass
class _Public:
    x_train: torch.Tensor
    name: str = "public"
    y_train: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))


def run_inversions(spec: AuditSpec, ctx, out_dir: Path, data: InversionData | None = None) -> InversionResult:
    """Every inversion attack against the first `inversion.targets` targets, scored; grids in out_dir.
    `data`: the protocol's data if already loaded (`inversion_data`)."""
    from raymia.inversion.evaluation import feature_layer, save_grid, score_reconstructions

    inv = spec.inversion
    assert inv is not None
    data = data if data is not None else inversion_data(spec, ctx)
    device = _device(spec)
    evaluator = evaluator_for(spec, data, device).model
    # with target: the user's model, which the audit attacks as row num_models of the signals
    targets = [spec.plan.num_models] if spec.target is not None else spec.plan.target_list[: inv.targets]
    arch, _ = evaluator_arch(spec)
    result = InversionResult(targets=targets, evaluator={
        "model": arch, "features": feature_layer(evaluator), "fid": "Frechet distance of the evaluator's "
        "features (not Inception's)", "private_images": int(data.private_x.shape[0]),
        "public_images": int(data.public_x.shape[0]), "classes": data.classes})
    runs: dict[str, list[dict[str, float]]] = {a.key: [] for a in inv.attacks}
    for j, t in enumerate(targets):
        target = own_model(spec, ctx, device) if spec.target is not None else target_model(spec, ctx, t, device)
        seen_x, seen_y = training_images(spec, ctx, t)
        if missing := sorted(set(data.classes) - set(seen_y.unique().tolist())):
            raise SpecError(f"target {t} trained on no image of classes {missing}, so its reconstructions of "
                            "them have nothing to be compared with; leave them out of inversion.classes",
                            where="inversion.classes")
        for i, a in enumerate(inv.attacks):
            rec = _reconstruct(spec, i, target, t, data, device)
            # the evaluator learnt the private classes only (`evaluator_for`): those are the classes it tells apart
            s = score_reconstructions(evaluator, rec.images, rec.labels, seen_x, seen_y,
                                      told_apart=int(data.private_y.unique().numel()))
            runs[a.key].append({"top1": float(s["top1"]), "top5": float(s["top5"]),
                                "knn_dist": float(s["knn_dist"]), "fid": float(s["fid"])})
            log.info("inversion: target %d, %s: top-1 %.3f, KNN distance %.2f", t, a.key, s["top1"], s["knn_dist"])
            if j == 0:
                result.grids[a.key] = _grid(rec, data, out_dir / f"inversion-{a.key}.png", save_grid)
    for key, rs in runs.items():
        result.per_target[key] = rs
        result.attacks[key] = {k: float(np.mean([r[k] for r in rs])) for k in MI_METRICS}
        result.attacks_std[key] = {k: float(np.std([r[k] for r in rs])) for k in MI_METRICS}
    return result


def _grid(rec, data: InversionData, path: Path, save_grid) -> Path:
    """Per class one row: the mean private image, then the reconstructions."""
    rows, labels = [], []
    per_class = len(rec) // max(1, len(data.classes))
    for c in data.classes:
        mine = rec.images[rec.labels == c]
        rows += [data.private_x[data.private_y == c].mean(0, keepdim=True), mine]
        labels += [f"{c}: mean"] + [f"{c}"] * mine.shape[0]
    return save_grid(torch.cat(rows), path, nrow=per_class + 1, labels=labels, mean=data.info.mean,
                     std=data.info.std)
