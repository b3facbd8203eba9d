"""The YAML specs (pydantic): what to audit, how to train the bank, which attacks to run, what to sweep.

The schema only: registry names (data set, model, defense, attacks) are strings here, and this module
imports none of the plug-in packages. `raymia.resolve.load_spec(path, overrides)`, the one way to load a
spec, reads a YAML file (`load_raw`), applies `--set dotted.key=value` overrides (`apply_overrides`),
validates it against these models and resolves every registry name and its params; every problem becomes
one `SpecError` line naming the field or file and what is accepted.
`AuditSpec.fingerprint()` is a stable content hash of everything that changes the bank's outputs (data,
plan, model, recipe, defense, queries, seed): stored signals are keyed by it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
import textwrap
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from raymia.errors import SpecError, did_you_mean, first_line
from raymia.registry import MAX_EPOCHS, ValidatedModel, first_error, validation_depth

# Bump when the meaning of stored signals changes, so old entries are never reused by mistake.
SIGNAL_FORMAT_VERSION = 7

NAME_PATTERN = r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$"


def _file_name(v: str) -> str:
    # Names become folder names (audits/<name>, sweeps/<name>, a metric's prefix): no separator, and no
    # leading dot, so neither "." nor ".." can name the folder above (a --fresh sweep deletes its folder).
    if not re.match(NAME_PATTERN, v):
        raise ValueError(f"{v!r} is not a name: use letters, digits, '_', '-' and '.', not starting with '.'")
    return v


FileName = Annotated[
    str, Field(max_length=64, json_schema_extra={"pattern": NAME_PATTERN}), AfterValidator(_file_name)
]

_QUERY_RE = re.compile(r"^(identity|hflip|shift:(-?\d+):(-?\d+)|noise:(\d*\.?\d+))$")


class Query(NamedTuple):
    """One query augmentation, parsed: kind identity | hflip | shift (by dx, dy pixels) | noise (sigma)."""

    kind: str
    dx: int = 0
    dy: int = 0
    sigma: float = 0.0


def parse_query(text: str) -> Query:
    """The query grammar, in one place: identity, hflip, shift:DX:DY, noise:SIGMA (ValueError otherwise)."""
    m = _QUERY_RE.match(text)
    if m is None:
        raise ValueError(f"unknown query augmentation {text!r}; accepted: identity, hflip, shift:DX:DY, noise:SIGMA")
    if m.group(2) is not None:
        return Query("shift", dx=int(m.group(2)), dy=int(m.group(3)))
    if m.group(4) is not None:
        return Query("noise", sigma=float(m.group(4)))
    return Query(text)


FIELDS_HEADING = "\n\nFields:\n"


def _summary_only(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """The JSON Schema describes a model by its docstring without the field list (`_Model`'s, for help()):
    each property carries its own description."""
    summary = (schema.get("description") or "").split(FIELDS_HEADING.strip("\n"))[0].strip()
    if summary:
        schema["description"] = summary
    else:
        schema.pop("description", None)


def _field_list(cls: type[BaseModel]) -> str:
    """The model's fields with their defaults and descriptions, for its docstring (help())."""
    lines = []
    for name, f in cls.model_fields.items():
        if f.is_required():
            default = " (required)"
        elif f.default_factory is not None:
            value = f.default_factory()  # type: ignore[call-arg]
            nested = isinstance(value, BaseModel) or (isinstance(value, list) and value
                                                      and isinstance(value[0], BaseModel))
            default = "" if nested else f" (default {value!r})"  # a block's description says its default
        else:
            default = f" (default {f.default!r})"
        lines.append(textwrap.fill(f"{name}{default}: {f.description}", 100, initial_indent="    ",
                                   subsequent_indent="        ", break_on_hyphens=False))
    return FIELDS_HEADING + "\n".join(lines)


class _Model(ValidatedModel):
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_summary_only)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        # help(raymia.AuditSpec) lists the fields as the schema describes them
        doc = inspect.cleandoc(cls.__doc__ or "").split(FIELDS_HEADING)[0]
        cls.__doc__ = (doc + _field_list(cls)).lstrip("\n")

    def __init__(self, /, **data: Any) -> None:
        # A spec built in Python is checked as a spec file is: one SpecError naming the field, made by the
        # outermost model only (pydantic validates nested ones, and model_validate, through __init__ too)
        outermost = validation_depth() == 0
        try:
            super().__init__(**data)
        except ValidationError as e:
            if not outermost:
                raise
            loc, msg = format_error(e, type(self))
            raise SpecError(msg, where=loc) from None


def format_error(e: ValidationError, root: type[BaseModel]) -> tuple[str, str]:
    """The first error of a spec's validation as (dotted field, message), an unknown field's message listing
    the fields accepted there (`root`: the model validated)."""
    parts, msg, kind = first_error(e)
    loc = ".".join(str(x) for x in parts) or "spec"
    if kind == "extra_forbidden":
        msg = "unknown field"
        parent_loc = parts[:-1]
        model: Any = root
        try:
            for part in parent_loc:
                if isinstance(part, int):
                    continue
                ann = model.model_fields[part].annotation
                model = getattr(ann, "__args__", (ann,))[0] if hasattr(ann, "__args__") else ann
            if isinstance(model, type) and issubclass(model, BaseModel):
                msg += did_you_mean(parts[-1], model.model_fields) + "; accepted: " + ", ".join(model.model_fields)
        except (KeyError, AttributeError, TypeError):
            pass
    return loc, msg


class Named(_Model):
    """A registry entry chosen by name, with its own parameters (see `raymia list`). A bare name stands for
    the entry with its defaults: `model: lenet5`, `attacks: [loss, lira_online]`."""

    name: str = Field(description="a registered name (raymia list), or your own code by import path, "
                      "module:function")
    params: dict[str, Any] = Field(
        default_factory=dict, description="the entry's parameters, checked against the ones it declares (raymia "
        "list shows them with their types, defaults and ranges); unset: its defaults")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        """The JSON Schema admits the bare name too, as the validator above does."""
        schema = handler.resolve_ref_schema(handler(core_schema))
        return {"anyOf": [{"type": "string", "description": "a registered name, with its defaults"}, schema],
                **({"title": schema["title"]} if "title" in schema else {})}


class DataSpec(Named):
    """The data set, and for model inversion its split by class: `private_classes` (a count N: classes
    0..N-1, or a list) are the target's classes: the audited population, the test split and everything the
    bank trains on come from them only; `public_classes` (default: every other class) are the public split
    that defenses and the inversion attacker's GAN may fit on. Both unset: every class is private."""

    name: str = Field("digits", description="a registered data set (raymia list datasets), or module:function")
    private_classes: int | list[int] | None = Field(
        None, description="the target's classes (N: classes 0..N-1, or a list); default: all of them")
    public_classes: list[int] | None = Field(
        None, description="the public classes (default: every class not private); needs private_classes")

    @model_validator(mode="after")
    def _classes(self) -> DataSpec:
        if self.public_classes is not None and self.private_classes is None:
            raise ValueError("public_classes needs private_classes (which classes the target trains on)")
        if isinstance(self.private_classes, int) and self.private_classes < 1:
            raise ValueError(f"private_classes must be a count >= 1 or a list of classes, got {self.private_classes}")
        for field in ("private_classes", "public_classes"):
            v = getattr(self, field)
            if isinstance(v, list) and (not v or len(set(v)) != len(v) or min(v) < 0):
                raise ValueError(f"{field} must be distinct class indices >= 0, got {v}")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_classes(self, handler: Any) -> Any:
        d = handler(self)  # unset, left out: specs without a split keep their fingerprints and resume hashes
        for k in ("private_classes", "public_classes"):
            if isinstance(d, dict) and d.get(k) is None:
                d.pop(k, None)
        return d

    def private_class_list(self) -> list[int] | None:
        """The private classes as a list (None: no split)."""
        v = self.private_classes
        return list(range(v)) if isinstance(v, int) else (list(v) if v is not None else None)


class ModelSpec(Named):
    name: str = Field("mlp", description="a registered architecture (raymia list models), or your builder by "
                      "import path, module:function")


class DefenseSpec(Named):
    name: str = Field("none", description="a registered defense (raymia list defenses), or module:Class (a "
                      "raymia.defenses.base.Defense subclass)")


# prefixes of other flat metric names, and the fixed columns of records.parquet (report.records)
ATTACK_LABEL_RESERVED = ("worst", "defense", "std", "target", "index", "label", "member")


def _unique_keys(entries: list[Any], what: str) -> list[str]:
    """The entries' keys (label, or name), each naming one entry: results and metric names are keyed by it."""
    keys = [e.key for e in entries]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"{dup[0]!r} names two {what}; give each its own label")
    return keys


class LabelledEntry(Named):
    """A registry entry that results name by an optional `label` (default: the name): an attack, a
    non-member set. Labels let one entry be listed twice with different params; `key` is the label, or the
    name."""

    label: FileName | None = Field(
        None,
        description="name of this entry in results and metric names (default: its name)",
    )

    @model_serializer(mode="wrap")
    def _without_default_label(self, handler: Any) -> Any:
        d = handler(self)  # unset, left out: specs without labels keep their resume hashes
        if isinstance(d, dict) and d.get("label") is None:
            d.pop("label", None)
        return d

    @property
    def key(self) -> str:
        """What names this entry in results: the label, or the name."""
        return self.label or self.name


class AttackSpec(LabelledEntry):
    """An attack entry: a registered attack `name`, its `params`, and an optional `label` that names the entry
    in results and metric names (`<label>/auc`, MLflow, sweep objectives)."""

    name: str = Field(description="a registered attack (raymia list attacks; under inversion.attacks, raymia "
                      "list inversion), or module:function")

    @field_validator("label")
    @classmethod
    def _label(cls, v: str | None) -> str | None:
        if v in ATTACK_LABEL_RESERVED:
            raise ValueError(f"{v!r} is reserved for other metrics and columns ({', '.join(ATTACK_LABEL_RESERVED)})")
        return v


# A bank's largest size: the plan's keep matrix is models x audited points, and no audit needs more shadows
# (the attacks' papers use up to a few hundred); 10**12 was a MemoryError traceback.
MAX_MODELS = 10_000


def _even_models(m: int) -> int:
    """A bank's num_models: pairs of models on complementary halves."""
    if m % 2:
        raise ValueError(f"must be even (each point IN for exactly half of the models), got {m}")
    return m


class PlanSpec(_Model):
    """Who trains on what: M models, each audited point IN for exactly half of them."""

    num_models: int = Field(16, ge=2, le=MAX_MODELS, description="M: target(s) + shadows in the bank; even")
    population: int | None = Field(
        None, ge=2, description="audited points drawn from the training split (None: all of it)"
    )
    targets: list[int] | Literal["all"] = Field(
        "all", min_length=1,
        description="bank models attacked in turn, the others but the target's pair being its shadows "
        "(leave-one-out), or 'all' (default; [0] with attacker: non_adaptive): results are the mean and std "
        "over the targets",
    )

    # field validators, so that an error names plan.num_models or plan.targets, not plan
    _even = field_validator("num_models")(_even_models)

    @field_validator("targets")
    @classmethod
    def _in_bank(cls, targets: list[int] | str, info: ValidationInfo) -> list[int] | str:
        m = info.data.get("num_models")  # absent when it was refused itself
        if targets != "all" and m is not None:
            bad = [t for t in targets if not 0 <= t < m]
            if bad:
                raise ValueError(f"{bad} out of range [0, {m}): a target is a bank model (plan.num_models is {m})")
            if len(set(targets)) != len(targets):
                raise ValueError("a target given twice")
        return targets

    @property
    def target_list(self) -> list[int]:
        return list(range(self.num_models)) if self.targets == "all" else list(self.targets)


class AugmentSpec(_Model):
    """Training-time augmentation, drawn per sample from each model's own seed, applied on the device."""

    hflip: bool = Field(False, description="random horizontal flips (p = 0.5)")
    crop: int = Field(0, ge=0, le=16, description="random crops after padding by this many pixels")
    pad: Literal["zeros", "reflect"] = Field(
        "zeros", description="how crops pad: zeros, or reflect (mirror the border; airbench's translate)")
    flip: Literal["random", "alternate"] = Field(
        "random", description="how hflip flips: random (p = 0.5 at every draw), or alternate (airbench's: a "
                              "random half of the images on their first pass, then each image the other way "
                              "from its previous pass)")

    @model_validator(mode="after")
    def _flip(self) -> AugmentSpec:
        if self.flip == "alternate" and not self.hflip:
            raise ValueError("flip: alternate chooses how hflip flips; set hflip: true, or leave flip at random")
        return self


LOOKAHEAD_START_EPOCHS = 3  # airbench94's lookahead acts from this (0-based) epoch on


class TriangleSpec(_Model):
    """airbench's learning-rate schedule: linear from `start` x lr up to lr at `peak`, then down to `end` x lr."""

    start: float = Field(0.2, ge=0, le=1, description="lr factor at the first step")
    peak: float = Field(0.23, ge=0, lt=1, description="fraction of training at which the lr peaks (factor 1)")
    end: float = Field(0.07, ge=0, le=1, description="lr factor at the end of training")


class TrainSpec(_Model):
    """The training recipe, applied identically to the target and every shadow.

    An epoch is ceil((P/2) / batch_size) steps of full batches (P/2 is every model's expected member
    count); each model draws its batches from its own stream of reshuffled permutations of its members,
    so every model of the bank takes the same number of steps and packs of models vectorise.
    """

    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "adam", description="sgd (with momentum and nesterov), adam, or adamw (decoupled weight decay); torch's "
        "defaults otherwise")
    lr: float = Field(1e-3, gt=0, le=10, description="learning rate, the schedule's peak (factor 1)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd's momentum (adam and adamw ignore it)")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum (with momentum > 0)")
    weight_decay: float = Field(
        0.0, ge=0, description="the optimizer's weight_decay: an L2 term in the gradient for sgd and adam, "
        "decoupled for adamw (0: off)")
    epochs: int = Field(100, ge=1, le=MAX_EPOCHS, description="passes over each model's members (P/2 points)")
    batch_size: int = Field(64, ge=1, description="members per optimizer step")
    schedule: Literal["constant", "step", "cosine", "onecycle", "triangle"] = Field(
        "constant", description="the lr over the training's steps: constant; step (x lr_decay at each of "
        "milestones); cosine (annealed to 0); onecycle (torch's OneCycleLR, momentum held); triangle "
        "(airbench's, shaped by triangle)")
    milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75], description="step schedule: fractions of training where lr decays"
    )
    lr_decay: float = Field(0.1, gt=0, le=1, description="step schedule: factor at each milestone")
    triangle: TriangleSpec = Field(default_factory=TriangleSpec, description="triangle schedule: its shape")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="smoothing epsilon of the cross-entropy (0: "
                                   "off); the label_smoothing defense replaces it")
    augment: AugmentSpec = Field(default_factory=AugmentSpec,
                                 description="training-time augmentation (default: none)")
    function: Named | None = Field(
        None, description="your own training function instead of raymia's loop, by import path "
        "(module:function) or a plug-in's registered name: fn(job, params) trains job.model on job.x, job.y "
        "(raymia.defenses.base.FitJob) and returns it; the recipe fields above reach it as job.recipe")
    lookahead: bool = Field(
        False, description="airbench's lookahead: from the 4th epoch on, every 5 steps the weights (and "
                           "BatchNorm statistics) move to their running average, decay 0.95^5 x (fraction of "
                           "training done)^3, and every epoch ends on it; needs epochs >= 4")

    @model_validator(mode="after")
    def _lookahead(self) -> TrainSpec:
        if self.lookahead and self.epochs <= LOOKAHEAD_START_EPOCHS:
            raise ValueError(f"lookahead starts after epoch {LOOKAHEAD_START_EPOCHS} (airbench's); with epochs "
                             f"{self.epochs} it would never act: set epochs >= {LOOKAHEAD_START_EPOCHS + 1} or "
                             "lookahead: false")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_function(self, handler: Any) -> Any:
        d = handler(self)  # unset, left out: specs without one keep their fingerprints and resume hashes
        if isinstance(d, dict) and d.get("function") is None:
            d.pop("function", None)
        return d

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, v: list[float], info: ValidationInfo) -> list[float]:
        if any(not 0 < f < 1 for f in v) or sorted(v) != v:
            raise ValueError("milestones must be increasing fractions of training in (0, 1)")
        if not v and info.data.get("schedule") == "step":  # a step schedule that never steps: a constant lr
            raise ValueError("the step schedule needs at least one milestone; accepted: increasing fractions of "
                             "training in (0, 1), or schedule: constant")
        return v


class BankSpec(_Model):
    """How the bank is spread over the warm pool of Ray workers (`engine.pool`)."""

    engine: Literal["ray", "local"] = Field(
        "ray", description="ray: a warm pool of Ray actors, shared by a sweep's trials; local: train in this "
        "process (no Ray needed)")
    num_workers: int = Field(1, ge=1, description="pool workers (one per GPU on a cluster); capped at what the "
                             "cluster's nodes hold when the pool starts")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each pool worker holds (and its torch threads)")
    pack_size: int = Field(8, ge=1, description="models trained together per pack (unit of storage)")
    vectorize: bool | Literal["auto"] = Field(
        "auto",
        description="train a pack's models at once (grouped kernels for sequential models, torch.func.vmap "
        "for the others); auto: time a few steps of both and keep the faster",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the bank trains: auto is CUDA when torch sees a GPU, else the CPU; cuda "
        "without one is refused")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast on CUDA (a CPU trains in fp32); part of the fingerprint")
    channels_last: bool = Field(False, description="channels-last memory format for image inputs on CUDA")


def _default_levels(kind: str) -> list[float]:
    from raymia import metrics  # the one place of the defaults (the Python API's metric functions use them)

    return list(getattr(metrics, f"DEFAULT_{kind}_LEVELS"))


class MetricsSpec(_Model):
    fpr_levels: list[float] = Field(default_factory=lambda: _default_levels("FPR"), min_length=1,
                                    description="TPR at these FPR levels ('n/a' below the resolvable level)")
    fnr_levels: list[float] = Field(default_factory=lambda: _default_levels("FNR"),
                                    description="TNR at these FNR levels")
    bootstrap: int = Field(0, ge=0, le=100_000,
                           description="resamples for AUC / TPR@FPR 95% confidence intervals (0: off)")
    label_only_for_output_defenses: bool = Field(
        True,
        description="when the defense changes the released outputs (confidence, memguard, HAMP's output "
        "modification) and no label_only attack is listed, run the calibrated label-only attack too: "
        "output changes that keep the label cannot stop it, so worst/ must include it",
    )
    raw_outputs: bool = Field(
        False,
        description="also attack every model's outputs before the defense's post-processing (HAMP's output "
        "modification, MemGuard, temperature): the trained models' own leakage, as raw/ATTACK/METRIC. The "
        "bank stores those logits beside the released ones (a bank of its own)",
    )

    @field_validator("fpr_levels", "fnr_levels")
    @classmethod
    def _levels(cls, v: list[float]) -> list[float]:
        from raymia.metrics import fpr_key

        for f in v:
            if not 0 < f < 1:
                raise ValueError(f"each level must lie in (0, 1), got {f}")
        keys = [fpr_key(f) for f in v]  # a level's metric key: two levels with one key would overwrite
        if len(set(keys)) < len(keys):
            twice = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"levels {[f for f, k in zip(v, keys) if k == twice]} are one level to 6 significant "
                             f"digits ({twice.removeprefix('tpr_fpr_')}): give each level once")
        return v


# MLflow's tracking stores (its tracking/_tracking_service/utils.py registry; file:// is MLflow 3's rejected one)
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc")


class TrackingSpec(_Model):
    enabled: bool = Field(True, description="log each audit (and a sweep's trials) as an MLflow run")
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI: sqlite:///FILE, postgresql://..., "
                     "mysql://..., mssql://..., http(s)://host:port, or databricks")
    # MLflow refuses an empty name (as if the store failed)
    experiment: str = Field("raymia", min_length=1, description="MLflow experiment the runs go to")
    log_signals: bool = Field(
        False, description="an audit also logs its bank's stored signals (every pack and manifest, under "
        "signals/<fingerprint>/) as artifacts of its MLflow run: download them into DIR/ and "
        "raymia.read_signals(spec, output_dir=DIR) reads them (they can be large: 4 bytes x models x queries x "
        "(audited + test points) x classes)")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        accepted = "sqlite:///mlflow.db, postgresql://..., mysql://..., mssql://..., http(s)://host:port or databricks"
        if "://" not in v and v not in ("databricks", "databricks-uc", "uc"):
            raise ValueError(f"must be a tracking URI: {accepted} (MLflow 3 rejects plain ./mlruns directories)")
        scheme = v.split(":", 1)[0].split("+", 1)[0].lower()  # postgresql+psycopg2:// is postgresql's
        if scheme == "file":
            raise ValueError(f"file:// is MLflow's filesystem store, which MLflow 3 refuses; accepted: {accepted}")
        if scheme not in TRACKING_SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; accepted: {accepted}")
        return v


def _default_attacks() -> list[AttackSpec]:
    return [AttackSpec(name=n) for n in ("loss", "modified_entropy", "lira_online", "lira_offline", "rmia_online")]


class NonMemberSetSpec(LabelledEntry):
    """A non-member set (`raymia list ood`: permuted, scaled, unnormalized, uniform, gaussian, dataset, gan)
    queried beside the audited points; `label` names it in results (default: the name)."""

    name: str = Field(description="a registered non-member set (raymia list ood), or module:function")


class OodSpec(_Model):
    """Out-of-distribution non-members (Hintersdorf et al. 2022): every bank model also answers `size`
    inputs of each set, stored with the bank's signals (so the sets are part of its fingerprint); each attack
    is scored on them at the threshold it calibrates on a shadow's in-distribution members and non-members."""

    sets: list[NonMemberSetSpec] = Field(min_length=1, description="non-member sets (raymia list ood)")
    size: int = Field(500, ge=1, le=1_000_000, description="inputs per set")
    seed: int = Field(0, ge=0, description="seed of the sets' draws (also part of the fingerprint)")

    @model_validator(mode="after")
    def _labels(self) -> OodSpec:
        keys = _unique_keys(self.sets, "non-member sets")
        if "held_out" in keys:
            raise ValueError("'held_out' names the in-distribution non-members; label the set otherwise")
        return self


class EvaluatorSpec(_Model):
    """The independent evaluation classifier that scores reconstructions: trained on the private classes'
    images (the audited population and the private test split), cached by content."""

    model: str | None = Field(None, description="a registered model (default: cnn, or mlp when the target is a cnn)")
    params: dict[str, Any] = Field(default_factory=dict, description="the evaluator model's params")
    epochs: int = Field(30, ge=1, le=MAX_EPOCHS, description="training epochs (Adam)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(64, ge=1, description="images per Adam step")


class InversionSpec(_Model):
    """Model-inversion attacks on the audited targets (white-box): which attacks, against which private
    classes, with which public data, scored by which evaluator. Not part of the bank's fingerprint."""

    attacks: list[AttackSpec] = Field(min_length=1, description="registered inversion attacks (raymia list inversion)")
    public: Literal["classes"] | DataSpec = Field(
        "classes", description="the attacker's public data: 'classes' (the data set's public classes) or "
        "another data set {name, params}, its training inputs adapted to the input shape")
    classes: Literal["all"] | int | list[int] = Field(
        "all", description="private classes reconstructed: all, the first N of them, or a list")
    targets: int = Field(1, ge=1, description="invert the first N of plan.targets")
    min_public: int = Field(100, ge=1, description="fewest public images the attacker may be given")
    evaluator: EvaluatorSpec = Field(default_factory=EvaluatorSpec,
                                     description="the classifier that scores the reconstructions")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where attacks and the evaluator run")

    @model_validator(mode="after")
    def _labels(self) -> InversionSpec:
        _unique_keys(self.attacks, "inversion attacks")
        return self

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: str | int | list[int]) -> str | int | list[int]:
        if isinstance(v, int) and v < 1 or isinstance(v, list) and (not v or len(set(v)) < len(v)):  # []: no class
            raise ValueError(f"must be 'all', a count >= 1 or a list of distinct classes, got {v}")
        return v


class TargetSpec(_Model):
    """Your own trained model as the audit's target. The bank's models, trained on the same data with the
    spec's model and recipe, are all its shadows; the target is queried from its weights (`checkpoint`) or
    known only by its outputs (`outputs`, an API-only model). See docs/own-model.md."""

    checkpoint: str | None = Field(
        None, description="the target's weights: a state_dict saved with torch.save, loaded with weights_only=True "
        "into the spec's model (model.name: a registered model or your builder, module:function)")
    outputs: str | None = Field(
        None, description="black-box: an .npz of the target's outputs: indices (into the training split), "
        "logits or probs [N, C] (or [Q, N, C] with queries), test_logits or test_probs on the test split")
    members: list[int] | str = Field(
        description="the target's training points: indices into the data set's training split, or a file of "
        "them (.npy, .txt, .csv, .json)")

    @field_validator("members")
    @classmethod
    def _members(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, list) and (not v or min(v) < 0):
            raise ValueError("must be a non-empty list of indices >= 0, or a file of them")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> TargetSpec:
        if (self.checkpoint is None) == (self.outputs is None):
            raise ValueError("give the target's checkpoint (its weights) or its outputs (black-box), one of them")
        return self


def _within_metric_range(v: float | None, info: ValidationInfo) -> float | None:
    """A reference or bound outside what its metric can take (a percent written for a fraction) would leave
    every trial on one side of it: a hypervolume of 0, or a constraint that every trial breaks or none can."""
    from raymia.metrics import metric_range

    metric = info.data.get("metric")
    span = metric_range(metric) if v is not None and isinstance(metric, str) else None
    if span is not None and not span[0] <= v <= span[1]:
        accepted = f"{span[0]:g} to {span[1]:g}" if math.isfinite(span[1]) else f"at least {span[0]:g}"
        raise ValueError(f"{v:g} is outside the values of {metric}; accepted: {accepted}")
    return v


class Constraint(_Model):
    metric: str = Field(description="a metric name, as in objectives (e.g. test_accuracy)")
    op: Literal[">=", "<="] = Field(description="how the metric must compare to value")
    value: float = Field(allow_inf_nan=False, description="the bound, within the metric's values (fractions for "
                         "rates and accuracies)")

    _value = field_validator("value")(_within_metric_range)


class AuditSpec(_Model):
    """An audit's spec: the YAML's structure, every field defaulted (README's table). Immutable: change it
    with `raymia.as_spec(spec, ["train.epochs=30"])` or `spec.model_copy(update=...)`; `raymia.as_spec`
    also checks the registry names and params, which building the object alone does not."""

    name: FileName = Field("audit", description="names the audit's or sweep's folders and runs: letters, "
                           "digits, '_', '-' and '.', not starting with '.', at most 64 characters")
    # numpy's and Optuna's seeds are 32-bit
    seed: int = Field(0, ge=0, le=2**32 - 1, description="the bank's random choices derive from it and their "
                      "role (the plan, model m, the post-processing); the bootstrap, the epsilon bound's halves "
                      "and the sampler use it")
    data: DataSpec = Field(default_factory=DataSpec, description="the data set (default: digits)")
    plan: PlanSpec = Field(default_factory=PlanSpec, description="the bank's size, population and targets")
    model: ModelSpec = Field(default_factory=ModelSpec, description="the architecture of every bank model "
                             "(default: mlp)")
    train: TrainSpec = Field(default_factory=TrainSpec, description="the training recipe of every bank model")
    defense: DefenseSpec = Field(default_factory=DefenseSpec, description="the defense the audited models "
                                 "train with (default: none)")
    attacker: Literal["adaptive", "non_adaptive"] = Field(
        "adaptive",
        description="adaptive: the shadows are trained with the defense too; non_adaptive: only the targets "
        "are, and the attacker's shadows are the other, undefended models",
    )
    queries: list[str] = Field(
        default_factory=lambda: ["identity", "hflip"], min_length=1,
        description="query augmentations every model answers: identity (first), hflip, shift:DX:DY (pixels), "
        "noise:SIGMA")
    attacks: list[AttackSpec] = Field(
        default_factory=_default_attacks, min_length=1,
        description="membership attacks (default: loss, modified_entropy, lira_online, lira_offline, "
        "rmia_online)")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="what the report measures")
    bank: BankSpec = Field(default_factory=BankSpec, description="how and where the bank trains")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow logging")
    target: TargetSpec | None = Field(
        None, description="audit your own trained model (its checkpoint or outputs, and its members); the bank's "
        "models are then all its shadows")
    inversion: InversionSpec | None = Field(None, description="model-inversion attacks on the targets")
    ood: OodSpec | None = Field(None, description="out-of-distribution non-member sets")
    # an empty path: the current folder, or (store) output_dir, without a word
    output_dir: str = Field("raymia-runs", min_length=1, description="folder of the reports (and of the store, "
                            "unless store is set)")
    store: str | None = Field(None, min_length=1, description="where signals and caches live (what every node must reach): a "
                              "path, NFS, or a URI (s3://bucket/prefix, gs://..., file:///..., any fsspec protocol); "
                              "default: output_dir. Reports stay in output_dir")
    gate: list[Constraint] = Field(
        default_factory=list,
        description="conditions the results must meet, e.g. {metric: lira_online/tpr_fpr_0.01, op: '<=', value: "
        "0.05}: each is checked and reported, and `raymia audit` exits with status 3 when one fails (a CI gate); "
        "a sweep keeps its conditions in sweep.constraints")

    @property
    def store_root(self) -> str:
        return self.store or self.output_dir

    @model_serializer(mode="wrap")
    def _without_unset_blocks(self, handler: Any) -> Any:
        d = handler(self)  # unset, left out: specs without these blocks keep their resume hashes
        for k in ("inversion", "ood", "target"):
            if isinstance(d, dict) and d.get(k) is None:
                d.pop(k, None)
        if isinstance(d, dict) and not d.get("gate", True):
            d.pop("gate")
        return d

    @model_validator(mode="before")
    @classmethod
    def _non_adaptive_targets(cls, v: Any) -> Any:
        # Every target of a non-adaptive bank is defended, and its shadows are the undefended models:
        # attacking all of them would leave none, so there the default is one target.
        if isinstance(v, dict) and v.get("attacker") == "non_adaptive":
            plan = v.get("plan", {})
            if isinstance(plan, dict) and "targets" not in plan:
                v = {**v, "plan": {**plan, "targets": [0]}}
            elif isinstance(plan, PlanSpec) and "targets" not in plan.model_fields_set:
                v = {**v, "plan": plan.model_copy(update={"targets": [0]})}
        return v

    @field_validator("queries")
    @classmethod
    def _queries(cls, v: list[str]) -> list[str]:
        for q in v:
            parse_query(q)
        if v[0] != "identity":
            raise ValueError("the first query must be 'identity' (the plain query attacks and utility use)")
        return v

    def bank_dict(self) -> dict[str, Any]:
        """The fields that determine the bank's outputs (and nothing else), a renamed parameter under its old
        name (`hashed_dump`; the bank's blocks only: an attack's or inversion attack's registry is not read)."""
        d = hashed_dump(self.model_dump(mode="json"), ("data", "model", "defense", "train", "ood"))
        targets = d["plan"].pop("targets")  # which models are attacked does not change an adaptive bank
        if self.attacker == "non_adaptive":
            d["plan"]["defended_models"] = self.plan.target_list  # ... but it does decide who is defended
            d["plan"]["targets_raw"] = targets
        out = {
            "format": SIGNAL_FORMAT_VERSION,
            **{k: d[k] for k in ("seed", "data", "plan", "model", "train", "defense", "queries", "attacker")},
            # bf16 changes the numbers; pack size, pack engine and memory format only change float rounding.
            "precision": d["bank"]["precision"],
        }
        code = self.code_digests()
        # each of these is left out when empty or unset, so specs without it keep their fingerprints
        if code:  # plug-ins named by import path: their source file's bytes
            out["code"] = code
        inputs = self.input_digests()
        if inputs:  # files the params name: their bytes
            out["inputs"] = inputs
        if self.metrics.raw_outputs:  # the packs hold the outputs before post-processing too
            out["raw_outputs"] = True
        if self.ood is not None:  # the packs hold the sets' outputs too
            sets = [{k: v for k, v in st.items() if k != "label"} for st in d["ood"]["sets"]]  # names only
            out["ood"] = {**d["ood"], "sets": sets}
        return out

    def code_digests(self) -> dict[str, str]:
        """{field: digest of its module's source file} for the bank's plug-ins named by import path
        (module:function), so stored signals are not reused once the user's code has changed."""
        from raymia.plugins import is_import_path, source_digest

        named = {"data.name": self.data.name, "model.name": self.model.name, "defense.name": self.defense.name}
        if self.train.function is not None:
            named["train.function.name"] = self.train.function.name
        return {f: source_digest(n, where=f) for f, n in named.items() if is_import_path(n)}

    def input_digests(self) -> dict[str, str]:
        """{field: digest of its contents} for the local files and folders the bank's params name (an npz's
        `path`, an image folder's `root`, TL-DMI's `weights`), so stored signals are not reused once the data
        behind an unchanged path has changed. Params left at their defaults are not read here."""
        from raymia.storage import content_digest

        sections = {"data.params": self.data.params, "model.params": self.model.params,
                    "defense.params": self.defense.params}
        if self.train.function is not None:
            sections["train.function.params"] = self.train.function.params
        out = {}
        for where, params in sections.items():
            for k, v in sorted(params.items()):
                if isinstance(v, str) and v and "://" not in v and Path(v).expanduser().exists():
                    out[f"{where}.{k}"] = content_digest(Path(v))
        return out

    def pack_fingerprints(self) -> dict[int, str]:
        """Non-adaptive banks: packs holding no target (so no defended model) are exactly the packs of the
        same bank trained without any defense, and share its key: one reference bank serves every trial
        of a sweep. Adaptive banks: no override."""
        if self.attacker != "non_adaptive":
            return {}
        from raymia.store import num_packs, pack_models

        # undefended models post-process nothing: their packs hold no raw outputs either
        plain = self.model_copy(update={"defense": DefenseSpec(), "attacker": "adaptive", "metrics": self.metrics.model_copy(
            update={"raw_outputs": False})}).fingerprint()
        k, m, targets = self.bank.pack_size, self.plan.num_models, set(self.plan.target_list)
        return {p: plain for p in range(num_packs(m, k)) if not targets & set(pack_models(p, k, m))}

    def fingerprint(self) -> str:
        """Stable content hash of everything that changes the bank's outputs (signals cache key)."""
        blob = json.dumps(self.bank_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Objective(_Model):
    metric: str = Field(description="e.g. test_accuracy, lira_online/tpr_fpr_0.01, loss/auc")
    mode: Literal["max", "min"] = Field(description="max: higher is better (utility); min: lower is better "
                                        "(an attack's success)")
    reference: float | None = Field(
        None, allow_inf_nan=False,
        description="the hypervolume's reference on this objective (default: the undefended trial's value), "
        "within the metric's values (fractions for rates and accuracies); e.g. 0.8 on test_accuracy credits "
        "trials that trade accuracy down to 0.8 for privacy")

    _reference = field_validator("reference")(_within_metric_range)


class DefenseChoice(_Model):
    name: str = Field(description="a registered defense (raymia list defenses)")
    space: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the defense's declared space: {param: {low, high, log} | {choices} | value}; "
        "a range or choices of a parameter that acts only in a mode is drawn only when the trial's mode turns it on",
    )


class FinalAudit(_Model):
    """Re-audit the front's trials with more shadows once the search is done."""

    num_models: int = Field(64, ge=2, le=MAX_MODELS, description="bank size of each re-audit (even)")
    targets: list[int] | Literal["all"] | None = Field(None, description="default: the sweep's targets")

    _even = field_validator("num_models")(_even_models)


class SweepBlock(_Model):
    defense: str = Field("hamp", description="the defense searched (raymia list defenses: its params and "
                         "declared search space)")
    space: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the defense's declared space: {param: {low, high, log} | {choices} | value}; "
        "a range or choices of a parameter that acts only in a mode is drawn only when the trial's mode turns it on",
    )
    defenses: list[DefenseChoice | str] = Field(
        default_factory=list,
        description="several defenses searched together (each trial picks one); replaces defense/space",
    )
    include_undefended: bool = Field(
        True, description="audit the undefended setting first, as trial 0 (not counted in num_trials): the "
        "objectives' default references")
    objectives: list[Objective] = Field(
        default_factory=lambda: [
            Objective(metric="test_accuracy", mode="max"),
            Objective(metric="lira_online/tpr_fpr_0.01", mode="min"),
        ],
        min_length=1,
        max_length=3,
        description="1 to 3 metrics the front trades off (default: test_accuracy max, lira_online/tpr_fpr_0.01 "
        "min)",
    )
    constraints: list[Constraint] = Field(
        default_factory=list,
        description="e.g. {metric: test_accuracy, op: '>=', value: 0.9}: trials that break one are kept off the front",
    )
    num_trials: int = Field(8, ge=1, description="searched trials (the undefended trial 0 comes on top); the "
                            "samplers' start-up trials are sized to it")
    max_concurrent: int = Field(1, ge=1, description="trials audited at once (they share the bank's pool)")
    trial_cpu: float = Field(0.01, gt=0, description="CPUs a trial's driver reserves (its bank workers ask for their own)")
    sampler: Literal["tpe", "nsga2", "gp", "random"] = Field(
        "tpe", description="Optuna sampler: tpe, nsga2 (population sized to num_trials), gp, or random; "
        "seeded by seed")
    final_audit: FinalAudit | None = Field(None, description="re-audit the front with more shadows at the end")
    storage: str | None = Field(
        None, min_length=1, description="Optuna storage URL for the study (an RDB or journal store on clusters); "
        "default: an SQLite file beside the sweep's results")

    @model_validator(mode="after")
    def _one_way(self) -> SweepBlock:
        if self.defenses and ({"defense", "space"} & self.model_fields_set):
            raise ValueError("give either defense (+ space) or defenses, not both")
        names = [d if isinstance(d, str) else d.name for d in self.defenses]
        if len(set(names)) != len(names):
            raise ValueError("a defense is listed twice in defenses")
        if "none" in names:
            raise ValueError("'none' is not searched: include_undefended adds the undefended trial")
        return self

    @property
    def choices(self) -> list[DefenseChoice]:
        if not self.defenses:
            return [DefenseChoice(name=self.defense, space=self.space)]
        return [DefenseChoice(name=d) if isinstance(d, str) else d for d in self.defenses]


class SweepSpec(AuditSpec):
    """A sweep's spec: an audit's fields (the base setting each trial audits) and the `sweep:` block."""

    sweep: SweepBlock = Field(default_factory=SweepBlock, description="what to search and how (default: hamp's "
                              "declared space, 8 trials)")


# ---------------------------------------------------------------------------------------------------------
# loading


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur: Any = d
    for i, k in enumerate(keys[:-1]):
        at: Any = k
        if isinstance(cur, list):
            try:
                at = int(k)
                nxt = cur[at]
            except (ValueError, IndexError):
                raise SpecError(f"no list element {k!r}", where=".".join(keys[: i + 1])) from None
        else:
            nxt = cur.get(k)
        if isinstance(nxt, str) and keys[i + 1] in LabelledEntry.model_fields:
            nxt = cur[at] = {"name": nxt}  # a bare name (`model: wrn`) is the entry {name: wrn}: set its params
        if nxt is None and isinstance(cur, dict):
            if keys[i + 1].isdigit():
                raise SpecError("is not set in the spec, so it has no list element to override; set the whole "
                                "list instead", where=".".join(keys[: i + 1]))
            nxt = cur[k] = {}
        if not isinstance(nxt, dict | list):
            raise SpecError("is not a mapping; cannot set a sub-key", where=".".join(keys[: i + 1]))
        cur = nxt
    last = keys[-1]
    if isinstance(cur, list):
        try:
            cur[int(last)] = value
        except (ValueError, IndexError):
            raise SpecError(f"no list element {last!r}", where=dotted) from None
    else:
        cur[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise SpecError(f"expected dotted.key=value, got {text!r}", where="--set")
    key, raw = text.split("=", 1)
    if not key or not re.match(r"^[A-Za-z0-9_.]+$", key):
        raise SpecError(f"bad key {key!r}; expected dotted.key=value", where="--set")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        if raw.lstrip().startswith(("[", "{")):  # meant as a list or mapping: the string would be refused as
            # "Input should be a valid list", which hides the unclosed bracket
            problem = getattr(e, "problem", None) or first_line(e)
            raise SpecError(f"{key}: malformed YAML value {raw!r} ({problem}); quote the whole --set for the "
                            "shell, e.g. --set 'attacks=[loss, lira_online]'", where="--set") from None
        value = raw  # a plain string YAML would not take as is (@name, `text`)
    return key, value


def spec_kind(kind: Any) -> type[AuditSpec]:
    """AuditSpec or SweepSpec, from the class or its name ("audit", "sweep"), as the Python API takes it."""
    kinds = {"audit": AuditSpec, "sweep": SweepSpec}
    if isinstance(kind, str) and kind in kinds:
        return kinds[kind]
    if kind in (AuditSpec, SweepSpec):
        return kind
    raise SpecError(f"{kind!r} is no kind of spec; accepted: AuditSpec, SweepSpec, 'audit', 'sweep'", where="kind")


def spec_schema(kind: type[AuditSpec] | str | None = None) -> dict[str, Any]:
    """The JSON Schema of a spec, for editors: a sweep's (an audit's fields and the `sweep:` block) unless
    `kind` is AuditSpec (or "audit"). Registry names (data sets, models, defenses, attacks) are checked when a
    spec is loaded, not by the schema: plug-ins add to them."""
    schema = spec_kind(kind or SweepSpec).model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema.setdefault("title", "raymia spec")
    return schema


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error (the second would silently win), and
    so is a key that is not text (`1:`, `yes:`, `[a, b]:`): every key of a spec names a field or a parameter."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, whose keys the mapping may override
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                what = (f"the key {key_node.value!r}" if isinstance(key_node, yaml.ScalarNode)
                        else "a list or mapping as a key")
                raise yaml.constructor.ConstructorError(
                    None, None, f"{what} is not a name; a key names a field or a parameter (quote it to make it "
                    "text)", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_raw(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise SpecError("file not found; pass the path of a YAML spec (see sweeps/)", where=str(p))
    if p.is_dir():
        raise SpecError("is a directory; pass the path of a YAML spec file", where=str(p))
    try:
        raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "malformed YAML"
        raise SpecError(f"malformed YAML{at}: {problem}", where=str(p)) from None
    except UnicodeDecodeError:
        raise SpecError("is not a UTF-8 text file", where=str(p)) from None
    except RecursionError:
        raise SpecError("malformed YAML: lists or mappings nested too deeply", where=str(p)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"top level must be a mapping of fields, got {type(raw).__name__}", where=str(p))
    return raw


# Where a spec names a registry entry whose params it gives: the registry's module and name, by the entry's
# path in the spec's dict (`*`: each element of a list). A sweep's spaces are keyed by the searched defense's
# params too.
_ENTRY_PATHS = {
    "data": ("raymia.data", "DATASETS"), "model": ("raymia.models", "MODELS"),
    "defense": ("raymia.defenses", "DEFENSES"), "train.function": ("raymia.train.function", "TRAINERS"),
    "attacks.*": ("raymia.attacks", "ATTACKS"), "ood.sets.*": ("raymia.data.ood", "NONMEMBER_SETS"),
    "inversion.attacks.*": ("raymia.inversion.registry", "INVERSION"), "inversion.public": ("raymia.data", "DATASETS"),
}


def _entries(d: dict[str, Any], blocks: tuple[str, ...] | None = None) -> list[tuple[str, dict[str, Any], str, Any]]:
    """(path, mapping, key, Params class) for each entry of a spec's dict whose params are checked by a
    registered entry: `mapping[key]` are its params (or for a sweep's space, its space's keys). Entries named
    by import path or unknown are left out (their params are their own). `blocks`: the top-level keys looked
    at (default: all), so a caller reads only the registries it needs (each one imports its plug-ins)."""
    import importlib

    from raymia.plugins import is_import_path

    found: list[tuple[str, dict[str, Any], str, Any]] = []

    def add(path: str, block: Any, name: Any, key: str, where: tuple[str, str]) -> None:
        if not isinstance(block, dict) or not isinstance(name, str) or is_import_path(name):
            return
        registry = getattr(importlib.import_module(where[0]), where[1])
        if name in registry and isinstance(block.get(key), dict):
            found.append((path, block, key, registry.get(name).params))

    for pattern, where in _ENTRY_PATHS.items():
        first, *rest = pattern.split(".")
        if blocks is not None and first not in blocks:
            continue
        nodes: list[tuple[str, Any]] = [(first, d.get(first))]
        for part in rest:
            if part == "*":
                nodes = [(f"{p}.{i}", x) for p, n in nodes if isinstance(n, list) for i, x in enumerate(n)]
            else:
                nodes = [(f"{p}.{part}", n.get(part)) for p, n in nodes if isinstance(n, dict)]
        for path, block in nodes:
            add(path, block, block.get("name") if isinstance(block, dict) else None, "params", where)
    sweep = d.get("sweep")
    if isinstance(sweep, dict) and (blocks is None or "sweep" in blocks):
        defenses = _ENTRY_PATHS["defense"]
        if sweep.get("defenses"):
            for i, c in enumerate(sweep["defenses"]):
                add(f"sweep.defenses.{i}", c, c.get("name") if isinstance(c, dict) else None, "space", defenses)
        else:
            add("sweep", sweep, sweep.get("defense", SweepBlock.model_fields["defense"].default), "space", defenses)
    return found


def hashed_dump(d: dict[str, Any], blocks: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A spec's dict with every registered entry's renamed parameters (and a sweep's space keys) under their
    oldest names (`Params.hashed`): what fingerprints and resume hashes read, so a spec keeps its hash
    whichever spelling it uses, and stores written before a rename are found again. `blocks`: as `_entries`."""
    d = json.loads(json.dumps(d))
    for _, block, key, params in _entries(d, blocks):
        block[key] = params.hashed(block[key])
    return d


def other_spellings(d: dict[str, Any], dotted: str) -> list[str]:
    """The keys beside the parameter `dotted` (`defense.params.vae_batch`) that are other names of it (its
    old or new name), in the spec's dict `d`; [] for a key that is no registered entry's parameter."""
    path, sep, key = dotted.rpartition(".")
    path, _, slot = path.rpartition(".")
    if not sep or slot not in ("params", "space"):
        return []
    first = path.split(".")[0]
    for where, block, k, params in _entries(d, (first,)):
        if where == path and k == slot and (field := params.field_of(key)) is not None:
            return [x for x in block[k] if x != key and params.field_of(x) == field]
    return []


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
        # `--set defense.params.vae_batch=32` on a spec that spells it vae_batch_size overrides it: the
        # parameter's other name goes, as a key set twice would
        params = _container(raw, key)
        for other in other_spellings(raw, key):
            params.pop(other)
    return raw


def _container(d: dict[str, Any], dotted: str) -> Any:
    """The mapping or list that holds the last key of `dotted` in `d` (which `_set_dotted` made)."""
    cur: Any = d
    for k in dotted.split(".")[:-1]:
        cur = cur[int(k)] if isinstance(cur, list) else cur[k]
    return cur


def changed_fields(before: Any, after: Any, prefix: str = "") -> list[str]:
    """The dotted fields whose values differ between two spec dumps (sorted; [] when `before` is unknown)."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return [] if before is None and not prefix else ([prefix.rstrip(".")] if before != after else [])
    out: list[str] = []
    for k in sorted(set(before) | set(after)):
        a, b = before.get(k), after.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out
