"""MLflow: one run per audit, a parent run per sweep with one child run per trial."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from raymia.errors import uninterruptible

log = logging.getLogger("raymia")

# The MLflow tags raymia sets on its runs (and `raymia pareto` reads back): their names live here only.
TAG_KIND = "raymia.kind"  # what the run is: one of the KIND_* values below
TAG_PARENT = "raymia.parent"  # a child run's sweep parent run id (beside MLflow's own MLFLOW_PARENT_TAG)
TAG_TRIAL_ID = "raymia.trial_id"  # a trial run's Ray Tune trial id
TAG_TRIAL = "raymia.trial"  # a trial's number: the one the console, front.md, pareto.png and result.json use
TAG_FRONT = "raymia.front"  # "true" on the trial runs of the sweep's (feasible) Pareto front
TAG_STATUS = "raymia.status"  # a trial run's outcome: its status in the sweep's result.json, ok or failed
TAG_DEFENSE = "raymia.defense"  # a trial run's defense
TAG_ERROR = "raymia.error"  # a failed trial's error
TAG_FINGERPRINT = "raymia.fingerprint"  # an audit run's signal fingerprint
MLFLOW_PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests a child run under its parent in the UI
MLFLOW_NOTE_TAG = "mlflow.note.content"  # MLflow's own: a run's description (markdown) in the UI
# MLflow 3 opens an experiment without this tag in its GenAI view (traces); raymia's are model development
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
KIND_AUDIT, KIND_SWEEP, KIND_TRIAL, KIND_FINAL_AUDIT = "audit", "sweep", "trial", "final_audit"


def tag_equals(tag: str, value: str) -> str:
    """An MLflow search filter: the runs whose tag `tag` is `value`."""
    return f"tags.`{tag}` = '{value}'"


def trial_tags(trial_id: str, status: str, defense: str, error: str | None = None,
               number: int | str | None = None) -> dict[str, str]:
    """The tags of a sweep trial's child run (`raymia.parent` and MLflow's parent tag are added by
    `log_run`)."""
    tags = {TAG_KIND: KIND_TRIAL, TAG_TRIAL_ID: trial_id, TAG_STATUS: status, TAG_DEFENSE: defense}
    if number is not None:
        tags[TAG_TRIAL] = str(number)
    if error:
        tags[TAG_ERROR] = error[:5000]
    return tags


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [x, y]} -> {"a.b": 1, "c.0": x, "c.1": y}; empty containers kept as "[]"/"{}"."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        if not d and prefix:
            out[prefix] = "{}"
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list | tuple):
        if not d and prefix:
            out[prefix] = "[]"
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = d
    return out


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Only finite numbers are logged: 'n/a' levels (None) and NaN are left out."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, int | float) and math.isfinite(v):
            out[k] = float(v)
    return out


HEALTH_TIMEOUT_S = 5.0


SHARED_VIEW_TAG = "mlflow.sharedViewState."  # MLflow's own: a runs-table view (columns, filter, sort) by key


def column(kind: str, key: str) -> str:
    """A runs-table column as MLflow's UI names it: metrics.`lira_online/auc`, params.`defense.name`, ..."""
    return f"{kind}.`{key}`"


def share_view(uri: str, experiment: str, key: str, columns: list[str], order_by: str = "attributes.start_time") -> str:
    """Store a runs-table view on the experiment (MLflow's shared view state: these columns, oldest run
    first) and return the UI path that opens it in the classic runs view (MLflow 3 opens experiments in its
    GenAI view otherwise)."""
    from mlflow.tracking import MlflowClient

    _, exp_id = _setup(uri, experiment)
    state = {"selectedColumns": columns, "orderByKey": order_by, "orderByAsc": True}
    MlflowClient(uri).set_experiment_tag(exp_id, SHARED_VIEW_TAG + key, json.dumps(state))
    return f"#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey={key}"


def ui_address(uri: str) -> str:
    """Where a user opens the MLflow UI of this store: the tracking server itself, or `mlflow ui`'s default."""
    return uri.rstrip("/") + "/" if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000/"


_HINT = "start it, fix tracking.uri, or set tracking.enabled: false (results are written to disk either way)"


def check_reachable(uri: str, experiment: str) -> None:
    """Before any training: a tracking server that does not answer, or a database that cannot be opened, is
    one RaymiaError naming tracking.uri (the run would otherwise train, then fail to log, after MLflow's own
    retries: minutes)."""
    from raymia.errors import RaymiaError, first_line

    probe_tracking(uri)
    try:
        _setup(uri, experiment)
    except Exception as e:  # a database or server that refuses: one line
        raise RaymiaError(f"MLflow cannot open {uri}: {first_line(e)}; {_HINT}", where="tracking.uri") from None


def probe_tracking(uri: str) -> None:
    """The quick half of `check_reachable`, without MLflow's import: an http(s) tracking server that does not
    answer is one RaymiaError naming tracking.uri at once."""
    probe_server(uri, _HINT, where="tracking.uri")


def probe_server(uri: str, hint: str, where: str) -> None:
    """An http(s) tracking URI's /health must answer 200 within HEALTH_TIMEOUT_S (MLflow's own client would
    retry for minutes); other URIs pass."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    from raymia.errors import RaymiaError

    try:
        answer = requests.get(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S)
    except requests.RequestException as e:
        reason = type(e).__name__ + (": connection refused" if "refused" in str(e).lower() else "")
        raise RaymiaError(f"the MLflow tracking server at {uri} cannot be reached ({reason}); {hint}",
                          where=where) from None
    if answer.status_code != 200:
        raise RaymiaError(f"{uri}/health answers HTTP {answer.status_code}: not a healthy MLflow tracking "
                          f"server; {hint}", where=where)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local SQLite store (<its folder>/mlartifacts/
    <experiment>), not in the ./mlruns of whatever folder the run started in; None (the server's or the
    store's default) for other stores. The experiment's name is made one folder name (a name such as
    "/Users/alice/x" or "../x" must not place files outside mlartifacts/)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    if str(db) in ("", ":memory:"):
        return None
    folder = re.sub(r"[^A-Za-z0-9_.\-]", "_", experiment).lstrip(".") or "_"
    return (db.resolve().parent / "mlartifacts" / folder).as_uri()


def context_tags() -> dict[str, str]:
    """MLflow's own context tags of a run started here (source, user, git commit where there is one), as its
    fluent API would set them; MlflowClient.create_run sets none."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {k: str(v) for k, v in resolve_tags().items()}
    except Exception:  # a context provider failing must not stop the run
        return {}


def _setup(uri: str, experiment: str):
    """(a client of `uri`, the id of `experiment` there, created if new). Through a client of its own: the
    caller's global MLflow tracking URI (`mlflow.set_tracking_uri`, MLFLOW_TRACKING_URI) is left alone."""
    from mlflow.tracking import MlflowClient

    _new_sqlite_store_whole(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(experiment, artifact_location=artifact_location(uri, experiment),
                                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    else:
        exp_id = exp.experiment_id
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return client, exp_id


def _new_sqlite_store_whole(uri: str) -> None:
    """A local SQLite store that does not exist yet is made under a hidden temporary name and linked into
    place once MLflow has created its tables. MLflow creates them through dozens of migrations, not in one
    transaction: a Ctrl-C or a kill among them left a database that MLflow cannot open again ("table
    _alembic_tmp_trace_tags already exists", found by benchmarks/kill_points.py). Now it leaves a temporary
    file, which the next creation removes once its process is gone."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if str(db) in ("", ":memory:") or db.exists() or not db.parent.is_dir():
        return  # an existing store, or a folder that is not there (MLflow's own error says so)
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from raymia.storage import _dead_writes, _tmp_name

    for dead in _dead_writes(db.name, os.listdir(db.parent)):
        for leftover in (dead, dead + "-journal"):  # a killed creation's rollback journal too
            (db.parent / leftover).unlink(missing_ok=True)
    tmp = db.parent / _tmp_name(db.name)
    tmp_uri = f"sqlite:///{tmp}"
    try:
        # as MLflow's client makes a new store (the default experiment's artifacts under ./mlruns)
        store = SqlAlchemyStore(tmp_uri, os.environ.get("_MLFLOW_SERVER_ARTIFACT_ROOT",
                                                        DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH))
        # every connection to the file closed before it gets its name: SQLite's locks are per process and
        # file, and a stray connection closed later would drop the store's
        store.engine.dispose()
        getattr(SqlAlchemyStore, "_engine_map", {}).pop(tmp_uri, None)
        try:
            os.link(tmp, db)  # never over a store another process made meanwhile
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            if not db.exists():
                os.rename(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)


def log_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    metrics: dict[str, Any],
    artifacts: Iterable[Path] = (),
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    start_time: float | None = None,
    dataset: tuple[str, str] | None = None,
    tree: Path | None = None,
) -> str:
    """Log one finished run (params, finite metrics, artifact files, the folder `tree` as `close_run` does,
    MLflow's context tags); returns its run id. `start_time` (seconds since the epoch) is when the work began;
    `dataset` (name, fingerprint) is logged as the run's input."""
    rid = open_run(uri, experiment, run_name, params, tags, parent_run_id, start_time, dataset)
    close_run(uri, rid, metrics, artifacts, tree=tree)
    return rid


def open_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None,
             parent_run_id: str | None = None, start_time: float | None = None,
             dataset: tuple[str, str] | None = None) -> str:
    """Create a RUNNING run (params, tags with MLflow's context tags, the data set as its input); returns its
    id. `close_run` ends it."""
    _, exp_id = _setup(uri, experiment)
    from mlflow.entities import Param

    client = _client(uri)
    all_tags = {**context_tags(), **(tags or {})}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_TAG] = parent_run_id
        all_tags[TAG_PARENT] = parent_run_id
    with uninterruptible():  # each database write whole: a stop that cut one short left SQLite locked
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags,
                                start_time=int(1000 * start_time) if start_time else None)
    rid = run.info.run_id
    try:
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        with uninterruptible():
            client.log_batch(rid, params=[Param(k, v) for k, v in flat.items()])
            if dataset is not None:
                log_dataset(client, rid, *dataset)
    except BaseException as e:  # a Ctrl-C too: no run stays RUNNING for good
        with uninterruptible():
            client.set_terminated(rid, _ended(e))
        raise
    return rid


def _client(uri: str):
    """A client of `uri` that ends runs quietly: MLflow writes two "View run/experiment at" lines to stdout
    each time a run on a tracking server ends (each sweep trial's too); raymia names the runs it logs in its
    own lines (`run_address`). A user's MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT is kept."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return MlflowClient(uri)


def run_address(uri: str, run_id: str) -> str:
    """Where the run is seen: its page in the tracking server's UI, or its id in a local store."""
    if not uri.startswith(("http://", "https://")):
        return f"run {run_id} in {uri}"
    try:
        exp_id = _client(uri).get_run(run_id).info.experiment_id
    except Exception:  # the run is logged: a server that stops answering now costs the link only
        return f"run {run_id} in {uri}"
    return f"{ui_address(uri)}#/experiments/{exp_id}/runs/{run_id}"


def _ended(e: BaseException) -> str:
    return "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"


def close_run(uri: str, run_id: str, metrics: dict[str, Any], artifacts: Iterable[Path] = (),
              status: str = "FINISHED", tags: dict[str, str] | None = None, tree: Path | None = None) -> None:
    """Log a run's finite metrics, artifact files (at the artifact root), the folder `tree` (its contents at
    the root, sub-folders kept) and tags, and end it with `status`."""
    from mlflow.entities import Metric, RunTag

    client = _client(uri)
    # whole, as in `open_run`: a stop inside MLflow's artifact copy made its own cleanup raise EBADF
    with uninterruptible():
        try:
            ts = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in finite_metrics(metrics).items()],
                             tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
            for a in artifacts:
                if Path(a).exists():
                    client.log_artifact(run_id, str(a))
            if tree is not None:
                client.log_artifacts(run_id, str(tree))
        except BaseException as e:  # a Ctrl-C (Python's KeyboardInterrupt) still lands anywhere
            client.set_terminated(run_id, _ended(e))
            raise
        client.set_terminated(run_id, status)


def log_dataset(client, run_id: str, name: str, digest: str) -> None:
    """The data set as the run's input, its digest the bank's fingerprint (what identifies the signals)."""
    from mlflow.entities import Dataset, DatasetInput

    client.log_inputs(run_id, datasets=[DatasetInput(Dataset(name=name, digest=digest, source_type="raymia",
                                                             source=json.dumps({"data": name})))])


def start_parent(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
                 dataset: tuple[str, str] | None = None) -> str:
    return open_run(uri, experiment, run_name, params, tags, dataset=dataset)


def finish_parent(uri: str, run_id: str, metrics: dict[str, Any], artifacts: Iterable[Path], status: str = "FINISHED",
                  tags: dict[str, str] | None = None) -> None:
    close_run(uri, run_id, metrics, artifacts, status, tags)


def drop_interrupted(uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> int:
    """Delete the runs named `run_name` with `tags` that are still RUNNING: an audit's run is open only while
    its report uploads, so one left RUNNING is what a kill cut short there; the re-run's run replaces it.
    Returns how many."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    where = " and ".join([tag_equals("mlflow.runName", run_name), *(tag_equals(k, v) for k, v in tags.items()),
                          "attributes.status = 'RUNNING'"])
    left = client.search_runs([exp.experiment_id], filter_string=where, max_results=1000)
    for run in left:
        client.delete_run(run.info.run_id)
    return len(left)


def end_running_children(uri: str, parent_id: str, status: str = "KILLED") -> int:
    """End the child runs of `parent_id` that are still RUNNING (an interrupted sweep's trials) with
    `status`, so the UI does not show them as running; a resumed sweep replaces them. Returns how many."""
    client = _client(uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    running = client.search_runs([experiment_id], filter_string=f"{tag_equals(MLFLOW_PARENT_TAG, parent_id)} and "
                                                                "attributes.status = 'RUNNING'")
    for run in running:
        with uninterruptible():
            client.set_terminated(run.info.run_id, status)
    return len(running)
