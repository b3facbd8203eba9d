"""The command line: one-line errors with exit code 2, `raymia list`, the exit, the lines' prefixes."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import run_cli, signal_on_file


def raymia(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd)  # in this process; a real one where the process is what is tested


@pytest.mark.parametrize(
    ("content", "args", "needle"),
    [
        (None, [], "missing.yaml: file not found"),
        ("plan: [1, 2\n", [], "malformed YAML at line"),
        ("colour: red\n", [], "colour: unknown field"),
        ("data: {name: cifar1000}\n", [], "data.name: unknown data set 'cifar1000' (did you mean 'cifar10'?); accepted:"),
        ("defense: {name: hamp, params: {alpha: -1}}\n", [], "defense.params: alpha"),
        ("plan: {num_models: 7}\n", [], "plan.num_models: must be even"),
        ("plan: {population: 5000}\n", [], "plan.population: 5000 exceeds the 1347 training points"),
        ("", ["--set", "train.epochs=0"], "train.epochs: Input should be greater than or equal to 1"),
        ("? [a, b]\n: 1\n", [], "malformed YAML at line 1, column 3: a list or mapping as a key is not a name"),
        ("attacks: [loss]\n", ["--set", "attacks.0.params.query=5"],
         "attacks.0.params: query: 5 is no query index: the spec's queries are ['identity', 'hflip']"),
    ],
)
def test_bad_audit_input_is_one_line_exit_2(tmp_path, content, args, needle):
    path = tmp_path / "missing.yaml"
    if content is not None:
        path = tmp_path / "spec.yaml"
        path.write_text(content + f"output_dir: {tmp_path}/runs\ntracking: {{uri: 'sqlite:///{tmp_path}/m.db'}}\n")
    out = raymia("audit", str(path), *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("raymia: error: "), out.stderr
    assert needle in lines[0]
    assert not (tmp_path / "runs" / "signals").exists()  # nothing started


def test_bad_sweep_objective(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nsweep: {objectives: [{metric: test_accuracy, mode: max}, {metric: lira/auc, mode: min}]}\n"
                    f"tracking: {{enabled: false}}\noutput_dir: {tmp_path}/runs\n")
    # A finished sweep of the same name: a bad spec run with --fresh is refused before it discards anything.
    finished = tmp_path / "runs" / "sweeps" / "s"
    finished.mkdir(parents=True)
    (finished / "result.json").write_text("{}")
    out = raymia("sweep", str(path), "--fresh")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    # named after the file, as the schema's errors are, although found after loading it
    assert out.stderr.startswith(f"raymia: error: {path}: sweep.objectives.1.metric: unknown metric 'lira/auc' "
                                 "(did you mean 'lira_offline/auc' or 'lira_online/auc'?); accepted:")
    check = raymia("check", str(path))
    assert check.returncode == 2 and check.stderr.startswith(f"raymia: error: {path}: sweep.objectives.1.metric:")
    assert (finished / "result.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "runs").rglob("*")) == ["result.json", "s", "sweeps"]
    path.write_text(f"sweep: {{space: {{beta: {{low: 0, high: 1}}}}}}\noutput_dir: {tmp_path}/runs\n")
    out = raymia("sweep", str(path))
    assert out.returncode == 2 and "sweep.space.beta: 'hamp' has no parameter 'beta'" in out.stderr
    path.write_text(f"sweep: {{space: {{gamma: {{low: 0.5, high: 3}}}}}}\noutput_dir: {tmp_path}/runs\n")
    out = raymia("sweep", str(path))
    assert out.returncode == 2 and "sweep.space.gamma" in out.stderr and "gamma" in out.stderr


def test_a_spec_file_named_like_a_spec_field_is_named_once(tmp_path):
    """`sweep.yaml` given by a relative path: its schema error names the file once, not again as if the
    file's name were the `sweep` field's path."""
    (tmp_path / "sweep.yaml").write_text("sweep: {defense: hamp}\ntrain: {epochs: 0}\n")
    out = raymia("check", "sweep.yaml", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == "raymia: error: sweep.yaml: train.epochs: Input should be greater than or equal to 1"


def test_report_of_a_folder_that_is_not_a_finished_run_is_one_line(tmp_path):
    missing = raymia("report", str(tmp_path / "nosuch"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"raymia: error: {tmp_path / 'nosuch'}: folder not found; pass the folder of a finished audit "
        "(<output_dir>/audits/NAME-FINGERPRINT) or sweep (<output_dir>/sweeps/NAME)"]
    empty = raymia("report", str(tmp_path))
    assert empty.returncode == 2 and empty.stderr.strip().splitlines() == [
        f"raymia: error: {tmp_path}: holds no result.json; pass the folder of a finished audit "
        "(<output_dir>/audits/NAME-FINGERPRINT) or sweep (<output_dir>/sweeps/NAME)"]


def test_an_entrys_description_is_its_docstrings_first_paragraph_not_its_first_line():
    from raymia.inversion.registry import INVERSION
    from raymia.registry import summary

    def f():
        """One sentence wrapped
        over two lines.

        Details."""

    assert summary(f) == "One sentence wrapped over two lines." and summary(lambda: 0) == ""
    assert INVERSION.get("ked_mi").doc.endswith("fitted to the prior and identity losses, sampled.")


def test_quiet_goes_before_or_after_the_command():
    from raymia.cli import build_parser

    ap = build_parser()
    for command in ("audit", "sweep", "check"):
        assert ap.parse_args(["-q", command, "s.yaml"]).quiet
        assert ap.parse_args([command, "-q", "s.yaml"]).quiet
        assert ap.parse_args([command, "s.yaml", "--quiet"]).quiet
        assert not ap.parse_args([command, "s.yaml"]).quiet


def test_list_shows_every_registry_with_parameters_and_defaults():
    out = raymia("list")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ("dataset digits", "test_fraction", "0.25", "model mlp", "hidden", "[256, 256]",
                   "defense hamp", "gamma", "0.95", "[0.3, 0.99]", "log [0.0001, 0.05]", "defense none",
                   "attack lira_online", "fixed_variance", "attack loss", "query"):
        assert needle in text, needle
    assert "training functions: none registered" in text  # plug-ins add them; module:function needs none
    # docstrings and types print as written: brackets are text, not console markup
    assert "list[int]" in text and "score = 1[argmax == y] of the target" in text
    only = raymia("list", "attacks")
    assert "lira_offline" in only.stdout and "dataset digits" not in only.stdout
    for needle in ("inversion attack miface", "inversion attack gmi", "inversion attack plg_mi",
                   "inversion attack ked_mi", "gan_steps"):
        assert needle in only.stdout, needle  # every attack, membership and inversion, with its params
    ood = raymia("list", "ood")
    assert "non-member set scaled" in ood.stdout and "non-member set gan" in ood.stdout
    inversion = raymia("list", "inversion")
    assert "inversion attack plg_mi" in inversion.stdout and "lira_offline" not in inversion.stdout
    bad = raymia("list", "widgets")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr and "did you mean" not in bad.stderr
    near = raymia("list", "attack")  # a word near a choice (a command, a kind) says which
    assert near.returncode == 2 and near.stderr.rstrip().endswith("(did you mean 'attacks'?)"), near.stderr
    command = raymia("lsit")
    assert command.returncode == 2 and command.stderr.rstrip().endswith("(did you mean 'list'?)"), command.stderr


def test_a_prefixed_block_marks_only_its_own_threads_lines():
    """A sweep audits its baseline in a thread while Tune's callbacks log from the main one: `trial 0: `
    goes on the baseline's lines only, and the handler's format comes back when the block ends."""
    from raymia.engine.bank_job import UNPREFIXED, current_prefix, prefixed

    rlog = logging.getLogger("raymia")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    plain = logging.Formatter("[raymia] %(message)s")
    handler.setFormatter(plain)
    saved = rlog.handlers[:], rlog.level, rlog.propagate
    rlog.handlers[:], rlog.propagate = [handler], False
    rlog.setLevel(logging.INFO)
    inside, go_on = threading.Event(), threading.Event()
    seen = {}

    def baseline():
        with prefixed("trial 0: "):
            seen["inside"] = current_prefix()
            rlog.info("bank pool: 1 warm worker(s)", extra={UNPREFIXED: True})  # the sweep's, not trial 0's
            rlog.info("training 1 pack(s)")
            inside.set()
            go_on.wait(10)
            rlog.info("done")

    try:
        t = threading.Thread(target=baseline)
        t.start()
        assert inside.wait(10)
        rlog.info("trial 1 done (1/7)")
        seen["beside"] = current_prefix()
        go_on.set()
        t.join(10)
        rlog.info("front")
    finally:
        rlog.handlers[:], _, rlog.propagate = saved[0], None, saved[2]
        rlog.setLevel(saved[1])
    assert stream.getvalue().splitlines() == ["[raymia] bank pool: 1 warm worker(s)",
                                              "[raymia] trial 0: training 1 pack(s)", "[raymia] trial 1 done (1/7)",
                                              "[raymia] trial 0: done", "[raymia] front"]
    assert seen == {"inside": "trial 0: ", "beside": ""}
    assert handler.formatter is plain


def test_the_command_exits_with_mains_code_after_the_exit_hooks(tmp_path):
    """`python -m raymia` (as the console script) skips the interpreter's teardown, not the exit hooks:
    what a hook prints still comes out, and the exit code is main's."""
    hook = tmp_path / "sitecustomize.py"
    hook.write_text("import atexit, sys\natexit.register(lambda: print('hook ran', file=sys.stderr))\n")
    import os

    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    ok = subprocess.run([sys.executable, "-m", "raymia", "list", "trainers"], capture_output=True, text=True,
                        timeout=120, env=env)
    assert ok.returncode == 0 and "hook ran" in ok.stderr and ok.stdout.startswith("training functions")
    bad = subprocess.run([sys.executable, "-m", "raymia", "audit", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "hook ran" in bad.stderr and "file not found" in bad.stderr


def test_output_piped_into_a_reader_that_stops_early_is_no_traceback():
    """`raymia schema | head -1`: the reader closes the pipe while raymia still writes."""
    proc = subprocess.Popen([sys.executable, "-m", "raymia", "schema"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in stderr, stderr


LOST_INTERRUPT = """
import gc, os, signal, sys
from raymia.cli import _redeliver_lost_interrupts
if sys.argv[1] == "hook":
    sys.unraisablehook = _redeliver_lost_interrupts(sys.unraisablehook)
fired = []
def callback(phase, info):  # Ctrl-C while the collector runs a callback, as Ray's and torch's frees do
    if phase == "start" and not fired:
        fired.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs here, inside the callback
            pass
gc.callbacks.append(callback)
try:
    gc.collect()
    import time
    end = time.monotonic() + 2  # the command's work goes on
    while time.monotonic() < end:
        pass
    print("went on")
except KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.parametrize(("hook", "after"), [("hook", "interrupted"), ("none", "went on")])
def test_a_ctrl_c_lost_in_a_garbage_collection_callback_still_stops_the_command(hook, after):
    """Python only prints a KeyboardInterrupt raised inside a gc callback ("Exception ignored") and goes on:
    a final audit went on after such a Ctrl-C. raymia's hook raises it again in the main thread."""
    out = subprocess.run([sys.executable, "-c", LOST_INTERRUPT, hook], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == after, (out.stdout, out.stderr)


TERM_SPEC = """
name: term
plan: {{num_models: 4, population: 200}}
model: {{params: {{hidden: [64]}}}}
train: {{epochs: 300}}
attacks: [{{name: loss}}, {{name: lira_online}}]
bank: {{pack_size: 1, engine: local}}
output_dir: {out}/runs
tracking: {{uri: "sqlite:///{out}/mlflow.db", experiment: term}}
"""


@pytest.mark.slow
def test_sigterm_stops_an_audit_as_ctrl_c_does_and_the_same_command_resumes_it(tmp_path):
    """SIGTERM is how a cluster stops a run (`ray job stop`, a pod's deletion, systemd, `kill`): one line, exit
    143 (128 + 15) well within `ray job stop`'s 3 s before SIGKILL, no traceback, nothing left RUNNING in
    MLflow; the same audit then trains only the packs the stop cut off, to the numbers of a run never
    stopped. (The bank trains in the process, `bank.engine: local`: the handler is the command's, whatever
    trains; tests/test_api.py checks that starting Ray keeps it.)"""
    import glob
    import os
    import signal

    import yaml
    from mlflow.tracking import MlflowClient

    spec = tmp_path / "term.yaml"
    spec.write_text(TERM_SPEC.format(out=tmp_path))
    packs = str(tmp_path / "runs" / "signals" / "*" / "k1-pack-*.json")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "raymia", "audit", str(spec)], stdout=subprocess.DEVNULL,
                                stderr=err, env=env, start_new_session=True)
    took = signal_on_file(proc, packs, signal.SIGTERM, group=False, within=120, log=tmp_path / "err")
    stderr = (tmp_path / "err").read_text()
    assert proc.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == \
        "raymia: stopped by SIGTERM; finished work is stored and the same command resumes it", stderr[-3000:]
    assert "Traceback" not in stderr and took < 3, (took, stderr[-3000:])
    kept = {p: (os.path.getmtime(p), open(p, "rb").read()) for p in glob.glob(packs)}
    assert 1 <= len(kept) < 4, kept  # stopped mid-bank, its finished packs stored
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("term")
    assert exp is None or not client.search_runs([exp.experiment_id])  # the audit's run opens when it reports

    from raymia.audit import run_audit
    from raymia.spec import AuditSpec

    again = run_audit(str(spec), console=False, page=False)  # what the same command runs
    assert {p: (os.path.getmtime(p), open(p, "rb").read()) for p in kept} == kept  # none trained again
    assert len(glob.glob(packs)) == 4
    exp = client.get_experiment_by_name("term")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    never_stopped = yaml.safe_load(TERM_SPEC.format(out=tmp_path / "ref"))
    never_stopped["tracking"] = {"enabled": False}
    ref = run_audit(AuditSpec.model_validate(never_stopped), console=False, page=False)
    assert again.utility == ref.utility
    assert run.data.metrics["test_accuracy"] == pytest.approx(ref.utility["test_accuracy"])
    for attack in ("loss", "lira_online"):
        assert again.attacks[attack]["auc"] == ref.attacks[attack]["auc"]
        assert run.data.metrics[f"{attack}/auc"] == pytest.approx(ref.attacks[attack]["auc"])


def test_a_stop_waits_for_the_database_write_it_lands_in():
    """The stop a SIGTERM to the process group raises in a sweep's Tune loop is held while the main thread
    writes MLflow's or Optuna's SQLite store (cut short there, SQLAlchemy logs a traceback), and raised as
    the outermost write ends; outside one it is raised at once."""
    from raymia.errors import stop_now, uninterruptible

    done = []
    with pytest.raises(KeyboardInterrupt):
        with uninterruptible():
            with uninterruptible():
                stop_now()
                done.append("inner")
            done.append("outer")
    assert done == ["inner", "outer"]
    with uninterruptible():  # the stop was raised once: a later section ends normally
        pass
    with pytest.raises(KeyboardInterrupt):
        stop_now()
    done.clear()
    with pytest.raises(KeyboardInterrupt):  # a second stop while the first waits (a write that hangs): at once
        with uninterruptible():
            stop_now()
            done.append("held")
            stop_now()
            done.append("not reached")
    assert done == ["held"]
    with uninterruptible():  # and it was raised once
        pass


def test_a_stop_in_pythons_import_machinery_lands_as_the_import_returns(tmp_path, monkeypatch):
    """A stop raised inside importlib's bootstrap, between `_imp.acquire_lock()` and the `try` that releases
    it, left Python's global import lock held for good: every other thread's import then waited forever (a
    stopped sweep that never ended, its main thread waiting on the thread that made its MLflow run). The
    stop now lands in the import's caller, as the import returns. A trace function calls the handler where
    Python would run it for a signal arriving at that point."""
    import _imp
    import importlib
    import importlib._bootstrap as bootstrap
    from pathlib import Path

    from raymia import cli

    code = bootstrap._get_module_lock.__code__
    source = Path(importlib.__file__).with_name("_bootstrap.py").read_text().splitlines()
    taken = [n for n in range(code.co_firstlineno, code.co_firstlineno + 30)
             if source[n - 1].strip() == "_imp.acquire_lock()"]
    if not taken or source[taken[0]].strip() != "try:":
        pytest.skip("this Python's _get_module_lock is not `_imp.acquire_lock()` then `try:`")
    if sys.gettrace() is not None:
        pytest.skip("a tracer (debugger, coverage) is set: a stop is then raised where it lands")
    name = f"stopped_import_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text("x = 1\n")
    (tmp_path / f"{name}_other.py").write_text("y = 2\n")
    monkeypatch.syspath_prepend(tmp_path)

    def signal_lands(frame, event, arg):
        if event == "call":
            return signal_lands if frame.f_code is code and frame.f_locals.get("name") == name else None
        if event == "line" and frame.f_lineno == taken[0] + 1:  # the lock is taken, its `try` not yet
            sys.settrace(None)
            cli._ctrl_c(signal.SIGINT, frame)
            return None
        return signal_lands

    ran = []
    with pytest.raises(KeyboardInterrupt):
        try:
            sys.settrace(signal_lands)
            importlib.import_module(name)
            ran.append("the caller's next line")
        finally:
            sys.settrace(None)
    other = threading.Thread(target=importlib.import_module, args=(f"{name}_other",), daemon=True)
    other.start()
    other.join(10)
    if other.is_alive():  # the lock left held by this thread: give it back, or the test process hangs
        with contextlib.suppress(RuntimeError):
            _imp.release_lock()
    assert not other.is_alive(), "another thread's import waited on the import lock the stop left held"
    assert not ran and name in sys.modules  # the import ended whole, and the stop landed in its caller


def test_sigterm_goes_to_the_ctrl_c_handler_in_place_and_main_puts_the_callers_back(monkeypatch):
    """The handler calls the SIGINT handler in place (Tune's during a sweep: its last save, then the search
    ends), since a `ray job` entrypoint has SIGINT blocked; with SIGINT ignored it stops all the same. `main`
    sets it for its own run only."""
    import signal

    from raymia.cli import _stop_as_ctrl_c, main

    calls, stopped = [], []
    handler = _stop_as_ctrl_c(stopped)
    monkeypatch.setattr(signal, "getsignal", lambda sig: (lambda s, f: calls.append(s)))
    handler(signal.SIGTERM, None)
    assert calls == [signal.SIGINT] and stopped == [signal.SIGTERM]
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN)
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGTERM, None)
    monkeypatch.undo()

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    rlog = logging.getLogger("raymia")  # main sets up the raymia logger: the other tests get it back as it was
    kept = rlog.handlers[:], rlog.propagate, rlog.level
    try:
        assert main(["schema", "--audit"]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
        rlog.handlers[:], rlog.propagate = kept[0], kept[1]
        rlog.setLevel(kept[2])


def test_a_ctrl_c_inside_a_database_write_lands_as_the_write_ends(monkeypatch):
    """Python's own SIGINT handler raised inside a write (SQLAlchemy's call: MLflow's SQLite store stayed
    locked, the stop's own writes then failed); the command's raises as the write ends, and Python's is
    back once the command returns."""
    from raymia import cli
    from raymia.errors import uninterruptible

    wrote = []

    def command(args):
        with uninterruptible():
            os.kill(os.getpid(), signal.SIGINT)
            wrote.append("whole")
        wrote.append("went on after the stop")
        return 0

    monkeypatch.setattr(cli, "cmd_list", command)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = run_cli("list")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert done.returncode == 130 and wrote == ["whole"]
    assert "raymia: interrupted; finished work is stored" in done.stderr


def test_a_stopped_commands_exit_is_bounded_and_says_where_it_waited():
    """After a stop, the exit (non-daemon threads joined, then the exit hooks) waits at most a few seconds:
    one that waited for good after the stop's last line left a stopped sweep running, saying nothing. It
    exits with the stop's code, and every thread's stack says what held it."""
    code = """
import signal, sys, threading
from raymia import cli

def command(argv, stopped):
    threading.Thread(target=threading.Event().wait, name="never-ends").start()  # the exit would join it
    stopped.append(signal.SIGTERM)
    return 143

cli._main = command
cli.entry()
"""
    started = time.time()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    took = time.time() - started
    assert done.returncode == 143 and took < 3 + 10, (done.returncode, took, done.stderr[-2000:])
    assert "raymia: the exit still waited after 3 s (threads or exit hooks)" in done.stderr, done.stderr
    assert "in wait" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_sigusr1_prints_every_threads_stack_and_the_command_runs_on():
    """`kill -USR1 PID` on a command that seems stuck says where each thread waits, and the command goes
    on: without it, SIGUSR1 would end the process (exit -10)."""
    code = """
import os, signal, sys, threading
from raymia import cli
waiting = threading.Event()
threading.Thread(target=waiting.wait, name="beside", daemon=True).start()

def command(argv, stopped):
    os.kill(os.getpid(), signal.SIGUSR1)
    print("ran on")
    return 0

cli._main = command
sys.exit(cli.main([]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "ran on\n", (done.returncode, done.stderr[-2000:])
    assert "Current thread" in done.stderr and 'line 8 in command' in done.stderr, done.stderr
    assert done.stderr.count("Thread 0x") == 1 and "in wait" in done.stderr, done.stderr  # the other thread
