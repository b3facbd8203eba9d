"""The warm bank pool under faults, as a user runs it (`raymia audit` / `raymia sweep` processes):

- a bank worker killed mid-audit: one `[raymia]` line, its pack trained again by the restarted worker, every
  pack finished before the kill left as it was (read from the store), metrics identical to an undisturbed run;
- a two-node cluster on this machine (`ray.cluster_utils.Cluster`) whose second node is killed mid-sweep:
  the sweep's trials and packs ran on both nodes, and the sweep completes;
- requests the cluster cannot meet fail before any training, in one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_spec_dict


def _manifests(root: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(root.glob("signals/*/k*-pack-*.json"))}


def _wait_for(cond, timeout: float, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}")
        time.sleep(0.05)
    pytest.fail(f"no {what} within {timeout}s")


def _start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raymia", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, text=True, env=env)


def _clean_console(text: str) -> None:
    """What a healthy (or healed) run may not show: tracebacks, Ray ERROR lines, colour codes."""
    for noise in ("Traceback", " E ", "ERROR", "\x1b[", "PreemptionWatcher", "(raylet)"):
        assert noise not in text, f"{noise!r} on the console:\n{text[-3000:]}"


def _audit_spec(tmp_path: Path, name: str) -> Path:
    # 5 packs of 2 models, a second or so each on one CPU: the kill lands inside a pack
    d = tiny_spec_dict(tmp_path / name, name="faults", seed=21, plan={"num_models": 10, "population": 300},
                       train={"epochs": 60, "batch_size": 32, "lr": 0.002}, tracking={"enabled": False},
                       attacks=[{"name": "loss"}, {"name": "lira_offline"}])
    d["bank"] = {"pack_size": 2, "vectorize": True, "device": "cpu"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_killed_bank_worker_retrains_only_its_pack_and_changes_no_metric(tmp_path):
    calm = _start(["audit", str(_audit_spec(tmp_path, "calm"))], tmp_path / "calm.log")
    hit = _start(["audit", str(_audit_spec(tmp_path, "hit"))], tmp_path / "hit.log")
    root = tmp_path / "hit" / "runs"
    first = _wait_for(lambda: _manifests(root), 240, hit, "stored pack")
    victim = next(iter(first.values()))["pid"]
    before = _manifests(root)  # every pack stored before the kill (it stays as it is)
    os.kill(victim, signal.SIGKILL)
    assert hit.wait(timeout=300) == 0, (tmp_path / "hit.log").read_text()[-3000:]
    assert calm.wait(timeout=300) == 0, (tmp_path / "calm.log").read_text()[-3000:]

    text = (tmp_path / "hit.log").read_text()
    lost = [ln for ln in text.splitlines() if " lost: " in ln]
    assert len(lost) == 1 and lost[0].startswith("[raymia] bank worker 0 (node ") and f"pid {victim})" in lost[0]
    assert "goes back to the queue" in lost[0], lost[0]
    _clean_console(text)

    after = _manifests(root)
    assert len(after) == 5
    for name, m in before.items():  # finished before the kill: not trained again (same manifest, same pid)
        assert after[name] == m
    retrained = [m for name, m in after.items() if name not in before]
    assert retrained and all(m["pid"] != victim for m in retrained)
    assert {m["pid"] for m in before.values()} == {victim}

    calm_result = json.loads(next((tmp_path / "calm" / "runs").glob("audits/*/result.json")).read_text())
    hit_result = json.loads(next(root.glob("audits/*/result.json")).read_text())
    assert hit_result["metrics"] == calm_result["metrics"]
    assert hit_result["fingerprint"] == calm_result["fingerprint"]


def test_request_the_cluster_cannot_meet_fails_before_training_in_one_line(tmp_path):
    d = yaml.safe_load(_audit_spec(tmp_path, "bad").read_text())
    d["bank"]["device"] = "cuda"
    says = "bank.device: cuda asks for 1 GPU per worker, but the Ray cluster has 0 GPUs"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(d))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "raymia", "audit", str(tmp_path / "bad.yaml")],
                         capture_output=True, text=True, timeout=120,
                         env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                              "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode != 0 and time.monotonic() - t0 < 60
    errors = [ln for ln in out.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and says in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not _manifests(tmp_path / "bad" / "runs")  # nothing trained


def test_pool_sizes_itself_to_the_nodes_and_names_the_field_it_cannot_meet(ray_local):
    """On the tests' one-node instance of n CPUs: n workers of 1 CPU, n - 1 beside a sweep's trial drivers,
    2n of half a CPU; more CPUs per worker than the node has, or no room left for the drivers, is one line
    naming the field."""
    from raymia.engine.pool import capacity
    from raymia.errors import RaymiaError

    n = int(ray_local.cluster_resources()["CPU"])
    assert capacity(1, 0) == n and capacity(1, 0, reserve_cpus=0.02) == n - 1 and capacity(0.5, 0) == 2 * n
    with pytest.raises(RaymiaError, match=rf"^bank.cpus_per_worker: 64 CPUs per worker, but the largest node of "
                                          rf"the Ray cluster has {n}; accepted: at most {n}$"):
        capacity(64, 0)
    with pytest.raises(RaymiaError, match=r"^bank.cpus_per_worker: \d+ CPUs per worker leave no room for the 0.02"):
        capacity(n, 0, reserve_cpus=0.02)
    with pytest.raises(RaymiaError, match=r"^bank.device: cuda asks for 1 GPU per worker"):
        capacity(1, 1)


def test_a_trial_driver_larger_than_every_node_is_one_line_before_anything_trains(ray_local, tmp_path):
    """Tune left every trial pending for ever (the baseline trained meanwhile); with bank.engine: local no
    pool's sizing met the request first."""
    import raymia
    from raymia.errors import RaymiaError

    n = int(ray_local.cluster_resources()["CPU"])
    spec = {"plan": {"num_models": 4, "population": 100}, "train": {"epochs": 1}, "attacks": ["loss"],
            "bank": {"engine": "local"}, "tracking": {"enabled": False}, "output_dir": str(tmp_path),
            "sweep": {"defense": "hamp", "num_trials": 1, "trial_cpu": 64,
                      "objectives": [{"metric": "test_accuracy", "mode": "max"}, {"metric": "loss/auc", "mode": "min"}]}}
    with pytest.raises(RaymiaError, match=rf"^sweep.trial_cpu: 64 CPUs per trial driver, but the largest node of "
                                          rf"the Ray cluster has {n}; accepted: at most {n}"):
        raymia.run_sweep(spec)
    assert not (tmp_path / "signals").exists()  # nothing trained


@pytest.mark.slow
def test_two_node_sweep_uses_both_nodes_and_survives_losing_one(tmp_path):
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        d = tiny_spec_dict(tmp_path, name="twonode", seed=31, plan={"num_models": 8, "population": 300},
                           train={"epochs": 40, "batch_size": 32, "lr": 0.002}, tracking={"enabled": False},
                           attacks=[{"name": "loss"}])
        # one pool worker and one trial driver per node (half a CPU each): both nodes train and drive trials
        d["bank"] = {"pack_size": 2, "vectorize": True, "device": "cpu", "num_workers": 2, "cpus_per_worker": 0.5}
        d["sweep"] = {"defense": "hamp", "num_trials": 3, "max_concurrent": 2, "trial_cpu": 0.5,
                      "objectives": [{"metric": "test_accuracy", "mode": "max"}, {"metric": "loss/auc", "mode": "min"}]}
        (tmp_path / "twonode.yaml").write_text(yaml.safe_dump(d))
        proc = _start(["sweep", str(tmp_path / "twonode.yaml")], tmp_path / "sweep.log",
                      env={**os.environ, "RAY_ADDRESS": cluster.address})
        root = tmp_path / "runs"
        on_second = second.node_id

        def trial_nodes() -> set:
            nodes = set()
            for f in (root / "ray" / "sweep-twonode").glob("*/result.json"):
                nodes |= {json.loads(line).get("node") for line in f.read_text().splitlines() if line.strip()}
            return nodes

        def second_node_worked():
            return on_second in trial_nodes() and any(m.get("node") == on_second for m in _manifests(root).values())

        _wait_for(second_node_worked, 300, proc, "trial and pack done on the second node")
        cluster.remove_node(second, allow_graceful=False)  # its raylet and every process on it, killed
        assert proc.wait(timeout=400) == 0, (tmp_path / "sweep.log").read_text()[-4000:]
        text = (tmp_path / "sweep.log").read_text()

        result = json.loads((root / "sweeps" / "twonode" / "result.json").read_text())
        assert [t["status"] for t in result["trials"]] == ["ok"] * 4
        nodes = {m["node"] for m in _manifests(root).values()}
        assert on_second in nodes and len(nodes) == 2
        assert on_second in trial_nodes() and len(trial_nodes() - {None}) == 2
        assert text.count("[raymia] Ray lost a node") == 1
        _clean_console(text)
    finally:
        cluster.shutdown()


def test_pool_stores_signals_under_a_uri_and_changes_no_metric(tmp_path, ray_local):
    """The pool's workers (other processes) write the packs through the URI the spec names; the audit reads
    them back through it, with the same metrics as a store at a plain path."""
    from raymia.audit import run_audit
    from raymia.spec import AuditSpec

    d = yaml.safe_load(_audit_spec(tmp_path, "plain").read_text())
    d["plan"]["num_models"], d["train"]["epochs"] = 4, 10
    plain = run_audit(AuditSpec.model_validate(d), console=False, track=False)
    d["store"] = f"file://{tmp_path}/bucket/prefix"
    remote = run_audit(AuditSpec.model_validate(d), console=False, track=False)
    assert not remote.reused_signals  # trained again, into the other store
    packs = sorted((tmp_path / "bucket" / "prefix" / "signals" / remote.fingerprint).glob("k2-pack-*.npz"))
    assert len(packs) == 2
    assert remote.flat_metrics() == plain.flat_metrics()


def test_console_drops_what_raymia_says_itself_and_a_terminated_workers_sigterm_report(caplog):
    """A worker that SIGTERM reaches in a weakref callback (its node killed) prints Python's report of the
    SystemExit Ray's handler raised (seen once in the two-node test above): dropped, as a worker's death
    and a node's end are (raymia says those in a line of its own). Any other traceback stays."""
    from raymia.engine.cluster import console_lines

    sigterm = ["Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f537cda1c60>",
               "Traceback (most recent call last):",
               '  File "/usr/lib/python3.11/_weakrefset.py", line 39, in _remove',
               "    def _remove(item, selfref=ref(self)):",
               "",
               '  File "ray/_private/worker.py", line 1063, in sigterm_handler',
               "    raise_sys_exit_with_custom_error_message(",
               "SystemExit: 1"]
    said: set[str] = set()
    assert console_lines(1234, ["before", *sigterm, "after"], said) == ["before", "after"]
    other = [*sigterm[:5], '  File "mine.py", line 3, in f', "SystemExit: 1"]  # not Ray's SIGTERM handler
    assert console_lines(1234, other, said) == other
    assert console_lines(1234, sigterm[:4], said) == sigterm[:4]  # a report cut off by the batch: kept
    with caplog.at_level("WARNING", logger="raymia"):
        lost = ["[2026] Raylet is terminated. Termination is unexpected. Last 20 lines:", "kept"]
        assert console_lines("raylet", lost, said) == ["kept"]
        assert console_lines("raylet", lost, said) == ["kept"]
    assert caplog.text.count("Ray lost a node") == 1


def test_a_lost_worker_is_said_once_by_the_processes_that_share_the_pool(ray_local):
    """A sweep's concurrent trials each wait on the pool's workers: the first to see a loss says it, the
    others only which of their packs goes back to the queue (two full lines were printed for one loss)."""
    import uuid

    import ray
    from ray.experimental.internal_kv import _internal_kv_initialized

    from raymia.engine.pool import _first_to_say

    assert _internal_kv_initialized()  # ray_local started the session's instance again if a test ended it
    key = f"raymia-lost/test/{uuid.uuid4().hex}"
    assert _first_to_say(key)
    assert not _first_to_say(key)
    assert ray.get(ray.remote(_first_to_say).remote(key)) is False  # another process of the cluster


def test_a_trials_copy_of_the_pool_made_before_a_worker_was_lost_trains_on_the_others(tmp_path, ray_local):
    """A sweep's trials get the pool pickled with their function as the sweep starts, before its workers are
    warm. A copy first used after a worker was lost (a trial run again after its node went) trains on the
    others: it reads where each worker runs from the start's answers and leaves the lost one to `run`. A copy
    that asked every worker again failed on the lost one ("bank workers failed to start"), or waited for good
    on one Ray could not place again."""
    import ray
    from ray import cloudpickle

    from raymia.engine.pool import BankPool
    from raymia.spec import AuditSpec
    from raymia.store import SignalStore

    d = yaml.safe_load(_audit_spec(tmp_path, "copy").read_text())
    d["plan"]["num_models"], d["train"]["epochs"] = 4, 5
    d["bank"].update(num_workers=2, cpus_per_worker=0.5)
    spec = AuditSpec.model_validate(d)
    pool = BankPool.start(spec)
    try:
        copy = cloudpickle.dumps(pool)  # as Tune registers a sweep's trial function
        pool.ready()
        ray.kill(pool.workers[1], no_restart=True)
        store = SignalStore(spec.output_dir, spec.fingerprint(), spec.bank.pack_size, spec.plan.num_models,
                            spec.pack_fingerprints())
        cloudpickle.loads(copy).run(spec, store, store.missing_packs())
        assert store.missing_packs() == []
        assert {m["worker"] for m in _manifests(Path(spec.output_dir)).values()} == {0}
    finally:
        pool.shutdown()
