"""The Pareto front of a sweep: constraints, the non-dominated filter, hypervolume, and its reports.

One place for a front, whoever asks: `run_sweep` (trials from Ray Tune) and `raymia pareto` (trials read
back from MLflow by `trials_from_mlflow`) both go through `front_and_hypervolume` over trial dicts
({"trial", "defense", "params", "status", <metric>: value, "std/<metric>": spread, ...}), and report with
`front_markdown` (front.md), `print_front` (the console table), `plot_front` (pareto.png) and
`write_front` (front.csv, front.md and pareto.png for `raymia pareto`). `report.plots` only draws.

Why not Optuna's front (`Study.best_trials`, `optuna.study._multi_objective._get_pareto_front_trials`):
it gives the same front on the same trials (`tests/test_pareto.py` checks it, constraints included, set
with `Trial.set_constraint`), but it cannot be the one place. `raymia pareto` reads a sweep back from
MLflow, where there is no study. A sweep's study lacks the undefended baseline (trial 0 runs outside the
search), holds the objective values only (Tune's OptunaSearch tells it nothing else; the constraints'
values reach its sampler as a user attribute, `searcher.ConstrainedOptunaSearch`), and numbers its trials
by Optuna's order, not by Tune's as the sweep does. So the front is one pure function over trial dicts.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raymia.errors import RaymiaError, SpecError, did_you_mean, first_line
from raymia.metrics import as_number as _num
from raymia.metrics import spread_key
from raymia.spec import NAME_PATTERN
from raymia.tracking import (
    KIND_SWEEP,
    KIND_TRIAL,
    MLFLOW_PARENT_TAG,
    TAG_DEFENSE,
    TAG_ERROR,
    TAG_KIND,
    TAG_STATUS,
    TAG_TRIAL,
    TAG_TRIAL_ID,
    tag_equals,
)

SWEEP_PREFIX = "sweep-"
_LIVE = ("FINISHED", "RUNNING")


# ---------------------------------------------------------------------------------------------------------
# objectives, constraints and the front


def objective_pairs(objectives: Iterable[Any]) -> list[tuple[str, str]]:
    """[(metric, mode)] from (metric, mode) pairs, {metric, mode} dicts or the spec's `Objective`s."""
    out = []
    for o in objectives:
        if isinstance(o, dict):
            out.append((o["metric"], o["mode"]))
        elif hasattr(o, "metric"):
            out.append((o.metric, o.mode))
        else:
            metric, mode = o
            out.append((metric, mode))
    return out


def _constraint_triples(constraints: Iterable[Any] | None) -> list[tuple[str, str, float]]:
    out = []
    for c in constraints or ():
        metric, op, value = (c["metric"], c["op"], c["value"]) if isinstance(c, dict) else (c.metric, c.op, c.value)
        if op not in (">=", "<="):
            raise ValueError(f"constraint on {metric!r}: op must be '>=' or '<=', got {op!r}")
        out.append((metric, op, float(value)))
    return out


def objective_signs(objectives: list[tuple[str, str]], what: str) -> list[float]:
    """+1 for each 'max' objective and -1 for each 'min' one (so that larger signed values are better);
    ValueError naming the objective for any other mode, or for no objectives at all."""
    if not objectives:
        raise ValueError(f"{what} needs at least one objective")
    for key, mode in objectives:
        if mode not in ("max", "min"):
            raise ValueError(f"objective {key!r}: mode must be 'max' or 'min', got {mode!r}")
    return [1.0 if mode == "max" else -1.0 for _, mode in objectives]


def pareto_front(points: list[dict], objectives: Iterable[Any]) -> list[int]:
    """Indices (ascending) of the non-dominated points under objectives [(key, "max"|"min"), ...].

    A point is dominated when another is at least as good on every objective and strictly better on one.
    Exact duplicates therefore do not dominate each other: every copy of a non-dominated point is kept
    (as Optuna's `best_trials` keeps them). Points with a missing, None or NaN objective are left out
    entirely (they neither belong to the front nor dominate anything).
    """
    objectives = objective_pairs(objectives)
    signs = objective_signs(objectives, "pareto_front")
    keys = [key for key, _ in objectives]

    valid: list[int] = []
    rows: list[list[float]] = []
    for i, p in enumerate(points):
        vals = [_num(p.get(key)) for key in keys]
        if any(v is None for v in vals):
            continue
        valid.append(i)
        rows.append([s * v for s, v in zip(signs, vals)])  # type: ignore[operator]
    if not valid:
        return []
    a = np.asarray(rows, dtype=float)  # larger is better on every column
    geq = (a[None, :, :] >= a[:, None, :]).all(axis=2)  # geq[i, j]: j at least as good as i everywhere
    gt = (a[None, :, :] > a[:, None, :]).any(axis=2)  # gt[i, j]: j strictly better than i somewhere
    dominated = (geq & gt).any(axis=1)
    return [valid[k] for k in range(len(valid)) if not dominated[k]]


def meets(trial: dict[str, Any], constraints: Iterable[Any] | None) -> bool:
    """Whether the trial meets every constraint ({metric, op: ">=" | "<=", value} dicts or the spec's
    `Constraint`s); a missing, None or non-finite metric meets none."""
    for metric, op, bound in _constraint_triples(constraints):
        v = _num(trial.get(metric))
        if v is None or not math.isfinite(v) or not (v >= bound if op == ">=" else v <= bound):
            return False
    return True


def feasible_front(ok: list[dict[str, Any]], objectives: Iterable[Any], constraints: Iterable[Any] | None = None
                   ) -> set[int]:
    """Trial numbers of the non-dominated trials among `ok` (the successful trials) that meet every
    constraint; sets each trial's "feasible" flag (a sweep's result.json keeps it). Trials that break a
    constraint never enter the front."""
    for t in ok:
        t["feasible"] = meets(t, constraints)
    feasible = [t for t in ok if t["feasible"]]
    return {feasible[i]["trial"] for i in pareto_front(feasible, objectives)}


def undefended_trial(trials: list[dict[str, Any]], objectives: Iterable[Any]) -> dict[str, Any] | None:
    """The first successful undefended trial with every objective: the hypervolume's reference point on
    each objective that gives no `reference` of its own."""
    keys = [k for k, _ in objective_pairs(objectives)]
    return next((t for t in trials if t.get("status") == "ok" and t.get("defense") == "none"
                 and all(_num(t.get(k)) is not None for k in keys)), None)


def objective_references(objectives: Iterable[Any]) -> dict[str, float]:
    """{metric: value} of the objectives that set their own hypervolume reference (the spec's
    `Objective.reference`, or a "reference" entry of an objective dict read back from MLflow)."""
    out = {}
    for o in objectives:
        ref = o.get("reference") if isinstance(o, dict) else getattr(o, "reference", None)
        if _num(ref) is not None:
            out[o["metric"] if isinstance(o, dict) else o.metric] = float(ref)
    return out


def hypervolume_reference(trials: list[dict[str, Any]], objectives: Iterable[Any]) -> dict[str, Any] | None:
    """The hypervolume's reference point: {metric: value} of every objective, each objective's own
    `reference` where it has one, else the undefended trial's value; "given" lists the metrics set by hand
    and "trial" the undefended trial's number (None when no value came from it). None when some objective
    has neither."""
    objectives = list(objectives)
    given = objective_references(objectives)
    keys = [k for k, _ in objective_pairs(objectives)]
    if all(k in given for k in keys):
        return {**{k: given[k] for k in keys}, "given": keys, "trial": None}
    base = undefended_trial(trials, objectives)
    if base is None:
        return None
    return {**{k: given.get(k, base[k]) for k in keys}, "given": [k for k in keys if k in given],
            "trial": base["trial"]}


def front_and_hypervolume(
    trials: list[dict], objectives: Iterable[Any], constraints: Iterable[Any] | None = None
) -> tuple[list[int], float | None, dict | None]:
    """(front as trial numbers in the trials' order, hypervolume against `hypervolume_reference` or None,
    that reference or None).

    Only successful trials (status "ok") that meet every constraint can be on the front or count in the
    hypervolume; each successful trial's "feasible" flag is set (`feasible_front`).
    """
    objectives = list(objectives)
    pairs = objective_pairs(objectives)
    ok = [t for t in trials if t.get("status") == "ok"]
    on = feasible_front(ok, pairs, constraints)
    front = [t["trial"] for t in ok if t["trial"] in on]
    ref = hypervolume_reference(trials, objectives)
    hv = hypervolume([t for t in ok if t["trial"] in on], pairs, ref) if ref else None
    return front, hv, ref


# ---------------------------------------------------------------------------------------------------------
# hypervolume


def _union_volume(pts: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    """Volume of the union of the boxes [p, ref] (minimisation, every p strictly below ref everywhere).

    One objective: a segment; two: sort and sum the strips; more: slice along the last objective and sum
    slab thickness x the (d-1)-dimensional volume of the points at or below the slab (exact).
    """
    if not pts:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in pts)
    if len(ref) == 2:
        vol, best_y = 0.0, ref[1]
        for x, y in sorted(set(pts)):
            if y < best_y:  # a point not below every earlier one lies inside their union: adds nothing
                vol += (ref[0] - x) * (best_y - y)
                best_y = y
        return vol
    levels = sorted({p[-1] for p in pts}) + [ref[-1]]
    vol = 0.0
    for lo, hi in zip(levels[:-1], levels[1:]):
        active = [p[:-1] for p in pts if p[-1] <= lo]
        vol += _union_volume(active, ref[:-1]) * (hi - lo)
    return vol


def hypervolume(points: list[dict], objectives: Iterable[Any], reference: dict) -> float:
    """Dominated hypervolume of the points relative to a reference point (e.g. the undefended trial).

    Convention: "max" objectives are negated so that every objective is minimised; each point then spans
    the box between itself and the reference, and the hypervolume is the volume of the union of those
    boxes (in the objectives' own units multiplied together). Boxes are clipped to the reference: a point
    worse than the reference in some objective (or equal to it in one) spans nothing and contributes 0,
    dominated points and duplicates add nothing beyond the front's union. So 0 means no point improves on
    the reference in every objective at once; with the undefended trial as reference, a defense that
    trades utility for privacy scores 0 (pass a looser reference, e.g. accuracy 0, to credit trade-offs).
    Points with a missing, None or NaN objective are skipped. Exact for any number of objectives
    (slicing; fine for the small fronts of a sweep). Equal to Optuna's WFG (`optuna._hypervolume`, private,
    and refusing points worse than the reference where this clips them) on the points that improve on the
    reference everywhere (tests/test_pareto.py).
    """
    objectives = objective_pairs(objectives)
    signs = [-s for s in objective_signs(objectives, "hypervolume")]  # minimisation: smaller is better
    ref_vals = [_num(reference.get(key)) for key, _ in objectives]
    missing = [key for (key, _), v in zip(objectives, ref_vals) if v is None or not math.isfinite(v)]
    if missing:
        raise ValueError(f"reference has no finite value for {', '.join(missing)}")
    ref = tuple(s * v for s, v in zip(signs, ref_vals))  # type: ignore[operator]
    pts = []
    for p in points:
        vals = [_num(p.get(key)) for key, _ in objectives]
        if any(v is None for v in vals):
            continue
        q = tuple(s * v for s, v in zip(signs, vals))  # type: ignore[operator]
        if all(qi < ri for qi, ri in zip(q, ref)):
            pts.append(q)
    return _union_volume(pts, ref)


# ---------------------------------------------------------------------------------------------------------
# reading a sweep back from MLflow


def _client(uri: str):
    """A client of the store at `uri`, checked the way a sweep's tracking.uri is, and read-only: nothing is
    created where there is no store."""
    from mlflow.tracking import MlflowClient

    from raymia.spec import TrackingSpec
    from raymia.tracking import probe_server

    try:
        TrackingSpec(uri=uri)
    except SpecError as e:
        raise RaymiaError(e.message, where="--uri") from None
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():  # MLflow would create an empty store here: say there is none instead
            raise RaymiaError(f"no MLflow store at {path}", where="--uri")
    probe_server(uri, "start it or fix --uri", where="--uri")
    try:
        return MlflowClient(uri)
    except Exception as e:  # noqa: BLE001  # a file that is not an MLflow database
        raise RaymiaError(f"MLflow cannot open {uri}: {first_line(e)}", where="--uri") from None


def _search_all(client, exp_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _sweep_name(run) -> str:
    name = run.data.params.get("name")
    if name:
        return name
    rn = run.info.run_name or ""
    return rn[len(SWEEP_PREFIX):] if rn.startswith(SWEEP_PREFIX) else rn


def _unflatten(flat: dict[str, Any]) -> Any:
    """{"a.b": 1, "c.0": x} -> {"a": {"b": 1}, "c": [x]}: undoes tracking.flatten (lists from 0..n-1)."""
    root: dict[str, Any] = {}
    for key, value in flat.items():
        cur = root
        parts = key.split(".")
        for k in parts[:-1]:
            nxt = cur.setdefault(k, {})
            if not isinstance(nxt, dict):
                nxt = cur[k] = {"": nxt}
            cur = nxt
        cur[parts[-1]] = value

    def fix(d: Any) -> Any:
        if not isinstance(d, dict):
            return d
        d = {k: fix(v) for k, v in d.items()}
        if d and all(k.isdigit() for k in d) and sorted(int(k) for k in d) == list(range(len(d))):
            return [d[str(i)] for i in range(len(d))]
        return d

    return fix(root)


def _parse(text: str) -> Any:
    """A param logged as str(value) back to its value ("0.5" -> 0.5, "True" -> True, "None" -> None)."""
    if text == "None":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _defense_params(params: dict[str, str], defense: str | None = None) -> dict[str, Any]:
    """The defense's params a run logged, each renamed one under its current name (a run logged before the
    rename has the old one), so sweeps of either age share its column."""
    prefix = "defense.params."
    flat = {k[len(prefix):]: _parse(v) for k, v in params.items() if k.startswith(prefix)}
    out = _unflatten(flat)
    if not isinstance(out, dict):
        return {}
    from raymia.defenses import DEFENSES

    if defense and defense in DEFENSES:
        cls = DEFENSES.get(defense).params
        out = {cls.field_of(k) or k: v for k, v in out.items()}
    return out


def _indexed(params: dict[str, str], prefix: str, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """[{field: value}] from params prefix.0.field, prefix.1.field, ... (until the first gap)."""
    out = []
    while all(f"{prefix}.{len(out)}.{f}" in params for f in fields):
        out.append({f: params[f"{prefix}.{len(out)}.{f}"] for f in fields})
    return out


def _find_parent(client, exp_id: str, experiment: str, sweep: str | None, parent_run_id: str | None):
    if parent_run_id:
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(parent_run_id)
        except MlflowException:
            raise RaymiaError(f"no MLflow run {parent_run_id!r}", where="--run-id") from None
        if run.info.experiment_id != exp_id:
            raise RaymiaError(f"run {parent_run_id} is not in experiment {experiment!r}", where="--run-id")
        if run.data.tags.get(TAG_KIND) != KIND_SWEEP:
            raise RaymiaError(f"run {parent_run_id} is not a sweep's parent run", where="--run-id")
        return run
    parents = _search_all(client, exp_id, tag_equals(TAG_KIND, KIND_SWEEP))  # newest first
    names = sorted({_sweep_name(r) for r in parents})
    if sweep is None:
        live = [r for r in parents if r.info.status in _LIVE]
        if not live:
            raise RaymiaError(f"experiment {experiment!r} has no finished or running sweep"
                              + (f"; sweeps: {', '.join(names)}" if names else ""), where="--sweep")
        return live[0]
    matching = [r for r in parents if r.info.run_name == f"{SWEEP_PREFIX}{sweep}"]
    live = [r for r in matching if r.info.status in _LIVE]
    if live:
        return live[0]
    if matching:
        raise RaymiaError(f"sweep {sweep!r} has no FINISHED or RUNNING parent run (latest: "
                          f"{matching[0].info.status} {matching[0].info.run_id}); pass --run-id to read it anyway",
                          where="--sweep")
    raise RaymiaError(f"no sweep {sweep!r} in experiment {experiment!r}{did_you_mean(sweep, names)}; sweeps: "
                      f"{', '.join(names) if names else '(none)'}", where="--sweep")


def experiment_of_run(uri: str, run_id: str) -> str:
    """The name of the MLflow experiment that holds run `run_id` (`raymia pareto --run-id` without
    --experiment)."""
    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001  # MLflow's RESOURCE_DOES_NOT_EXIST, or a malformed id
        raise RaymiaError(f"no MLflow run {run_id!r} in {uri}", where="--run-id") from None
    return client.get_experiment(run.info.experiment_id).name


def trials_from_mlflow(
    uri: str, experiment: str, sweep: str | None = None, parent_run_id: str | None = None
) -> tuple[list[dict], dict]:
    """One sweep's trials rebuilt from its MLflow child runs, plus what the parent run says about it.

    The sweep is the parent run parent_run_id, else the newest FINISHED or RUNNING parent run named
    "sweep-<sweep>", else (neither given) the newest such sweep of the experiment. Trials keep the numbers
    the sweep gave them (their `raymia.trial` tag; by start time for runs without it) and are shaped like
    run_sweep's: trial, trial_id, defense, params, status, run_id, error (failed
    ones) and every logged metric. info holds parent_run_id, sweep, experiment, defense, objectives
    [{metric, mode, reference}] and constraints [{metric, op, value}].
    """
    client = _client(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as e:  # noqa: BLE001  # a server that refuses
        raise RaymiaError(f"MLflow cannot open {uri}: {first_line(e)}", where="--uri") from None
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise RaymiaError(f"no MLflow experiment {experiment!r} in {uri}{did_you_mean(experiment, known)}; "
                          f"experiments: {', '.join(known) if known else '(none)'}", where="--experiment")
    parent = _find_parent(client, exp.experiment_id, experiment, sweep, parent_run_id)
    pid, pparams = parent.info.run_id, parent.data.params
    name = _sweep_name(parent)
    if not re.match(NAME_PATTERN, name):  # it names the output folder: a run's params must not reach outside it
        raise RaymiaError(f"parent run {pid}'s sweep name {name!r} is not a sweep name (letters, digits, '_', '-', "
                          "'.', not starting with '.')", where="--run-id" if parent_run_id else "--sweep")
    objectives = [{"metric": o["metric"], "mode": o["mode"],
                   "reference": _num(pparams.get(f"sweep.objectives.{i}.reference"))}
                  for i, o in enumerate(_indexed(pparams, "sweep.objectives", ("metric", "mode")))]
    if not objectives:
        raise RaymiaError(f"parent run {pid} of sweep {name!r} has no sweep.objectives params")
    constraints = [{"metric": c["metric"], "op": c["op"], "value": float(c["value"])}
                   for c in _indexed(pparams, "sweep.constraints", ("metric", "op", "value"))]

    children = [r for r in _search_all(client, exp.experiment_id, tag_equals(MLFLOW_PARENT_TAG, pid))
                if r.data.tags.get(TAG_KIND, KIND_TRIAL) == KIND_TRIAL]
    def number(r) -> int | None:
        n = r.data.tags.get(TAG_TRIAL)
        return int(n) if n is not None and n.isdigit() else None

    children.sort(key=lambda r: (r.info.start_time or 0, r.info.run_name or "", r.info.run_id))
    numbered = all(number(r) is not None for r in children)  # runs of older sweeps lack the tag
    if numbered:
        children.sort(key=number)
    trials: list[dict] = []
    for i, r in enumerate(children):
        tags, params = r.data.tags, r.data.params
        status = tags.get(TAG_STATUS) or ("ok" if r.info.status == "FINISHED" else "failed")
        row: dict[str, Any] = {
            "trial": number(r) if numbered else i,
            "trial_id": tags.get(TAG_TRIAL_ID),
            "defense": (defense := tags.get(TAG_DEFENSE) or params.get("defense.name")),
            "params": _defense_params(params, defense),
            "status": status,
            "run_id": r.info.run_id,
        }
        if status != "ok":
            err = (tags.get(TAG_ERROR) or "trial failed").strip().splitlines()
            row["error"] = (err[-1] if err else "trial failed")[:500]
        row.update(r.data.metrics)
        trials.append(row)
    info = {"parent_run_id": pid, "sweep": name, "experiment": experiment,
            "defense": pparams.get("sweep.defense"), "objectives": objectives, "constraints": constraints,
            "status": parent.info.status}
    return trials, info


def merge_sweeps(sweeps: list[tuple[list[dict], dict]], where: str = "--sweep") -> tuple[list[dict], dict]:
    """Several sweeps' trials as one (`trials_from_mlflow`'s shape), for one front over all of them: each
    trial is numbered "<sweep>:<its number>" and keeps its sweep under "sweep". The sweeps must share their
    objectives; a trial is feasible when it meets every sweep's constraints. The hypervolume's reference
    is the first sweep's: its objectives' own references, else its undefended trial; info["note"] says
    when the sweeps' undefended trials differ (other recipes: one scale no longer holds). Two runs of one sweep
    are told apart as "<sweep>@<run id>"; errors name `where`, the option that gave the sweeps."""
    if len(sweeps) == 1:
        return sweeps[0]
    runs = [info["parent_run_id"] for _, info in sweeps]
    if len(set(runs)) < len(runs):
        raise RaymiaError(f"a sweep is given twice: runs {', '.join(runs)}", where=where)
    names = [info["sweep"] for _, info in sweeps]
    if len(set(names)) < len(names):  # two runs of one sweep (by --run-id): told apart by their run ids
        names = [f"{info['sweep']}@{info['parent_run_id'][:8]}" for _, info in sweeps]
        sweeps = [(part, {**info, "sweep": name}) for (part, info), name in zip(sweeps, names, strict=True)]
    first = sweeps[0][1]
    pairs = objective_pairs(first["objectives"])
    for _, info in sweeps[1:]:
        if objective_pairs(info["objectives"]) != pairs:
            raise RaymiaError(f"sweeps {first['sweep']!r} and {info['sweep']!r} have different objectives ("
                              f"{_objectives_text(first['objectives'])}; {_objectives_text(info['objectives'])}): "
                              "one front needs the same ones", where=where)
    trials = [{**t, "trial": f"{info['sweep']}:{t['trial']}", "sweep": info["sweep"]}
              for part, info in sweeps for t in part]
    # sweeps of one recipe share their undefended bank (the stored signals), so their undefended trials agree
    bases = {info["sweep"]: undefended_trial(part, pairs) for part, info in sweeps}
    seen = {tuple(b[k] for k, _ in pairs) for b in bases.values() if b is not None}
    note = None if len(seen) < 2 else (
        "the sweeps' undefended trials differ (" + "; ".join(
            f"{n}: " + ", ".join(f"{k} {b[k]:.4g}" for k, _ in pairs) for n, b in bases.items() if b is not None)
        + "): their data, model or recipe differ, so their trials are not measured on one scale")
    constraints = []
    for _, info in sweeps:
        constraints += [c for c in info["constraints"] if c not in constraints]
    return trials, {**first, "sweep": "+".join(names), "objectives": first["objectives"], "constraints": constraints,
                    "note": note,
                    "parent_run_id": ", ".join(info["parent_run_id"] for _, info in sweeps),
                    "defense": ", ".join(dict.fromkeys(str(info.get("defense")) for _, info in sweeps))}


def _objectives_text(objectives: Iterable[Any]) -> str:
    return ", ".join(f"{m} ({mode})" for m, mode in objective_pairs(objectives))


# ---------------------------------------------------------------------------------------------------------
# reports of a front: front.md, the console table, pareto.png, front.csv


def fmt_params(t: dict[str, Any], sep: str = ", ", digits: int = 3) -> str:
    """A trial's defense parameters on one line ("-" for the undefended trial or none), floats to `digits`
    significant digits (`params_digits`: as many as tell a sweep's settings apart)."""
    if t.get("defense") == "none" or not t.get("params"):
        return "-"
    return sep.join(f"{k}={v:.{digits}g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())


def params_digits(trials: list[dict]) -> int:
    """The fewest significant digits, from 3, at which the trials' different settings print differently:
    at 3, weight_decay 1.206e-05 and 1.211e-05 both print 1.21e-05, which reads as one setting proposed
    again (`same_settings`) with other results."""
    settings = [g[0] for g in same_settings(trials)]
    for digits in range(3, 10):
        if len({(t.get("sweep"), t.get("defense"), fmt_params(t, digits=digits)) for t in settings}) == len(settings):
            return digits
    return 10


def fmt_mean_std(t: dict[str, Any], key: str) -> str:
    """A trial's metric as "mean ± std" (its std over targets, where the trial has one), "n/a" if missing."""
    f = _num(t.get(key))
    if f is None:
        return "n/a"
    sd = _num(t.get(spread_key(key)))
    return f"{f:.4f}" if sd is None else f"{f:.4f} ± {sd:.4f}"


def same_settings(rows: list[dict]) -> list[list[dict]]:
    """`rows` grouped by setting (defense and parameters, within one sweep: `merge_sweeps`), in order of
    first appearance: a sampler may propose a setting again (a discrete space), and the repeat reuses the
    stored signals, so its metrics are the same and the front shows it once, as "5, 7, 8"."""
    groups: dict[str, list[dict]] = {}
    for t in rows:
        key = json.dumps([t.get("sweep"), t.get("defense"), t.get("params") or {}], sort_keys=True, default=str)
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def hypervolume_text(hv: float | None, reference: dict[str, Any] | None) -> str:
    """The hypervolume line after "hypervolume ": what it is measured against, then its value."""
    given = (reference or {}).get("given") or []
    if reference is None and hv is None:
        return "vs the undefended trial: n/a (no undefended trial)"
    if not given:
        against = "the undefended trial"
    else:
        parts = [f"{k} {_num(reference[k]):.4g}" for k in given]
        rest = [k for k in reference if k not in ("given", "trial", *given)]
        if rest:
            parts.append(f"the undefended trial's {', '.join(rest)}")
        against = ", ".join(parts)
    if hv is None or hv > 0:
        return f"vs {against}: {'n/a' if hv is None else f'{hv:.6g}'}"
    # no volume beyond the reference: every trial pays for its privacy with some of another objective
    # (accuracy), as most defenses do against the undefended point
    why = "no trial is better than the reference on every objective"
    hint = "" if given else "; an objective's `reference` (e.g. the lowest test_accuracy worth having) credits trade-offs"
    return f"vs {against}: 0 ({why}{hint})"


# A DP defense's accounted epsilon is the privacy number its users read first, and no searched parameter
# shows it: the front's tables and each trial's console line give it beside the objectives.
EPSILON = "defense/epsilon"
DELTA = "defense/delta"


def with_epsilon(objectives: list[tuple[str, str]], trials: list[dict]) -> list[tuple[str, str]]:
    """The objectives, and the accounted epsilon (mode "") when a trial has one and it is not an objective."""
    if any(k == EPSILON for k, _ in objectives) or not any(_num(t.get(EPSILON)) is not None for t in trials):
        return objectives
    return [*objectives, (EPSILON, "")]


def epsilon_note(trials: list[dict]) -> str | None:
    """What the accounted epsilon shown beside a front means: the delta it holds at (a DP defense's own:
    DP-SGD's default is 1/n^1.1 of its n training points); None where no trial has one."""
    deltas = sorted({d for t in trials if _num(t.get(EPSILON)) is not None and (d := _num(t.get(DELTA))) is not None})
    if not deltas:
        return None
    return f"epsilon: the defense's accounted epsilon at delta {', '.join(f'{d:.2g}' for d in deltas)}"


def _heading(metric: str, mode: str) -> str:
    return f"{metric} ({mode})" if mode else metric


def front_markdown(trials: list[dict], objectives: Iterable[Any], front: list[int], hv: float | None = None,
                   reference: dict[str, Any] | None = None, intro: str = "") -> str:
    """Markdown table of every trial (objective values as "mean ± std", and DP-SGD's accounted epsilon
    where trials have one; * on the front) and the hypervolume line (against `reference`, from
    `hypervolume_reference`), after `intro` (e.g. a heading)."""
    objectives = with_epsilon(objective_pairs(objectives), trials)
    objs = [k for k, _ in objectives]
    on = set(front)
    lines = ["| trial | defense | params | " + " | ".join(_heading(k, m) for k, m in objectives) + " | front |",
             "|---|---|---|" + "---|" * len(objs) + "---|"]
    digits = params_digits(trials)
    for t in trials:
        vals = [fmt_mean_std(t, o) for o in objs] if t.get("status") == "ok" else ["failed"] * len(objs)
        lines.append(f"| {_md(t['trial'])} | {_md(t['defense'])} | {_md(fmt_params(t, digits=digits))} | "
                     + " | ".join(vals)
                     + f" | {'*' if t['trial'] in on else ''} |")
    lines += ["", f"Hypervolume {hypervolume_text(hv, reference)}"]
    if note := epsilon_note(trials):
        lines += ["", note[0].upper() + note[1:] + "."]
    return intro + "\n".join(lines) + "\n"


def _md(value: Any) -> str:
    """A table cell's text that stays text: a plug-in's name or a categorical value holding '|' must not split
    the row, nor HTML in it render (front.md is also the MLflow parent run's description)."""
    import html

    return html.escape(str(value), quote=False).replace("|", "\\|")


def print_front(
    sweep: str,
    trials: list[dict],
    objectives: Iterable[Any],
    front: list[int],
    footer: str,
    *,
    hypervolume: float | None = None,
    reference: dict[str, Any] | None = None,
    show_hypervolume: bool = False,
    console=None,
) -> None:
    """The console report of a front: a rich table of the front's trials (objectives as "mean ± std", a DP
    defense's accounted epsilon after its parameters), the hypervolume line (`show_hypervolume`), the
    failed trials and `footer`."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # names and values print as given, whatever the console's markup setting

    objectives = objective_pairs(objectives)
    by_num = {t["trial"]: t for t in trials}
    groups = same_settings([by_num[n] for n in front])
    rows = [g[0] for g in groups]
    # spaces, no commas: a column narrower than the line wraps between two parameters, never before a comma.
    # The accounted epsilon follows the setting that gives it (a column of its own would not fit 80 columns).
    eps = [None if any(k == EPSILON for k, _ in objectives) else _num(t.get(EPSILON)) for t in rows]
    digits = params_digits(trials)
    params = [fmt_params(t, sep="  ", digits=digits) + ("" if e is None else f"  (epsilon={e:.3g})")
              for t, e in zip(rows, eps, strict=True)]
    # One defense on the front goes in the title, leaving its column's width to the parameters. Columns
    # "fold" instead of rich's "…": a narrow console (80 columns in a log file) must not hide a parameter's
    # value or the FPR level in a metric's name.
    defenses = sorted({str(t["defense"]) for t in rows})
    one = len(defenses) == 1
    values = [[fmt_mean_std(t, m) for m, _ in objectives] for t in rows]
    widths = [max([len(v[i]) for v in values] + [len(mode) + 2, 8]) for i, (_, mode) in enumerate(objectives)]
    labels = [", ".join(str(r["trial"]) for r in g) for g in groups]
    c = console or Console()
    # what the params column is left with when the others take their widths (borders and padding: 3 a
    # column, and 1): a parameter longer than that breaks after its "=", since a fold inside its value
    # ("weight_decay=0.00" over "258") reads as another number
    others = [max(map(len, ["trial", *labels])), *([] if one else [max(map(len, ["defense", *defenses]))]), *widths]
    room = c.width - sum(others) - 3 * (len(others) + 1) - 1
    params = ["  ".join(w.replace("=", "= ", 1) if len(w) > room else w for w in p.split("  ")) for p in params]
    title = f"sweep {sweep}: Pareto front ({len(front)} of {len(trials)} trials)"
    table = Table(title=Text(title + (f", all {defenses[0]}" if one else "")))
    table.add_column("trial", overflow="fold")
    if not one:
        table.add_column("defense", overflow="fold")
    table.add_column("params", overflow="fold")
    for i, (metric, mode) in enumerate(objectives):  # as wide as the values; a longer name folds
        table.add_column(_heading(metric, mode), justify="right", overflow="fold", max_width=widths[i])
    for label, t, p, v in zip(labels, rows, params, values, strict=True):
        table.add_row(*map(Text, [label, *([] if one else [str(t["defense"])]), p, *v]))
    c.print(table)
    if any(e is not None for e in eps) and (note := epsilon_note(rows)):
        c.print(Text(note), soft_wrap=True)
    if show_hypervolume:
        c.print(Text(f"hypervolume {hypervolume_text(hypervolume, reference)}"), soft_wrap=True)
    failed = [t for t in trials if t.get("status") != "ok"]
    if failed:
        c.print(Text(f"{len(failed)} trial(s) failed: "
                     + "; ".join(f"#{t['trial']}: {t.get('error')}" for t in failed)), soft_wrap=True)
    c.print(Text(footer), soft_wrap=True)


def axis_label(metric: str, mode: str) -> str:
    """An objective's axis title on pareto.png and pareto.html: its metric and which way is better."""
    return f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)"


def undefended_label(trial: dict[str, Any]) -> str:
    """The undefended trial's name in the figures' legends."""
    return f"undefended (trial {trial['trial']})"


def plot_front(trials: list[dict], objectives: Iterable[Any], front: list[int], reference: dict | None,
               path: str | Path, title: str) -> Path:
    """pareto.png: the successful trials, the second objective (x) against the first (y), one colour per
    defense, each point's std over targets as error bars, the front ringed, the undefended trial as a red
    star and each hypervolume reference given by hand (`reference`, from `hypervolume_reference`) as a
    dashed line."""
    from raymia.report.plots import plot_pareto

    objectives = objective_pairs(objectives)
    ok = [t for t in trials if t.get("status") == "ok"]
    on = set(front)
    (x, xm), (y, ym) = objectives[1] if len(objectives) > 1 else objectives[0], objectives[0]
    base = undefended_trial(ok, objectives)
    given = {k: reference[k] for k in (reference or {}).get("given", []) if k in (x, y)}

    return plot_pareto(
        ok, x_key=x, y_key=y, path=path,
        front_ids={i for i, t in enumerate(ok) if t["trial"] in on},
        x_label=axis_label(x, xm), y_label=axis_label(y, ym), title=title,
        reference={**base, "label": undefended_label(base), "point": base} if base else None,
        x_err_key=spread_key(x), y_err_key=spread_key(y), lines=given,
        # the staircase bounds what the front dominates: between two front points it takes the y of the
        # one that still covers the x in between (the right one when x is maximised)
        front_step="pre" if xm == "max" else "post",
    )


def write_front(
    trials: list[dict],
    objectives: Iterable[Any],
    out_dir: str | Path,
    title: str,
    constraints: Iterable[Any] | None = None,
    name: str | None = None,
) -> dict:
    """Front, hypervolume (against `hypervolume_reference`, when there is one) and the files front.csv
    (every trial), front.md, pareto.png (`plot_front`) and result.json (shaped as a sweep's, for
    `report.html.write_html`; `name` heads it). Returns {"front": [trial numbers], "hypervolume",
    "reference", "paths"}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    objectives = list(objectives)
    front, hv, ref = front_and_hypervolume(trials, objectives, constraints)
    given = objective_references(objectives)
    objectives = objective_pairs(objectives)
    on = set(front)

    csv_path = out / "front.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "defense", "params", *(k for k, _ in objectives), "on_front"])
        for t in trials:
            vals = [("" if _num(t.get(k)) is None else repr(_num(t.get(k)))) for k, _ in objectives]
            w.writerow([t["trial"], t["defense"], json.dumps(t.get("params") or {}, sort_keys=True, default=str),
                        *vals, int(t["trial"] in on)])

    md_path = out / "front.md"
    md_path.write_text(front_markdown(trials, objectives, front, hv, ref, intro=f"# {title}\n\n"))
    png_path = plot_front(trials, objectives, front, ref, out / "pareto.png", title)
    result = {"name": name or title, "trials": trials, "front": front, "hypervolume": hv, "hypervolume_reference": ref,
              "objectives": [{"metric": k, "mode": m, "reference": given.get(k)} for k, m in objectives]}
    json_path = out / "result.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    return {"front": front, "hypervolume": hv, "reference": ref,
            "paths": [str(csv_path), str(md_path), str(png_path), str(json_path)]}
