"""run_sweep(spec): Ray Tune + OptunaSearch over a defense's hyperparameters, one audit per trial.

Each trial is a light driver (a tiny CPU request: the sweep's warm bank pool holds the CPUs that train)
that runs one audit, its bank trained on the pool, and reports every metric once. Objectives (2-3 metrics
with directions) are searched with a multi-objective Optuna sampler. The undefended setting is the first
trial when `include_undefended` is on. One MLflow parent run per sweep; a Tune callback on the driver logs
one child run per finished trial. The result is the Pareto front (table, result.json, Pareto plot), as
`raymia.pareto` computes and reports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raymia.audit import UTILITY_METRICS
from raymia.errors import RaymiaError, SpecError
from raymia.pareto import fmt_params, front_and_hypervolume, front_markdown, plot_front, print_front
from raymia.space import Categorical, Domain, Float, Int, describe
from raymia.spec import AuditSpec, SweepSpec

log = logging.getLogger("raymia")


@dataclass
class SweepResult:
    spec: SweepSpec
    trials: list[dict[str, Any]]
    front: list[int]  # indices into trials
    out_dir: Path
    parent_run_id: str | None
    hypervolume: float | None = None  # of the feasible front against the undefended trial
    final_audit: list[dict[str, Any]] | None = None

    @property
    def front_trials(self) -> list[int]:
        """The front as trial numbers (what result.json, front.md and the console show)."""
        return [self.trials[i]["trial"] for i in self.front]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "objectives": [o.model_dump() for o in self.spec.sweep.objectives],
            "trials": self.trials,
            "front": self.front_trials,
            "hypervolume": self.hypervolume,
            "final_audit": self.final_audit,
            "mlflow_parent_run_id": self.parent_run_id,
        }


def resolve_space(spec: SweepSpec) -> dict[str, dict[str, Domain | Any]]:
    """{defense: {param: Domain | constant}}: each searched defense's declared space with the spec's
    overrides ({low, high[, log]}, {choices}, or a constant), every bound checked against its params."""
    from raymia.defenses import DEFENSES

    several = bool(spec.sweep.defenses)
    out: dict[str, dict[str, Domain | Any]] = {}
    for i, choice in enumerate(spec.sweep.choices):
        at = f"sweep.defenses.{i}" if several else "sweep"
        entry = DEFENSES.get(choice.name, where=f"{at}.name" if several else "sweep.defense")
        space: dict[str, Domain | Any] = dict(entry.obj.search_space())
        for name, raw in choice.space.items():
            where = f"{at}.space.{name}"
            if name not in entry.params.model_fields:
                raise SpecError(f"{choice.name!r} has no parameter {name!r}; accepted: "
                                f"{', '.join(entry.params.model_fields)}", where=where)
            if isinstance(raw, dict):
                try:
                    if "choices" in raw:
                        if set(raw) != {"choices"} or not isinstance(raw["choices"], list) or not raw["choices"]:
                            raise ValueError("expected {choices: [a, b, ...]}")
                        space[name] = Categorical(tuple(raw["choices"]))
                    else:
                        if not {"low", "high"} <= set(raw) <= {"low", "high", "log"}:
                            raise ValueError("expected {low, high[, log]} or {choices: [...]} or a constant")
                        kind = Int if all(isinstance(raw[k], int) for k in ("low", "high")) else Float
                        space[name] = kind(raw["low"], raw["high"], bool(raw.get("log", False)))
                except (ValueError, TypeError) as e:
                    raise SpecError(str(e), where=where) from None
            else:
                space[name] = raw
        for name, dom in space.items():
            samples = list(dom.choices) if isinstance(dom, Categorical) else (
                [dom.low, dom.high] if isinstance(dom, Float | Int) else [dom])
            for v in samples:
                entry.parse({name: v}, where=f"{at}.space.{name}")
        out[choice.name] = space
    return out


def describe_space(space: dict[str, dict[str, Domain | Any]]) -> dict[str, str]:
    """{defense: "gamma [0.3, 0.99], alpha log [0.0001, 0.05], ..."}: a resolved space for people."""
    return {d: ", ".join(f"{k} {describe(v) if isinstance(v, Float | Int | Categorical) else repr(v)}"
                         for k, v in sp.items()) or "no parameters" for d, sp in space.items()}


class DefineByRun:
    """Optuna define-by-run space (a picklable object: Tune checkpoints the searcher). The first trial
    asked for is the undefended setting when `include_undefended` is on; every later one picks a defense
    (when several are searched) and samples its space. Parameters are named "<defense>.<param>"."""

    def __init__(self, spaces: dict[str, dict[str, Any]], include_undefended: bool):
        self.spaces, self.include_undefended = spaces, include_undefended
        self.asked = 0

    def __call__(self, trial) -> dict[str, Any]:
        first = self.asked == 0
        self.asked += 1
        if self.include_undefended and first:
            return {"defense": "none"}
        names = list(self.spaces)
        defense = names[0] if len(names) == 1 else trial.suggest_categorical("defense", names)
        const: dict[str, Any] = {"defense": defense}
        for name, dom in self.spaces[defense].items():
            key = f"{defense}.{name}"
            if isinstance(dom, Float):
                trial.suggest_float(key, dom.low, dom.high, log=dom.log)
            elif isinstance(dom, Int):
                trial.suggest_int(key, dom.low, dom.high, log=dom.log)
            elif isinstance(dom, Categorical):
                trial.suggest_categorical(key, list(dom.choices))
            else:
                const[key] = dom
        return const


def split_config(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A trial's config -> (defense name, its params without the "<defense>." prefix)."""
    name = config.get("defense", "none")
    prefix = f"{name}."
    return name, {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}


def _optuna_storage(url: str):
    """An Optuna storage from a URL: journal files (journal:///path) or any RDB URL (sqlite, postgresql...)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-study INFO lines repeat raymia's

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal://"):]))
    return optuna.storages.RDBStorage(url)


def _damaged_tune_state(exp_dir: Path) -> str | None:
    """Why Tune's newest saved state in exp_dir cannot be restored (a file cut short by a kill while Tune
    copied it), or None. A pickle is checked by its frame (protocol marker first, STOP opcode last), not
    loaded; anything else must parse as JSON."""
    for pattern in _TUNE_STATE:
        files = sorted(exp_dir.glob(pattern))
        if not files:
            continue
        newest = files[-1]
        try:
            data = newest.read_bytes()
        except OSError as e:
            return f"{newest.name}: {e}"
        if data[:1] == b"\x80":  # a pickle, whatever its name says (Tune's search_gen_state-*.json is one)
            if data[-1:] != b".":
                return f"{newest.name} is cut short ({len(data)} bytes)"
            continue
        if newest.suffix == ".pkl":
            return f"{newest.name} is cut short ({len(data)} bytes)"
        try:
            json.loads(data)
        except ValueError:
            return f"{newest.name} is neither intact JSON nor an intact pickle ({len(data)} bytes)"
    return None


_TUNE_STATE = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")


def _backup_tune_state(exp_dir: Path, backup: Path) -> None:
    """Copy Tune's state files to `backup` when they are intact, replacing the previous copy atomically
    (a new folder renamed over it; a kill in between leaves `<backup>.old`, which a restore also reads)."""
    import os
    import shutil

    if not exp_dir.is_dir() or _damaged_tune_state(exp_dir) is not None:
        return
    tmp, old = backup.with_name(backup.name + ".tmp"), backup.with_name(backup.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for pattern in _TUNE_STATE:
        for f in exp_dir.glob(pattern):
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(old, ignore_errors=True)
    if backup.exists():
        os.replace(backup, old)
    os.replace(tmp, backup)
    shutil.rmtree(old, ignore_errors=True)


def _restore_tune_state(backup: Path, exp_dir: Path) -> bool:
    """Put an intact copy from `_backup_tune_state` back into exp_dir; False when there is none."""
    import shutil

    for copy in (backup, backup.with_name(backup.name + ".old")):
        if copy.is_dir() and any(copy.iterdir()) and _damaged_tune_state(copy) is None:
            for pattern in _TUNE_STATE:
                for f in exp_dir.glob(pattern):
                    f.unlink()
                for f in copy.glob(pattern):
                    shutil.copy2(f, exp_dir / f.name)
            return True
    return False


def _delete_study(spec: SweepSpec, sweep_dir: Path) -> None:
    """Remove the sweep's Optuna study, so a new search starts from the same seeded proposals."""
    import optuna

    storage = _optuna_storage(spec.sweep.storage or f"sqlite:///{sweep_dir / 'optuna.db'}")
    try:
        optuna.delete_study(study_name=f"raymia-{spec.name}", storage=storage)
    except KeyError:  # no such study yet
        pass


def _make_sampler(name: str, seed: int):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def trial_spec(base: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    name, cfg = split_config(config)
    spec = json.loads(json.dumps(base))
    spec.pop("sweep", None)
    spec["defense"] = {"name": name, "params": cfg}
    spec["tracking"] = {**spec["tracking"], "enabled": False}
    return spec


def _finished_trial(run_dir: Path, spec) -> dict[str, Any] | None:
    """The stored result of this trial's audit when it already finished with exactly this spec."""
    path = run_dir / "result.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    def key(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in ("output_dir", "tracking")}

    if "metrics" not in saved or key(saved.get("spec") or {}) != key(spec.model_dump(mode="json")):
        return None
    return saved


def _run_trial(config: dict[str, Any], base: dict[str, Any], root: str, sweep_dir: str, log_level: int,
               pool=None) -> None:
    """One Tune trial: one audit of the base spec with this trial's defense setting, its bank trained on
    the sweep's warm pool. Its progress lines (and the pool's for its packs) reach the console at the
    driver's level, as `[raymia] trial N: ...`."""
    from ray import tune

    from raymia.audit import run_audit
    from raymia.engine.bank_job import worker_logging
    from raymia.spec import AuditSpec

    context = tune.get_context()
    worker_logging(log_level, context.get_trial_name().replace("_", " ", 1) + ": ")
    spec = AuditSpec.model_validate(trial_spec(base, config))
    trial_id = context.get_trial_id()
    run_dir = Path(sweep_dir) / "trials" / trial_id
    saved = _finished_trial(run_dir, spec)
    if saved is not None:  # finished before the driver was interrupted: report it again, run nothing
        metrics, audit_dir, fingerprint, reused = saved["metrics"], run_dir, saved["fingerprint"], True
    else:
        res = run_audit(spec, output_dir=root, track=False, console=False, run_dir=run_dir, pool=pool)
        metrics, audit_dir, fingerprint, reused = res.flat_metrics(), res.out_dir, res.fingerprint, res.reused_signals
    objectives = base["sweep"]["objectives"]
    for o in objectives:
        v = metrics.get(o["metric"])
        if v is None or not math.isfinite(v):
            raise ValueError(f"objective {o['metric']} is {'n/a' if v is None else v} for this trial "
                             "(for TPR at a low FPR, audit more non-members)")
    report = {k: (float("nan") if v is None else v) for k, v in metrics.items()}
    import ray

    report.update({"audit_dir": str(audit_dir), "fingerprint": fingerprint, "reused_signals": reused,
                   "node": ray.get_runtime_context().get_node_id()})
    tune.report(report)


def _number(trial) -> int | str:
    """A trial's number as the front's table and result.json give it (its place in Tune's trial order),
    read from the counter, from 1, that starts Tune's experiment tag `{N+1}_{config}`; its id if none."""
    head = str(getattr(trial, "experiment_tag", "")).split("_", 1)[0]
    return int(head) - 1 if head.isdigit() else trial.trial_id


def _trial_name(trial) -> str:
    """`trial_N` (Tune's trial name, which a trial's own progress lines show as `trial N:`)."""
    return f"trial_{_number(trial)}"


def _progress_callback(spec: SweepSpec, exp_dir: Path, backup: Path):
    from ray import tune

    objs = [o.metric for o in spec.sweep.objectives]

    class Progress(tune.Callback):
        """One console line per finished trial (Tune's own tables are switched off)."""

        def __init__(self) -> None:
            self.done = 0
            self.recovered: dict[str, str] = {}

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            _backup_tune_state(exp_dir, backup)  # Tune's own copy is not atomic: a kill can cut it short
            r = trial.last_result or {}
            _, cfg = split_config(trial.config)
            vals = "  ".join(f"{o}={r.get(o, float('nan')):.4f}" for o in objs)
            log.info("trial %s done (%d/%d): %s %s  %s%s", _number(trial), self.done, spec.sweep.num_trials,
                     trial.config.get("defense"), fmt_params({"defense": trial.config.get("defense"), "params": cfg}),
                     vals, "  (stored signals reused)" if r.get("reused_signals") else "")

        def on_trial_recover(self, iteration, trials, trial, **info):
            why = _trial_error(trial)
            if self.recovered.get(trial.trial_id) != why:  # one loss reaches Tune twice (see failure_config)
                self.recovered[trial.trial_id] = why
                log.warning("trial %s lost (%s); Tune runs it again, and the packs its bank stored are kept",
                            _number(trial), why)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            log.warning("trial %s failed (%d/%d): %s", _number(trial), self.done, spec.sweep.num_trials,
                        _trial_error(trial))

    return Progress()


def _trial_error(trial) -> str:
    """The line that says why a trial failed, from the error file Tune wrote for it (its path if unreadable)."""
    from raymia.errors import last_error_line

    path = trial.error_file
    try:
        text = Path(path).read_text()
        return last_error_line(text.split("\n", 1)[1] if text.startswith("Failure #") else text)
    except (OSError, TypeError):
        return f"see {path}" if path else "see the Ray logs"


def _mlflow_callback(spec: SweepSpec, parent_id: str):
    from ray import tune

    from raymia.tracking import TAG_PARENT, TAG_TRIAL_ID, log_run, tag_equals, trial_tags

    class MlflowChildRuns(tune.Callback):
        """Logs one MLflow child run per finished (or failed) trial, from the driver."""

        def _log(self, trial, status: str, error: str | None = None) -> None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(spec.tracking.uri)
            exp = client.get_experiment_by_name(spec.tracking.experiment)
            if exp is not None and client.search_runs(
                [exp.experiment_id],
                filter_string=f"{tag_equals(TAG_TRIAL_ID, trial.trial_id)} and {tag_equals(TAG_PARENT, parent_id)}",
            ):
                return  # logged before an interruption: one child run per trial
            result = trial.last_result or {}
            params = trial_spec(spec.model_dump(mode="json"), dict(trial.config))
            metrics = {k: v for k, v in result.items() if _is_metric(k)}
            audit_dir = result.get("audit_dir")
            arts = ([Path(audit_dir) / n for n in ("result.json", "roc.png", "spec.yaml")
                     if (Path(audit_dir) / n).exists()] + sorted(Path(audit_dir).glob("inversion-*.png"))
                    if audit_dir else [])
            tags = trial_tags(trial.trial_id, status, str(trial.config.get("defense")), error)
            log_run(spec.tracking.uri, spec.tracking.experiment, run_name=f"{spec.name}-{trial.trial_id}",
                    params=params, metrics=metrics, artifacts=arts, tags=tags, parent_run_id=parent_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._log(trial, "ok")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._log(trial, "failed", error=_trial_error(trial))

    return MlflowChildRuns()


def _resume_key(spec: SweepSpec) -> dict[str, Any]:
    """What must match for a re-run to continue a sweep (the tracking and output locations may move)."""
    d = spec.model_dump(mode="json")
    for k in ("tracking", "output_dir", "store"):
        d.pop(k, None)
    return d


def resume_hash(spec: SweepSpec) -> str:
    """The hash `state.json` keeps: a re-run continues the sweep only when its spec hashes the same."""
    return hashlib.sha256(json.dumps(_resume_key(spec), sort_keys=True).encode()).hexdigest()[:16]


def _load_result(spec: SweepSpec, sweep_dir: Path, parent_id: str | None) -> SweepResult:
    saved = json.loads((sweep_dir / "result.json").read_text())
    trials = saved["trials"]
    front_ids = set(saved["front"])
    return SweepResult(spec=spec, trials=trials, front=[i for i, t in enumerate(trials) if t["trial"] in front_ids],
                       out_dir=sweep_dir, parent_run_id=parent_id)


def validate_sweep(spec: SweepSpec, setup: bool = True):
    """Every check a sweep makes before its first trial: the search space, the data, plan and model
    (`BankContext.from_spec`; `setup=False` fits nothing), each searched defense against the model and
    data, the objectives' and constraints' metric names, and whether the plan's targets have enough
    non-members (members) to resolve the FPR (FNR) levels they name. Returns (space, context)."""
    from raymia.defenses import build_defense
    from raymia.train.bank import BankContext

    space = resolve_space(spec)
    ctx = BankContext.from_spec(spec, setup=setup)
    for d, sp in space.items():  # with the space's constants; the searched values were checked above
        fixed = {k: v for k, v in sp.items() if not isinstance(v, Float | Int | Categorical)}
        defense = build_defense(d, fixed, ctx.data.info, where="sweep.defense")
        defense.check(spec.model.name, ctx.data.info, spec.model.params)
        defense.check_data(ctx.data, ctx.plan.population)
    for field, names in (("objectives", [o.metric for o in spec.sweep.objectives]),
                         ("constraints", [c.metric for c in spec.sweep.constraints])):
        _check_objective_names(spec, names, field=field)
        _check_resolvable(spec, ctx.plan.keep, names, field=field)
    if spec.inversion is not None:  # the class split and the public data, before any training
        from raymia.inversion.protocol import inversion_data

        inversion_data(spec, ctx)
    return space, ctx


def _prepare_inversion(spec: SweepSpec) -> None:
    """Fit the inversion evaluator and the attacks' target-independent artefacts (GMI's GAN) once, on a Ray
    worker (a GPU one when the inversion runs on CUDA), into the cache every trial then reads."""
    import ray

    # the cache key holds the device type: a trial that resolves `auto` otherwise refits (correct, slower)
    device = spec.inversion.device
    gpus = 1 if device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1) else 0
    log.info("sweep %s: preparing the model-inversion evaluator and GANs on a Ray worker", spec.name)
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2)(_prepare_task)
    try:
        done = ray.get(task.remote(spec.model_dump(mode="json", exclude={"sweep"})))
    except ray.exceptions.RayTaskError as e:
        if isinstance(getattr(e, "cause", None), RaymiaError):
            raise e.cause from None  # one line, as on the driver
        raise
    log.info("sweep %s: inversion prepared (%s)", spec.name, ", ".join(f"{k}: {v}" for k, v in done.items()))


def _prepare_task(raw: dict[str, Any]) -> dict[str, str]:
    from raymia.inversion.protocol import prepare

    return prepare(AuditSpec.model_validate(raw))


def _check_resolvable(spec: SweepSpec, keep: np.ndarray, names: list[str], field: str) -> None:
    """A TPR at FPR f is n/a for a target with fewer than 1/f non-members (a TNR at FNR f: members); a
    sweep whose objective is n/a fails every trial, so it is refused before any training."""
    for i, n in enumerate(names):
        key = n.partition("/")[2]
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
                            where=f"sweep.{field}.{i}.metric")


def run_sweep(
    spec: SweepSpec, *, output_dir: str | Path | None = None, console: bool = True, resume: bool = False,
    fresh: bool = False,
) -> SweepResult:
    """Run (or continue) a sweep. A re-run of the same spec continues an interrupted sweep without
    re-running finished trials (`resume=True` insists that there is one); `fresh=True` discards it."""
    from ray import tune

    from raymia.engine.cluster import ensure_ray

    t0 = time.perf_counter()
    root = Path(output_dir or spec.output_dir).resolve()
    sweep_dir = root / "sweeps" / spec.name
    if fresh:
        import shutil

        shutil.rmtree(sweep_dir, ignore_errors=True)
        shutil.rmtree(root / "ray" / f"sweep-{spec.name}", ignore_errors=True)
        if spec.sweep.storage:  # a study in a database outlives the sweep's folder
            _delete_study(spec, sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    space, _ = validate_sweep(spec)

    # Resume: the sweep's state (spec hash, MLflow parent run) lives beside its results; Tune's experiment
    # checkpoint and the Optuna study (SQLite) hold the trials. Re-running the same command continues.
    state = _sweep_state(spec, sweep_dir, resume)
    if state is not None and state.get("finished") and (sweep_dir / "result.json").exists():
        log.info("sweep %s already finished; its result is in %s (use --fresh to run it again)", spec.name, sweep_dir)
        result = _load_result(spec, sweep_dir, state.get("parent_run_id"))
        if console:
            _print_front(result)
        return result
    exp_dir = root / "ray" / f"sweep-{spec.name}"
    resuming = state is not None and tune.Tuner.can_restore(str(exp_dir))
    if resuming and (problem := _damaged_tune_state(exp_dir)):
        # Tune would log the failed restore and then wait forever. Put back raymia's copy of its state from
        # the last finished trial (trials finished since then report their stored results again); without
        # one, start the search again: a fresh study with the same seed proposes the same settings, whose
        # banks are stored, so nothing retrains.
        if _restore_tune_state(sweep_dir / "tune-state", exp_dir):
            log.warning("sweep %s: Tune's saved state was damaged (%s; the sweep was killed while writing it); "
                        "resuming from the copy taken after the last finished trial", spec.name, problem)
        else:
            log.warning("sweep %s: Tune's saved state is damaged (%s; the sweep was killed while writing it): "
                        "starting the search again, reusing every stored bank", spec.name, problem)
            import shutil

            shutil.rmtree(exp_dir, ignore_errors=True)
            _delete_study(spec, sweep_dir)
            resuming = False
    parent_id = state.get("parent_run_id") if state else None
    with ThreadPoolExecutor(1) as bg:  # the MLflow parent run is created while Ray starts
        parent = bg.submit(_start_parent, spec) if spec.tracking.enabled and parent_id is None else None
        pool = None
        try:
            ensure_ray()
            if spec.bank.engine == "ray":  # one warm pool for every trial and the final audit; it warms meanwhile
                from raymia.engine.pool import BankPool

                pool = BankPool.start(spec, reserve_cpus=spec.sweep.trial_cpu * spec.sweep.max_concurrent)
        except BaseException:
            if parent is not None and parent.exception() is None:
                from raymia.tracking import finish_parent

                finish_parent(spec.tracking.uri, parent.result(), {}, [], status="FAILED")
            raise
        parent_id = parent.result() if parent is not None else parent_id
    _write_state(spec, sweep_dir, parent_id, finished=False)
    from raymia.audit import write_spec_file

    write_spec_file(spec, sweep_dir / "spec.yaml", f"the spec of sweep {spec.name}")
    status, summary = "FAILED", {}
    try:
        if spec.inversion is not None:
            _prepare_inversion(spec.model_copy(update={"output_dir": str(root)}))
        log.info("sweep %s: %d trials over %s", spec.name, spec.sweep.num_trials,
                 "; ".join(f"{d}: {text}" for d, text in describe_space(space).items()))
        tuner = _tuner(spec, space, root, sweep_dir, parent_id, exp_dir if resuming else None, pool)
        trials = _collect(tuner.fit(), [o.metric for o in spec.sweep.objectives])
        if len(trials) < spec.sweep.num_trials or any(t["status"] == "incomplete" for t in trials):
            # Tune returns early when interrupted (Ctrl-C): its state is saved, the sweep is not finished.
            raise RaymiaError(f"sweep {spec.name} was interrupted; run the same command again to resume it")
        result = _report(spec, trials, space, root, sweep_dir, parent_id, console, pool)
        status = "FINISHED"
        _write_state(spec, sweep_dir, parent_id, finished=True)
        summary = {"num_trials": len(trials), "num_failed": sum(t["status"] != "ok" for t in trials),
                   "front_size": len(result.front), "hypervolume": result.hypervolume}
        log.info("sweep %s done in %.0fs -> %s", spec.name, time.perf_counter() - t0, sweep_dir)
        return result
    finally:
        if pool is not None:
            pool.shutdown()
        if parent_id:
            from raymia.tracking import finish_parent

            arts = ([sweep_dir / n for n in ("result.json", "pareto.png", "front.md", "spec.yaml")]
                    if status == "FINISHED" else [])
            finish_parent(spec.tracking.uri, parent_id, summary, arts, status=status)


def _start_parent(spec: SweepSpec) -> str:
    """The sweep's MLflow parent run (its trials become child runs)."""
    from raymia.tracking import KIND_SWEEP, TAG_KIND, start_parent

    parent_id = start_parent(
        spec.tracking.uri, spec.tracking.experiment, run_name=f"sweep-{spec.name}",
        params=spec.model_dump(mode="json"), tags={TAG_KIND: KIND_SWEEP},
    )
    log.info("MLflow parent run %s in %s", parent_id, spec.tracking.uri)
    return parent_id


def _sweep_state(spec: SweepSpec, sweep_dir: Path, resume: bool) -> dict[str, Any] | None:
    """The sweep's saved state (spec hash, MLflow parent run, finished), None for a new sweep; a different
    spec under the same name, or --resume with nothing to resume, is a SpecError."""
    path = sweep_dir / "state.json"
    state = json.loads(path.read_text()) if path.exists() else None
    if state is not None and state.get("spec_hash") != resume_hash(spec):
        raise SpecError(f"a sweep named {spec.name!r} with a different spec exists in {sweep_dir}; give this one "
                        "another name, or use --fresh to discard the old one", where="name")
    if resume and state is None:
        raise SpecError(f"nothing to resume in {sweep_dir}", where="--resume")
    return state


def _write_state(spec: SweepSpec, sweep_dir: Path, parent_id: str | None, finished: bool) -> None:
    (sweep_dir / "state.json").write_text(
        json.dumps({"spec_hash": resume_hash(spec), "parent_run_id": parent_id, "finished": finished}))


def _tuner(spec: SweepSpec, space, root: Path, sweep_dir: Path, parent_id: str | None, restore: Path | None,
           pool=None):
    """Tune's Tuner over the trials: restored from `restore` (an interrupted sweep's experiment), or new,
    with OptunaSearch (its study in sweep.storage) proposing each trial's defense setting."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    trainable = tune.with_resources(tune.with_parameters(
        _run_trial, base=spec.model_dump(mode="json"), root=str(root), sweep_dir=str(sweep_dir),
        log_level=logging.getLogger("raymia").getEffectiveLevel(), pool=pool,
    ), {"cpu": spec.sweep.trial_cpu})
    if restore is not None:
        log.info("resuming sweep %s: finished trials are kept, unfinished ones run again", spec.name)
        return tune.Tuner.restore(str(restore), trainable=trainable, resume_unfinished=True, resume_errored=False)
    objectives = spec.sweep.objectives
    searcher = OptunaSearch(
        space=DefineByRun(space, spec.sweep.include_undefended),
        metric=[o.metric for o in objectives],
        mode=[o.mode for o in objectives],
        sampler=_make_sampler(spec.sweep.sampler, spec.seed),
        storage=_optuna_storage(spec.sweep.storage or f"sqlite:///{sweep_dir / 'optuna.db'}"),
        study_name=f"raymia-{spec.name}",
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=spec.sweep.num_trials,
            max_concurrent_trials=spec.sweep.max_concurrent, trial_name_creator=_trial_name,
            reuse_actors=True,  # a trial's process keeps its imports (torch, the attacks) for the next one
        ),
        run_config=tune.RunConfig(
            name=f"sweep-{spec.name}",
            storage_path=str(root / "ray"),
            # a trial lost with its node (or its process) runs again elsewhere; the packs its bank had
            # stored are kept, so only the rest trains. Tune counts one loss twice (the trial's task
            # fails, then its actor), so 3 is one loss and one more failure.
            failure_config=tune.FailureConfig(max_failures=3),
            callbacks=[_progress_callback(spec, root / "ray" / f"sweep-{spec.name}", sweep_dir / "tune-state")]
            + ([_mlflow_callback(spec, parent_id)] if parent_id else []),
            verbose=0,
        ),
    )


def _report(spec: SweepSpec, trials: list[dict[str, Any]], space, root: Path, sweep_dir: Path,
            parent_id: str | None, console: bool, pool=None) -> SweepResult:
    """The front among the trials that meet every constraint, its hypervolume, the final audit if asked:
    result.json, pareto.png and front.md in the sweep's folder, and the front on the console."""
    objectives = spec.sweep.objectives
    ok = [t for t in trials if t["status"] == "ok"]
    # the front among the trials that meet every constraint (each ok trial's "feasible" flag is set)
    front_ids, hv, ref = front_and_hypervolume(trials, objectives, spec.sweep.constraints)
    front = [i for i, t in enumerate(trials) if t["trial"] in front_ids]
    result = SweepResult(spec=spec, trials=trials, front=front, out_dir=sweep_dir, parent_run_id=parent_id,
                         hypervolume=hv)
    # written now (the search is safe on disk) and again below with the final audit
    (sweep_dir / "result.json").write_text(json.dumps(result.to_json(), indent=1, default=str))
    plot_front(trials, objectives, front_ids, ref, sweep_dir / "pareto.png",
               title=f"sweep {spec.name}: {', '.join(space)} ({len(ok)} trials{_spread_note(spec)})")
    if spec.sweep.final_audit is not None:
        result.final_audit = _final_audit(spec, result, root, parent_id, pool)
    (sweep_dir / "result.json").write_text(json.dumps(result.to_json(), indent=1, default=str))
    (sweep_dir / "front.md").write_text(front_markdown(
        trials, objectives, result.front_trials, result.hypervolume,
        intro=f"Sweep {spec.name}: every objective is the mean over {len(spec.plan.target_list)} target(s) "
              f"(leave-one-out over the bank), ± its std over them.\n\n"))
    if console:
        _print_front(result)
    return result


def audit_spec_of_trial(spec: SweepSpec, trial: dict[str, Any], num_models: int | None = None,
                        targets: Any = None) -> dict[str, Any]:
    """The audit spec (a dict) of one sweep trial, optionally with a bigger bank: the final audit."""
    d = spec.model_dump(mode="json")
    d.pop("sweep", None)
    d["defense"] = {"name": trial["defense"], "params": trial.get("params") or {}}
    if num_models is not None:
        d["plan"]["num_models"] = num_models
        if targets is None and d["plan"]["targets"] != "all":
            d["plan"]["targets"] = [t for t in d["plan"]["targets"] if t < num_models] or [0]
    if targets is not None:
        d["plan"]["targets"] = targets
    d["name"] = f"{spec.name}-trial{trial['trial']}"
    return d


def _final_audit(spec: SweepSpec, result: SweepResult, root: Path, parent_id: str | None,
                 pool=None) -> list[dict[str, Any]]:
    from raymia.audit import run_audit
    from raymia.spec import AuditSpec

    fa = spec.sweep.final_audit
    rows = []
    for i in result.front:
        t = result.trials[i]
        audit = AuditSpec.model_validate(audit_spec_of_trial(spec, t, fa.num_models, fa.targets))
        log.info("final audit of trial %d (%s) with %d models", t["trial"], t["defense"], fa.num_models)
        res = run_audit(audit, output_dir=root, track=False, console=False, pool=pool)
        if parent_id:
            from raymia.tracking import KIND_FINAL_AUDIT, TAG_KIND, TAG_TRIAL, log_run

            log_run(spec.tracking.uri, spec.tracking.experiment, run_name=f"{audit.name}-final",
                    params=audit.model_dump(mode="json"), metrics=res.flat_metrics(),
                    artifacts=[res.out_dir / "result.json", res.out_dir / "roc.png", res.out_dir / "spec.yaml"],
                    tags={TAG_KIND: KIND_FINAL_AUDIT, TAG_TRIAL: str(t["trial"])}, parent_run_id=parent_id)
        rows.append({"trial": t["trial"], "defense": t["defense"], "params": t["params"],
                     "num_models": fa.num_models, "audit_dir": str(res.out_dir), **res.flat_metrics()})
    return rows


def _check_objective_names(spec: SweepSpec, names: list[str], field: str = "objectives") -> None:
    attacks = {a.key for a in spec.attacks}
    utility = set(UTILITY_METRICS)
    keys = {"auc", "balanced_accuracy", "epsilon_lb", *(f"tpr_fpr_{f:g}" for f in spec.metrics.fpr_levels),
            *(f"tnr_fnr_{f:g}" for f in spec.metrics.fnr_levels)}
    from raymia.inversion.protocol import metric_names
    from raymia.ood_audit import metric_names as ood_metric_names

    inversion = set(metric_names(spec))
    ood = set(ood_metric_names(spec))
    for i, n in enumerate(names):
        if n in utility or n in inversion or n in ood:
            continue
        a, _, k = n.partition("/")
        if (a in attacks or a == "worst") and k in keys:
            continue
        if a == "defense" and k:
            continue
        accepted = (sorted(utility) + [f"ATTACK/{k}" for k in sorted(keys)] + ["defense/KEY"]
                    + (["mi/INVERSION_ATTACK/top1|top5|knn_dist|fid"] if inversion else [])
                    + (["ood/ATTACK/fpr", "ood/ATTACK/SET/METRIC"] if ood else []))
        raise SpecError(f"unknown metric {n!r}; accepted: {', '.join(accepted)} with ATTACK one of the spec's "
                        f"attacks ({', '.join(sorted(attacks))}) or 'worst' (the strongest of them)",
                        where=f"sweep.{field}.{i}.metric")


def _collect(grid, metric_names: list[str]) -> list[dict[str, Any]]:
    trials = []
    for i, r in enumerate(grid):
        defense, params = split_config(dict(r.config or {}))
        row: dict[str, Any] = {"trial": i, "trial_id": (r.metrics or {}).get("trial_id"),
                               "defense": defense, "params": params}
        if r.error is not None:
            row.update(status="failed", error=str(r.error).strip().splitlines()[-1][:500])
        elif not all(k in (r.metrics or {}) for k in metric_names):
            row["status"] = "incomplete"
        else:
            row["status"] = "ok"
            for k, v in (r.metrics or {}).items():
                if _is_metric(k):
                    row[k] = None if isinstance(v, float) and math.isnan(v) else v
            row["audit_dir"] = (r.metrics or {}).get("audit_dir")
        trials.append(row)
    return trials


def _is_metric(key: str) -> bool:
    """A metric a trial reports (utility, ATTACK/METRIC, worst/, defense/, std/...), not Tune's bookkeeping."""
    return "/" in key or key in UTILITY_METRICS


def _spread_note(spec) -> str:
    n = len(spec.plan.target_list)
    return f"; mean ± std over {n} targets" if n > 1 else "; one target"


def _print_front(result: SweepResult) -> None:
    spec = result.spec
    print_front(spec.name, result.trials, spec.sweep.objectives, result.front_trials, f"-> {result.out_dir}")
