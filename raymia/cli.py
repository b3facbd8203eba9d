"""The `raymia` command: audit | sweep | check | report | pareto | schema | list."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

from raymia import __version__, progress
from raymia.errors import Interrupted, RaymiaError, stop_now

KINDS = ("datasets", "models", "defenses", "attacks", "inversion", "ood", "trainers")
GATE_FAILED = 3  # an audit that ran to the end and broke a condition of its spec's `gate` (a CI's failure)


def _registries():
    from raymia.attacks import ATTACKS
    from raymia.data import DATASETS
    from raymia.data.ood import NONMEMBER_SETS
    from raymia.defenses import DEFENSES
    from raymia.inversion.registry import INVERSION
    from raymia.models import MODELS
    from raymia.train.function import TRAINERS

    return {"datasets": DATASETS, "models": MODELS, "defenses": DEFENSES, "attacks": ATTACKS,
            "inversion": INVERSION, "ood": NONMEMBER_SETS, "trainers": TRAINERS}


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    from raymia.registry import param_table
    from raymia.space import describe

    regs = _registries()
    console = Console(width=None if sys.stdout.isatty() else 160, markup=False, emoji=False)
    # `list attacks` shows every attack, membership and inversion; `list inversion` the latter only
    kinds = {"attacks": ["attacks", "inversion"]}.get(args.kind, [args.kind]) if args.kind else KINDS
    for kind in kinds:
        if kind == "trainers" and not regs[kind].entries():
            console.print("training functions: none registered (plug-ins register them; `train.function` also "
                          "takes module:function)")
            continue
        for entry in regs[kind].entries():
            label = {"inversion": "inversion attack", "ood": "non-member set", "trainers": "training function"
                     }.get(kind, kind[:-1])
            console.print(Text.assemble(f"{label} ", (entry.name, "bold"), f": {entry.doc}"))
            # Long cells wrap at spaces and fold a word longer than the column, so nothing is cut off
            table = Table()
            table.add_column("parameter", no_wrap=True)
            table.add_column("type", overflow="fold")
            table.add_column("default", overflow="fold")
            table.add_column("description", overflow="fold", ratio=1)
            space = entry.obj.search_space() if kind == "defenses" else {}
            if space:
                table.add_column("search space", overflow="fold")
            rows = param_table(entry.params)
            if not rows:
                table.add_row("(none)", "", "", "", *([""] if space else []))
            for name, typ, default, desc in rows:
                extra = [describe(space[name]) if name in space else ""] if space else []
                table.add_row(name, typ, default, desc, *extra)
            if Measurement.get(console, console.options, table).maximum > console.width:
                # too wide for the console: the columns beside the description give it room (at 100
                # columns rich would share the width out evenly, the description's lines a few words long)
                for column, cap in zip(table.columns[1:], (20, 16, None, 20)):
                    column.max_width = cap
            console.print(table)
            console.print()
    return 0


@contextlib.contextmanager
def _in_file(path) -> Iterator[None]:
    """A spec field's error found after loading (a sweep's objectives, space and constraints, the attacks'
    plan checks) names the spec file first, as the schema's errors do."""
    from raymia.errors import SpecError
    from raymia.spec import SweepSpec

    try:
        yield
    except SpecError as e:
        field = (e.where or "").split(".")[0].split("[")[0]
        named = path is not None and (e.where or "").startswith(f"{path}: ")  # a file such as sweep.yaml: named once
        if path is None or named or field not in SweepSpec.model_fields or field == "output_dir":  # --output-dir may set it
            raise
        message = str(e)[len(e.where) + 2:]
        raise SpecError(message, where=f"{path}: {e.where}") from None


def cmd_audit(args: argparse.Namespace) -> int:
    from raymia.audit import run_audit
    from raymia.resolve import load_spec
    from raymia.spec import AuditSpec

    if args.from_trial is not None:
        from raymia.sweep import spec_of_trial

        spec = spec_of_trial(args.spec, args.from_trial, args.set, args.output_dir)
    else:
        spec = load_spec(args.spec, args.set, kind=AuditSpec)
    with _in_file(args.spec):
        result = run_audit(spec, output_dir=args.output_dir)
    return GATE_FAILED if result.gate_failures else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from raymia.resolve import load_spec
    from raymia.spec import SweepSpec
    from raymia.sweep import run_sweep

    spec = load_spec(args.spec, args.set, kind=SweepSpec)
    with _in_file(args.spec):
        run_sweep(spec, output_dir=args.output_dir, resume=args.resume, fresh=args.fresh)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from raymia.check import check_spec, print_report

    with _in_file(args.spec):
        report = check_spec(args.spec, args.set, args.output_dir, from_trial=args.from_trial)
    print_report(report)
    return 0


def _with_references(objectives: list[dict], given: list[str]) -> list[dict]:
    """The objectives with each --reference METRIC=VALUE set on its objective."""
    import math

    out = [dict(o) for o in objectives]
    for item in given:
        metric, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not math.isfinite(number):
            raise RaymiaError(f"expected METRIC=VALUE with a finite number, got {item!r}", where="--reference")
        match = [o for o in out if o["metric"] == metric]
        if not match:
            raise RaymiaError(f"{metric!r} is no objective of the sweep; objectives: "
                              f"{', '.join(o['metric'] for o in out)}", where="--reference")
        from raymia.errors import SpecError
        from raymia.spec import Objective

        try:  # the spec's own check: within the values the metric can take
            Objective(metric=metric, mode=match[0]["mode"], reference=number)
        except SpecError as e:
            raise RaymiaError(e.message, where="--reference") from None
        match[0]["reference"] = number
    return out


def _pareto_sources(args: argparse.Namespace) -> tuple[str, str, list[str]]:
    """(MLflow URI, experiment, sweep names) of `raymia pareto`: from the sweeps' spec files, or from
    --uri, --experiment and --sweep; --uri and --experiment given beside spec files win."""
    if not args.specs:
        uri = args.uri or "sqlite:///mlflow.db"
        if args.experiment is None and args.run_id:  # a run id names its experiment
            from raymia.pareto import experiment_of_run

            return uri, experiment_of_run(uri, args.run_id[0]), args.sweep
        if args.experiment is None:
            raise RaymiaError("name the MLflow experiment, or give the sweeps' spec files", where="--experiment")
        return uri, args.experiment, args.sweep
    if args.sweep or args.run_id:
        raise RaymiaError("give the sweeps' spec files or their names, not both", where="--sweep")
    from raymia.resolve import load_spec
    from raymia.spec import SweepSpec

    specs = [load_spec(path, kind=SweepSpec) for path in args.specs]
    for field, given in (("tracking.uri", args.uri), ("tracking.experiment", args.experiment)):
        seen = {getattr(s.tracking, field.split(".")[1]) for s in specs}
        if given is None and len(seen) > 1:
            raise RaymiaError(f"the spec files name {len(seen)} different {field}s ({', '.join(sorted(seen))}); "
                              f"give --{field.split('.')[1]} to choose one",
                              where=field)
    return (args.uri or specs[0].tracking.uri, args.experiment or specs[0].tracking.experiment,
            [s.name for s in specs])


def cmd_pareto(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from raymia.pareto import merge_sweeps, print_front, trials_from_mlflow, write_front
    from raymia.report.html import write_html

    uri, experiment, sweeps = _pareto_sources(args)
    parts = []
    for sweep, run_id in ([(s, None) for s in sweeps] or [(None, r) for r in args.run_id] or [(None, None)]):
        trials, info = trials_from_mlflow(uri, experiment, sweep=sweep, parent_run_id=run_id)
        if not trials:
            raise RaymiaError(f"sweep {info['sweep']!r} (run {info['parent_run_id']}) has no trial runs yet")
        parts.append((trials, info))
    trials, info = merge_sweeps(parts, where="--run-id" if args.run_id else "--sweep")
    objectives = _with_references(info["objectives"], args.reference)
    out_dir = Path(args.output_dir) if args.output_dir else Path("raymia-runs") / "pareto" / info["sweep"]
    ok = [t for t in trials if t["status"] == "ok"]
    title = f"sweep {info['sweep']}: {info.get('defense') or 'defense'} ({len(ok)} trials)"
    res = write_front(trials, objectives, out_dir, title, constraints=info.get("constraints"), name=info["sweep"])
    write_html(out_dir)  # the page a sweep's folder has, from the result.json just written
    print_front(info["sweep"], trials, objectives, res["front"],
                f"MLflow parent run{'s' if len(parts) > 1 else ''} {info['parent_run_id']} -> {out_dir}",
                hypervolume=res["hypervolume"], reference=res["reference"], show_hypervolume=True,
                console=Console(width=None if sys.stdout.isatty() else 160))
    if info.get("note"):
        print(f"note: {info['note']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from raymia.report.html import write_html

    print(write_html(args.dir))
    return 0


def cmd_shadows(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from raymia.audit import attack_cell, spec_of
    from raymia.metrics import metric_label
    from raymia.report.html import write_html
    from raymia.shadows import curve_metrics, shadow_curve

    folder = Path(args.dir)
    if not (folder / "spec.yaml").is_file():
        raise RaymiaError(f"{folder} holds no audit report (spec.yaml); give an audit's folder, "
                          "<output_dir>/audits/NAME-FP", where="dir")
    measured = curve_metrics(spec_of(folder).metrics.fpr_levels)
    if args.metric not in measured:
        raise RaymiaError(f"{args.metric!r} is not among the audit's metrics; accepted: {', '.join(measured)}",
                          where="--metric")
    try:
        curve = shadow_curve(folder, shadows=args.shadows)
    except ValueError as e:
        raise RaymiaError(str(e), where="--shadows") from None
    table = Table(title=f"{metric_label(args.metric)} by shadow models per target (mean ± std over "
                        f"{len(curve.targets)} target(s))")
    table.add_column("shadows", justify="right")
    for a in curve.attacks:
        table.add_column(Text(a), justify="right")  # a label as given: a `[` is text, not markup
    for i, k in enumerate(curve.shadows):
        cells = []
        for a in curve.attacks:
            m, sd = float(curve.mean(a, args.metric)[i]), float(curve.std(a, args.metric)[i])
            cells.append(attack_cell({args.metric: m}, None if m != m else sd, args.metric, len(curve.targets) > 1))
        table.add_row(str(k), *cells)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    for note in curve.notes:
        print(note)
    png, csv = curve.write(folder, args.metric)
    print(f"-> {png}, {csv}, {write_html(folder)}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from raymia.spec import AuditSpec, spec_schema

    print(json.dumps(spec_schema(AuditSpec if args.audit else None), indent=1))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose "invalid choice" (a command, `raymia list`'s kind) says which choice the word
    was likely meant as, as the spec's errors do: `raymia list attack` is `attacks`."""

    def _check_value(self, action, value):
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:
            from raymia.errors import did_you_mean

            raise argparse.ArgumentError(action, e.message + did_you_mean(value, action.choices or ())) from None


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="raymia",
        description="Distributed evaluation of membership-inference attacks and defenses (Ray, PyTorch, MLflow).",
    )
    ap.add_argument("--version", action="version", version=f"raymia {__version__}")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = ap.add_subparsers(dest="command", required=True)

    def with_spec(p: argparse.ArgumentParser) -> None:
        # -q after the command too (raymia audit -q spec.yaml); SUPPRESS keeps a -q given before it
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="only warnings and results")
        p.add_argument("spec", help="YAML spec file (see sweeps/)")
        p.add_argument("--set", action="append", default=[], metavar="dotted.key=value",
                       help="override a spec field, e.g. --set train.epochs=50 (repeatable)")
        p.add_argument("--output-dir", default=None, help="where signals and reports go (default: spec.output_dir)")

    def no_bars(p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-progress", action="store_true",
                       help="no progress bars (shown only when stdout and stderr are a terminal, never with -q)")

    def from_trial(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--from-trial", type=int, default=None, metavar="N",
                       help=f"{what} trial N of the finished sweep SPEC describes (its defense setting); add "
                            "--set plan.num_models=... for more shadows")

    p = sub.add_parser("audit", help="train the bank, run the attacks, report and log one MLflow run; exit "
                       f"status {GATE_FAILED} when a condition of the spec's gate fails")
    with_spec(p)
    no_bars(p)
    from_trial(p, "audit")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("sweep", help="search a defense's hyperparameters for the privacy-utility Pareto front")
    with_spec(p)
    no_bars(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep of this spec (re-running the same command does too)")
    g.add_argument("--fresh", action="store_true", help="discard a previous sweep of the same name and start over")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("check", help="validate an audit or sweep spec and show what it would run and what is "
                                     "already stored, without training (no Ray, no MLflow)")
    with_spec(p)
    from_trial(p, "check the audit of")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("report", help="(re)write report.html in a finished audit's or sweep's folder: one "
                                      "self-contained page of tables, figures and the spec")
    p.add_argument("dir", help="the folder holding the run's result.json (<output_dir>/audits/NAME-FP or "
                               "<output_dir>/sweeps/NAME)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("shadows", help="was the bank large enough? an audit's attacks again with 2, 4, 8, ... of each "
                                       "target's shadows, from its stored signals: a table, shadows.png and "
                                       "shadows.csv in its folder")
    p.add_argument("dir", help="the audit's report folder (<output_dir>/audits/NAME-FP)")
    p.add_argument("--metric", default="auc", help="the metric of the table and plot (default: auc; e.g. tpr_fpr_0.01)")
    p.add_argument("--shadows", type=int, nargs="+", default=None, metavar="K",
                   help="shadow models per target (default: 2, 4, 8, ... and all of them); whole pairs")
    no_bars(p)
    p.set_defaults(func=cmd_shadows)
    p = sub.add_parser("pareto", help="read a sweep back from MLflow: Pareto front, hypervolume, table and plot")
    p.add_argument("specs", nargs="*", metavar="SPEC",
                   help="the sweeps' spec files: their names, MLflow store and experiment (instead of --sweep, "
                        "--uri and --experiment)")
    p.add_argument("--experiment", default=None, help="MLflow experiment holding the sweep (with --run-id: the run's)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--sweep", action="append", default=[],
                       help="sweep name (default: the experiment's newest sweep); repeat it for one front over "
                            "several sweeps with the same objectives")
    which.add_argument("--run-id", action="append", default=[], help="the sweep's MLflow parent run id (repeatable)")
    p.add_argument("--uri", default=None, help="MLflow tracking URI (default: the specs', else sqlite:///mlflow.db)")
    p.add_argument("--output-dir", default=None,
                   help="where front.csv, front.md and pareto.png go (default: raymia-runs/pareto/<sweep>)")
    p.add_argument("--reference", action="append", default=[], metavar="METRIC=VALUE",
                   help="the hypervolume's reference on an objective, instead of the sweep's (repeatable; "
                        "default: the objective's own reference, else the undefended trial's value)")
    p.set_defaults(func=cmd_pareto)
    p = sub.add_parser("schema", help="print the JSON Schema of a sweep spec (an audit's fields and `sweep:`), "
                                      "for editors (YAML language servers read it)")
    p.add_argument("--audit", action="store_true", help="an audit spec's schema (no `sweep:` block)")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("list", help="print the registries with every entry's parameters and defaults")
    p.add_argument("kind", nargs="?", choices=KINDS)
    p.set_defaults(func=cmd_list)
    return ap


def _redeliver_lost_interrupts(previous):
    """An `unraisablehook` that gives a lost Ctrl-C back to the main thread. A KeyboardInterrupt raised
    where Python cannot propagate it (inside a garbage-collection callback or a `__del__`, both frequent
    while Ray and torch free objects) is only printed as "Exception ignored", and the command went on.
    A thread signals the main thread again once the hook has returned: from the hook itself the handler
    would run at once, inside the hook, and be lost the same way (so would a wait for a thread's start)."""
    import _thread

    def again() -> None:
        time.sleep(0.05)
        _thread.interrupt_main()

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _thread.start_new_thread(again, ())
            return
        previous(unraisable)

    return hook


def _stop_as_ctrl_c(stopped: list[int]):
    """A SIGTERM handler that stops the command as Ctrl-C does, noting the signal in `stopped`. SIGTERM is
    how a run is stopped on a cluster: `ray job stop` (SIGKILL 3 s later), a pod's deletion, systemd, `kill`.
    It calls the SIGINT handler in place (Tune's during a sweep: its experiment saved, the search ended; else
    Python's, which raises KeyboardInterrupt), not `kill -INT`: a `ray job` entrypoint has SIGINT blocked.
    A second SIGTERM skips Tune's last save, as a second Ctrl-C does (Tune's handler puts Python's back), and
    so does a SIGTERM that the local Ray of the command's own got too (sent to the process group): Tune's
    cleanup would wait a minute on its GCS, which hangs in its own shutdown; Tune saved its state after the
    last event and raymia's copy after the last finished trial, as a resume after a kill needs."""

    def handler(signum: int, frame) -> None:
        if not stopped:
            stopped.append(signum)
        from raymia.engine.cluster import going_down, leave_a_ray_going_down

        # asked here, where its first processes end within milliseconds of a group's SIGTERM, and remembered:
        # what runs after the stop (the pool's shutdown, Ray's, Tune's at exit) must not wait on a GCS that
        # hangs. The stop may cut any of that short, so Ray's processes and its key-value client go here.
        down = going_down(wait=0.5)
        if down:
            leave_a_ray_going_down()
        on_ctrl_c = signal.getsignal(signal.SIGINT)
        # Python's own (or SIGINT ignored, a background job of a script: stop anyway), after an open
        # database write (`uninterruptible`); Tune's graceful stop needs a Ray that stays up
        if not callable(on_ctrl_c) or on_ctrl_c in (signal.default_int_handler, _ctrl_c) or down:
            stop_now(frame)
            return
        on_ctrl_c(signal.SIGINT, frame)

    return handler


def _ctrl_c(signum: int, frame) -> None:
    """The command's SIGINT handler, in place of Python's own: the same KeyboardInterrupt, raised after an
    open database write (`uninterruptible`) as SIGTERM's stop is. Inside SQLAlchemy's call it left MLflow's
    SQLite store locked, and the stop's own writes (runs ended KILLED) then failed after SQLite's wait.
    Tune's handler, in place during a sweep, puts this one back when it fires."""
    stop_now(frame)


# libraries whose INFO lines a command leaves out (raymia's own progress lines say what they would)
QUIETED_LOGGERS = ("mlflow", "alembic", "ray", "urllib3")


def main(argv: list[str] | None = None) -> int:
    previous = sys.unraisablehook
    sys.unraisablehook = _redeliver_lost_interrupts(previous)
    # the command's own process only: `import raymia` and the Python API leave a caller's handlers alone
    main_thread = threading.current_thread() is threading.main_thread()
    stopped: list[int] = []
    term = signal.signal(signal.SIGTERM, _stop_as_ctrl_c(stopped)) if main_thread else None
    # Python's own only: a caller's handler (or SIGINT ignored) stays as it is
    ctrl_c = main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ctrl_c:
        signal.signal(signal.SIGINT, _ctrl_c)
    # `kill -USR1 PID`: every thread's stack on stderr, and the command runs on (where does it wait?)
    dump = main_thread and hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    if dump:
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (OSError, ValueError, AttributeError):  # a stderr with no file descriptor (a caller's capture)
            dump = False
    try:
        return _main(argv, stopped)
    finally:
        sys.unraisablehook = previous
        if main_thread:
            signal.signal(signal.SIGTERM, term if term is not None else signal.SIG_DFL)
        if ctrl_c:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if dump:
            faulthandler.unregister(signal.SIGUSR1)


def _main(argv: list[str] | None, stopped: list[int]) -> int:
    args = build_parser().parse_args(argv)
    # raymia's own logger gets its own handler: Ray's logging configuration (applied when it starts)
    # must not silence raymia's progress lines.
    rlog = logging.getLogger("raymia")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[raymia] %(message)s"))
    rlog.handlers[:] = [handler]
    rlog.propagate = False
    rlog.setLevel(logging.WARNING if args.quiet else logging.INFO)
    for noisy in QUIETED_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.quiet and not getattr(args, "no_progress", False) and progress.terminal():
        progress.enable()
    # MLflow sets its own logger's level when it is imported (later, lazily), from this variable.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        return args.func(args)
    except (Interrupted, KeyboardInterrupt) as e:
        if stopped:  # by SIGTERM: exit as a shell reports that signal (128 + 15), which a supervisor expects
            print(f"raymia: stopped by {signal.Signals(stopped[0]).name}; finished work is stored and the same "
                  "command resumes it", file=sys.stderr)
            return 128 + stopped[0]
        print(f"raymia: {e}" if isinstance(e, Interrupted) else
              "raymia: interrupted; finished work is stored and a re-run resumes it", file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 130
    except RaymiaError as e:
        print(f"raymia: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `raymia schema | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush has nowhere to fail
        return 0
    finally:
        progress.disable()


EXIT_AFTER_STOP_S = 3.0


def _exit_within(seconds: float, code: int) -> None:
    """Bound a stopped command's exit (its non-daemon threads joined, then the exit hooks): past `seconds`,
    one line and every thread's stack on stderr, then the exit with `code`. A SIGTERM to the process group
    once left a stopped sweep's exit waiting for good after its last line, where nothing said what it
    waited on. Should the GIL never come free, faulthandler's own watchdog ends it 2 s later (exit 1)."""
    def cut() -> None:
        print(f"raymia: the exit still waited after {seconds:g} s (threads or exit hooks); it ends without "
              "them. Where each thread was:", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            faulthandler.dump_traceback(all_threads=True)
        os._exit(code)

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a stderr with no file descriptor
        faulthandler.dump_traceback_later(seconds + 2, exit=True)


def entry() -> None:
    """The `raymia` console script and `python -m raymia`: `main`, then an exit without the interpreter's
    teardown. What a normal exit runs first still runs, in its order: non-daemon threads are joined, then
    the exit hooks (Ray's shutdown, MLflow's and logging's flushes). What is skipped comes after them:
    module teardown and the static destructors of torch, gRPC and Arrow, which write nothing and took
    about 2 s after a quickstart sweep on two cores."""
    import atexit
    import threading

    code = main()
    if code in (130, 143):  # stopped: its finished work is stored, and the user wants the process gone
        _exit_within(EXIT_AFTER_STOP_S, code)
    threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx calls first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe
            pass
    os._exit(code)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    entry()
