"""Progress bars: off unless enabled, every line printed above them while they show, the streams and log
handlers given back when the last closes, and the bars of a real audit (packs, attacks x targets)."""

from __future__ import annotations

import io
import logging
import pickle
import re
import sys

from rich.console import Console

import raymia
from raymia import progress
from raymia.cli import build_parser
from tests.conftest import ANSI, terminal_bars


def _text(buf: io.StringIO) -> str:
    return ANSI.sub("", buf.getvalue())


def test_bars_are_off_unless_enabled():
    stderr = sys.stderr
    with progress.bar("packs", 3) as b:
        assert sys.stderr is stderr  # nothing redirected
        b.advance()
        b.update(3)


def test_lines_print_above_the_bar_and_the_streams_come_back():
    with terminal_bars() as (buf, handler):
        stream, stdout, stderr = handler.stream, sys.stdout, sys.stderr
        assert stream is stderr
        log = logging.getLogger("raymia")
        with progress.bar("bank packs", 3) as outer:
            assert handler.stream is not stream and sys.stderr is not stderr  # through the display now
            with progress.bar("attacks x targets", 2) as inner:
                log.info("pack 0 done")
                inner.advance(2)
            assert sys.stderr is not stderr  # the outer bar still shows
            outer.advance(3)
            print("a line on stdout")
        assert handler.stream is stream and sys.stdout is stdout and sys.stderr is stderr
        shown = _text(buf)
        assert shown.count("[raymia] pack 0 done\n") == 1 and "a line on stdout\n" in shown
        assert "[raymia] bank packs" in shown and "3/3" in shown and "2/2" in shown
        assert "pack 0 done" not in stderr.getvalue()  # not also written past the display
        log.info("after the bars")
        assert "after the bars" not in _text(buf) and stderr.getvalue() == "[raymia] after the bars\n"


def test_a_bar_pickles_as_an_inert_one():
    """Tune pickles its callbacks, the sweep's trials bar with them; the copy must not carry the display."""
    buf = io.StringIO()
    progress.enable(Console(file=buf, force_terminal=True))
    try:
        with progress.bar("trials", 2) as b:
            copy = pickle.loads(pickle.dumps(b))
            copy.advance()
            assert copy._progress is None and b._progress is not None
    finally:
        progress.disable()


def test_an_audit_shows_its_packs_and_attacks(tmp_path):
    spec = {"name": "bars", "plan": {"num_models": 4, "population": 200}, "model": {"params": {"hidden": [32]}},
            "attacks": ["loss"], "bank": {"engine": "local", "pack_size": 2}, "output_dir": str(tmp_path / "runs")}
    with terminal_bars() as (buf, _):
        raymia.run_audit(spec, ["train.epochs=1", "tracking.enabled=false"], console=False)
    shown = _text(buf)
    assert re.search(r"\[raymia\] bank packs .* 2/2", shown), shown
    assert re.search(r"\[raymia\] attacks x targets .* 4/4", shown), shown
    assert "[raymia] worker 0: pack 1 done (2/2" in shown  # the progress lines stay, above the bars


def test_the_commands_of_long_work_take_no_progress():
    for command in ("audit", "sweep", "shadows"):
        assert build_parser().parse_args([command, "s.yaml", "--no-progress"]).no_progress


def test_steps_count_from_a_resumed_start_and_close_on_a_break():
    with terminal_bars() as (buf, handler):
        stream = handler.stream
        assert list(progress.steps(range(3, 5), "gmi: GAN training steps")) == [3, 4]
        assert "gmi: GAN training steps" in _text(buf) and "5/5" in _text(buf)
        for step in progress.steps(range(0, 10), "plg_mi: cGAN training steps"):
            if step == 2:
                break  # a stop_after, or a return from inside the loop
        assert progress._progress is None and handler.stream is stream  # the bar closed with the loop


def test_disable_takes_down_a_bar_left_open():
    """A thread that outlives the command (a sweep's baseline on Ctrl-C) must not leave the display up: the
    terminal's cursor hidden, the streams redirected."""
    with terminal_bars() as (buf, handler):
        stream, stderr = handler.stream, sys.stderr
        left = progress.bar("bank packs", 4)
        left.__enter__().advance()
        progress.disable()
        assert progress._progress is None and handler.stream is stream and sys.stderr is stderr
        drawn = buf.getvalue()
        assert drawn.rfind("\x1b[?25h") > drawn.rfind("\x1b[?25l") >= 0  # the cursor hidden, then shown again
        left.__exit__(None, None, None)  # the thread's block ends later: nothing left to close
        assert progress._open == 0
