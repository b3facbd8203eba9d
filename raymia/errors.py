"""User-facing errors: each one becomes a single line on stderr and exit code 2 in the CLI."""

from __future__ import annotations

import contextlib
import sys
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


def stop_now(frame=None) -> None:
    """Raise KeyboardInterrupt in the main thread (from a signal handler, `frame` the one it interrupted):
    now, as its open `uninterruptible` section ends, or as the import it landed in returns to its caller
    (`_after_the_import`). A second stop while one waits is raised at once: a write that hangs (a locked
    database, an artifact store that does not answer) is the user's to cut short."""
    if not _held["stop"] and (_held["depth"] or _after_the_import(frame)):
        _held["stop"] = True
        return
    _held["stop"] = False
    raise KeyboardInterrupt


_IMPORTS = "<frozen importlib._bootstrap>"


def _after_the_import(frame) -> bool:
    """Whether a stop that landed in Python's import machinery (`frame` in importlib's bootstrap) is held
    until the import returns to its caller, and raised there (a trace function on the caller's frame, for
    the moments until then). Raised inside the machinery, between a lock's acquisition and the `try` or
    `with` that releases it, it would leave that lock (the global import lock, or a module's) held for
    good, and every other thread's import waiting forever. With a tracer already set (a debugger,
    coverage) the stop is raised where it landed: the tracer is not this function's to replace."""
    if frame is None or frame.f_code.co_filename != _IMPORTS or sys.gettrace() is not None:
        return False
    caller = frame
    while caller is not None and caller.f_code.co_filename.startswith("<frozen importlib"):
        caller = caller.f_back
    if caller is None:
        return False

    def at_the_caller(frame, event, arg):
        sys.settrace(None)
        frame.f_trace = None
        if _held["stop"] and not _held["depth"]:
            _held["stop"] = False
            raise KeyboardInterrupt

    caller.f_trace = at_the_caller
    sys.settrace(lambda frame, event, arg: None)  # on for this thread; frames called from now on untraced
    return True


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


def close_names(given: object, accepted) -> list[str]:
    """The names of `accepted` that `given`, none of them, was likely meant as: another case, those it starts
    (up to 3: 'lira' for lira_offline and lira_online), one it adds a suffix to (hidden_size for hidden), else
    the nearest by difflib's ratio (a typo)."""
    import difflib

    name, accepted = str(given), [str(a) for a in accepted]
    low = {a.lower(): a for a in accepted}
    if name in accepted:
        return []
    return ([low[name.lower()]] if name.lower() in low else
            [a for a in accepted if name and a.lower().startswith(name.lower())][:3]
            or [a for a in accepted if len(a) >= 4 and name.lower().startswith(a.lower())][:1]
            or difflib.get_close_matches(name, accepted, n=2, cutoff=0.75))


def did_you_mean(given: object, accepted=(), *, near: list[str] | None = None) -> str:
    """" (did you mean 'population'?)" for a name that is none of `accepted` but close to one (`close_names`,
    or the names `near` where the caller found them), else "": it goes before an error's list of what is
    accepted, which stays whole."""
    near = close_names(given, accepted) if near is None else near
    return f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
