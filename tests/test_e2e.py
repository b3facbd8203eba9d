"""End to end with real components: a local Ray instance, Ray Train workers, real training on digits,
a real SQLite MLflow store, and the CLI in a subprocess."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from raymia.audit import run_audit
from raymia.resolve import load_spec
from raymia.spec import AuditSpec, SweepSpec
from raymia.storage import open_root
from tests.conftest import chromium_page_url, tiny_spec_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def first_audit(ray_session, workdir):
    spec = AuditSpec.model_validate(tiny_spec_dict(workdir))
    return spec, run_audit(spec)


def _mlflow_client(workdir):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{workdir}/mlflow.db")


def test_audit_leaks_on_an_overfit_mlp(first_audit):
    spec, res = first_audit
    assert not res.reused_signals
    assert res.utility["train_accuracy"] > 0.99  # overfit
    assert 0.85 < res.utility["test_accuracy"] < 0.99
    assert res.utility["generalization_gap"] > 0.02
    online = res.attacks["lira_online"]
    assert online["auc"] > 0.6, online  # clearly above chance
    assert res.attacks["loss"]["auc"] > 0.52
    # ~150 non-members: TPR@1%FPR is resolvable, TPR@0.1%FPR is not
    assert online["tpr_fpr_0.01"] is not None and online["tpr_fpr_0.001"] is None
    saved = json.loads((res.out_dir / "result.json").read_text())
    assert saved["fingerprint"] == spec.fingerprint()
    assert saved["attacks"]["lira_online"]["auc"] == pytest.approx(online["auc"])
    assert saved["utility"]["test_accuracy"] == pytest.approx(res.utility["test_accuracy"])
    png = (res.out_dir / "roc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_audit_is_logged_to_mlflow(first_audit, workdir):
    spec, res = first_audit
    client = _mlflow_client(workdir)
    exp = client.get_experiment_by_name("raymia-tests")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`raymia.fingerprint` = '{res.fingerprint}'")
    assert runs, "no MLflow run for the audit"
    run = runs[-1]
    assert run.data.params["plan.num_models"] == "8"
    assert run.data.params["model.params.hidden.0"] == "256"
    assert run.data.params["defense.name"] == "none"
    assert run.data.metrics["lira_online/auc"] == pytest.approx(res.attacks["lira_online"]["auc"])
    assert run.data.metrics["test_accuracy"] == pytest.approx(res.utility["test_accuracy"])
    assert "lira_online/tpr_fpr_0.001" not in run.data.metrics  # n/a is not logged as a number
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"result.json", "roc.png", "spec.yaml"} <= names
    # the spec artifact runs the same audit again: same fingerprint, so its stored signals are reused
    local = client.download_artifacts(run.info.run_id, "spec.yaml", str(workdir / "artifact"))
    assert load_spec(local, kind=AuditSpec).fingerprint() == res.fingerprint
    assert load_spec(local, kind=AuditSpec) == load_spec(res.out_dir / "spec.yaml", kind=AuditSpec)


def test_a_run_left_open_by_a_kill_is_replaced_by_the_reruns(first_audit, workdir):
    """A kill while the audit's report uploads leaves its MLflow run RUNNING for good; the re-run's run
    replaces it (one run of that attempt, none left running), and finished runs of the audit stay."""
    from raymia.audit import run_name
    from raymia.tracking import KIND_AUDIT, TAG_FINGERPRINT, TAG_KIND, open_run

    spec, res = first_audit
    client = _mlflow_client(workdir)
    exp_id = client.get_experiment_by_name("raymia-tests").experiment_id

    def runs(status: str) -> set[str]:
        found = client.search_runs([exp_id], filter_string=f"tags.`raymia.fingerprint` = '{res.fingerprint}' and "
                                                           f"attributes.status = '{status}'")
        return {r.info.run_id for r in found}

    finished = runs("FINISHED")
    cut_short = open_run(spec.tracking.uri, "raymia-tests", run_name(spec), params={},
                         tags={TAG_KIND: KIND_AUDIT, TAG_FINGERPRINT: res.fingerprint})
    other = open_run(spec.tracking.uri, "raymia-tests", "another-audit", params={}, tags={TAG_KIND: KIND_AUDIT})
    run_audit(spec, console=False)
    assert runs("RUNNING") == set()
    assert client.get_run(cut_short).info.lifecycle_stage == "deleted"
    assert len(runs("FINISHED") - finished) == 1 and finished <= runs("FINISHED")
    assert client.get_run(other).info.status == "RUNNING"  # another audit's run is not this one's to end
    client.set_terminated(other, "KILLED")


def test_a_new_mlflow_store_cut_short_while_mlflow_creates_it_leaves_no_database(tmp_path, monkeypatch):
    """MLflow creates a new SQLite store's tables through dozens of migrations, not in one transaction: a stop
    among them left a database it cannot open again (found by kill_points.py, `table _alembic_tmp_trace_tags
    already exists`). The store is made under a temporary name instead: a stop leaves no database and no
    temporary file, and the next run makes the store whole."""
    import os

    import mlflow.store.db.utils as db_utils

    from raymia.tracking import check_reachable

    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def stopped(engine):
        raise KeyboardInterrupt  # a Ctrl-C after the initial tables, before MLflow's migrations

    with monkeypatch.context() as m:
        m.setattr(db_utils, "_upgrade_db", stopped)
        with pytest.raises(KeyboardInterrupt):
            check_reachable(uri, "cut-short")
    assert os.listdir(tmp_path) == []
    # what a kill of a creation leaves (its temporary file and rollback journal) goes once its process is gone
    from raymia.storage import _HOST

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    for name in (f".mlflow.db.{_HOST}.{gone}.ab12cd34.tmp", f".mlflow.db.{_HOST}.{gone}.ab12cd34.tmp-journal"):
        (tmp_path / name).write_bytes(b"cut short")
    check_reachable(uri, "cut-short")
    assert os.listdir(tmp_path) == ["mlflow.db"]
    client = _mlflow_client(tmp_path)
    assert client.get_experiment_by_name("cut-short") is not None
    client.create_run(client.get_experiment_by_name("cut-short").experiment_id)  # the whole schema is there


def test_a_report_cut_short_leaves_no_result_json(first_audit, workdir, monkeypatch):
    """result.json is the report's last file: a sweep's resume reuses a trial folder that holds one, so an
    audit killed while it wrote the others (here: interrupted at vulnerable.csv) must leave none behind."""
    import raymia.report.records as records
    from raymia.sweep import _finished_trial

    spec, res = first_audit
    run_dir = workdir / "cut-short"

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(records, "write_vulnerable", killed)
    with pytest.raises(KeyboardInterrupt):
        run_audit(spec, track=False, console=False, run_dir=run_dir, page=False)
    assert (run_dir / "records.parquet").is_file() and not (run_dir / "result.json").exists()
    assert _finished_trial(open_root(run_dir), spec) is None
    monkeypatch.undo()
    run_audit(spec, track=False, console=False, run_dir=run_dir, page=False)
    assert _finished_trial(open_root(run_dir), spec)["metrics"]["lira_online/auc"] == res.attacks["lira_online"]["auc"]
    assert not list(run_dir.glob(".*.tmp"))


def test_a_damaged_spec_yaml_in_the_report_folder_is_replaced(first_audit, workdir, caplog):
    """A report's spec.yaml cut short or damaged (not UTF-8, a bare word) is replaced by the re-run's: it
    was a traceback after the attacks had run."""
    from raymia.audit import _say_replaced

    spec, res = first_audit
    run_dir = workdir / "damaged-spec"
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text("nam")
    _say_replaced(run_dir / "spec.yaml", spec)
    (run_dir / "spec.yaml").write_bytes(b"\xff\xfe name: x")
    caplog.set_level(logging.WARNING, logger="raymia")
    again = run_audit(spec, track=False, console=False, run_dir=run_dir, page=False)
    assert again.attacks == res.attacks and "replaced" not in caplog.text
    assert load_spec(run_dir / "spec.yaml", kind=AuditSpec).fingerprint() == res.fingerprint


def test_rerun_reuses_signals_and_a_lost_pack_is_rebuilt_alone(first_audit, workdir, caplog, monkeypatch):
    import raymia.audit as audit

    spec, res = first_audit
    caplog.set_level(logging.INFO, logger="raymia")
    t0 = time.perf_counter()
    again = run_audit(spec, track=False, console=False)
    assert again.reused_signals
    assert time.perf_counter() - t0 < 10  # no training, no worker group
    assert "reusing stored signals" in caplog.text
    assert again.attacks == res.attacks and again.utility == res.utility
    assert "report: " not in caplog.text  # a short audit writes its report without a word

    monkeypatch.setattr(audit, "ATTACK_PROGRESS_AFTER_S", 0.0)  # as if the audit had run long
    caplog.clear()
    run_audit(spec, track=False, console=False)
    assert f"; writing result.json, records.parquet and the figures to {res.out_dir}" in caplog.text
    monkeypatch.undo()

    # Lose one of the two packs (as a killed run would): only that pack is retrained, numbers unchanged.
    pack1 = workdir / "runs" / "signals" / res.fingerprint / "k4-pack-00001.npz"
    pack1.write_bytes(pack1.read_bytes()[:-10])
    caplog.clear()
    rebuilt = run_audit(spec, track=False, console=False)
    assert "reusing 1 of 2 stored packs" in caplog.text
    assert rebuilt.attacks["lira_online"]["auc"] == pytest.approx(res.attacks["lira_online"]["auc"], abs=1e-6)


def test_the_reported_numbers_are_the_mean_and_std_over_the_targets(first_audit, workdir):
    """The headline numbers over 3 targets (with 2, a median would pass for a mean): each attack metric and
    each utility metric is np.mean over the per-target values, its spread np.std (ddof 0, as docs/validity.md
    says), and the bank's test accuracy is over every bank model, not the targets only."""
    spec, _ = first_audit
    d = tiny_spec_dict(workdir, plan={**spec.plan.model_dump(), "targets": [0, 3, 5]}, tracking={"enabled": False})
    res = run_audit(AuditSpec.model_validate(d))
    assert res.reused_signals and res.targets == [0, 3, 5]
    flat = res.flat_metrics()
    for a, runs in res.per_target.items():
        for k in runs[0]:
            vals = [r[k] for r in runs]
            if any(v is None for v in vals):
                assert res.attacks[a][k] is None
                continue
            assert res.attacks[a][k] == pytest.approx(np.mean(vals), abs=1e-12)
            assert res.attacks_std[a][k] == pytest.approx(np.std(vals), abs=1e-12)
            assert flat[f"std/{a}/{k}"] == pytest.approx(np.std(vals), abs=1e-12)
        assert len({round(r["auc"], 9) for r in runs}) == 3  # three different models: a spread to average
    import raymia
    from raymia.metrics import accuracy

    sig = raymia.read_signals(res)
    test = [accuracy(sig.pop_logits[t, 0], sig.pop_labels) for t in res.targets]
    assert res.utility["test_accuracy"] == pytest.approx(np.mean(test), abs=1e-12)
    assert res.utility_std["test_accuracy"] == pytest.approx(np.std(test), abs=1e-12) and np.std(test) > 0
    every = [accuracy(sig.pop_logits[m, 0], sig.pop_labels) for m in range(sig.num_models)]
    assert res.utility["bank_test_accuracy"] == pytest.approx(np.mean(every), abs=1e-12)
    saved = res.to_json()  # what each target's rates rest on, for the report's subtitle
    assert saved["members_per_target"] == [int(sig.keep[t].sum()) for t in res.targets]
    assert saved["nonmembers_per_target"] == [300 - int(sig.keep[t].sum()) for t in res.targets]


def test_cli_audit_reuses_signals_and_prints_the_table(first_audit, workdir):
    spec, res = first_audit
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(workdir)))
    out = subprocess.run([sys.executable, "-m", "raymia", "audit", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "reusing stored signals" in out.stderr
    assert "lira_online" in out.stdout and f"{res.attacks['lira_online']['auc']:.4f}" in out.stdout
    assert f"[{res.fingerprint}]" in out.stdout  # brackets are text, not console markup (it ate "[b3...]")
    # ~150 non-members: TPR@1%FPR is a column, the levels no attack resolves are named once below the table
    assert "TPR@1%FPR" in out.stdout and "TPR@0.1%FPR ┃" not in out.stdout
    assert "n/a for every attack, not shown: TPR@0.1%FPR, TPR@0.01%FPR, TPR@0.001%FPR" in out.stdout


def _raymia(*args: str) -> list[str]:
    return [sys.executable, "-m", "raymia", *args]


def _run_together(cmds: dict[str, list[str]], logs, timeout: float) -> dict[str, subprocess.CompletedProcess]:
    """Run commands side by side, each as `subprocess.run(cmd, capture_output=True, text=True)` would (their
    output goes to files under `logs`: pipes read one at a time could fill up and block the others)."""
    procs = {}
    try:
        for key, cmd in cmds.items():
            with open(logs / f"{key}.out", "w") as out, open(logs / f"{key}.err", "w") as err:
                procs[key] = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        for p in procs.values():
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return {key: subprocess.CompletedProcess(p.args, p.returncode, (logs / f"{key}.out").read_text(),
                                             (logs / f"{key}.err").read_text()) for key, p in procs.items()}


@pytest.fixture(scope="module")
def console_runs(workdir):
    """The console tests' three `raymia` runs, each on a fresh bank (so its workers print), run side by side:
    each process starts its own local Ray instance and Train worker group(s), and most of a run is that
    start-up's latency, which the other runs' work fills. Each run has its own MLflow store."""
    progress = tiny_spec_dict(workdir, name="progress", seed=11, train={"epochs": 5, "batch_size": 64},
                              tracking={"uri": f"sqlite:///{workdir}/progress.db", "experiment": "raymia-tests"})
    quiet = {**progress, "seed": 12,  # a fresh bank again, quiet
             "tracking": {"uri": f"sqlite:///{workdir}/quiet.db", "experiment": "raymia-tests"}}
    console = tiny_spec_dict(workdir, name="console", seed=13, train={"epochs": 5, "batch_size": 64},
                             tracking={"uri": f"sqlite:///{workdir}/console.db", "experiment": "raymia-tests"})
    console["sweep"] = {"defense": "hamp", "num_trials": 1, "max_concurrent": 1}
    for name, raw in (("progress", progress), ("quiet", quiet), ("console", console)):
        (workdir / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return _run_together({
        "progress": _raymia("audit", str(workdir / "progress.yaml")),
        "quiet": _raymia("-q", "audit", str(workdir / "quiet.yaml")),
        "console": _raymia("sweep", str(workdir / "console.yaml")),
    }, workdir, timeout=400)


# what a healthy run's console never shows: Ray ERROR lines (e.g. Train's PreemptionWatcher), its merged
# "[repeated Nx]" lines and colour codes, its notice that token authentication is on
HEALTHY_RUN_NOISE = ("ERROR", " E ", "PreemptionWatcher", "[repeated", "\x1b[", "Token authentication is enabled")


def test_cli_progress_lines_show_once_at_the_drivers_level(console_runs):
    """The bank's progress reaches the console once per line as `[raymia] ...`, Ray's own INFO lines stay
    off it, and -q silences the pool's workers too."""
    out = console_runs["progress"]
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert text.count("[raymia] training 2 pack(s) on 1 warm worker(s)") == 1
    assert text.count("[raymia] worker 0: pack 0 done (1/2") == 1 and text.count("pack 1 done (2/2") == 1
    lines = text.splitlines()
    how = [i for i, ln in enumerate(lines) if ln.startswith("[raymia] bank: ")]  # how the bank trains
    first = next(i for i, ln in enumerate(lines) if "pack 0 done (1/2" in ln)
    assert len(how) == 1 and how[0] < first, lines  # the driver says it before the pack that decided it
    assert "Requesting resources" not in text and "Started training worker group" not in text
    for noise in HEALTHY_RUN_NOISE:
        assert noise not in text, (noise, text[-3000:])

    quiet = console_runs["quiet"]  # a fresh bank too: its workers train, and print nothing
    assert quiet.returncode == 0, quiet.stderr
    assert "[raymia]" not in quiet.stdout + quiet.stderr and "lira_online" in quiet.stdout


def test_tune_upload_racing_its_own_temporary_file_is_no_error_but_other_failures_are():
    """Tune uploads its experiment folder in a background thread while it saves its searcher's state there
    through a hidden temporary file: an upload that lists the file before its rename fails, and Tune logs an
    ERROR with the traceback (once in three suite runs on two cores). That race, and only it, is dropped."""
    import ray.tune.execution.experiment_state as tune_state

    from raymia.sweep import _quiet_tune_summaries

    _quiet_tune_summaries()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    tune_state.logger.addHandler(handler)  # the logger Tune's ERROR goes to
    staging = "/tmp/ray/session_x/artifacts/2026-12-06_00-05-29/sweep-console/driver_artifacts"
    cases = [
        (FileNotFoundError(2, f"Failed to open local file '{staging}/.a1754a29-c68d-4cbe-bfcd-5c33d3716033-tmp-"
                              "searcher-state-2026-12-06_00-05-29.pkl'. Detail: [errno 2] No such file or directory"),
         False),
        (FileNotFoundError(2, f"Failed to open local file '{staging}/experiment_state-2026.json'"), True),
        (PermissionError(13, "Permission denied: '/shared/sweeps/ray/sweep-console'"), True),
    ]
    try:
        for exc, shown in cases:
            seen.clear()
            try:
                raise exc
            except OSError:  # as Tune logs it (experiment_state.wait_for_sync)
                tune_state.logger.error("Saving experiment state to storage at '/runs/ray/sweep-console' failed "
                                        "with exception: ", exc_info=True)
            assert bool(seen) == shown, (exc, seen)
    finally:
        tune_state.logger.removeHandler(handler)
    # the same race, reported by the syncer's next upload as a warning holding the traceback
    import ray.train._internal.syncer as syncer

    syncer.logger.addHandler(handler)
    try:
        for exc, shown in cases:
            seen.clear()
            syncer.logger.warning(f"Last sync command failed with the following error:\nTraceback (most recent call "
                                  f"last):\n  ...\n{type(exc).__name__}: {exc}")
            assert bool(seen) == shown, (exc, seen)
    finally:
        syncer.logger.removeHandler(handler)


def test_cli_sweep_console_is_raymias_lines(console_runs):
    """`raymia sweep` shows each trial's progress once, as `[raymia] trial N: ...` lines numbered as the
    front's table numbers trials, and none of Tune's, Optuna's or MLflow's own INFO output."""
    out = console_runs["console"]
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    for n in (0, 1):
        assert text.count(f"[raymia] trial {n}: worker 0: pack 1 done (2/2") == 1
        assert text.count(f"[raymia] trial {n} done (") == 1
    assert "trial 0 done (baseline): none" in text and "trial 1 done (1/1): hamp" in text
    for noise in ("Configuration for experiment", "View detailed results", "A new study created", "INFO mlflow",
                  "Requesting resources", *HEALTHY_RUN_NOISE):
        assert noise not in text, (noise, text[-3000:])


def test_sweep_writes_parent_and_child_runs(first_audit, workdir, caplog):
    from raymia.sweep import run_sweep

    caplog.set_level(logging.INFO, logger="raymia")

    d = tiny_spec_dict(workdir, name="tinysweep")
    d["sweep"] = {"defense": "hamp", "num_trials": 1, "max_concurrent": 2,
                  "space": {"output_modification": {"choices": [True]}},
                  "final_audit": {"num_models": 8}}  # same bank size: the re-audit reuses the trials' signals
    (workdir / "tinysweep.yaml").write_text(yaml.safe_dump(d))
    spec = SweepSpec.model_validate(d)
    result = run_sweep(spec, console=False)
    assert [t["defense"] for t in result.trials] == ["none", "hamp"]
    # the progress lines number the trials as the front's table and result.json do
    assert "trial 0 done (" in caplog.text and "trial 1 done (" in caplog.text
    assert caplog.text.split("trial 0 done (")[1].split("\n")[0].split(": ", 1)[1].startswith("none")
    assert caplog.text.split("trial 1 done (")[1].split("\n")[0].split(": ", 1)[1].startswith("hamp")
    assert all(t["status"] == "ok" for t in result.trials)
    none, hamp = result.trials
    # The undefended trial has the first audit's fingerprint: its signals are reused, numbers equal.
    assert none["lira_online/auc"] == pytest.approx(first_audit[1].attacks["lira_online"]["auc"])
    assert 0.3 <= hamp["params"]["gamma"] <= 0.99 and hamp["params"]["output_modification"] is True
    # HAMP's output modification hides membership: LiRA is far weaker than on the undefended model.
    assert hamp["lira_online/auc"] < none["lira_online/auc"] - 0.05
    assert result.front and all(0 <= i < 2 for i in result.front)
    saved = json.loads((result.out_dir / "result.json").read_text())
    assert len(saved["trials"]) == 2 and saved["front"]
    assert (result.out_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    client = _mlflow_client(workdir)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["raymia.kind"] == "sweep" and parent.info.status == "FINISHED"
    assert parent.data.metrics["num_trials"] == 2
    assert {"result.json", "pareto.png", "front.md", "spec.yaml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    assert load_spec(result.out_dir / "spec.yaml", kind=SweepSpec) == spec
    exp = parent.info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                                       "and tags.`raymia.kind` = 'trial'")
    assert len(children) == 2
    by_def = {c.data.params["defense.name"]: c for c in children}
    assert set(by_def) == {"none", "hamp"}
    assert by_def["hamp"].data.metrics["lira_online/auc"] == pytest.approx(hamp["lira_online/auc"])
    assert "defense.params.gamma" in by_def["hamp"].data.params
    # each trial's spec artifact is the audit of that trial (its HAMP setting)
    local = client.download_artifacts(by_def["hamp"].info.run_id, "spec.yaml", str(workdir / "trial-artifact"))
    trial_spec = load_spec(local, kind=AuditSpec)
    assert trial_spec.defense.name == "hamp" and trial_spec.defense.params["gamma"] == hamp["params"]["gamma"]

    # MLflow explains the sweep: the classic runs view, trial runs named and tagged as the console numbers
    # them, open while their trial ran, the front tagged, context tags, the searched space on the parent,
    # front.md as its description, the data set as input with the bank's fingerprint, interactive figures
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(exp).artifact_location.startswith((workdir / "mlartifacts").as_uri())
    by_num = {int(c.data.tags["raymia.trial"]): c for c in children}
    assert {n: c.info.run_name for n, c in by_num.items()} == {0: "trial 0", 1: "trial 1"}
    assert by_num[0].info.start_time <= by_num[1].info.start_time  # created in trial order
    # open while its audit ran: the HAMP trial trains its bank (the undefended one reuses the first
    # audit's signals and may finish in well under a second)
    assert by_def["hamp"].info.end_time - by_def["hamp"].info.start_time > 200
    assert all(c.info.start_time <= c.info.end_time for c in children)
    assert {n for n, c in by_num.items() if c.data.tags["raymia.front"] == "true"} == set(result.front_trials)
    assert all(c.data.tags.get("mlflow.user") and c.data.tags.get("mlflow.source.name") for c in children)
    assert "| trial | defense |" in parent.data.tags["mlflow.note.content"]
    assert parent.data.params["space.hamp.output_modification"] == "{True}"
    assert parent.data.params["space.hamp.gamma"].startswith("[")
    (data_input,) = parent.inputs.dataset_inputs
    assert data_input.dataset.name == "digits" and data_input.dataset.digest == spec.fingerprint()
    assert {"pareto.html", "report.html"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "trial 1 (hamp" in (result.out_dir / "pareto.html").read_text()  # hover text by trial number

    # the front was re-audited (final_audit) and those runs hang under the parent too
    assert result.final_audit and len(result.final_audit) == len(result.front)
    finals = client.search_runs([exp], filter_string="tags.`raymia.kind` = 'final_audit'")
    assert len(finals) == len(result.front)
    for run in finals:  # the same report files as a stand-alone audit's run (it kept three of them)
        kept = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"result.json", "roc.png", "spec.yaml", "records.parquet", "vulnerable.csv", "report.html"} <= kept
    assert saved["hypervolume"] == result.hypervolume and saved["hypervolume_reference"] == result.hypervolume_reference


def test_the_mlflow_ui_shows_the_sweeps_trials_metrics_and_front(first_audit, workdir, capfd, monkeypatch):
    """The real MLflow UI (`mlflow server` on the sweep's store, headless Chromium): the address raymia gives
    opens the classic runs table with the sweep's columns; expanding the sweep shows each trial, named by
    its number, with its objectives and its front tag."""
    import socket

    import requests

    result = json.loads((workdir / "runs" / "sweeps" / "tinysweep" / "result.json").read_text())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{workdir}/mlflow.db", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() - t0 < 60 and server.poll() is None, "mlflow server did not start"
            time.sleep(0.3)
        exp = _mlflow_client(workdir).get_experiment_by_name("raymia-tests")
        view = exp.tags["mlflow.sharedViewState.raymia-tinysweep"]  # what raymia's console line opens
        assert "metrics.`lira_online/tpr_fpr_0.01`" in view and "tags.`raymia.front`" in view
        url = (f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
               "&viewStateShareKey=raymia-tinysweep")
        with chromium_page_url(url, width=3000) as tab:  # wide: the grid draws only the columns in view
            tab.get_by_text("sweep-tinysweep").first.wait_for(timeout=30000)
            header = tab.locator("[role=columnheader]").all_inner_texts()
            assert {"test_accuracy", "lira_online/tpr_fpr_0.01", "raymia.trial", "raymia.front"} <= set(header), header
            tab.locator("[role=row]", has_text="sweep-tinysweep").locator("button").first.click()  # expand
            for t in result["trials"]:
                named = tab.locator("[role=row]", has_text=f"trial {t['trial']}").first
                named.wait_for(timeout=15000)
                index = named.get_attribute("row-index")  # the grid splits a row into its pinned and other parts
                cells = tab.locator(f"[role=row][row-index='{index}'] [role=gridcell]").all_inner_texts()
                assert any(c.startswith(f"{t['test_accuracy']:.4g}"[:5]) for c in cells), cells
                assert ("true" if t["trial"] in result["front"] else "false") in cells, cells
        # a run logged to a server: MLflow's two "View run/experiment at" lines per run are not printed (a
        # sweep's trials each printed them); raymia's own line gives the run's page
        from raymia.tracking import log_run, run_address

        monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
        uri = f"http://127.0.0.1:{port}"
        capfd.readouterr()
        rid = log_run(uri, "raymia-tests", "quiet", {"a": 1}, {"m": 0.5})
        assert "View run" not in capfd.readouterr().out
        assert run_address(uri, rid) == f"{uri}/#/experiments/{exp.experiment_id}/runs/{rid}"
    finally:
        server.terminate()
        server.wait(timeout=30)


# the sweep's default objectives, the hypervolume's reference on accuracy set to 0.5
REFERENCE_05 = ("sweep.objectives=[{metric: test_accuracy, mode: max, reference: 0.5}, "
                "{metric: lira_online/tpr_fpr_0.01, mode: min}]")


def test_check_reads_the_finished_sweep(first_audit, workdir):
    """raymia check on the sweep above: finished, both trials counted; a changed spec under the same name is
    reported as the conflict that `raymia sweep` would refuse."""
    from raymia.check import check_spec

    rep = check_spec(workdir / "tinysweep.yaml")
    assert rep.kind == "sweep" and rep.trials_done == 1  # searched trials; the baseline is kept beside them
    assert dict(rep.rows)["progress"].startswith("finished: its result is in ")
    changed = dict(check_spec(workdir / "tinysweep.yaml", ["sweep.num_trials=3"]).rows)["progress"]
    assert "holds a sweep of this name with a different spec" in changed
    # the tracking location may move without making it another sweep
    moved = check_spec(workdir / "tinysweep.yaml", [f"tracking.uri=sqlite:///{workdir}/elsewhere.db"])
    assert dict(moved.rows)["progress"].startswith("finished")
    # nor may a hypervolume reference, which only changes the report
    scored = check_spec(workdir / "tinysweep.yaml", [REFERENCE_05])
    assert dict(scored.rows)["progress"].startswith("finished")


def test_a_finished_sweep_is_reported_as_saved_and_says_so_when_its_references_changed(first_audit, workdir,
                                                                                       caplog):
    from raymia.resolve import load_spec
    from raymia.sweep import run_sweep

    caplog.set_level(logging.INFO, logger="raymia")
    saved = json.loads((workdir / "runs" / "sweeps" / "tinysweep" / "result.json").read_text())
    # a kill while the finished sweep uploaded its report files left its parent run RUNNING: the re-run ends it
    client = _mlflow_client(workdir)
    exp = client.get_experiment_by_name("raymia-tests")
    parent = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'sweep-tinysweep'")[0]
    client.update_run(parent.info.run_id, status="RUNNING")
    again = run_sweep(load_spec(workdir / "tinysweep.yaml", kind=SweepSpec), console=False)
    assert "already finished" in caplog.text and "other hypervolume references" not in caplog.text
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert "result.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert (again.hypervolume, again.hypervolume_reference, again.final_audit) == (
        saved["hypervolume"], saved["hypervolume_reference"], saved["final_audit"])
    assert again.hypervolume_reference["trial"] == 0 and again.final_audit
    run_sweep(load_spec(workdir / "tinysweep.yaml", [REFERENCE_05], kind=SweepSpec),
              console=False)
    assert "finished with other hypervolume references" in caplog.text and "--reference METRIC=VALUE" in caplog.text
    # its result.json cut short (damaged outside raymia: raymia writes it atomically, last): written again from
    # the stored trials, none run again
    path = workdir / "runs" / "sweeps" / "tinysweep" / "result.json"
    path.write_text(path.read_text()[:100])
    stored = [*(workdir / "runs" / "sweeps" / "tinysweep").glob("*/result.json"),
              *(workdir / "runs" / "sweeps" / "tinysweep" / "trials").glob("*/result.json")]
    stamps = {p: p.stat().st_mtime_ns for p in stored}
    assert len(stamps) == 2  # the baseline's and the HAMP trial's stored results
    caplog.clear()
    run_sweep(load_spec(workdir / "tinysweep.yaml", kind=SweepSpec), console=False)
    assert "result.json is damaged; writing it again" in caplog.text
    rewritten = json.loads(path.read_text())
    assert [t["trial_id"] for t in rewritten["trials"]] == [t["trial_id"] for t in saved["trials"]]
    assert rewritten["front"] == saved["front"] and rewritten["hypervolume"] == saved["hypervolume"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no trial ran again


def test_audit_from_trial(first_audit, workdir):
    """raymia audit SPEC --from-trial N audits a sweep trial's setting (here with the same bank: reused), and
    raymia check SPEC --from-trial N says what that audit would train."""
    from raymia.check import check_spec

    sweep = str(workdir / "tinysweep.yaml")
    runs = _run_together({  # independent runs (none starts Ray), side by side
        "from-trial": _raymia("audit", sweep, "--from-trial", "1", "--set", "tracking.enabled=false"),
        "bad-trial": _raymia("audit", sweep, "--from-trial", "7"),
        "bad-check": _raymia("check", sweep, "--from-trial", "7"),
    }, workdir, timeout=120)
    out, bad = runs["from-trial"], runs["bad-trial"]
    assert out.returncode == 0, out.stderr
    assert "reusing stored signals" in out.stderr and "defense=hamp" in out.stdout
    assert bad.returncode == 2 and "--from-trial: no finished trial 7" in bad.stderr
    assert runs["bad-check"].returncode == 2 and "--from-trial: no finished trial 7" in runs["bad-check"].stderr
    same = check_spec(sweep, [], from_trial=1)  # the trial's own bank: stored
    assert same.kind == "audit" and same.spec.defense.name == "hamp" and same.stored == list(range(same.packs))
    assert dict(same.rows)["spec"].startswith(f"{sweep}: trial 1 of the sweep, as an audit")
    bigger = check_spec(sweep, ["plan.num_models=12"], from_trial=1)  # more shadows: a new bank
    assert bigger.spec.plan.num_models == 12 and bigger.stored == [] and bigger.fingerprint != same.fingerprint
