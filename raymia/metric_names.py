"""The flat metric names a spec's results will hold (`AuditResult.flat_metrics`), checked before any training:
a sweep's objectives and constraints, an audit's gate. A name that none of them will be is one line naming the
field and what is accepted; a rate that the plan cannot resolve (a TPR at 0.1% FPR over 200 non-members) too.
After an audit, `check_gate` says which of its gate's conditions hold."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from raymia.errors import SpecError, close_names, did_you_mean
from raymia.spec import AuditSpec, SweepSpec

# The utility metrics of an audit, by the flat names that result.json's `utility`, MLflow and sweep objectives
# and constraints use: those of the attacked models (mean and std over the targets), then the whole bank's.
TARGET_UTILITY = ("train_accuracy", "test_accuracy", "generalization_gap", "test_ece")
BANK_UTILITY = "bank_test_accuracy"
UTILITY_METRICS = (*TARGET_UTILITY, BANK_UTILITY)


def check_metric_names(spec: AuditSpec, names: list[str], field: str) -> None:
    """Each of `names` (the metrics of `field`'s entries: sweep.objectives, sweep.constraints, gate) is a name
    the spec's results hold: a utility metric, ATTACK/METRIC or worst/METRIC of its attacks and levels,
    defense/KEY, raw/... with metrics.raw_outputs, and its inversion and OOD metrics."""
    from raymia.inversion.protocol import metric_names
    from raymia.ood_audit import metric_names as ood_metric_names

    attacks = {a.key for a in spec.attacks}
    utility = set(UTILITY_METRICS)
    keys = {"auc", "balanced_accuracy", "epsilon_lb", *(f"tpr_fpr_{f:g}" for f in spec.metrics.fpr_levels),
            *(f"tnr_fnr_{f:g}" for f in spec.metrics.fnr_levels)}
    inversion = set(metric_names(spec))
    ood = set(ood_metric_names(spec))
    raw = spec.metrics.raw_outputs
    for i, n in enumerate(names):
        if n in utility or n in inversion or n in ood:
            continue
        a, _, k = n.removeprefix("raw/").partition("/") if raw else n.partition("/")
        if (a in attacks or a == "worst") and k in keys:
            continue
        if a == "defense" and k and not n.startswith("raw/"):
            continue
        accepted = (sorted(utility) + [f"ATTACK/{k}" for k in sorted(keys)] + ["defense/KEY"]
                    + ["raw/ATTACK/METRIC" + ("" if raw else " (with metrics.raw_outputs: true)")]
                    + (["mi/INVERSION_ATTACK/top1|top5|knn_dist|fid (INVERSION_ATTACK: a label or worst)"]
                       if inversion else [])
                    + (["ood/ATTACK/fpr", "ood/ATTACK/SET/METRIC"] if ood else []))
        default = (field == "sweep.objectives" and isinstance(spec, SweepSpec)
                   and "objectives" not in spec.sweep.model_fields_set)
        said = " (a default objective: the spec gives no sweep.objectives)" if default else ""
        near = close_names(n, sorted(utility | inversion | ood))
        if not near and k:  # an attack's metric: each half of the name on its own ('lira' for lira_online)
            near_a = [a] if a in attacks or a == "worst" else close_names(a, sorted(attacks) + ["worst"])
            raw_part = "raw/" if raw and n.startswith("raw/") else ""
            near = [f"{raw_part}{x}/{y}" for x in near_a
                    for y in ([k] if k in keys else percent_key(k, keys) or close_names(k, sorted(keys)))][:3]
        raise SpecError(f"unknown metric {n!r}{said}{did_you_mean(n, near=near)}; accepted: {', '.join(accepted)} "
                        f"with ATTACK one of the spec's attacks ({', '.join(sorted(attacks))}) or 'worst' (the "
                        "strongest of them)",
                        where=f"{field}.{i}.metric")


def percent_key(key: str, keys: set[str]) -> list[str]:
    """[tpr_fpr_0.001] for tpr_fpr_0.1% (a rate written in percent, which a name's nearest match, tpr_fpr_0.1,
    would misread a hundredfold), else []."""
    stem, _, number = key.removesuffix("%").rpartition("_")
    try:
        fixed = f"{stem}_{float(number) / 100:g}"
    except ValueError:
        return []
    return [fixed] if key.endswith("%") and fixed in keys else []


def check_resolvable(spec: AuditSpec, keep: np.ndarray, names: list[str], field: str) -> None:
    """A TPR at FPR f is n/a for a target with fewer than 1/f non-members (a TNR at FNR f: members); a sweep
    whose objective is n/a fails every trial, and a gate on it could never pass, so either is refused before
    any training. `keep`: the plan's [M, P] membership."""
    for i, n in enumerate(names):
        key = n.removeprefix("raw/").partition("/")[2]
        if not key.startswith(("tpr_fpr_", "tnr_fnr_")):
            continue
        level = float(key.rsplit("_", 1)[1])
        need = math.ceil(1.0 / level - 1e-9)
        side = "non-members" if key.startswith("tpr") else "members"
        counts = {t: int((~keep[t]).sum() if side == "non-members" else keep[t].sum())
                  for t in spec.plan.target_list}
        t, have = min(counts.items(), key=lambda kv: kv[1])
        if have < need:
            raise SpecError(f"{n} needs at least {need} {side} per target, target {t} has {have} (about half of "
                            f"the {keep.shape[1]} audited points); audit more points (plan.population) or use a "
                            f"larger level in metrics.{'fpr' if side == 'non-members' else 'fnr'}_levels",
                            where=f"{field}.{i}.metric")


def check_gate(gate: list, flat: dict[str, float | None]) -> list[dict[str, Any]]:
    """Each of the spec's gate conditions (`Constraint`: metric, op, value) with the audit's value of its metric
    (`AuditResult.flat_metrics`, the mean over the targets) and whether it holds, as a sweep's constraint would
    (`pareto.meets`: an n/a value does not)."""
    from raymia.pareto import meets

    return [{"metric": g.metric, "op": g.op, "value": g.value, "actual": flat.get(g.metric), "passed": meets(flat, [g])}
            for g in gate]


def gate_line(g: dict[str, Any]) -> str:
    """'lira_online/tpr_fpr_0.01 = 0.0988, must be <= 0.05' (or 'is n/a')."""
    actual = "is n/a" if g["actual"] is None else f"= {g['actual']:.4g}"
    return f"{g['metric']} {actual}, must be {g['op']} {g['value']:g}"
