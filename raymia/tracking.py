"""MLflow: one run per audit, a parent run per sweep with one child run per trial."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("raymia")

# The MLflow tags raymia sets on its runs (and `raymia pareto` reads back): their names live here only.
TAG_KIND = "raymia.kind"  # what the run is: one of the KIND_* values below
TAG_PARENT = "raymia.parent"  # a child run's sweep parent run id (beside MLflow's own MLFLOW_PARENT_TAG)
TAG_TRIAL_ID = "raymia.trial_id"  # a trial run's Ray Tune trial id
TAG_TRIAL = "raymia.trial"  # a final audit's trial number (in the sweep's front table)
TAG_STATUS = "raymia.status"  # a trial run's outcome: its status in the sweep's result.json, ok or failed
TAG_DEFENSE = "raymia.defense"  # a trial run's defense
TAG_ERROR = "raymia.error"  # a failed trial's error
TAG_FINGERPRINT = "raymia.fingerprint"  # an audit run's signal fingerprint
MLFLOW_PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests a child run under its parent in the UI
KIND_AUDIT, KIND_SWEEP, KIND_TRIAL, KIND_FINAL_AUDIT = "audit", "sweep", "trial", "final_audit"


def tag_equals(tag: str, value: str) -> str:
    """An MLflow search filter: the runs whose tag `tag` is `value`."""
    return f"tags.`{tag}` = '{value}'"


def trial_tags(trial_id: str, status: str, defense: str, error: str | None = None) -> dict[str, str]:
    """The tags of a sweep trial's child run (`raymia.parent` and MLflow's parent tag are added by
    `log_run`)."""
    tags = {TAG_KIND: KIND_TRIAL, TAG_TRIAL_ID: trial_id, TAG_STATUS: status, TAG_DEFENSE: defense}
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


def check_reachable(uri: str, experiment: str) -> None:
    """Before any training: a tracking server that does not answer, or a database that cannot be opened, is
    one RaymiaError naming tracking.uri (the run would otherwise train, then fail to log, after MLflow's own
    retries: minutes)."""
    from raymia.errors import RaymiaError

    hint = "start it, fix tracking.uri, or set tracking.enabled: false (results are written to disk either way)"
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            answer = requests.get(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S)
        except requests.RequestException as e:
            reason = type(e).__name__ + (": connection refused" if "refused" in str(e).lower() else "")
            raise RaymiaError(f"the MLflow tracking server at {uri} cannot be reached ({reason}); {hint}",
                              where="tracking.uri") from None
        if answer.status_code != 200:
            raise RaymiaError(f"{uri}/health answers HTTP {answer.status_code}: not a healthy MLflow tracking "
                              f"server; {hint}", where="tracking.uri")
    try:
        _setup(uri, experiment)
    except Exception as e:  # a database or server that refuses: one line
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise RaymiaError(f"MLflow cannot open {uri}: {first}; {hint}", where="tracking.uri") from None


def _setup(uri: str, experiment: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else mlflow.create_experiment(experiment)
    return mlflow, exp_id


def log_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    metrics: dict[str, Any],
    artifacts: Iterable[Path] = (),
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Log one finished run (params, finite metrics, artifact files); returns its run id."""
    mlflow, exp_id = _setup(uri, experiment)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[MLFLOW_PARENT_TAG] = parent_run_id
        all_tags[TAG_PARENT] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    rid = run.info.run_id
    try:
        from mlflow.entities import Metric, Param

        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        ts = int(time.time() * 1000)
        client.log_batch(
            rid,
            metrics=[Metric(k, v, ts, 0) for k, v in finite_metrics(metrics).items()],
            params=[Param(k, v) for k, v in flat.items()],
        )
        for a in artifacts:
            if Path(a).exists():
                client.log_artifact(rid, str(a))
        client.set_terminated(rid, "FINISHED")
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    return rid


def start_parent(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    mlflow, exp_id = _setup(uri, experiment)
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat.items()])
    return run.info.run_id


def finish_parent(uri: str, run_id: str, metrics: dict[str, Any], artifacts: Iterable[Path], status: str = "FINISHED") -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    ts = int(time.time() * 1000)
    m = finite_metrics(metrics)
    if m:
        client.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in m.items()])
    for a in artifacts:
        if Path(a).exists():
            client.log_artifact(run_id, str(a))
    client.set_terminated(run_id, status)
