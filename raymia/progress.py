"""Progress bars for a person at a terminal: the bank's packs, the attacks, a sweep's trials, the inversion
GANs' training steps.

The `[raymia]` lines stay the record of a run (they read the same in a log file and in Ray's forwarded
worker output); a bar only adds, at the bottom of an interactive terminal, how far a long step is and the
time it has left. Bars are off until `enable` (the `raymia` command calls it when stdout and stderr are a
terminal, unless --quiet or --no-progress), so library callers, Ray workers and sweep trial processes
never draw one. While a bar shows, every line written to stdout or stderr (raymia's and Ray's loggers,
Ray's forwarded worker output) is printed above it instead of through it; the bars vanish when the last
one closes. rich is imported only once bars are enabled: the compute core runs without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

_lock = threading.RLock()
_console: Any = None  # the rich Console bars draw on; None: bars are off
_progress: Any = None  # the rich Progress while a bar is open
_open = 0  # bars open now
_restreamed: list[tuple[logging.StreamHandler, Any]] = []  # handlers pointed at the display, their own stream


def terminal() -> bool:
    """Whether a person watches this process's output: stdout and stderr both a terminal that draws."""
    try:
        tty = sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def enable(console: Any = None) -> None:
    """Draw bars from now on, on `console` (default: a rich Console on stderr)."""
    global _console
    from rich.console import Console

    with _lock:
        _console = console if console is not None else Console(stderr=True)


def disable() -> None:
    """No bars from now on, and any still open taken down (a thread that outlives the command, such as a
    sweep's baseline on Ctrl-C, must not leave the terminal's cursor hidden or its streams redirected)."""
    global _console, _open
    with _lock:
        _console = None
        if _progress is not None:
            _open = 1
            _stop()


class Bar:
    """One bar: `advance` by finished units, or `update` to a count; does nothing while bars are off."""

    def __init__(self, progress: Any, task: Any):
        self._progress, self._task = progress, task

    def __reduce__(self):  # pickled with what holds it (Tune pickles its callbacks): a bar stays in its process
        return Bar, (None, None)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, completed: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed)

    def restart(self, completed: int) -> None:
        """Count from `completed` as if the bar opened now: work done before (a resumed run's) does not
        enter the time-left estimate."""
        if self._progress is not None:
            self._progress.reset(self._task, completed=completed)


@contextlib.contextmanager
def bar(description: str, total: int, completed: int = 0) -> Iterator[Bar]:
    """A bar of `total` units for the block's duration (a no-op Bar while bars are off or total is 0)."""
    with _lock:
        on = _console is not None and total > 0
        if on:
            progress = _start()
            task = progress.add_task(description, total=total, completed=completed)
            progress.refresh()  # drawn now, not at the next tick
    if not on:
        yield Bar(None, None)
        return
    try:
        yield Bar(progress, task)
    finally:
        with _lock:
            if progress is _progress:  # not taken down by `disable` meanwhile
                progress.refresh()  # its last count, before it goes
                progress.remove_task(task)
                _stop()


def steps(span: range, description: str) -> Iterator[int]:
    """The steps of `span` (a training's, from where a resumed one starts) under a bar of `span.stop`."""
    with bar(description, span.stop, completed=span.start) as shown:
        for step in span:
            yield step
            shown.advance()


def _start() -> Any:
    """The Progress display, started by the first open bar (call with _lock held)."""
    global _progress, _open
    if _progress is None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        before = sys.stdout, sys.stderr
        _progress = Progress(TextColumn("[raymia] {task.description}", markup=False), BarColumn(),
                             MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                             console=_console, transient=True, redirect_stdout=True, redirect_stderr=True)
        _progress.start()  # sys.stdout and sys.stderr now print above the bars
        # handlers made before hold the streams themselves (logging.StreamHandler keeps sys.stderr as it was)
        for old, new in zip(before, (sys.stdout, sys.stderr)):
            if new is old:
                continue
            for h in _stream_handlers():
                if h.stream is old:
                    _restreamed.append((h, h.setStream(new)))
    _open += 1
    return _progress


def _stop() -> None:
    """Close the display once no bar is open (call with _lock held)."""
    global _progress, _open
    _open -= 1
    if _open == 0 and _progress is not None:
        for h, stream in reversed(_restreamed):
            h.setStream(stream)
        _restreamed.clear()
        _progress.stop()  # restores sys.stdout and sys.stderr
        _progress = None


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                      if isinstance(x, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
