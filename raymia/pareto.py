"""Pareto fronts of finished sweeps, read back from MLflow, with their dominated hypervolume.

`trials_from_mlflow` rebuilds a sweep's trials from its MLflow parent and child runs (so a front can be
recomputed and compared without the sweep's output folder), `hypervolume` scores a front against the
undefended trial, and `write_front` writes front.csv, front.md and pareto.png.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml

from raymia.errors import RaymiaError
from raymia.metrics import spread_key
from raymia.report.plots import as_number as _num
from raymia.report.plots import objective_signs

SWEEP_PREFIX = "sweep-"
_LIVE = ("FINISHED", "RUNNING")


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


def hypervolume(points: list[dict], objectives: list[tuple[str, str]], reference: dict) -> float:
    """Dominated hypervolume of the points relative to a reference point (e.g. the undefended trial).

    Convention: "max" objectives are negated so that every objective is minimised; each point then spans
    the box between itself and the reference, and the hypervolume is the volume of the union of those
    boxes (in the objectives' own units multiplied together). Boxes are clipped to the reference: a point
    worse than the reference in some objective (or equal to it in one) spans nothing and contributes 0,
    dominated points and duplicates add nothing beyond the front's union. So 0 means no point improves on
    the reference in every objective at once; with the undefended trial as reference, a defense that
    trades utility for privacy scores 0 (pass a looser reference, e.g. accuracy 0, to credit trade-offs).
    Points with a missing, None or NaN objective are skipped. Exact for any number of objectives
    (slicing; fine for the small fronts of a sweep).
    """
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
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():  # MLflow would create an empty store here: say there is none instead
            raise RaymiaError(f"no MLflow store at {path}", where="--uri")
    return MlflowClient(uri)


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


def _defense_params(params: dict[str, str]) -> dict[str, Any]:
    prefix = "defense.params."
    flat = {k[len(prefix):]: _parse(v) for k, v in params.items() if k.startswith(prefix)}
    out = _unflatten(flat)
    return out if isinstance(out, dict) else {}


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
        if run.data.tags.get("raymia.kind") != "sweep":
            raise RaymiaError(f"run {parent_run_id} is not a sweep's parent run", where="--run-id")
        return run
    parents = _search_all(client, exp_id, "tags.`raymia.kind` = 'sweep'")  # newest first
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
    raise RaymiaError(f"no sweep {sweep!r} in experiment {experiment!r}; sweeps: "
                      f"{', '.join(names) if names else '(none)'}", where="--sweep")


def trials_from_mlflow(
    uri: str, experiment: str, sweep: str | None = None, parent_run_id: str | None = None
) -> tuple[list[dict], dict]:
    """One sweep's trials rebuilt from its MLflow child runs, plus what the parent run says about it.

    The sweep is the parent run parent_run_id, else the newest FINISHED or RUNNING parent run named
    "sweep-<sweep>", else (neither given) the newest such sweep of the experiment. Trials are numbered by
    start time and shaped like run_sweep's: trial, trial_id, defense, params, status, run_id, error (failed
    ones) and every logged metric. info holds parent_run_id, sweep, experiment, defense, objectives
    [(metric, mode)] and constraints [{metric, op, value}].
    """
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise RaymiaError(f"no MLflow experiment {experiment!r} in {uri}; experiments: "
                          f"{', '.join(known) if known else '(none)'}", where="--experiment")
    parent = _find_parent(client, exp.experiment_id, experiment, sweep, parent_run_id)
    pid, pparams = parent.info.run_id, parent.data.params
    name = _sweep_name(parent)
    objectives = [(o["metric"], o["mode"]) for o in _indexed(pparams, "sweep.objectives", ("metric", "mode"))]
    if not objectives:
        raise RaymiaError(f"parent run {pid} of sweep {name!r} has no sweep.objectives params")
    constraints = [{"metric": c["metric"], "op": c["op"], "value": float(c["value"])}
                   for c in _indexed(pparams, "sweep.constraints", ("metric", "op", "value"))]

    children = [r for r in _search_all(client, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{pid}'")
                if r.data.tags.get("raymia.kind", "trial") == "trial"]
    children.sort(key=lambda r: (r.info.start_time or 0, r.info.run_name or "", r.info.run_id))
    trials: list[dict] = []
    for i, r in enumerate(children):
        tags, params = r.data.tags, r.data.params
        status = tags.get("raymia.status") or ("ok" if r.info.status == "FINISHED" else "failed")
        row: dict[str, Any] = {
            "trial": i,
            "trial_id": tags.get("raymia.trial_id"),
            "defense": tags.get("raymia.defense") or params.get("defense.name"),
            "params": _defense_params(params),
            "status": status,
            "run_id": r.info.run_id,
        }
        if status != "ok":
            err = (tags.get("raymia.error") or "trial failed").strip().splitlines()
            row["error"] = (err[-1] if err else "trial failed")[:500]
        row.update(r.data.metrics)
        trials.append(row)
    info = {"parent_run_id": pid, "sweep": name, "experiment": experiment,
            "defense": pparams.get("sweep.defense"), "objectives": objectives, "constraints": constraints,
            "status": parent.info.status}
    return trials, info


# ---------------------------------------------------------------------------------------------------------
# writing a front


def fmt_params(t: dict[str, Any]) -> str:
    """A trial's defense parameters on one line ("-" for the undefended trial)."""
    if t.get("defense") == "none" or not t.get("params"):
        return "-"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())


def fmt_mean_std(t: dict[str, Any], key: str) -> str:
    """A trial's metric as "mean ± std" (its std over targets, where the trial has one), "n/a" if missing."""
    f = _num(t.get(key))
    if f is None:
        return "n/a"
    sd = _num(t.get(spread_key(key)))
    return f"{f:.4f}" if sd is None else f"{f:.4f} ± {sd:.4f}"


def _meets(t: dict[str, Any], constraints: list[dict[str, Any]]) -> bool:
    for c in constraints:
        v = _num(t.get(c["metric"]))
        if v is None or not (v >= c["value"] if c["op"] == ">=" else v <= c["value"]):
            return False
    return True


def front_and_hypervolume(
    trials: list[dict], objectives: list[tuple[str, str]], constraints: list[dict[str, Any]] | None = None
) -> tuple[list[int], float | None, dict | None]:
    """(front as trial numbers, hypervolume against the undefended trial or None, that trial or None).

    Only successful trials that meet every constraint can be on the front or count in the hypervolume.
    """
    from raymia.report.plots import pareto_front

    ok = [t for t in trials if t.get("status") == "ok" and _meets(t, constraints or [])]
    front = [ok[i]["trial"] for i in pareto_front(ok, list(objectives))]
    ref = next((t for t in trials if t.get("status") == "ok" and t.get("defense") == "none"
                and all(_num(t.get(k)) is not None for k, _ in objectives)), None)
    hv = hypervolume([t for t in ok if t["trial"] in front], list(objectives), ref) if ref else None
    return front, hv, ref


def front_markdown(trials: list[dict], objectives: list[tuple[str, str]], front: list[int],
                   hv: float | None = None) -> str:
    """Markdown table of every trial (objective values, * on the front) and the hypervolume line."""
    objs = [k for k, _ in objectives]
    on = set(front)
    lines = ["| trial | defense | params | " + " | ".join(f"{k} ({m})" for k, m in objectives) + " | front |",
             "|---|---|---|" + "---|" * len(objs) + "---|"]
    for t in trials:
        vals = [fmt_mean_std(t, o) for o in objs] if t.get("status") == "ok" else ["failed"] * len(objs)
        lines.append(f"| {t['trial']} | {t['defense']} | {fmt_params(t)} | " + " | ".join(vals)
                     + f" | {'*' if t['trial'] in on else ''} |")
    lines += ["", f"Hypervolume vs the undefended trial: {'n/a (no undefended trial)' if hv is None else f'{hv:.6g}'}"]
    return "\n".join(lines) + "\n"


def write_front(
    trials: list[dict],
    objectives: list[tuple[str, str]],
    out_dir: str | Path,
    title: str,
    constraints: list[dict[str, Any]] | None = None,
) -> dict:
    """Front, hypervolume (against the undefended trial, when there is one) and the files front.csv (every
    trial), front.md and pareto.png (first objective against the second, one colour per defense, the
    undefended trial as a red star). Returns {"front": [trial numbers], "hypervolume", "paths"}."""
    from raymia.report.plots import plot_pareto

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    objectives = [(k, m) for k, m in objectives]
    front, hv, ref = front_and_hypervolume(trials, objectives, constraints)
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
    md_path.write_text(f"# {title}\n\n" + front_markdown(trials, objectives, front, hv))

    ok = [t for t in trials if t.get("status") == "ok"]
    (x, xm), (y, ym) = objectives[1] if len(objectives) > 1 else objectives[0], objectives[0]

    def label(k: str, m: str) -> str:
        return f"{k} ({'higher' if m == 'max' else 'lower'} is better)"

    png_path = plot_pareto(
        ok, x_key=x, y_key=y, path=out / "pareto.png",
        front_ids={i for i, t in enumerate(ok) if t["trial"] in on},
        x_label=label(x, xm), y_label=label(y, ym), title=title,
        reference={**ref, "label": "undefended"} if ref else None,
        x_err_key=spread_key(x), y_err_key=spread_key(y),
    )
    return {"front": front, "hypervolume": hv, "paths": [str(csv_path), str(md_path), str(png_path)]}
