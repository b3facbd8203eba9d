"""Security defaults of a local run, measured: which sockets a local Ray instance started by raymia (with
its warm bank pool) listens on, and that a client without Ray's token is refused.

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
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    try:
        gcs = json.loads(driver.stdout.readline())["gcs"]
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
