"""A stop (the command's SIGTERM handler, and its Ctrl-C) that arrives while MLflow writes to its SQLite
store waits for that write: one cut short inside SQLAlchemy left the database locked, and every later write
of the stop (the sweep's runs ended KILLED, the parent run) failed after SQLite's 20 s wait, exit 1 after
43 s. Python's own Ctrl-C left the run RUNNING, or KILLED with its report not stored."""

from __future__ import annotations

import os
import signal

import pytest

STOPS = ["SIGTERM", "SIGINT"]


def _handler(name: str):
    """The raymia command's handler of that signal."""
    from raymia import cli

    return cli._stop_as_ctrl_c([]) if name == "SIGTERM" else cli._ctrl_c


@pytest.mark.parametrize("stop", STOPS)
def test_a_stop_during_a_runs_end_waits_for_the_write_and_leaves_the_store_usable(tmp_path, stop):
    from mlflow.tracking import MlflowClient
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from raymia import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rid = tracking.open_run(uri, "stops", "a run", {"p": 1})
    sent = []

    def signal_inside_the_write(conn, cursor, statement, parameters, context, executemany):
        if not sent and statement.lstrip().upper().startswith("UPDATE RUNS"):  # set_terminated's write
            sent.append(statement)
            os.kill(os.getpid(), signal.Signals[stop])  # its Python handler runs inside SQLAlchemy's call

    previous = signal.signal(signal.Signals[stop], _handler(stop))
    event.listen(Engine, "before_cursor_execute", signal_inside_the_write)
    try:
        with pytest.raises(KeyboardInterrupt):
            tracking.close_run(uri, rid, {"m": 0.5})
    finally:
        event.remove(Engine, "before_cursor_execute", signal_inside_the_write)
        signal.signal(signal.Signals[stop], previous)
    assert sent
    client = MlflowClient(uri)
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.metrics == {"m": 0.5}  # the write ended whole
    client.set_tag(rid, "after", "the stop")  # the store takes writes at once: not locked
    assert client.get_run(rid).data.tags["after"] == "the stop"


@pytest.mark.parametrize("stop", STOPS)
def test_a_stop_during_an_artifacts_copy_ends_the_run_whole_and_then_stops(tmp_path, stop):
    """Inside MLflow's copy of an artifact the stop made MLflow's own cleanup raise EBADF (exit 1 with a
    traceback, seen by benchmarks/kill_points.py): the run's end now finishes first."""
    import sys

    from mlflow.tracking import MlflowClient

    from raymia import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    report = tmp_path / "report.txt"
    report.write_text("the run's report\n")
    rid = tracking.open_run(uri, "stops", "a run", {"p": 1})
    armed = [True]

    def signal_as_the_copy_opens(event, args):
        if armed[0] and event == "open" and str(args[0]) == str(report):
            armed[0] = False
            os.kill(os.getpid(), signal.Signals[stop])

    sys.addaudithook(signal_as_the_copy_opens)  # hooks stay for the process: this one fires once
    previous = signal.signal(signal.Signals[stop], _handler(stop))
    try:
        with pytest.raises(KeyboardInterrupt):
            tracking.close_run(uri, rid, {"m": 0.5}, [report])
    finally:
        armed[0] = False
        signal.signal(signal.Signals[stop], previous)
    client = MlflowClient(uri)
    assert client.get_run(rid).info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(rid)] == ["report.txt"]
