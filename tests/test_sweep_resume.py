"""A sweep whose driver is killed mid-run finishes on a re-run, without re-running finished trials and
without duplicate MLflow runs (a real `raymia sweep` process, killed with SIGKILL)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

SPEC = """
name: resumable
plan: {{num_models: 4, population: 200}}
model: {{params: {{hidden: [64]}}}}
train: {{epochs: 10}}
attacks: [{{name: loss}}, {{name: lira_online}}]
bank: {{pack_size: 4}}
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

    again = subprocess.run([sys.executable, "-m", "raymia", "sweep", str(spec), "--resume"],
                           capture_output=True, text=True, timeout=400, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming sweep resumable" in again.stderr
    result = json.loads((tmp_path / "runs" / "sweeps" / "resumable" / "result.json").read_text())
    assert len(result["trials"]) == 3 and all(t["status"] == "ok" for t in result["trials"])
    assert [t["defense"] for t in result["trials"]].count("none") == 1
    ids = {t["trial_id"] for t in result["trials"]}
    assert done_before <= ids
    for p, m in mtimes.items():  # finished trials were not run again
        assert os.path.getmtime(p) == m

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("resume-test")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`raymia.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], filter_string="tags.`raymia.kind` = 'trial'")
    assert sorted(c.data.tags["raymia.trial_id"] for c in children) == sorted(ids)  # one run per trial

    # Re-running a finished sweep reports it and runs nothing.
    third = subprocess.run([sys.executable, "-m", "raymia", "sweep", str(spec)], capture_output=True, text=True,
                           timeout=120, env=env)
    assert third.returncode == 0 and "already finished" in third.stderr
