"""Security defaults of a local run, measured: which sockets a local Ray instance started by raymia (with
its warm bank pool) listens on, that a client without Ray's token is refused, and that the token file Ray
writes is readable by its owner only.

Ray 2.60 binds its GCS, raylet and every worker's gRPC server to all interfaces and turns a loopback node
address into the machine's routable one, so those cannot be moved to loopback; README.md ("Security")
names them and why token authentication is what protects them. Everything raymia decides itself stays
off: no dashboard, no Ray client server, no MLflow server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# what may listen beyond loopback: Ray's own services (README.md, "Security"), by process name
RAY_CORE = {"gcs_server", "raylet"}
RAY_WORKER_PREFIX = "ray::"  # a worker's core-worker gRPC server (process titles ray::IDLE, ray::BankWorker...)

DRIVER = """
import json, sys
from raymia.engine.cluster import ensure_ray
from raymia.engine.pool import BankPool
from raymia.spec import AuditSpec
import ray
ensure_ray()
pool = BankPool.start(AuditSpec.model_validate({"plan": {"num_models": 2, "population": 100}})).ready()
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address}), flush=True)
sys.stdin.read()  # hold the instance until the test is done
"""


def listening() -> list[tuple[str, int, int | None]]:
    """(ip, port, pid) of every listening TCP socket (IPv4 and IPv6), read from /proc."""
    owner = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owner[link[8:-1]] = int(pid)
        except OSError:
            continue
    out = []
    for family, table in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] != "0A":  # LISTEN
                continue
            hexip, hexport = f[1].split(":")
            raw = bytes.fromhex(hexip)
            raw = raw[::-1] if family == socket.AF_INET else b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
            out.append((socket.inet_ntop(family, raw), int(hexport, 16), owner.get(f[9])))
    return out


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    out, todo = {root}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0].split("/")[-1]
    except OSError:
        return "?"


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="lists sockets through Linux's /proc")
def test_local_run_listens_beyond_loopback_only_where_ray_cannot_move_and_refuses_tokenless_clients(tmp_path):
    owner = tmp_path / "owner"  # a home without a token: Ray writes a new one, under the usual umask
    owner.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")},
           "HOME": str(owner)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path, umask=0o022)
    try:
        gcs = json.loads(driver.stdout.readline())["gcs"]
        # whoever reads the token can run code as its owner: raymia leaves it readable by the owner only
        assert (owner / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
        ours = descendants(driver.pid)
        sockets = [(ip, port, pid) for ip, port, pid in listening() if pid in ours]
        names = {pid: _name(pid) for _, _, pid in sockets}
        assert any(names[pid] == "gcs_server" for *_, pid in sockets)  # the listing sees Ray's own servers

        beyond = [(ip, port, names[pid]) for ip, port, pid in sockets if not ip.startswith("127.") and ip != "::1"]
        for ip, port, name in beyond:
            assert (name in RAY_CORE or name.startswith(RAY_WORKER_PREFIX) or pid_is_driver(name)), (ip, port, name)
        ports = {port for _, port, _ in sockets}
        assert 8265 not in ports and 10001 not in ports  # no dashboard, no Ray client server
        assert not any("dashboard" in n and "agent" not in n for n in names.values())

        # a client without the cluster's token (another HOME, no RAY_AUTH_* variables) is refused
        home = tmp_path / "home"
        home.mkdir()
        bare = {**{k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}, "HOME": str(home)}
        client = subprocess.Popen([sys.executable, "-c", f"import ray; ray.init(address={gcs!r})"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=bare)
        refused, deadline = False, time.monotonic() + 60
        try:
            for line in client.stderr:
                if "InvalidAuthToken" in line or "Unauthenticated" in line:
                    refused = True
                    break
                if time.monotonic() > deadline:
                    break
        finally:
            client.kill()
            client.wait()
        assert refused
    finally:
        driver.stdin.close()
        driver.wait(timeout=60)


def pid_is_driver(name: str) -> bool:
    """The driver's own core worker (the python process that called ray.init) listens like a worker's."""
    return name.startswith("python")


# --- names and strings a user or another program gives: they stay inside their folders and print as given


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "../x", "a/b", "a b", ""])
def test_names_that_would_leave_their_folder_are_refused(name):
    """`name` becomes audits/<name> and sweeps/<name> (which --fresh deletes); a label, part of metric names."""
    from raymia.errors import SpecError
    from raymia.resolve import validate_spec
    from raymia.spec import SweepSpec

    with pytest.raises(SpecError, match=r"name: .*not starting with '\.'|name: .*should have at least"):
        validate_spec({"name": name, "sweep": {"defense": "hamp"}}, SweepSpec)
    with pytest.raises(SpecError, match=r"attacks\.0\.label"):
        validate_spec({"attacks": [{"name": "loss", "label": name or "."}]})
    assert validate_spec({"name": "v1.2_run-3"}).name == "v1.2_run-3"


def test_an_mlflow_experiment_name_is_one_folder_under_mlartifacts(tmp_path):
    from raymia.tracking import artifact_location

    base = (tmp_path / "mlartifacts").as_uri()
    for experiment, folder in (("raymia-quickstart", "raymia-quickstart"), ("/Users/alice/x", "_Users_alice_x"),
                               ("../../etc", "_.._etc"), ("..", "_"), ("a <b>", "a__b_")):
        assert artifact_location(f"sqlite:///{tmp_path}/mlflow.db", experiment) == f"{base}/{folder}"


def test_a_sweep_name_read_from_mlflow_must_be_a_name(tmp_path):
    """`raymia pareto` writes raymia-runs/pareto/<the parent run's name param>: anyone who logs to a shared
    tracking server chooses that param."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from raymia.errors import RaymiaError
    from raymia.pareto import trials_from_mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("X")
    run = client.create_run(exp, run_name="sweep-evil", tags={"raymia.kind": "sweep"})
    client.log_batch(run.info.run_id, params=[Param("name", "../../../tmp/evil")])
    with pytest.raises(RaymiaError, match=r"--run-id: parent run \w+'s sweep name '\.\./\.\./\.\./tmp/evil' is not"):
        trials_from_mlflow(uri, "X", parent_run_id=run.info.run_id)


def test_user_strings_print_as_given_on_the_console_and_in_front_md():
    """Rich reads [...] as markup: a categorical value "[/dim]" ended a finished sweep with MarkupError, and
    "[bold]x[/]" lost its brackets. In front.md, "|" would split the row and HTML would render."""
    import io

    from rich.console import Console

    from raymia.pareto import front_markdown, print_front

    objectives = [("test_accuracy", "max"), ("auc", "min")]
    trials = [{"trial": 1, "defense": "plug:Evil", "status": "ok", "test_accuracy": 0.9, "auc": 0.6,
               "params": {"mode": "[/dim]", "tag": "[bold]x[/] a|b <script>"}},
              {"trial": 2, "defense": "plug:Evil", "status": "failed", "error": "bad [/red] value", "params": {}}]
    console = Console(width=200, file=io.StringIO(), record=True)  # markup on, as a caller's console may be
    print_front("s [b30b23353fb71fa4]", trials, objectives, [1], "-> out [/x]", console=console)
    text = console.export_text()
    for needle in ("s [b30b23353fb71fa4]", "mode=[/dim]", "tag=[bold]x[/] a|b <script>", "bad [/red] value",
                   "-> out [/x]"):
        assert needle in text, needle
    md = front_markdown(trials, objectives, [1])
    assert r"tag=[bold]x[/] a\|b &lt;script&gt;" in md and "<script>" not in md
    assert all(line.count(" | ") == md.splitlines()[0].count(" | ") for line in md.splitlines()[2:4])


def test_report_of_a_result_json_raymia_did_not_write_is_one_line(tmp_path):
    from raymia.errors import RaymiaError
    from raymia.report.html import write_html

    for content, needle in (("[]", "holds a JSON list"), ('{"front": [1], "trials": [{"x": 1}]}', "KeyError")):
        (tmp_path / "result.json").write_text(content)
        with pytest.raises(RaymiaError, match=f"result.json: .*{needle}"):
            write_html(tmp_path)


def test_report_of_a_damaged_records_file_is_one_line(tmp_path):
    from raymia.errors import DataError
    from raymia.report.html import write_html

    (tmp_path / "result.json").write_text('{"name": "t", "attacks": {}}')
    (tmp_path / "records.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(DataError, match=r"records.parquet: is not a records file raymia wrote"):
        write_html(tmp_path)
