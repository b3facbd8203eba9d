"""Loading a spec: the schema (raymia.spec) with every registry name resolved, beside the registries.

`load_spec(path, overrides, kind)` is the one way to load a spec: it reads the YAML file, applies the
`--set dotted.key=value` overrides, validates the result against the pydantic models of raymia.spec and
resolves the data set, model, defense and attack names and their params in the registries (`check_names`),
so bad input fails before any work starts. `validate_spec` does the last two steps for a spec that is
already a dict (`raymia check`, `raymia audit --from-trial`). Every problem is one `SpecError` naming the
field (or the file) and what is accepted.

raymia.spec imports no plug-in package; this module imports the four registries (reading one imports its
plug-in modules, raymia.plugins), and nothing below it imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raymia.attacks import ATTACKS
from raymia.data import DATASETS
from raymia.defenses import DEFENSES
from raymia.errors import RaymiaError, SpecError
from raymia.models import MODELS
from raymia.spec import AuditSpec, SweepSpec, apply_overrides, load_raw, spec_kind


def load_spec(
    path: str | Path | None,
    overrides: list[str] | None = None,
    kind: type[AuditSpec] = AuditSpec,
) -> AuditSpec:
    """The spec in the YAML file `path` (None: every default) with `overrides` applied, validated, its
    registry names resolved. An audit (`kind=AuditSpec`) of a sweep file audits its base setting."""
    raw = load_raw(path) if path is not None else {}
    if kind is AuditSpec:
        raw.pop("sweep", None)  # an audit of a sweep file audits its base setting
    apply_overrides(raw, overrides)
    return validate_spec(raw, kind, where=str(path) if path is not None else "spec")


def as_spec(spec: AuditSpec | dict[str, Any] | str | Path | None, overrides: list[str] | None = None,
            kind: type[AuditSpec] | str = AuditSpec) -> AuditSpec:
    """A validated spec of `kind` from what the Python API accepts: a spec object (used as it is, unless
    there are overrides; a sweep's spec audited gives its base setting), a dict (the YAML's structure), a YAML file's path, or None (every default). A spec
    object's registry names and params are checked here too (building one checks only its schema), so a
    typo fails before any training."""
    import copy
    from collections.abc import Mapping

    kind = spec_kind(kind)  # the class, or "audit" / "sweep"
    if isinstance(overrides, str):
        raise SpecError(f"must be a list of 'dotted.key=value' strings, not one string (write [{overrides!r}])",
                        where="overrides")
    if not (spec is None or isinstance(spec, AuditSpec | Mapping | str | Path)):
        raise SpecError(f"a spec is a spec object, a dict, a YAML file's path or None; got {type(spec).__name__}",
                        where="spec")
    if type(spec) is kind and not overrides:  # a SweepSpec audited goes below: its base setting, as a dict's
        check_names(spec)
        return spec
    if spec is None or isinstance(spec, str | Path):
        return load_spec(spec, overrides, kind=kind)
    raw = spec.model_dump(mode="json") if isinstance(spec, AuditSpec) else copy.deepcopy(dict(spec))
    if kind is AuditSpec:
        raw.pop("sweep", None)  # an audit of a sweep's spec audits its base setting, as the CLI does
    return validate_spec(apply_overrides(raw, overrides), kind)


def validate_spec(raw: dict[str, Any], kind: type[AuditSpec] = AuditSpec, where: str = "spec") -> AuditSpec:
    """`raw` validated as a `kind` and its registry names resolved; `where` (a file) prefixes the field of a
    schema error and replaces the field of a name error."""
    try:
        spec = kind.model_validate(raw)
    except SpecError as e:  # the field's error: after the file's name
        if where == "spec":
            raise
        raise SpecError(e.message, where=f"{where}: {e.where}") from None
    try:
        check_names(spec)
    except SpecError as e:
        if where == "spec":
            raise
        raise SpecError(str(e), where=where) from None
    return spec


def check_bank_size(spec: AuditSpec) -> None:
    if spec.target is None and spec.plan.num_models < 4:
        raise SpecError(f"leave-one-out attacks a bank model with the others but its pair as shadows: it needs at "
                        f"least 4 models, got {spec.plan.num_models}", where="plan.num_models")


def check_undefended_shadows(spec: AuditSpec) -> None:
    """attacker: non_adaptive: every target needs an undefended shadow, a model that is no target and not in
    the target's pair (the pool `audit.attacker_view` gives the attacks); refused before any training."""
    if spec.attacker != "non_adaptive" or spec.target is not None:  # (`target:` refuses non_adaptive)
        return
    from raymia.signals import paired_model

    targets = set(spec.plan.target_list)
    for t in spec.plan.target_list:
        if not any(m not in targets and m not in (t, paired_model(t)) for m in range(spec.plan.num_models)):
            raise SpecError(f"attacker: non_adaptive attacks each target with the undefended models (the non-targets) "
                            f"outside its pair as shadows, and target {t} has none ({len(targets)} of the "
                            f"{spec.plan.num_models} models are targets): leave some pairs out of plan.targets",
                            where="plan.targets")


def check_workers_know(spec: AuditSpec, attacks: bool = False) -> None:
    """A data set, model, defense or training function (with `attacks`, an attack too) registered in this
    session's `__main__` (a notebook cell, the script itself) is unknown to Ray's worker processes, which
    import raymia and the installed plug-ins afresh: refused before Ray trains anything with it, saying how
    to run it instead. `attacks`: a sweep's, which its trials run in Ray's processes."""
    from raymia.plugins import is_import_path

    named = [("data.name", DATASETS, spec.data.name), ("model.name", MODELS, spec.model.name)]
    defenses = [c.name for c in spec.sweep.choices] if isinstance(spec, SweepSpec) else [spec.defense.name]
    named += [("defense.name" if not isinstance(spec, SweepSpec) else "sweep.defense", DEFENSES, d) for d in defenses]
    if spec.train.function is not None:
        from raymia.train.function import TRAINERS

        named.append(("train.function.name", TRAINERS, spec.train.function.name))
    if attacks:
        named += [(f"attacks.{i}.name", ATTACKS, a.name) for i, a in enumerate(spec.attacks)]
    for where, registry, name in named:
        if is_import_path(name) or getattr(registry.get(name, where=where).obj, "__module__", None) != "__main__":
            continue
        run = "a sweep's trials run in Ray's processes" if attacks else "use bank.engine: local to train in this process"
        raise RaymiaError(f"{registry.kind} {name!r} is registered in this session (__main__), which Ray's worker "
                          f"processes do not run: {run}, or put it in a module and name it by import path "
                          "(module:function) or as a plug-in (docs/extending.md)", where=where)


def check_query_indices(params: Any, queries: list[str], where: str) -> None:
    """A registered attack's `query` (one index) or `queries` (a list of them) index the spec's queries: one
    past them failed only when the attack ran, after training. (An import path's params are its own.)"""
    from raymia.registry import OpenParams

    if isinstance(params, OpenParams):
        return
    one = getattr(params, "query", None)
    for field, asked in (("query", [] if one is None else [one]), ("queries", getattr(params, "queries", None) or [])):
        bad = [q for q in asked if isinstance(q, int) and q >= len(queries)]
        if bad:
            raise SpecError(f"{field}: {bad[0]} is no query index: the spec's queries are {queries}; accepted: 0 to "
                            f"{len(queries) - 1}", where=where)


def check_names(spec: AuditSpec) -> None:
    """Resolve every registry name and its params now, so bad input fails before any work starts."""
    DATASETS.get(spec.data.name, where="data.name").parse(spec.data.params, where="data.params")
    MODELS.get(spec.model.name, where="model.name").parse(spec.model.params, where="model.params")
    DEFENSES.get(spec.defense.name, where="defense.name").parse(spec.defense.params, where="defense.params")
    seen: dict[str, int] = {}  # attack results are keyed by label (default: the name): one entry per key
    for i, a in enumerate(spec.attacks):
        entry = ATTACKS.get(a.name, where=f"attacks.{i}.name")
        params = entry.parse(a.params, where=f"attacks.{i}.params")
        check_query_indices(params, spec.queries, where=f"attacks.{i}.params")
        # an attack's own `check_plan(params, num_models, own_target)`: what the bank must give it
        if (check_plan := getattr(entry.obj, "check_plan", None)) is not None:
            try:
                check_plan(params, spec.plan.num_models, spec.target is not None)
            except ValueError as e:
                raise SpecError(str(e), where=f"attacks.{i}.params") from None
        if a.key in seen:
            raise SpecError(f"{a.key!r} already names attacks.{seen[a.key]}; give each entry its own label "
                            "(results and metrics are keyed by it)", where=f"attacks.{i}.label")
        seen[a.key] = i
    check_bank_size(spec)
    check_undefended_shadows(spec)
    if spec.gate:
        if isinstance(spec, SweepSpec):
            raise SpecError("a sweep keeps the conditions its trials must meet in sweep.constraints", where="gate")
        from raymia.metric_names import check_metric_names

        check_metric_names(spec, [g.metric for g in spec.gate], "gate")
    if spec.train.function is not None:
        from raymia.train.function import TRAINERS

        f = spec.train.function
        TRAINERS.get(f.name, where="train.function.name").parse(f.params, where="train.function.params")
        searched = isinstance(spec, SweepSpec)
        if spec.defense.name != "none" or searched:
            raise SpecError("a training function trains the models its own way, which a defense's hooks do not "
                            "reach: " + ("a sweep cannot search defenses with it" if searched
                                         else "use defense: none"), where="train.function")
    if spec.target is not None:
        from raymia.target import check_target_spec

        check_target_spec(spec)
    if spec.ood is not None:
        from raymia.data.ood import NONMEMBER_SETS

        for i, st in enumerate(spec.ood.sets):
            NONMEMBER_SETS.get(st.name, where=f"ood.sets.{i}.name").parse(st.params, where=f"ood.sets.{i}.params")
    if spec.inversion is not None:
        from raymia.inversion.protocol import check_inversion

        check_inversion(spec)
    if isinstance(spec, SweepSpec):
        if spec.sweep.defenses:
            for i, c in enumerate(spec.sweep.choices):
                DEFENSES.get(c.name, where=f"sweep.defenses.{i}")
        else:
            DEFENSES.get(spec.sweep.defense, where="sweep.defense")
