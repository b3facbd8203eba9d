"""run_sweep(spec): Ray Tune + OptunaSearch over a defense's hyperparameters, one audit per trial.

Each trial is a light driver (a tiny CPU request: the sweep's warm bank pool holds the CPUs that train)
that runs one audit, its bank trained on the pool, and reports every metric once. Objectives (2-3 metrics
with directions) are searched with a multi-objective Optuna sampler sized to the sweep. With
`include_undefended` the undefended setting is audited first, on its own (trial 0: the hypervolume's
reference), and the search's `num_trials` trials are numbered from 1. One MLflow parent run per sweep; a
Tune callback on the driver opens one child run per trial when it starts. The result is the Pareto front
(table, result.json, Pareto plot), as `raymia.pareto` computes and reports it. The search space is
`raymia.sweep_space`'s, what a re-run resumes from `raymia.sweep_state`'s, the Optuna searcher
`raymia.searcher`'s.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymia import progress
from raymia.caller import as_found, in_daemon_thread
from raymia.errors import (
    Interrupted,
    RaymiaError,
    SpecError,
    first_line,
    uninterruptible,
)
from raymia.metric_names import UTILITY_METRICS, check_metric_names, check_resolvable
from raymia.metrics import as_number
from raymia.pareto import (
    EPSILON,
    SWEEP_PREFIX,
    fmt_params,
    front_and_hypervolume,
    front_markdown,
    hypervolume_text,
    objective_references,
    params_digits,
    plot_front,
    print_front,
    same_settings,
)
from raymia.space import Categorical, Float, Int, describe
from raymia.spec import AuditSpec, SweepSpec, hashed_dump
from raymia.storage import absolute, check_locations, join, open_root
from raymia.sweep_space import (
    DefineByRun,  # also found here by the searchers Tune pickled (resume state) before it moved there
    describe_space,
    resolve_space,
    space_pairs,
    space_points,
    split_config,
)
from raymia.sweep_state import (
    BACKUP,
    backup_tune_state,
    check_study_storage,
    delete_study,
    read_state,
    restore_tune_state,
    study_storage,
    write_state,
)

log = logging.getLogger("raymia")


REPR_FRONT_ROWS = 10  # the front's settings a SweepResult's repr lists


@dataclass
class SweepResult:
    """What `run_sweep` returns (the sweep folder's result.json holds the same, `to_json`).

    trials: one dict per trial, the baseline (undefended, trial 0, with `sweep.include_undefended`) first:
    "trial" (its number), "trial_id", "defense", "params" (the defense's setting), "status" ("ok", "failed"
    with "error", "incomplete"), and for an ok trial its audit's flat metrics ("test_accuracy",
    "lira_online/tpr_fpr_0.01", "std/...", as `AuditResult.flat_metrics`) and "audit_dir" (its report).
    front: the Pareto front as indices into `trials` (`front_trials`: as trial numbers). hypervolume: the
    feasible front's, against `hypervolume_reference`. final_audit: the front re-audited
    (`sweep.final_audit`). parent_run_id: the sweep's MLflow parent run (None untracked). out_dir: the
    sweep's folder."""

    spec: SweepSpec
    trials: list[dict[str, Any]]
    front: list[int]  # indices into trials
    out_dir: Path
    parent_run_id: str | None
    hypervolume: float | None = None  # of the feasible front against `hypervolume_reference`
    hypervolume_reference: dict[str, Any] | None = None  # pareto.hypervolume_reference: {metric: value, given, trial}
    final_audit: list[dict[str, Any]] | None = None

    @property
    def front_trials(self) -> list[int]:
        """The front as trial numbers (what result.json, front.md and the console show)."""
        return [self.trials[i]["trial"] for i in self.front]

    def table(self):
        """A pandas DataFrame of the trials, indexed by trial number: "defense", one "params.<name>" column per
        defense parameter, "status", "front" (on the Pareto front), the objectives and their std over the
        targets ("std/<metric>"), then every other flat metric and field a trial holds (`trials`), as named
        there (a failed trial's metrics NaN)."""
        import pandas as pd  # imported here: a sweep's processes load this module and never need pandas

        from raymia.metrics import spread_key

        front = set(self.front_trials)
        rows = [{"trial": t["trial"], "defense": t.get("defense"),
                 **{f"params.{k}": v for k, v in (t.get("params") or {}).items()},
                 "status": t.get("status"), "front": t["trial"] in front,
                 **{k: v for k, v in t.items() if k not in ("trial", "defense", "params", "status")}}
                for t in self.trials]
        table = pd.DataFrame(rows).set_index("trial")
        objectives = [o.metric for o in self.spec.sweep.objectives]
        first = ["defense", *[c for c in table.columns if c.startswith("params.")], "status", "front",
                 *objectives, *[spread_key(m) for m in objectives]]
        first = list(dict.fromkeys(c for c in first if c in table.columns))
        return table[first + [c for c in table.columns if c not in first]]

    def __repr__(self) -> str:
        """A few lines for a notebook or a prompt: the sweep, its trials, the front's settings with their
        objectives (as the console's trial lines write them; the first `REPR_FRONT_ROWS`), the
        hypervolume, the folder."""
        objectives = [o.metric for o in self.spec.sweep.objectives]
        ok = sum(t.get("status") == "ok" for t in self.trials)
        lines = [f"SweepResult {self.spec.name}: {len(self.trials)} trials, {ok} ok; objectives "
                 + ", ".join(f"{o.metric} ({o.mode})" for o in self.spec.sweep.objectives)]
        groups = same_settings([self.trials[i] for i in self.front])  # a setting proposed again: one row
        digits = params_digits(self.trials)
        n = len(self.front)
        lines.append(f"  front ({n} trial{'s' if n > 1 else ''}):" if groups else "  front: none")
        for g in groups[:REPR_FRONT_ROWS]:
            number = ", ".join(str(t["trial"]) for t in g)
            lines.append(f"    trial {number}: {g[0].get('defense')} {fmt_params(g[0], digits=digits)}  "
                         f"{result_text(g[0], objectives)}")
        if len(groups) > REPR_FRONT_ROWS:
            lines.append(f"    ... {len(groups) - REPR_FRONT_ROWS} more settings: .table() has every trial")
        lines.append(f"  hypervolume {hypervolume_text(self.hypervolume, self.hypervolume_reference)}")
        lines.append(f"  report: {self.out_dir}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """What a notebook shows: report.html's summary line, Pareto front table and pareto.png (read from
        the sweep's folder)."""
        from raymia.report.html import sweep_fragment

        return sweep_fragment(self.to_json(), self.out_dir)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "objectives": [o.model_dump() for o in self.spec.sweep.objectives],
            "trials": self.trials,
            "front": self.front_trials,
            "hypervolume": self.hypervolume,
            "hypervolume_reference": self.hypervolume_reference,
            "final_audit": self.final_audit,
            "mlflow_parent_run_id": self.parent_run_id,
        }


def trial_spec(base: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    name, cfg = split_config(config)
    spec = json.loads(json.dumps(base))
    spec.pop("sweep", None)
    spec["defense"] = {"name": name, "params": cfg}
    spec["tracking"] = {**spec["tracking"], "enabled": False}
    return spec


def _finished_trial(kept, spec) -> dict[str, Any] | None:
    """The stored result of this trial's audit (in its state folder `kept`) when it already finished with
    exactly this spec."""
    try:
        saved = json.loads(kept.read("result.json"))
    except (OSError, json.JSONDecodeError):
        return None
    def key(d: dict[str, Any]) -> dict[str, Any]:  # either spelling of a renamed parameter: the same audit
        return hashed_dump({k: v for k, v in d.items() if k not in ("output_dir", "tracking")})

    if "metrics" not in saved or key(saved.get("spec") or {}) != key(spec.model_dump(mode="json")):
        return None
    return saved


def _run_trial(config: dict[str, Any], base: dict[str, Any], root: str, sweep_dir: str, state: str, log_level: int,
               pool=None) -> None:
    """One Tune trial: one audit of the base spec with this trial's defense setting, its bank trained on
    the sweep's warm pool. Its progress lines (and the pool's for its packs) reach the console at the
    driver's level, as `[raymia] trial N: ...`."""
    import ray
    from ray import tune

    from raymia.engine.bank_job import worker_logging

    context = tune.get_context()
    worker_logging(log_level, context.get_trial_name().replace("_", " ", 1) + ": ")
    trial_id = context.get_trial_id()
    try:
        metrics, fingerprint, reused, audit_dir = _audit_setting(
            base, config, root, Path(sweep_dir) / "trials" / trial_id, open_root(join(state, "trials", trial_id)), pool)
    except Interrupted:
        if pool is not None and pool.closed():  # the sweep is stopping (`_pool_stop_callback`): Tune no longer
            return  # listens to this trial, which its re-run runs again; an error would be Ray's "unhandled error"
        raise
    report = {k: (float("nan") if v is None else v) for k, v in metrics.items()}
    report.update({"audit_dir": str(audit_dir), "fingerprint": fingerprint, "reused_signals": reused,
                   "node": ray.get_runtime_context().get_node_id()})
    tune.report(report)


def _audit_setting(base: dict[str, Any], config: dict[str, Any], root: str | Path, run_dir: Path, kept,
                   pool=None) -> tuple[dict[str, Any], str, bool, str]:
    """One defense setting's audit: (its flat metrics, fingerprint, whether its signals were reused, where its
    report is kept). `run_dir` holds the report on this node, `kept` (a folder of the store: the same one
    unless the store is a URI) what a resume reads; a setting finished before an interruption is read back,
    not run again. An objective that is n/a or not finite is a ValueError (the trial fails)."""
    from raymia.audit import run_audit

    spec = AuditSpec.model_validate(trial_spec(base, config))
    saved = _finished_trial(kept, spec)
    if saved is not None:  # finished before the driver was interrupted: report it again, run nothing
        metrics, fingerprint, reused = saved["metrics"], saved["fingerprint"], True
    else:
        res = run_audit(spec, output_dir=root, track=False, console=False, run_dir=run_dir, pool=pool, page=False,
                        checked=True)
        metrics, fingerprint, reused = res.flat_metrics(), res.fingerprint, res.reused_signals
        if kept.location != str(run_dir.resolve()):  # the report reaches the driver and a resume through the store
            for f in sorted(p for p in run_dir.iterdir() if p.is_file() and p.name != "result.json"):
                kept.write(f.name, f.read_bytes())
            kept.write("result.json", (run_dir / "result.json").read_bytes())  # last: it marks the trial done
    for o in base["sweep"]["objectives"]:
        v = metrics.get(o["metric"])
        if v is None or not math.isfinite(v):
            raise ValueError(f"objective {o['metric']} is {'n/a' if v is None else v} for this trial "
                             "(for TPR at a low FPR, audit more non-members)")
    return metrics, fingerprint, reused, kept.location


BASELINE = 0  # the undefended setting's trial number; the search's trials are numbered from 1
BASELINE_ID = "baseline"  # its trial id (in result.json, MLflow and the store: <sweep>/baseline/)


def _number(trial) -> int | str:
    """A searched trial's number as the front's table and result.json give it (its place in Tune's trial
    order, from 1: 0 is the undefended baseline), read from the counter, from 1, that starts Tune's
    experiment tag `{N}_{config}`; its id if none."""
    head = str(getattr(trial, "experiment_tag", "")).split("_", 1)[0]
    return int(head) if head.isdigit() else trial.trial_id


def _trial_name(trial) -> str:
    """`trial_N` (Tune's trial name, which a trial's own progress lines show as `trial N:`)."""
    return f"trial_{_number(trial)}"


def _space_line(space: dict[str, dict[str, Any]]) -> str:
    """What a sweep searches, for its first console line: each defense's space, or with more than two
    defenses their names and parameter counts (`raymia check` lists the spaces)."""
    described = describe_space(space)
    if len(described) <= 2:
        return "; ".join(f"{d}: {text}" for d, text in described.items())
    searched = {d: sum(isinstance(v, Float | Int | Categorical) for v in sp.values()) for d, sp in space.items()}
    return (f"{len(space)} defenses: " + ", ".join(f"{d} ({n} parameter{'s' * (n != 1)})" for d, n in searched.items())
            + "; raymia check lists their spaces")


def result_text(metrics: dict[str, Any], objectives: list[str]) -> str:
    """A finished trial's objectives for its console line, and a DP defense's accounted epsilon."""
    def value(key: str) -> float:
        v = as_number(metrics.get(key))
        return float("nan") if v is None else v

    text = "  ".join(f"{o}={value(o):.4f}" for o in objectives)
    if EPSILON not in objectives and (eps := as_number(metrics.get(EPSILON))) is not None:
        text += f"  {EPSILON}={eps:.4g}"
    return text


def _progress_callback(spec: SweepSpec, exp, keep, shown=None):
    from ray import tune

    objs = [o.metric for o in spec.sweep.objectives]

    class Progress(tune.Callback):
        """One console line per finished trial (Tune's own tables are switched off), and the trials bar."""

        def __init__(self) -> None:
            self.recovered: dict[str, str] = {}
            self.counted = False  # whether the bar starts from the trials a resumed sweep finished before
            self.tuner_pkl: bytes | None = None  # the Tuner's state as this process pickled it (`_tuner`)

        def backup(self, trials) -> None:
            """raymia's signed copy of Tune's state, from Tune's staging folder on this driver (its trials
            know where; Tune uploads the folder to the store in the background)."""
            staging = getattr(getattr(trials[0], "storage", None), "experiment_driver_staging_path", None) \
                if trials else None
            if staging and self.tuner_pkl is not None:
                backup_tune_state(staging, self.tuner_pkl, keep)

        def on_experiment_end(self, trials, **info):
            self.backup(trials)  # after Tune's last save (a Ctrl-C's too), which a trial's callback precedes

        def on_trial_start(self, iteration, trials, trial, **info):
            if shown is not None and not self.counted:  # a resumed sweep's bar starts from its finished trials
                self.counted = True
                if finished := len(self.ended(trials)):
                    shown.restart(finished)
            # Tune's newest saved state, which holds this trial's setting once Tune has saved since it was
            # proposed (it saves at most every 10 s); a resume from a state before that proposes it again, the
            # same setting (the searcher puts its study back as it was then)
            self.backup(trials)

        @staticmethod
        def done(trials, trial) -> int:
            """Searched trials finished or failed as Tune's state has them (those finished before a resume
            included; a trial lost to the cluster runs again, so it is not done), the one just ended counted.
            Tune's state, not the stored results: another trial may have stored its result already."""
            return len(Progress.ended(trials) | {trial.trial_id})

        @staticmethod
        def ended(trials) -> set[str]:
            return {t.trial_id for t in trials if t.status == "TERMINATED" or (t.status == "ERROR" and not _lost(t))}

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.backup(trials)  # Tune's own copy is not atomic: a kill can cut it short
            r = trial.last_result or {}

            def setting(t) -> dict[str, Any]:
                return {"defense": t.config.get("defense"), "params": split_config(t.config)[1]}

            # as many digits as tell this trial's setting from every one finished before it
            digits = params_digits([setting(t) for t in trials if t.status == "TERMINATED" or t is trial])
            log.info("trial %s done (%d/%d): %s %s  %s%s", _number(trial), self.done(trials, trial), spec.sweep.num_trials,
                     trial.config.get("defense"), fmt_params(setting(trial), digits=digits),
                     result_text(r, objs), "  (stored signals reused)" if r.get("reused_signals") else "")
            if shown is not None:
                shown.update(self.done(trials, trial))

        def on_trial_recover(self, iteration, trials, trial, **info):
            why = _trial_error(trial)
            if self.recovered.get(trial.trial_id) != why:  # one loss reaches Tune twice (see failure_config)
                self.recovered[trial.trial_id] = why
                log.warning("trial %s lost (%s); Tune runs it again, and the packs its bank stored are kept",
                            _number(trial), why)

        def on_trial_error(self, iteration, trials, trial, **info):
            if _lost(trial):  # run again after the others (run_sweep)
                why = _trial_error(trial)
                if self.recovered.get(trial.trial_id) != why:  # not said already by on_trial_recover
                    log.warning("trial %s lost (%s); it runs again after the others", _number(trial), why)
                return
            log.warning("trial %s failed (%d/%d): %s", _number(trial), self.done(trials, trial), spec.sweep.num_trials,
                        _trial_error(trial))
            if shown is not None:
                shown.update(self.done(trials, trial))

    return Progress()


@contextlib.contextmanager
def _local_copy(where: str | None):
    """A trial's report folder as a local path: itself, or (a URI store) its files fetched to a temporary
    folder for MLflow to upload."""
    if not where or "://" not in where:
        yield Path(where) if where else None
        return
    import tempfile

    files = open_root(where)
    with tempfile.TemporaryDirectory(prefix="raymia-trial-") as tmp:
        for name in files.list():
            (Path(tmp) / name).write_bytes(files.read(name))
        yield Path(tmp)


LOST_TRIAL_ROUNDS = 2  # how many times a sweep runs again the trials its cluster lost


def lost_to_cluster(error: BaseException | None) -> bool:
    """Whether a trial failed because Ray lost its process or node (not because of its own error)."""
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.NodeDiedError, rex.WorkerCrashedError, rex.ObjectLostError)
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # Tune may wrap it
        if isinstance(error, lost):
            return True
        seen.add(id(error))
        error = getattr(error, "cause", None) or error.__cause__
    return False


class _SaidByRaymia(logging.Filter):
    """Drops Tune's summary of failed trials (raymia has said each failure in its own line, and lists them
    under the front), its advice after Ctrl-C to call Tuner.restore and its note on Ctrl-C or SIGTERM that it
    stops (re-running the raymia command resumes, which raymia's last line says), and the searcher's note
    that the study already has a trial's result (a trial finished after raymia's copy of Tune's state
    reports its stored result again on resume)."""

    SAID = ("Trials did not complete", "Failed to fetch metrics for", "Experiment has been interrupted",
            "Stop signal received", "Cannot tell a COMPLETE trial")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.SAID)


class _TuneSyncRace(logging.Filter):
    """Drops Tune's ERROR for one known race, and only that one. Tune saves its searcher's state by writing a
    hidden temporary file (`.<uuid4>-<name>`) and renaming it, in the folder that a background thread is
    meanwhile copying to the experiment's storage; when the copy lists the temporary file before the rename,
    that upload fails with FileNotFoundError on it. Nothing is lost: the next upload copies the whole
    folder again, and raymia keeps its own copy of Tune's state after every finished trial. Any other failed
    upload (permissions, a full disk, an unreachable bucket) still reaches the console."""

    TMP = re.compile(r"/\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-[^/]*'")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        msg = str(record.msg)
        raced = (msg.startswith("Saving experiment state to storage") and isinstance(exc, FileNotFoundError)
                 and self.TMP.search(str(exc)))
        # the same race reported by the syncer's next upload, the traceback in the message itself
        raced = raced or (msg.startswith("Last sync command failed") and "FileNotFoundError" in msg
                          and self.TMP.search(msg))
        if raced:
            log.debug("Tune's state upload raced its own temporary file (uploaded again next time): %s",
                      exc or msg.splitlines()[-1])
            return False
        return True


def _quiet_tune_summaries() -> None:
    for name, kind in (("ray.tune.tune", _SaidByRaymia), ("ray.tune.analysis.experiment_analysis", _SaidByRaymia),
                       ("ray.tune.execution.experiment_state", _TuneSyncRace),
                       ("ray.train._internal.syncer", _TuneSyncRace),
                       ("ray.tune.search.optuna.optuna_search", _SaidByRaymia)):
        lg = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in lg.filters):
            lg.addFilter(kind())


def _lost(trial) -> bool:
    """Whether Tune's trial failed because Ray lost its process or node: the exception Tune saved, or, when
    Tune has not written it yet, the message of Ray's lost-actor errors."""
    try:
        if lost_to_cluster(trial.get_pickled_error()):
            return True
    except Exception:  # not written yet, or unreadable: the message decides
        pass
    text = _trial_error(trial)
    return text.startswith("The actor ") and ("is unavailable" in text or "died" in text)


def _trial_error(trial) -> str:
    """The line that says why a trial failed, from the error file Tune wrote for it (its path if unreadable)."""
    from raymia.errors import last_error_line

    path = trial.error_file
    try:
        text = Path(path).read_text()
        return last_error_line(text.split("\n", 1)[1] if text.startswith("Failure #") else text)
    except (OSError, TypeError):
        return f"see {path}" if path else "see the Ray logs"


def _child_runs(spec: SweepSpec, parent_id: str, tags: dict[str, str] | None = None):
    """(an MLflow client of the sweep's store, the runs under the parent run with these tag values)."""
    from mlflow.tracking import MlflowClient

    from raymia.tracking import TAG_PARENT, tag_equals

    client = MlflowClient(spec.tracking.uri)
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    if exp is None:
        return client, []
    where = " and ".join(tag_equals(k, v) for k, v in {TAG_PARENT: parent_id, **(tags or {})}.items())
    return client, client.search_runs([exp.experiment_id], filter_string=where, max_results=5000)


def _open_trial_run(spec: SweepSpec, parent_id: str, trial_id: str, number: int | str,
                    config: dict[str, Any]) -> str | None:
    """The MLflow child run of a trial that starts, named "trial N"; None when the trial finished before an
    interruption (it reports its stored result to that run). Runs left by an interrupted or lost attempt
    are replaced: one run per trial."""
    from raymia.tracking import TAG_STATUS, TAG_TRIAL_ID, open_run, trial_tags

    client, before = _child_runs(spec, parent_id, {TAG_TRIAL_ID: trial_id})
    # done: closed with its result (a kill between the status tag and the run's end leaves it RUNNING: redone)
    if any(r.data.tags.get(TAG_STATUS) == "ok" and r.info.status == "FINISHED" for r in before):
        return None
    for r in before:
        client.delete_run(r.info.run_id)
    params = trial_spec(spec.model_dump(mode="json"), config)
    fingerprint = AuditSpec.model_validate(params).fingerprint()
    return open_run(spec.tracking.uri, spec.tracking.experiment, run_name=f"trial {number}", params=params,
                    tags=trial_tags(trial_id, "running", str(config.get("defense")), number=number),
                    parent_run_id=parent_id, start_time=time.time(), dataset=(spec.data.name, fingerprint))


def _close_trial_run(spec: SweepSpec, run_id: str | None, status: str, metrics: dict[str, Any],
                     audit_dir: str | None, error: str | None = None) -> None:
    """End a trial's child run with its metrics and report files (ok), or its error (failed)."""
    from raymia.tracking import TAG_ERROR, TAG_STATUS, close_run

    if run_id is None:
        return
    tags = {TAG_STATUS: status, **({TAG_ERROR: error[:5000]} if error else {})}
    with _local_copy(audit_dir if status == "ok" else None) as where:
        from raymia.audit import report_files

        arts = report_files(where) if where else []
        close_run(spec.tracking.uri, run_id, {k: v for k, v in metrics.items() if _is_metric(k)}, arts,
                  "FINISHED" if status == "ok" else "FAILED", tags)


def _mlflow_callback(spec: SweepSpec, parent_id: str):
    from ray import tune

    class MlflowChildRuns(tune.Callback):
        """One MLflow child run per trial, from the driver: opened when the trial starts (so runs carry real
        start and end times and are created in trial order), named and tagged with the trial's number,
        closed with its metrics and report when it ends."""

        def __init__(self):
            self.runs: dict[str, str | None] = {}  # Tune trial id -> its open run

        # each in `uninterruptible`: a SIGTERM's stop waits for its SQLite write
        def on_trial_start(self, iteration, trials, trial, **info):
            with uninterruptible():
                self.runs[trial.trial_id] = _open_trial_run(spec, parent_id, trial.trial_id, _number(trial),
                                                            dict(trial.config))

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            with uninterruptible():
                _close_trial_run(spec, self.runs.pop(trial.trial_id, None), "ok", result, result.get("audit_dir"))

        def on_trial_error(self, iteration, trials, trial, **info):
            with uninterruptible():
                _close_trial_run(spec, self.runs.pop(trial.trial_id, None), "failed", {}, None, _trial_error(trial))

    return MlflowChildRuns()


def _baseline(spec: SweepSpec, root: Path, sweep_dir: Path, keep, pool, parent_id: str | None) -> dict[str, Any]:
    """Trial 0: the undefended setting, audited on its own before the search, on the sweep's pool. It is the
    hypervolume's reference and takes neither a trial of `num_trials` nor an Optuna trial without
    parameters from the sampler. Its report is kept in <sweep>/baseline/; a resumed sweep reads it back."""
    from raymia.engine.bank_job import prefixed

    config = {"defense": "none"}
    run = _open_trial_run(spec, parent_id, BASELINE_ID, BASELINE, config) if parent_id else None
    row: dict[str, Any] = {"trial": BASELINE, "trial_id": BASELINE_ID, "defense": "none", "params": {}}
    try:
        with prefixed(f"trial {BASELINE}: "):
            metrics, _, reused, audit_dir = _audit_setting(spec.model_dump(mode="json"), config, root,
                                                           sweep_dir / BASELINE_ID,
                                                           open_root(join(keep.location, BASELINE_ID)), pool)
    except ValueError as e:  # an objective the undefended audit cannot resolve
        row.update(status="failed", error=str(e))
        log.warning("trial %d (undefended baseline) failed: %s", BASELINE, e)
        _close_trial_run(spec, run, "failed", {}, None, str(e))
        return row
    row.update(status="ok", audit_dir=audit_dir,
               **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items() if _is_metric(k)})
    log.info("trial %d done (baseline): none -  %s%s", BASELINE, result_text(metrics, [o.metric for o in spec.sweep.objectives]),
             "  (stored signals reused)" if reused else "")
    _close_trial_run(spec, run, "ok", metrics, audit_dir)
    return row


def _load_result(spec: SweepSpec, sweep_dir: Path, parent_id: str | None) -> SweepResult:
    saved = json.loads((sweep_dir / "result.json").read_text())
    if objective_references(saved.get("objectives", [])) != objective_references(spec.sweep.objectives):
        log.warning("sweep %s finished with other hypervolume references; its saved result is reported "
                    "(`raymia pareto --experiment %s --sweep %s --reference METRIC=VALUE` scores it against others)",
                    spec.name, spec.tracking.experiment, spec.name)
    trials = saved["trials"]
    front_ids = set(saved["front"])
    return SweepResult(spec=spec, trials=trials, front=[i for i, t in enumerate(trials) if t["trial"] in front_ids],
                       out_dir=sweep_dir, parent_run_id=parent_id, hypervolume=saved.get("hypervolume"),
                       hypervolume_reference=saved.get("hypervolume_reference"),
                       final_audit=saved.get("final_audit"))


def validate_sweep(spec: SweepSpec, setup: bool = True):
    """Every check a sweep makes before its first trial: the search space, the data, plan and model
    (`BankContext.from_spec`; `setup=False` fits nothing), each searched defense against the model and
    data, the objectives' and constraints' metric names, and whether the plan's targets have enough
    non-members (members) to resolve the FPR (FNR) levels they name. Returns (space, context)."""
    from raymia.defenses import DEFENSES, build_defense
    from raymia.resolve import check_workers_know
    from raymia.train.bank import BankContext

    space = resolve_space(spec)
    check_workers_know(spec, attacks=True)
    ctx = BankContext.from_spec(spec, setup=setup)
    several = bool(spec.sweep.defenses)

    def check(d: str, params: dict[str, Any]) -> None:
        defense = build_defense(d, params, ctx.data.info, where="sweep.defense")
        defense.check(spec.model.name, ctx.data.info, spec.model.params, spec.train)
        defense.check_data(ctx.data, ctx.plan.population)

    def end(sp, name: str, v: Any, which: str) -> str:
        return f"{v!r}, {'a choice' if which == 'choice' else f'the {which}'} of {describe(sp[name], condition=False)}"

    for i, (d, sp) in enumerate(space.items()):
        at = f"sweep.defenses.{i}" if several else "sweep"
        for name, v, which, params in space_points(DEFENSES.get(d).params, sp):
            try:
                check(d, params)
            except RaymiaError as e:
                if name is None:  # the space's base setting: a field of the space where the error names one
                    field = (e.where or "").removeprefix("defense.params.")
                    raise type(e)(e.message, where=f"{at}.space.{field}" if field in sp else e.where) from None
                why = e.message if e.where == f"defense.params.{name}" else str(e)
                raise SpecError(f"{end(sp, name, v, which)}, is refused: {why}", where=f"{at}.space.{name}") from None
        for (a, va, wa), (b, vb, wb), params in space_pairs(DEFENSES.get(d).params, sp):
            try:
                check(d, params)
            except RaymiaError as e:
                why = e.message if "defense.params" in (e.where or "") else str(e)
                raise SpecError(f"{a} {end(sp, a, va, wa)}, with {b} {end(sp, b, vb, wb)}, is refused together: "
                                f"{why}", where=f"{at}.space") from None
    for field, names in (("objectives", [o.metric for o in spec.sweep.objectives]),
                         ("constraints", [c.metric for c in spec.sweep.constraints])):
        check_metric_names(spec, names, field=f"sweep.{field}")
        check_resolvable(spec, ctx.plan.keep, names, field=f"sweep.{field}")
    if spec.inversion is not None:  # the class split and the public data, before any training
        from raymia.inversion.protocol import inversion_data

        inversion_data(spec, ctx)
    if (fa := spec.sweep.final_audit) is not None:  # it runs after the whole search: check its plan now
        from raymia.resolve import check_bank_size, check_undefended_shadows

        raw = audit_spec_of_trial(spec, {"defense": "none", "trial": 0}, fa.num_models, fa.targets)
        try:
            final = AuditSpec.model_validate(raw)
        except SpecError as e:  # the final audit's plan: its num_models and targets
            field = e.where.removeprefix("plan.") if e.where and e.where.startswith("plan.") else None
            raise SpecError(e.message, where="sweep.final_audit" + (f".{field}" if field else "")) from None
        try:
            check_bank_size(final)
            check_undefended_shadows(final)
        except SpecError as e:
            raise SpecError(str(e), where="sweep.final_audit") from None
    if spec.sweep.storage:  # a given study database, before anything is written (the default file: at the start)
        study_storage(spec, Path())
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


@as_found
def run_sweep(
    spec: SweepSpec | dict[str, Any] | str | Path, overrides: list[str] | None = None, *,
    output_dir: str | Path | None = None, console: bool = True, resume: bool = False, fresh: bool = False,
) -> SweepResult:
    """Run (or continue) a sweep; `spec` is a spec object, a dict or a YAML file's path, `overrides` the
    CLI's `dotted.key=value` strings; returns its `SweepResult`. A re-run of the same spec continues an
    interrupted sweep without re-running finished trials, and returns a finished one's result without
    running anything (`resume=True` insists that there is one to continue); `fresh=True` discards it and
    runs again. `console=False` prints no front table."""
    from raymia.engine.cluster import ensure_ray, going_down
    from raymia.resolve import as_spec

    spec = as_spec(spec, overrides, kind=SweepSpec)
    t0 = time.perf_counter()
    root = Path(output_dir or spec.output_dir).resolve()
    check_locations(spec, root)
    spec = spec.model_copy(update={"store": absolute(spec.store)})
    sweep_dir = root / "sweeps" / spec.name  # the reports: result.json, pareto.png, front.md, trials' reports
    # The state a re-run resumes from, in the store (every node reaches it; by default output_dir, so the
    # same folder): state.json, a copy of Tune's state, each trial's result; Tune's experiment beside it.
    keep = open_root(join(spec.store or str(root), "sweeps", spec.name))
    ray_storage = join(spec.store or str(root), "ray")
    exp = open_root(join(ray_storage, _tune_name(spec)))
    # Every check before anything is written or deleted: a spec with a typo run with --fresh must not
    # discard the finished sweep of the same name.
    space, _ = validate_sweep(spec)
    check_study_storage(spec, sweep_dir)

    if fresh:
        import shutil

        shutil.rmtree(sweep_dir, ignore_errors=True)
        keep.remove_tree("")
        exp.remove_tree("")
        if spec.sweep.storage:  # a study in a database outlives the sweep's folder
            delete_study(spec, sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)

    # Resume: the sweep's state (spec hash, MLflow parent run) is in `keep`; Tune's experiment checkpoint
    # and the Optuna study hold the trials. Re-running the same command continues.
    state = read_state(spec, keep, resume)
    if state is not None and state.get("finished") and (sweep_dir / "result.json").exists():
        try:
            result = _load_result(spec, sweep_dir, state.get("parent_run_id"))
        except (ValueError, KeyError, TypeError, AttributeError):  # cut short or edited: the trials are stored
            log.warning("sweep %s: its result.json is damaged; writing it again from the stored trials", spec.name)
        else:
            log.info("sweep %s already finished; its result is in %s (use --fresh (fresh=True) to run it again)", spec.name,
                     sweep_dir)
            _close_left_parent(spec, state.get("parent_run_id"), sweep_dir, result)
            if console:
                _print_front(result)
            return result
    # Tune's state is resumed from raymia's signed copy, taken after each finished trial, never from Tune's own
    # files: those are written without an atomic rename (a kill can cut one short, and Tune then waits
    # forever), and they hold pickles anyone who can write the store could have replaced. Trials finished
    # after the copy report their stored results again. Without a usable copy the search starts again: a
    # fresh study with the same seed proposes the same settings, whose banks are stored, so nothing retrains.
    resuming = False
    if state is not None:
        why = restore_tune_state(keep, exp)
        resuming = why is None
        if not resuming:
            (log.warning if keep.size(BACKUP) is not None else log.info)(
                "sweep %s: Tune's saved state is not resumed (%s): starting the search again, reusing every "
                "stored bank", spec.name, why)
            exp.remove_tree("")
            delete_study(spec, sweep_dir)
    # the parent run of the tracking store this run logs to: none with tracking off, a new one in another store
    same_store = state is not None and state.get("tracking_uri", spec.tracking.uri) == spec.tracking.uri
    parent_id = state.get("parent_run_id") if state and spec.tracking.enabled and same_store else None
    if spec.tracking.enabled and spec.tracking.uri.startswith(("http://", "https://")):
        # a server that does not answer: one line, nothing started
        from raymia.tracking import check_reachable

        check_reachable(spec.tracking.uri, spec.tracking.experiment)
    import ray

    if os.environ.get("RAY_ADDRESS") and not ray.is_initialized():  # one line, and no MLflow run left FAILED
        from raymia.engine.cluster import check_address

        check_address(os.environ["RAY_ADDRESS"])
    # the MLflow parent run is created while Ray starts
    parent = in_daemon_thread(_start_parent, spec, space) if spec.tracking.enabled and parent_id is None else None
    pool = None
    try:
        ensure_ray()
        from raymia.engine.pool import check_trial_cpu

        check_trial_cpu(spec.sweep.trial_cpu)
        if spec.bank.engine == "ray":  # one warm pool for every trial and the final audit; it warms meanwhile
            from raymia.engine.pool import BankPool

            pool = BankPool.start(spec, reserve_cpus=spec.sweep.trial_cpu * spec.sweep.max_concurrent)
        parent_id = parent.result() if parent is not None else parent_id
    except BaseException as e:  # no parent run stays RUNNING: a Ctrl-C while Ray, the pool and it start ends it KILLED
        if pool is not None:
            pool.shutdown()
        _end_parent_cut_short(spec, keep, parent, isinstance(e, KeyboardInterrupt))
        raise
    status, summary, beside = "FAILED", {}, None
    try:
        write_state(spec, keep, parent_id, finished=False)
        from raymia.audit import write_spec_file

        write_spec_file(spec, sweep_dir / "spec.yaml", f"the spec of sweep {spec.name}")
        if spec.inversion is not None:
            _prepare_inversion(spec.model_copy(update={"output_dir": str(root)}))
        log.info("sweep %s: %d trials over %s", spec.name, spec.sweep.num_trials, _space_line(space))
        # On the pool, the baseline is audited in a thread while Tune starts its trials: their processes'
        # start (imports) overlaps the pool's warm-up and the baseline's training, about 2 s of a quickstart
        # on two cores (benchmarks/RESULTS.md). A bank trained in this process (`bank.engine: local`) would
        # hold up Tune's controller instead, so there the baseline comes first.
        baseline = None
        with progress.bar(f"sweep {spec.name}: trials", spec.sweep.num_trials) as shown:
            if spec.sweep.include_undefended and pool is not None:
                beside = in_daemon_thread(_baseline, spec, root, sweep_dir, keep, pool, parent_id)
            elif spec.sweep.include_undefended:
                baseline = _baseline(spec, root, sweep_dir, keep, pool, parent_id)
            tuner = _tuner(spec, space, root, sweep_dir, parent_id, pool, ray_storage, keep, exp, resuming,
                           shown=shown)
            grid = _fit(tuner, spec.sweep.max_concurrent)
            for _ in range(LOST_TRIAL_ROUNDS):
                # Tune can give up on a trial lost with its node although it has retries left (two failures of
                # one loss race each other); trials are idempotent (stored results and packs are reused), so
                # those run again, after the others (with them, errored trials run again: a deterministic error
                # fails again at once, its packs stored)
                lost = [r for r in grid if lost_to_cluster(r.error)]
                if not lost or (pool is not None and pool.closed()):  # nothing lost, or a stop shut the pool down
                    break
                if (why := restore_tune_state(keep, exp)) is not None:  # Tune restores from what it verified
                    log.warning("sweep %s: the %d trial(s) lost with their worker or node are not run again: Tune's "
                                "state is not restored (%s)", spec.name, len(lost), why)
                    break
                log.warning("sweep %s: running the %d trial(s) lost with their worker or node again", spec.name, len(lost))
                tuner = _tuner(spec, space, root, sweep_dir, parent_id, pool, ray_storage, keep, exp, True,
                               resume_errored=True, shown=shown)
                grid = _fit(tuner, spec.sweep.max_concurrent)
        searched = _collect(grid, [o.metric for o in spec.sweep.objectives])
        if len(searched) < spec.sweep.num_trials or any(t["status"] == "incomplete" for t in searched):
            # Tune returns early when interrupted (Ctrl-C): its state is saved, the sweep is not finished.
            raise Interrupted(f"sweep {spec.name} was interrupted; run the same command again to resume it")
        if beside is not None:
            baseline = beside.result()
        trials = ([baseline] if baseline is not None else []) + searched
        result = _report(spec, trials, space, root, sweep_dir, parent_id, console, pool)
        status = "FINISHED"
        write_state(spec, keep, parent_id, finished=True)
        summary = _summary(result)
        log.info("sweep %s done in %.0fs -> %s", spec.name, time.perf_counter() - t0, sweep_dir)
        return result
    except (KeyboardInterrupt, Interrupted):
        status = "KILLED"
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        if beside is not None and not beside.done() and not going_down():
            # a stop does not wait for the baseline's audit: without its pool it ends at once (Interrupted),
            # its finished packs stored, before its MLflow run is ended with the others. On a local Ray that
            # is going down (a SIGTERM to the process group) its calls could wait out Ray's timeouts instead.
            wait([beside], timeout=BASELINE_STOP_S)
        if parent_id:
            from raymia.tracking import end_running_children

            if status == "KILLED":
                try:
                    end_running_children(spec.tracking.uri, parent_id)
                except Exception as e:  # the interruption is what the user must hear about
                    log.warning("could not end the sweep's open MLflow runs: %s", first_line(e))

            _finish_parent(spec, parent_id, sweep_dir, summary, status)


def _close_left_parent(spec: SweepSpec, parent_id: str | None, sweep_dir: Path, result: SweepResult) -> None:
    """A finished sweep's parent run that a kill left RUNNING (the state is marked finished before the run's
    report files are uploaded) is ended now, with them."""
    if not (spec.tracking.enabled and parent_id):
        return
    try:
        from mlflow.tracking import MlflowClient

        if MlflowClient(spec.tracking.uri).get_run(parent_id).info.status != "RUNNING":
            return
        _finish_parent(spec, parent_id, sweep_dir, _summary(result), "FINISHED")
    except Exception as e:  # the sweep's results are on disk: its run is what is missing
        log.warning("sweep %s: could not end its MLflow run %s: %s", spec.name, parent_id, first_line(e))


def _summary(result: SweepResult) -> dict[str, Any]:
    """The parent run's metrics."""
    trials = result.trials
    return {"num_trials": len(trials), "num_failed": sum(t["status"] != "ok" for t in trials),
            "front_size": len(result.front), "hypervolume": result.hypervolume}


def _finish_parent(spec: SweepSpec, parent_id: str, sweep_dir: Path, summary: dict[str, Any], status: str) -> None:
    """End the sweep's MLflow parent run with `status`; a finished sweep's with its summary and report files."""
    from raymia.tracking import MLFLOW_NOTE_TAG, finish_parent

    names = ("result.json", "pareto.png", "front.md", "spec.yaml", "report.html", "pareto.html", "importance.html")
    arts = [sweep_dir / n for n in names] if status == "FINISHED" else []
    front_md = sweep_dir / "front.md"
    note = {MLFLOW_NOTE_TAG: front_md.read_text()[:4900]} if status == "FINISHED" and front_md.exists() else {}
    finish_parent(spec.tracking.uri, parent_id, summary, arts, status=status, tags=note)


def _start_parent(spec: SweepSpec, space: dict[str, dict[str, Any]]) -> str:
    """The sweep's MLflow parent run (its trials become child runs): the spec and the searched space
    (`space.<defense>.<param>`) as params, the data set as input; a store that cannot be opened is one
    RaymiaError."""
    from raymia.tracking import KIND_SWEEP, TAG_KIND, check_reachable, start_parent

    check_reachable(spec.tracking.uri, spec.tracking.experiment)
    searched = {d: {k: describe(v) if isinstance(v, Float | Int | Categorical) else repr(v) for k, v in sp.items()}
                or "no parameters" for d, sp in space.items()}
    parent_id = start_parent(
        spec.tracking.uri, spec.tracking.experiment, run_name=f"{SWEEP_PREFIX}{spec.name}",
        params={**spec.model_dump(mode="json"), "space": searched}, tags={TAG_KIND: KIND_SWEEP},
        dataset=(spec.data.name, spec.fingerprint()),
    )
    log.info("MLflow parent run %s in %s", parent_id, spec.tracking.uri)
    return parent_id


def _tune_name(spec: SweepSpec) -> str:
    """The name of the sweep's Tune experiment: its folder under `<store>/ray/`."""
    return f"sweep-{spec.name}"


BASELINE_STOP_S = 20.0  # how long a stopped sweep waits for its baseline's thread to see its pool gone
PARENT_WAIT_S = 20.0  # how long a start cut short waits for its MLflow parent run (a new store's migrations)


def _end_parent_cut_short(spec: SweepSpec, keep, parent: Future | None, stopped: bool) -> None:
    """The parent run of a sweep whose start a stop or an error cut short is ended KILLED or FAILED once
    `_start_parent` has made it, and a stopped sweep's state names it, so that the re-run carries on in it.
    The wait is bounded: a Ctrl-C can land inside an import of the main thread and leave that module's
    lock held for good, and the thread making the run may be importing the same module (MLflow's imports
    are many); the run then stays RUNNING, and the re-run opens another."""
    if parent is None:
        return
    if not wait([parent], timeout=PARENT_WAIT_S).done:
        log.warning("sweep %s: its MLflow parent run was not made within %g s of the stop; if it is made, it "
                    "stays RUNNING", spec.name, PARENT_WAIT_S)
        return
    if parent.exception() is not None:
        return
    from raymia.tracking import finish_parent

    finish_parent(spec.tracking.uri, parent.result(), {}, [], status="KILLED" if stopped else "FAILED")
    if stopped:
        write_state(spec, keep, parent.result(), finished=False)


def _fit(tuner, max_concurrent: int):
    """Tune's fit, its finished trials' processes kept for the next trials (`_trial_processes_kept`). Tune's
    SIGINT handler, which it removes only when it fires, is removed here too: the final audit and the
    caller's Python session keep their Ctrl-C."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        with _trial_processes_kept(max_concurrent):
            return tuner.fit()
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def _trial_processes_kept(keep: int):
    """While Tune's controller is made and runs, its cache of idle trial processes (`reuse_actors`) keeps up
    to `keep` of them, the sweep's `max_concurrent`, instead of one.

    The searcher's hold rule (`searcher.ConstrainedOptunaSearch`) makes two proposals at once when concurrent
    trials end out of order. Tune keeps a finished trial's process for a trial already waiting or, with none,
    one process in all: it ended the other and started a new process for the second proposal. A trial shorter
    than that start (the imports, about 2 s of CPU) then handed its process on to the waiting trial, the new
    one ended unused, and the next proposal started another. A quickstart started 4 to 8 processes for its 7
    trials instead of 2 (benchmarks/RESULTS.md). Tune has no setting for the cache's size: this swaps its class
    for the one controller made here, and leaves Tune as it is where its internals differ."""
    from ray.tune.execution import tune_controller
    from ray.tune.utils.object_cache import _ObjectCache

    if keep <= 1 or tune_controller.__dict__.get("_ObjectCache") is not _ObjectCache or not all(
            hasattr(_ObjectCache(), a) for a in ("_cached_objects", "_num_cached_objects", "_max_num_objects")):
        yield
        return

    class KeepsIdleProcesses(_ObjectCache):
        def cache_object(self, key, obj) -> bool:
            if self._num_cached_objects < keep:
                self._cached_objects[key].append(obj)
                self._num_cached_objects += 1
                return True
            return super().cache_object(key, obj)

        def flush_cached_objects(self, force_all: bool = False):
            if force_all:  # the search is over, or Tune is cleaning up: every idle process ends
                yield from super().flush_cached_objects(force_all=True)
                return
            for key, objs in self._cached_objects.items():
                while len(objs) > max(self._max_num_objects[key], keep):
                    self._num_cached_objects -= 1
                    yield objs.pop(0)

    tune_controller._ObjectCache = KeepsIdleProcesses
    try:
        yield
    finally:
        tune_controller._ObjectCache = _ObjectCache


def _tuner(spec: SweepSpec, space, root: Path, sweep_dir: Path, parent_id: str | None, pool, ray_storage: str,
           keep, exp, restore: bool, resume_errored: bool = False, shown=None):
    """Tune's Tuner over the trials: restored from `restore` (an interrupted sweep's experiment), or new,
    with OptunaSearch (its study in sweep.storage) proposing each trial's defense setting. `shown`: the
    progress.Bar of the trials done."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from raymia.searcher import ConstrainedOptunaSearch, make_sampler

    # The trials' arguments are pickled with the function Tune registers (in the GCS), not put in the object
    # store as `tune.with_parameters` puts them. A raylet that dies (killed, or reached first by a SIGTERM to
    # the process group) takes its node's object store with it, and the driver's core, finding those objects
    # lost, wrote to the dead store and ended the process: exit 1, nothing printed, no clean stop.
    trainable = tune.with_resources(functools.partial(
        _run_trial, base=spec.model_dump(mode="json"), root=str(root), sweep_dir=str(sweep_dir), state=keep.location,
        log_level=logging.getLogger("raymia").getEffectiveLevel(), pool=pool,
    ), {"cpu": spec.sweep.trial_cpu})
    lines = _progress_callback(spec, exp, keep, shown)
    # each trial's reported results in its folder (result.json); Tune's other default loggers are off
    # (engine.cluster.ensure_ray)
    callbacks = [lines, JsonLoggerCallback()] + ([_mlflow_callback(spec, parent_id)] if parent_id else []) + (
        [_pool_stop_callback(pool)] if pool is not None else [])
    if restore:
        _quiet_tune_summaries()
        log.info("resuming sweep %s: finished trials are kept, unfinished ones run again", spec.name)
        tuner = tune.Tuner.restore(exp.location, trainable=trainable, resume_unfinished=True,
                                   resume_errored=resume_errored)
        # Tune restores the callbacks pickled when the sweep began, with that run's MLflow parent, tracking
        # settings and console state; this run's take their place (Tuner.restore takes no RunConfig).
        tuner._local_tuner.get_run_config().callbacks = callbacks
        return _with_state(tuner, lines)
    objectives = spec.sweep.objectives
    constraints = spec.sweep.constraints
    searcher = ConstrainedOptunaSearch(
        space=DefineByRun(space),
        metric=[o.metric for o in objectives],
        mode=[o.mode for o in objectives],
        sampler=make_sampler(spec.sweep.sampler, spec.seed, spec.sweep.num_trials, bool(constraints)),
        constraints=constraints,
        max_concurrent=spec.sweep.max_concurrent,
        num_trials=spec.sweep.num_trials,
        storage=study_storage(spec, sweep_dir),
        study_name=f"raymia-{spec.name}",
    )
    _quiet_tune_summaries()
    return _with_state(tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=spec.sweep.num_trials,
            max_concurrent_trials=spec.sweep.max_concurrent, trial_name_creator=_trial_name,
            reuse_actors=True,  # a trial's process keeps its imports (torch, the attacks) for the next one
        ),
        run_config=tune.RunConfig(
            name=_tune_name(spec),
            storage_path=ray_storage,
            # a trial lost with its node (or its process) runs again elsewhere; the packs its bank had
            # stored are kept, so only the rest trains. Tune counts one loss twice (the trial's task
            # fails, then its actor), so 3 is one loss and one more failure.
            failure_config=tune.FailureConfig(max_failures=3),
            callbacks=callbacks,
            verbose=0,
        ),
    ), lines)


def _pool_stop_callback(pool):
    """A Tune callback that shuts the sweep's pool down when a Ctrl-C (or the command's SIGTERM) stops the
    search, once Tune has saved the step in which it came. Tune then gives each running trial 10 s to end
    the call it is in, and a trial waits on its packs; without its pool it ends at once. Tune no longer
    listens to the trials by then: each keeps the status just saved, and a re-run runs it again."""
    import signal
    import threading

    from ray import tune

    class StopsPool(tune.Callback):
        def __init__(self, pool) -> None:
            self.pool, self.stopping = pool, False

        def __getstate__(self) -> dict[str, Any]:  # tuner.pkl holds the callbacks: no actor handles in it
            return {"pool": None, "stopping": False}

        def setup(self, **info) -> None:
            # Tune's SIGINT handler is in place now (fit set it); it puts back the one before when it fires
            if threading.current_thread() is not threading.main_thread():
                return
            tune_handler = signal.getsignal(signal.SIGINT)
            if not callable(tune_handler):
                return

            def handler(signum, frame) -> None:
                self.stopping = True
                tune_handler(signum, frame)

            signal.signal(signal.SIGINT, handler)

        def on_step_end(self, iteration, trials, **info) -> None:
            if self.stopping and self.pool is not None:
                self.pool.shutdown()

    return StopsPool(pool)


def _with_state(tuner, lines):
    """`tuner`, its state pickled here as Tune pickles it into tuner.pkl (`TunerInternal.__getstate__`, with
    Ray's cloudpickle) for the copy raymia signs: bytes from this process, not read back from the store."""
    from ray import cloudpickle

    lines.tuner_pkl = cloudpickle.dumps(tuner._local_tuner.__getstate__())
    return tuner


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
                         hypervolume=hv, hypervolume_reference=ref)
    # written now (the search is safe on disk) and again below with the final audit
    (sweep_dir / "result.json").write_text(json.dumps(result.to_json(), indent=1, default=str))
    what = ", ".join(space) if len(space) <= 2 else f"{len(space)} defenses"
    plot_front(trials, objectives, front_ids, ref, sweep_dir / "pareto.png",
               title=f"sweep {spec.name}: {what}, {len(ok)} trials{_spread_note(spec)}")
    if spec.sweep.final_audit is not None:
        result.final_audit = _final_audit(spec, result, root, parent_id, pool)
    (sweep_dir / "result.json").write_text(json.dumps(result.to_json(), indent=1, default=str))
    (sweep_dir / "front.md").write_text(front_markdown(
        trials, objectives, result.front_trials, result.hypervolume, ref,
        intro=f"Sweep {spec.name}: every objective is the mean over {len(spec.plan.target_list)} target(s) "
              f"(leave-one-out over the bank), ± its std over them.\n\n"))
    from raymia.report.html import write_html
    from raymia.report.interactive import importance_html, pareto_html

    pairs = [(o.metric, o.mode) for o in objectives]
    pareto_html(trials, pairs, result.front_trials, sweep_dir / "pareto.html")
    importance_html(study_storage(spec, sweep_dir),
                    f"raymia-{spec.name}", pairs, sweep_dir / "importance.html")
    write_html(sweep_dir)  # last: the page links the files beside it
    if parent_id:
        _log_earlier_trials(spec, parent_id, trials)
        _drop_orphan_runs(spec, parent_id, {str(t.get("trial_id")) for t in trials})
        _mark_front(spec, parent_id, result.front_trials)
        _share_view(spec, space)
    if console:
        _print_front(result)
    return result


def _share_view(spec: SweepSpec, space: dict[str, dict[str, Any]]) -> None:
    """The sweep's view of the MLflow runs table (trial number, objectives, the searched parameters, the front
    tag) stored on the experiment; its address goes to the console."""
    from raymia.tracking import TAG_FRONT, TAG_TRIAL, column, share_view, ui_address

    searched = sorted({k for sp in space.values() for k, v in sp.items() if isinstance(v, Float | Int | Categorical)})
    columns = ([column("tags", TAG_TRIAL)] + [column("metrics", o.metric) for o in spec.sweep.objectives]
               + [column("params", "defense.name")] + [column("params", f"defense.params.{k}") for k in searched]
               + [column("tags", TAG_FRONT)])
    path = share_view(spec.tracking.uri, spec.tracking.experiment, f"raymia-{spec.name}", columns)
    how = "" if spec.tracking.uri.startswith(("http://", "https://")) else \
        f" (after `mlflow ui --backend-store-uri {spec.tracking.uri}`)"
    log.info("MLflow: the sweep's runs, with its objectives as columns: %s%s%s", ui_address(spec.tracking.uri), path, how)


def _log_earlier_trials(spec: SweepSpec, parent_id: str, trials: list[dict[str, Any]]) -> None:
    """A run for each trial the parent run lacks: a resumed sweep that logs to another MLflow store than
    before (or to a new parent run) has no run for the trials that finished before the interruption, and
    Tune runs those no more, so no callback opens one. Each is logged from its stored row and report."""
    from raymia.tracking import KIND_TRIAL, TAG_KIND, TAG_TRIAL_ID

    _, runs = _child_runs(spec, parent_id, {TAG_KIND: KIND_TRIAL})
    ended = {r.data.tags.get(TAG_TRIAL_ID) for r in runs if r.info.status in ("FINISHED", "FAILED")}
    for t in trials:
        if t.get("trial_id") is None or str(t["trial_id"]) in ended or t["status"] not in ("ok", "failed"):
            continue
        config = {"defense": t["defense"], **{f"{t['defense']}.{k}": v for k, v in (t.get("params") or {}).items()}}
        run = _open_trial_run(spec, parent_id, str(t["trial_id"]), t["trial"], config)
        ok = t["status"] == "ok"
        _close_trial_run(spec, run, t["status"], t if ok else {}, t.get("audit_dir") if ok else None, t.get("error"))


def _drop_orphan_runs(spec: SweepSpec, parent_id: str, trial_ids: set[str]) -> None:
    """Delete the trial runs of trials that are not among the sweep's: one opened for a trial that a kill
    cut short before Tune saved it (the resumed search proposes it again, under another id)."""
    from raymia.tracking import KIND_TRIAL, TAG_KIND, TAG_TRIAL_ID

    client, runs = _child_runs(spec, parent_id, {TAG_KIND: KIND_TRIAL})
    for r in runs:
        if r.data.tags.get(TAG_TRIAL_ID) not in trial_ids:
            client.delete_run(r.info.run_id)


def _mark_front(spec: SweepSpec, parent_id: str, front: list[int]) -> None:
    """Tag the front's trial runs (raymia.front = true), found by their trial number."""
    from raymia.tracking import TAG_FRONT, TAG_TRIAL

    client, runs = _child_runs(spec, parent_id)
    for r in runs:
        number = r.data.tags.get(TAG_TRIAL)
        client.set_tag(r.info.run_id, TAG_FRONT, "true" if number is not None and int(number) in front else "false")


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


def spec_of_trial(path: str | Path, number: int, overrides: list[str], output_dir: str | Path | None) -> AuditSpec:
    """The audit of finished trial `number` of the sweep the spec file at `path` describes (its defense
    setting), `overrides` applied on top: `--set plan.num_models=128` re-audits a front point with more
    shadows (`raymia audit --from-trial`, `raymia check --from-trial`)."""
    from raymia.resolve import load_spec, validate_spec
    from raymia.spec import apply_overrides

    sweep = load_spec(path, [], kind=SweepSpec)
    result = Path(output_dir or sweep.output_dir) / "sweeps" / sweep.name / "result.json"
    if not result.exists():
        raise SpecError(f"no finished sweep {sweep.name!r} (expected {result}); run raymia sweep first",
                        where="--from-trial")
    try:
        trials = json.loads(result.read_text())["trials"]
        trials = [t for t in trials if isinstance(t, dict) and "trial" in t]
    except (ValueError, KeyError, TypeError):
        raise SpecError("is not a sweep result raymia wrote (cut short or edited); running the sweep again "
                        "writes it from its stored trials", where=str(result)) from None
    trial = next((t for t in trials if t["trial"] == number and t.get("status") == "ok"), None)
    if trial is None:
        ok = [t["trial"] for t in trials if t.get("status") == "ok"]
        raise SpecError(f"no finished trial {number} in {result}; accepted: {ok}", where="--from-trial")
    return validate_spec(apply_overrides(audit_spec_of_trial(sweep, trial), overrides), AuditSpec, where=str(path))


def _final_audit(spec: SweepSpec, result: SweepResult, root: Path, parent_id: str | None,
                 pool=None) -> list[dict[str, Any]]:
    from raymia.audit import report_files, run_audit
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

            _drop_final_audit_runs(spec, parent_id, t["trial"])  # one run per final audit, the last one
            log_run(spec.tracking.uri, spec.tracking.experiment, run_name=f"{audit.name}-final",
                    params=audit.model_dump(mode="json"), metrics=res.flat_metrics(),
                    artifacts=report_files(res.out_dir),
                    tags={TAG_KIND: KIND_FINAL_AUDIT, TAG_TRIAL: str(t["trial"])}, parent_run_id=parent_id)
        rows.append({"trial": t["trial"], "defense": t["defense"], "params": t["params"],
                     "num_models": fa.num_models, "audit_dir": str(res.out_dir), **res.flat_metrics()})
    return rows


def _drop_final_audit_runs(spec: SweepSpec, parent_id: str, trial: int) -> None:
    """Delete the final-audit runs of `trial` under the parent run: those an interrupted attempt left (a
    Ctrl-C while its run was logged ends it KILLED) before this attempt logs its own."""
    from raymia.tracking import KIND_FINAL_AUDIT, TAG_KIND, TAG_TRIAL

    client, runs = _child_runs(spec, parent_id, {TAG_KIND: KIND_FINAL_AUDIT, TAG_TRIAL: str(trial)})
    for r in runs:
        client.delete_run(r.info.run_id)


def _collect(grid, metric_names: list[str]) -> list[dict[str, Any]]:
    """One row per trial, numbered and ordered as the console numbered them (`trial_N`, from the trial's
    folder name): a restored Tune lists its results in another order."""
    import re

    def number(i: int, r) -> int:
        m = re.match(r"trial_(\d+)_", Path(str(getattr(r, "path", "") or "")).name)
        return int(m.group(1)) if m else i + 1

    trials = []
    for i, r in sorted(enumerate(grid), key=lambda ir: number(*ir)):
        defense, params = split_config(dict(r.config or {}))
        row: dict[str, Any] = {"trial": number(i, r), "trial_id": (r.metrics or {}).get("trial_id"),
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
    print_front(spec.name, result.trials, spec.sweep.objectives, result.front_trials, f"-> {result.out_dir}",
                hypervolume=result.hypervolume, reference=result.hypervolume_reference, show_hypervolume=True)
