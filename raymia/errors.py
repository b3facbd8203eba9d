"""User-facing errors: each one becomes a single line on stderr and exit code 2 in the CLI."""

from __future__ import annotations

import contextlib
import threading


class RaymiaError(Exception):
    """An error caused by the user's input (spec, data, arguments), not by a bug in raymia."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None):
        self.where, self.message = where, message
        super().__init__(f"{where}: {message}" if where else message)


class SpecError(RaymiaError):
    """A spec field is malformed, unknown or out of range. `where` names the field (dotted path) or file."""


class DataError(RaymiaError):
    """A data file is missing or malformed. `where` names the path."""


class TrainingDiverged(RaymiaError):
    """A model's loss or weights stopped being finite: the recipe's settings (a learning rate too high), not
    a bug; one line naming the models and the setting to change."""


class Interrupted(RaymiaError):
    """Work stopped by the user (Ctrl-C) after its finished part was stored: exit code 130, as a shell
    reports SIGINT, not the bad-input code."""

    exit_code = 130


_held = {"depth": 0, "stop": False}  # the main thread's open `uninterruptible` sections; a stop waiting for them


@contextlib.contextmanager
def uninterruptible():
    """A database write in the main thread (MLflow's and Optuna's SQLAlchemy stores, from Tune's callbacks
    and searcher) that `stop_now` does not cut short: SQLAlchemy logs a traceback when a KeyboardInterrupt
    lands inside it. The stop is raised as the outermost section ends. Other threads never get one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if not _held["depth"] and _held["stop"]:
            _held["stop"] = False
            raise KeyboardInterrupt


def stop_now() -> None:
    """Raise KeyboardInterrupt in the main thread (from a signal handler): now, or as its open
    `uninterruptible` section ends. A second stop while one waits is raised at once: a write that hangs (a
    locked database, an artifact store that does not answer) is the user's to cut short."""
    if _held["depth"] and not _held["stop"]:
        _held["stop"] = True
        return
    _held["stop"] = False
    raise KeyboardInterrupt


def not_found(path: object, what: str = "file") -> str:
    """"file not found" (or another `what`), and for a relative path the folder it was looked for in (a
    spec's relative paths are read from the current folder, not the spec's); a folder where a file was
    asked for says so."""
    import os

    text = str(path)
    if what == "file" and os.path.isdir(os.path.expanduser(text)):
        return "is a folder; give the path of a file"
    return f"{what} not found" + ("" if os.path.isabs(os.path.expanduser(text)) else
                                  f" (a relative path, looked for in the current folder {os.getcwd()})")


def last_error_line(text: str) -> str:
    """One line of why something failed, from a traceback or a Ray error message: its last `SomeError: ...`
    line (the exception raised), else its first line (a node died, a process was killed)."""
    import re

    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*: ", ln)]
    return (raised[-1] if raised else lines[0] if lines else "no message")[:300]


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
