"""Kill `raymia audit` / `raymia sweep` at spread points and check the re-run (README's "a crash or a kill
loses no finished work, and a re-run resumes it").

    python3 benchmarks/kill_points.py audit --points 12 [--signal INT|TERM] [--workdir D]
    python3 benchmarks/kill_points.py sweep --points 6 [--engine ray]

An undisturbed run gives the baseline (its duration and result). Then, for each of `--points` kill times
spread over that duration (plus one just before its end), a fresh folder runs the same command, the process
group gets the signal at that time, and the same command runs again in the same folder. Checked after the
re-run: exit 0; the metrics of result.json (audit) or the trials and front of the sweep's result.json equal
the baseline's; no pack that was intact when the kill landed was written again (inode and mtime); no
temporary file left in the store; every pack intact; the MLflow database passes `PRAGMA integrity_check`
and holds no run left RUNNING. `--twice` kills the re-run too (at half the time) before a third run.
With `--signal INT` or `TERM` (a Ctrl-C, or Slurm's scancel / a container's stop: the signal reaches the
run's own local Ray too) each line also says how long the signalled run took to exit, and a point fails
when that exit is not the signal's (130 or 143; or the signal's own death, before raymia's handler was
set) or took over 10 s. One line per kill point, then a summary; exit 1 when any point failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AUDIT = """
name: kills
seed: 0
plan: {{num_models: 8, population: 300, targets: all}}
model: {{name: mlp, params: {{hidden: [256]}}}}
train: {{epochs: 60, batch_size: 64, lr: 0.002}}
queries: [identity, hflip]
attacks: [{{name: loss}}, {{name: lira_online}}, {{name: rmia_online}}]
bank: {{pack_size: 2, num_workers: 1, vectorize: true}}  # auto picks by timing: float tolerance
tracking: {{uri: "sqlite:///{out}/mlflow.db", experiment: kills}}
output_dir: {out}/runs
"""

SWEEP = """
name: ksweep
seed: 0
plan: {{num_models: 4, population: 200}}
model: {{params: {{hidden: [64]}}}}
train: {{epochs: 10}}
attacks: [{{name: loss}}, {{name: lira_online}}]
bank: {{pack_size: 2, engine: {engine}, num_workers: 1, vectorize: true}}
output_dir: {out}/runs
tracking: {{uri: "sqlite:///{out}/mlflow.db", experiment: ksweep}}
sweep: {{defense: hamp, num_trials: 3, max_concurrent: {concurrent}, include_undefended: true}}
"""


def files(folder: Path) -> set[str]:
    """Every file under `folder` (relative), but the harness's own."""
    out = set()
    for root, _, names in os.walk(folder):
        for n in names:
            out.add(os.path.relpath(os.path.join(root, n), folder))
    return out - {"spec.yaml", "out.log"}


def pattern(rel: str) -> str:
    """A file's name as a glob that matches it in another run: a temporary file's process id and random
    suffix, MLflow's run ids, Tune's trial ids, its trial folders' times and its TensorBoard logs' vary."""
    import re

    parts = rel.split(os.sep)
    # MLflow's run ids and Tune's trial ids (hex), and the time in Tune's trial folder names
    parts = ["*" if len(x) in (8, 32) and all(c in "0123456789abcdef" for c in x) else x for x in parts]
    parts = [re.sub(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}", "*", x) for x in parts]
    if parts[-1].endswith(".tmp"):
        parts[-1] = parts[-1].split(".")[0] + "." + parts[-1].split(".")[1] + "*.tmp"
    if parts[-1].startswith(".artifact.uploading."):  # MLflow's artifact being written (mkstemp's suffix)
        parts[-1] = ".artifact.uploading.*"
    if parts[-1].startswith("events.out.tfevents."):  # Tune's TensorBoard log: its time and host
        parts[-1] = "events.out.tfevents.*"
    return os.sep.join(parts)


def run(kind: str, folder: Path, kill_at: float | str | None, sig: int,
        seen: dict[str, float] | None = None) -> tuple[int, float, str, float | None]:
    """The command in `folder`; with `kill_at` (seconds, or a glob of a file under `folder`), its process group
    gets `sig` after that many seconds or as soon as that file appears. `seen` collects when each file first
    appeared. (exit code, seconds, the log's tail, seconds from the signal to the exit or None)."""
    import fnmatch

    spec = folder / "spec.yaml"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(folder / "out.log", "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "raymia", kind, str(spec)], stdout=out, stderr=out,
                                start_new_session=True, env=env, cwd=folder)
        while proc.poll() is None:
            now = time.time() - t0
            if isinstance(kill_at, float | int) and now >= kill_at:
                break
            if isinstance(kill_at, str) or seen is not None:
                names = files(folder)
                if seen is not None:
                    for n in names - set(seen):
                        seen[n] = now
                if isinstance(kill_at, str) and any(fnmatch.fnmatch(n, kill_at) for n in names):
                    break
            time.sleep(0.005)
        stop = None
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            sent = time.time()
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            stop = time.time() - sent
    # a SIGINT'd run's or a killed run's leftover processes (Ray's) must not outlive it
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    tail = (folder / "out.log").read_text()[-1500:]
    return proc.returncode, time.time() - t0, tail, stop


def packs(folder: Path) -> dict[str, tuple[int, int]]:
    """Each intact pack's data file -> (inode, mtime_ns): a pack written again gets a new inode."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from raymia.store import SignalStore

    out = {}
    for fp_dir in (folder / "runs" / "signals").glob("*"):
        for manifest in fp_dir.glob("k*-pack-*.json"):
            k = int(manifest.name.split("-")[0][1:])
            pack = int(manifest.stem.split("-")[-1])
            info = json.loads(manifest.read_text()) if manifest.stat().st_size else {}
            store = SignalStore(folder / "runs", fp_dir.name, k, max(info.get("models", [0])) + 1)
            if store.check_pack(pack) is None:
                data = manifest.with_suffix(".npz")
                st = data.stat()
                out[str(data)] = (st.st_ino, st.st_mtime_ns)
    return out


def leftovers(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in (folder / "runs").rglob("*.tmp")]


def mlflow_state(folder: Path) -> tuple[str, dict[str, int]]:
    db = folder / "mlflow.db"
    if not db.exists():
        return "no db", {}
    con = sqlite3.connect(db)
    try:
        ok = con.execute("PRAGMA integrity_check").fetchone()[0]
        counts = dict(con.execute("SELECT status, count(*) FROM runs WHERE lifecycle_stage = 'active' "
                                  "GROUP BY status").fetchall())
    finally:
        con.close()
    return ok, counts


def outcome(kind: str, folder: Path) -> object:
    if kind == "audit":
        (res,) = (folder / "runs" / "audits").glob("*/result.json")
        return json.loads(res.read_text())["metrics"]
    res = json.loads((folder / "runs" / "sweeps" / "ksweep" / "result.json").read_text())
    # a trial's id and folder are Tune's, its time the machine's: the rest must be the same
    trials = {str(t["trial"]): json.dumps({k: v for k, v in t.items()
                                           if k not in ("trial_id", "audit_dir", "seconds", "node", "reused_signals")},
                                          sort_keys=True, default=str) for t in res["trials"]}
    return {**trials, "front": sorted(res["front"]), "hypervolume": res["hypervolume"]}


def differs(a: object, b: object) -> str | None:
    if a == b:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f"{len(keys)} differ, e.g. {keys[0]}: {a.get(keys[0])} vs {b.get(keys[0])}"
    return "differs"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=["audit", "sweep"])
    p.add_argument("--points", type=int, default=10, help="kills at spread times")
    p.add_argument("--events", type=int, default=0, help="at most this many kills on a file's appearance (0: all)")
    p.add_argument("--signal", choices=["KILL", "INT", "TERM"], default="KILL")
    p.add_argument("--twice", action="store_true", help="kill the re-run too")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="a sweep's bank: trained in its trial's process, or on the warm pool (2 trials at a time)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the folders")
    a = p.parse_args()
    sig = getattr(signal, f"SIG{a.signal}")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="raymia-kills-"))
    template = AUDIT if a.kind == "audit" else SWEEP

    def fresh(name: str) -> Path:
        d = work / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "spec.yaml").write_text(template.format(out=d, engine=a.engine,
                                                     concurrent=2 if a.engine == "ray" else 1))
        return d

    base = fresh("baseline")
    seen: dict[str, float] = {}
    rc, total, tail, _ = run(a.kind, base, None, sig, seen)
    if rc != 0:
        print(f"baseline failed ({rc}):\n{tail}")
        return 1
    want, want_runs = outcome(a.kind, base), mlflow_state(base)[1]
    print(f"baseline: {total:.1f} s")
    # when each file first appeared: a kill as each phase's first file appears (a pack's temporary data file,
    # its manifest, the report's files, MLflow's artifacts and journal), then kills at spread times
    events = sorted({pattern(n): t for n, t in sorted(seen.items(), key=lambda x: -x[1])}.items(), key=lambda x: x[1])
    if a.events and len(events) > a.events:
        events = [events[round(i * (len(events) - 1) / max(a.events - 1, 1))] for i in range(a.events)]
    times = [e for e, _ in events] + [total * (i + 0.5) / a.points for i in range(a.points)] + [max(total - 1.0, 0.5)]
    failed = 0
    for i, t in enumerate(times):
        d = fresh(f"kill-{i:02d}")
        rc1, secs1, tail1, stop = run(a.kind, d, t, sig)
        before = packs(d)
        notes = []
        if sig != signal.SIGKILL and stop is not None and (rc1 not in (128 + sig, -sig) or stop > 10):
            notes.append(f"signalled run exit {rc1} after {stop:.1f} s: "
                         f"{tail1.strip().splitlines()[-1] if tail1.strip() else ''}")
        if a.twice:
            run(a.kind, d, secs1 / 2 if rc1 else total / 2, sig)
            kept = packs(d)
            notes += [f"pack rewritten by the first re-run: {k}" for k in before if kept.get(k) != before[k]]
            before = kept
        rc2, secs, tail, _ = run(a.kind, d, None, sig)
        after = packs(d)
        if rc2 != 0:
            notes.append(f"re-run exit {rc2}: {tail.strip().splitlines()[-1] if tail.strip() else ''}")
        else:
            if (why := differs(want, outcome(a.kind, d))) is not None:
                notes.append(f"result differs: {why}")
        notes += [f"pack rewritten: {Path(k).name}" for k in before if after.get(k) != before[k]]
        notes += [f"leftover {f}" for f in leftovers(d)]
        ok, runs = mlflow_state(d)
        if ok != "ok":
            notes.append(f"mlflow db: {ok}")
        if runs.get("RUNNING"):
            notes.append(f"MLflow runs left RUNNING: {runs['RUNNING']}")
        if a.kind == "sweep" and runs != want_runs:  # one parent run and one run per trial, as undisturbed
            notes.append(f"MLflow runs {runs}, undisturbed {want_runs}")
        at = f"{t:5.1f} s" if isinstance(t, float) else t
        stopped = f" after {stop:.1f} s" if stop is not None and sig != signal.SIGKILL else ""
        print(f"kill at {at} (first exit {rc1}{stopped}): {len(before)} packs kept, re-run {secs:.1f} s, "
              f"mlflow {runs}: {'; '.join(notes) or 'ok'}", flush=True)
        failed += bool(notes)
        if not a.keep and not notes:
            shutil.rmtree(d, ignore_errors=True)
    print(f"{len(times)} kill points ({a.signal}{', twice' if a.twice else ''}): {len(times) - failed} held, "
          f"{failed} failed; folders in {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
