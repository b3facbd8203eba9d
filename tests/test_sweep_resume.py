"""A sweep whose driver is killed mid-run finishes on a re-run, without re-running finished trials and
without duplicate MLflow runs (a real `raymia sweep` process, killed with SIGKILL). Each trial trains its
small bank in its own process (`bank.engine: local`): a Train worker group start per trial would add
nothing that this test checks (tests/test_e2e.py runs sweeps whose trials use Ray Train)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SPEC = """
name: resumable
plan: {{num_models: 4, population: 200}}
model: {{params: {{hidden: [64]}}}}
train: {{epochs: 10}}
attacks: [{{name: loss}}, {{name: lira_online}}]
bank: {{pack_size: 4, engine: local}}
output_dir: {out}/runs
tracking: {{uri: "sqlite:///{out}/mlflow.db", experiment: resume-test}}
sweep: {{defense: hamp, num_trials: 3, max_concurrent: 1}}
"""


def test_killed_sweep_resumes(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC.format(out=tmp_path))
    trials_glob = str(tmp_path / "runs" / "sweeps" / "resumable" / "trials" / "*" / "result.json")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "raymia", "sweep", str(spec)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    t0 = time.time()
    while time.time() - t0 < 240 and not glob.glob(trials_glob) and first.poll() is None:
        time.sleep(0.5)
    time.sleep(2)  # let the driver record the finished trial
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = {p.split(os.sep)[-2] for p in glob.glob(trials_glob)}
    assert 1 <= len(done_before) < 3, done_before
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(trials_glob)}
    # The worst kill: while Tune copied its searcher state (Tune's copies are not atomic). The resume must
    # put back raymia's copy from the last finished trial, not wait forever on a failed restore.
    for state in glob.glob(str(tmp_path / "runs" / "ray" / "sweep-resumable" / "searcher-state-*.pkl")):
        Path(state).write_bytes(b"")

    # The resumed run, watched: Tune logs a failed restore (e.g. of a searcher state that the kill left
    # truncated) and then waits forever, so that message fails the test at once instead of at the timeout.
    with open(tmp_path / "resume.out", "w") as out, open(tmp_path / "resume.err", "w") as err:
        resume = subprocess.Popen([sys.executable, "-m", "raymia", "sweep", str(spec), "--resume"], stdout=out,
                                  stderr=err, text=True, start_new_session=True, env=env)
    t0 = time.time()
    try:
        while resume.poll() is None:
            stderr = (tmp_path / "resume.err").read_text()
            if "Failed to restore the run state" in stderr:
                pytest.fail(f"the resumed sweep could not restore Tune's state:\n{stderr[-3000:]}")
            if time.time() - t0 > 400:
                pytest.fail(f"the resumed sweep did not finish in 400 s:\n{stderr[-3000:]}")
            time.sleep(0.5)
    finally:
        if resume.poll() is None:
            os.killpg(resume.pid, signal.SIGKILL)
            resume.wait()
    again = subprocess.CompletedProcess(resume.args, resume.returncode, (tmp_path / "resume.out").read_text(),
                                        (tmp_path / "resume.err").read_text())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming sweep resumable" in again.stderr
    assert "resuming from the copy taken after the last finished trial" in again.stderr
    result = json.loads((tmp_path / "runs" / "sweeps" / "resumable" / "result.json").read_text())
    assert len(result["trials"]) == 3 and all(t["status"] == "ok" for t in result["trials"])
    assert [t["defense"] for t in result["trials"]].count("none") == 1
    ids = {t["trial_id"] for t in result["trials"]}
    assert done_before <= ids
    for p, m in mtimes.items():  # finished trials were not run again
        assert os.path.getmtime(p) == m

    # Re-running a finished sweep reports it and runs nothing (started now: it runs while MLflow is read).
    with open(tmp_path / "third.out", "w") as out, open(tmp_path / "third.err", "w") as err:
        rerun = subprocess.Popen([sys.executable, "-m", "raymia", "sweep", str(spec)], stdout=out, stderr=err,
                                 text=True, env=env)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        exp = client.get_experiment_by_name("resume-test")
        parents = client.search_runs([exp.experiment_id], filter_string="tags.`raymia.kind` = 'sweep'")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        children = client.search_runs([exp.experiment_id], filter_string="tags.`raymia.kind` = 'trial'")
        assert sorted(c.data.tags["raymia.trial_id"] for c in children) == sorted(ids)  # one run per trial

        rerun.wait(timeout=120)
    finally:
        if rerun.poll() is None:
            rerun.kill()
            rerun.wait()
    third = subprocess.CompletedProcess(rerun.args, rerun.returncode, (tmp_path / "third.out").read_text(),
                                        (tmp_path / "third.err").read_text())
    assert third.returncode == 0 and "already finished" in third.stderr


def test_damaged_tune_state_is_found_without_unpickling(tmp_path):
    """A state file cut short by a kill while Tune copied it (Tune would then wait forever on resume)."""
    import pickle

    from raymia.sweep import _damaged_tune_state

    (tmp_path / "experiment_state-1.json").write_text('{"trials": []}')
    (tmp_path / "searcher-state-1.pkl").write_bytes(pickle.dumps({"a": 1}))
    assert _damaged_tune_state(tmp_path) is None
    (tmp_path / "searcher-state-1.pkl").write_bytes(b"")
    assert "searcher-state-1.pkl is cut short (0 bytes)" in _damaged_tune_state(tmp_path)
    (tmp_path / "searcher-state-1.pkl").write_bytes(pickle.dumps({"a": 1})[:-3])
    assert "cut short" in _damaged_tune_state(tmp_path)
    (tmp_path / "searcher-state-1.pkl").write_bytes(pickle.dumps({"a": 1}))
    (tmp_path / "search_gen_state-1.json").write_bytes(pickle.dumps({"b": 2}))  # Tune's: a pickle named .json
    assert _damaged_tune_state(tmp_path) is None
    (tmp_path / "experiment_state-2.json").write_text('{"trials": [')  # the newest one counts
    assert "experiment_state-2.json is neither intact JSON" in _damaged_tune_state(tmp_path)
    # (a real sweep's files, as Tune writes them, are checked by test_killed_sweep_resumes: it must resume)


def test_delete_study_lets_a_new_search_start_from_the_seed(tmp_path):
    import optuna

    from raymia.resolve import validate_spec
    from raymia.spec import SweepSpec
    from raymia.sweep import _delete_study, _optuna_storage

    spec = validate_spec({"name": "s", "sweep": {"defense": "label_smoothing"}}, SweepSpec)
    storage = _optuna_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(study_name="raymia-s", storage=storage)
    _delete_study(spec, tmp_path)
    assert "raymia-s" not in [s.study_name for s in optuna.get_all_study_summaries(storage)]
    _delete_study(spec, tmp_path)  # no study: nothing to do


def test_a_damaged_tune_state_is_put_back_from_raymias_copy(tmp_path):
    import pickle

    from raymia.sweep import _backup_tune_state, _damaged_tune_state, _restore_tune_state

    exp, backup = tmp_path / "exp", tmp_path / "sweep" / "tune-state"
    exp.mkdir()
    (exp / "experiment_state-1.json").write_text('{"trials": [1]}')
    (exp / "searcher-state-1.pkl").write_bytes(pickle.dumps({"told": 1}))
    (exp / "trial_0").mkdir()  # trial folders are Tune's, not copied
    _backup_tune_state(exp, backup)
    assert sorted(p.name for p in backup.iterdir()) == ["experiment_state-1.json", "searcher-state-1.pkl"]
    (exp / "searcher-state-1.pkl").write_bytes(b"")  # the kill
    _backup_tune_state(exp, backup)  # a damaged state is never copied over a good one
    assert _damaged_tune_state(backup) is None
    assert _restore_tune_state(backup, exp) and _damaged_tune_state(exp) is None
    assert pickle.loads((exp / "searcher-state-1.pkl").read_bytes()) == {"told": 1}
    assert not _restore_tune_state(tmp_path / "none", exp)
