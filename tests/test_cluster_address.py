"""Joining an existing Ray cluster through RAY_ADDRESS (`engine.cluster.check_address`): an address raymia
cannot join, a cluster that is down and a token the cluster refuses are one line naming RAY_ADDRESS and what
to do, in seconds. Without the check ray.init retried a cluster that is down for minutes and a refused token
for 20 s, then raised a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raymia.engine.cluster import check_address
from raymia.errors import RaymiaError

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, says", [
    ("http://127.0.0.1:8265", "dashboard / Jobs API address"),
    ("https://ray.example.com", "dashboard / Jobs API address"),
    ("ray://127.0.0.1:10001", "Ray Client address"),
    ("s3://bucket", "is not a Ray address; accepted: HOST:PORT"),
    ("headnode", "is not a Ray address; accepted: HOST:PORT"),
    ("headnode:port", "is not a Ray address; accepted: HOST:PORT"),
])
def test_an_address_raymia_cannot_join_is_one_line(address, says):
    with pytest.raises(RaymiaError) as e:
        check_address(address)
    text = str(e.value)
    assert text.startswith(f"RAY_ADDRESS: {address} ") and says in text and "\n" not in text, text


def test_a_cluster_that_is_down_is_one_line_at_once():
    address = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(RaymiaError, match=rf"^RAY_ADDRESS: no Ray cluster at {address} \(connection refused\): "
                                          r"start it \(`ray start --head --port=\d+`\)"):
        check_address(address)
    assert time.monotonic() - start < 5


def test_the_cli_says_a_cluster_is_down_in_one_line(tmp_path):
    """`raymia audit` with RAY_ADDRESS naming no cluster: exit 2 and one line on stderr, no Ray warnings."""
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "raymia", "audit", str(ROOT / "sweeps" / "quickstart.yaml"),
                          "--output-dir", str(tmp_path), "--set", "tracking.enabled=false"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"raymia: error: RAY_ADDRESS: no Ray cluster at {address}"), \
        run.stderr


def _gcs_address(ray_local) -> str:
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        pytest.skip("the tests' Ray runs without token authentication (RAY_AUTH_MODE is not token)")
    return ray_local.get_runtime_context().gcs_address


def test_a_running_cluster_with_its_token_passes(ray_local):
    check_address(_gcs_address(ray_local))


def test_a_token_the_cluster_refuses_is_one_line(ray_local, monkeypatch):
    address = _gcs_address(ray_local)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-clusters-token")
    with pytest.raises(RaymiaError, match=rf"^RAY_ADDRESS: the Ray cluster at {address} refused this process's "
                                          r"token: give it the cluster's token \(`ray get-auth-token` on its head\)"):
        check_address(address)


def test_token_auth_off_in_this_process_says_to_turn_it_on(ray_local, monkeypatch):
    address = _gcs_address(ray_local)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(RaymiaError, match=r"refused this process's token: set RAY_AUTH_MODE=token"):
        check_address(address)


def test_a_sweep_that_cannot_join_its_cluster_leaves_no_mlflow_run(tmp_path, monkeypatch):
    """The address is checked before the sweep's MLflow parent run is created (which happens while Ray
    starts): a cluster that is down leaves the tracking store without a FAILED run."""
    import mlflow
    import ray

    from raymia.sweep import run_sweep

    # as in a fresh process: a Ray already running here (the tests' shared one) is used whatever RAY_ADDRESS says
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    address = f"127.0.0.1:{_free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RaymiaError, match=rf"^RAY_ADDRESS: no Ray cluster at {address}"):
        run_sweep(str(ROOT / "sweeps" / "quickstart.yaml"), overrides=[f"tracking.uri={uri}"],
                  output_dir=tmp_path / "runs")
    client = mlflow.MlflowClient(uri)
    assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []
