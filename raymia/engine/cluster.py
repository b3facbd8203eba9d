"""Connect to a running Ray cluster, or start a local instance when none is running."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from raymia.errors import RaymiaError

log = logging.getLogger("raymia")


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (`auto`: the one `ray start` left running; a `ray job submit`
    job has it set); otherwise start a local instance of this run's own. Without an address Ray would join
    the latest instance on the machine, which may be another run's local one, gone when that run ends. The
    dashboard stays off and Ray's token authentication stays on."""
    import ray

    # Tune reads these when a sweep runs, on a Ray of the caller's too (`caller.as_found` puts them back).
    # Tune's and Train's own console reporters are replaced by raymia's log lines: Tune's legacy reporter
    # at verbose=0 prints nothing (the new one still prints its configuration box and paths).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A failed trial is one raymia line (`sweep._progress_callback`), not Tune's traceback
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # Save Tune's experiment state after every event so a killed sweep loses no finished trial.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    # Tune's default logger callbacks: the sweep adds the JSON one (each trial's result.json) itself; the
    # TensorBoard writer's queue thread (tensorboardX) held the exit of a sweep stopped by a SIGTERM to its
    # process group past EXIT_AFTER_STOP_S, and the CSV one repeats the JSON's numbers.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    _keep_progress_lines_whole()
    if ray.is_initialized():
        return
    if not sys.stdout.isatty():  # Ray colours its prefixes even in a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # Ray announces on every start that token authentication is on; it is, as raymia wants it
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ray applies the LoggingConfig to the driver's root logger too (its level set to WARNING, a handler of
    # its own added): the caller's logging (a notebook's basicConfig, a script's handlers) is put back.
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        check_address(address)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # ray.init replaces the driver's SIGTERM handler with its own (sys.exit, after its core's report
    # "*** SIGTERM received" on stderr): one the process set itself (the raymia command's clean stop, a
    # caller's own) is kept, also while Ray starts: Ray's would end the run at once with exit 15 and no
    # clean stop (its MLflow parent run FAILED). Without one, Ray's is set, as ray.init sets it.
    term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    own = callable(term) or term == signal.SIG_IGN
    before = _ray_descendants() if address == "local" else None  # a cluster's processes are not this run's
    if before is not None:
        _quiet_rays_log_threads()  # its log threads start inside ray.init
    try:
        # A local start runs beside the main thread, which waits where a stop reaches it: a stop that ends
        # Ray's new processes too (a SIGTERM to the process group) left ray.init waiting 30 s on the GCS in
        # one call, in which Python runs no signal handler. Ray then warns that it set no SIGTERM handler
        # (it sets one in the main thread only): the process's own is the one wanted.
        beside = own and before is not None
        with _keeping_sigterm(own), _ending_a_start_cut_short(before, beside), \
                _dropping("ray._private.worker", "SIGTERM handler is not set" if beside else None):
            _beside_the_main_thread(beside)(
                ray.init,
                address=address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                # Ray's own warnings from the workers still reach the console; raymia's workers set their own
                # logger's level (`bank_job.worker_logging`).
                logging_config=ray.LoggingConfig(log_level="WARNING"),
                log_to_driver=True,
                # A local instance only (a cluster's is set when it starts): the driver's last task events
                # wait at most this for the GCS, 5 s by default, all of it when the GCS is gone (`shutdown`).
                _system_config={"task_events_shutdown_flush_timeout_ms": 500} if address == "local" else None,
            )
    except (ConnectionError, RuntimeError) as e:  # what check_address could not foresee (a version mismatch)
        if address == "local":
            raise
        from raymia.errors import first_line

        raise RaymiaError(f"cannot join the Ray cluster at {address}: {first_line(e)}", where="RAY_ADDRESS") from None
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        if own:
            signal.signal(signal.SIGTERM, term)
    keep_token_private()
    _drop_duplicate_worker_deaths()
    res = ray.cluster_resources()
    log.info("Ray: %g CPUs, %g GPUs", res.get("CPU", 0), res.get("GPU", 0))


def _ray_descendants() -> set[int]:
    """The process ids of Ray's processes among this process's descendants (Linux's /proc; none found
    elsewhere): their command line runs Ray's package (GCS, raylet, monitors) or its title is Ray's
    (`ray::DashboardAgent`, a worker's `ray::IDLE`)."""
    import ray

    where, parent, cmd = os.path.dirname(ray.__file__), {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else ()):
        try:
            parent[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError, ValueError):  # ended meanwhile
            continue
    out, new = set(), {os.getpid()}
    while new:
        new = {pid for pid, pp in parent.items() if pp in new} - out
        out |= new
    return {pid for pid in out if where in cmd.get(pid, "") or cmd.get(pid, "").startswith("ray::")}


def _beside_the_main_thread(beside: bool):
    """`call` to run `call(fn, *args, **kwargs)` in a thread of its own while this one waits for it, where
    `beside`: this thread then takes a signal's handler (a stop's KeyboardInterrupt) at once, where a call
    into Ray's core would hold it until that call returns. The thread is kept, parked, for the life of the
    process: Ray starts its local processes with Linux's parent-death signal, which the kernel sends when
    the thread that started them ends, not the process. A call a stop cut short is left to end (a daemon)."""
    if not beside:
        return lambda fn, *args, **kwargs: fn(*args, **kwargs)

    def call(fn, *args, **kwargs):
        out: dict[str, object] = {}
        done = threading.Event()

        def run() -> None:
            try:
                out["value"] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001  # raised in the waiting thread
                out["error"] = e
            done.set()
            threading.Event().wait()  # never set: Ray's processes live while this thread does

        threading.Thread(target=run, name=f"raymia-{getattr(fn, '__name__', 'call')}", daemon=True).start()
        while not done.wait(0.05):
            pass
        if "error" in out:
            raise out["error"]  # type: ignore[misc]
        return out.get("value")

    return call


@contextlib.contextmanager
def _ending_a_start_cut_short(before: set[int] | None, beside: bool = False):
    """A local Ray whose start a stop (Ctrl-C, SIGTERM) or an error cuts short: the processes it had started
    (GCS, raylet, monitors, the raylet's agents and workers: Ray's new processes among this one's
    descendants, but those of `before`) are killed, as ray.init leaves them running for good, with no driver
    to shut them down. Nothing for a cluster joined (`before` None). A start left running `beside` the main
    thread may hold Ray's connect lock, waiting on the processes killed here, and `ray.shutdown` takes that
    lock: Ray's own call of it at the process's exit is taken off (there is nothing left to shut down)."""
    if before is None:
        yield
        return
    try:
        yield
    except BaseException:
        for pid in _ray_descendants() - before:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if beside:
            import atexit

            import ray

            atexit.unregister(ray._private.worker.shutdown)
        raise


@contextlib.contextmanager
def _dropping(logger: str, start: str | None):
    """While it runs, the records of `logger` whose message starts with `start` are dropped (none: all kept)."""
    def keep(record: logging.LogRecord) -> bool:
        return start is None or not record.getMessage().startswith(start)

    logging.getLogger(logger).addFilter(keep)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(keep)


@contextlib.contextmanager
def _keeping_sigterm(keep: bool):
    """While it runs, Ray's setter of the driver's SIGTERM handler (ray.init's two calls) does nothing, when
    `keep`: the handler the process set stays in place."""
    if not keep:
        yield
        return
    from ray._private import utils

    setter = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = setter


def _own_node():
    """The node of the local Ray instance this process started (or joined: its processes are then none);
    None with no Ray running."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return getattr(ray._private.worker, "_global_node", None)


def _own_processes(node) -> list:
    """The processes of `node` that this process started (GCS, raylet, log monitor, dashboard, autoscaler
    monitor); none for a cluster it joined, or with no Ray running."""
    infos = node.all_processes.values() if node is not None else []
    return [info.process for group in infos for info in group]


def going_down(wait: float = 0.0) -> bool:
    """Whether the local Ray instance this process started is going down: one of its processes has ended,
    waiting up to `wait` seconds for one to. A SIGTERM sent to the whole process group (Slurm's scancel,
    `kill -- -PGID`, a container's stop, systemd's control-group kill) reaches them together with the
    driver; the log monitor and the dashboard then end within milliseconds, while the GCS and the raylet hang
    in their own shutdown, so that every call the driver makes to them waits out a timeout (Tune's cleanup
    60 s, `ray.shutdown` 8 s, a key-value put 60 s and then an exit 1 by Ray's core). Never true for a
    cluster joined through RAY_ADDRESS: it has none here. Once seen, it stays true for that instance: its
    processes may all be gone by the next call, and the GCS still hangs."""
    node = _own_node()
    procs = _own_processes(node)
    if procs and _seen_down.get("node") is node:
        return True
    end = time.monotonic() + wait
    while procs:
        if any(p.poll() is not None for p in procs):
            _seen_down["node"] = node
            return True
        if time.monotonic() >= end:
            break
        time.sleep(0.01)
    return False


_seen_down: dict[str, object] = {}  # the local instance `going_down` found going down


def leave_a_ray_going_down() -> None:
    """For the local Ray found going down (`going_down`): its processes, hanging in their own shutdown after
    the signal that reached them, are killed (Ray's shutdown gave each 1 s, also at the process's exit when
    a stop cut raymia's short), and Ray's key-value client is dropped, so that what would call it later
    finds Ray's store closed and goes on (Tune's registry cleanup at exit: its delete waited 60 s on the
    GCS, then Ray's core ended the process with exit 1). So are the workers and agents the raylet started, found
    while it still is their parent: one it forked as the signal came was not signalled, and waited 60 s for
    the raylet it had not yet reached before it gave up."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_reset()
    _quiet_rays_log_threads()
    processes = _own_processes(_own_node())
    for pid in _ray_descendants() if processes else ():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(OSError):
                process.kill()


_RAYS_LOG_THREADS = frozenset({"ray_print_logs", "ray_listen_error_messages"})


def _quiet_rays_log_threads() -> None:
    """The driver threads that forward Ray's logs and errors subscribe to the GCS outside their own error
    handling: one still subscribing when a stop ends the GCS (a SIGTERM to the process group in the first
    moments after `ray.init`, or `leave_a_ray_going_down`'s kill) raised in its thread, and a traceback
    ended the stopped command, also before the stop's handler ran, where the main thread was in a call that
    holds signals. Their connection failures are dropped where the local Ray is going down (`going_down`);
    a failure while it is up, and anything else they raise, is still printed. Set as the local Ray starts."""
    from ray.exceptions import RpcError

    previous = threading.excepthook
    if getattr(previous, "quiets_rays_log_threads", False):
        return

    def excepthook(args):
        if not (args.thread is not None and args.thread.name in _RAYS_LOG_THREADS
                and issubclass(args.exc_type, (RpcError, OSError)) and going_down(wait=0.5)):
            previous(args)

    excepthook.quiets_rays_log_threads = True
    threading.excepthook = excepthook


def shutdown() -> None:
    """`ray.shutdown()`, which for a local instance going down (`going_down`) first kills its processes:
    Ray's graceful stop gives each of them 1 s after a SIGTERM they got already, and the driver's last task
    events then wait for a GCS that is gone (0.5 s, `ensure_ray`'s setting). The command is ending: Ray's
    automatic `ray.init` is turned off too."""
    import ray

    if going_down():
        leave_a_ray_going_down()
        ray._private.worker._global_node.kill_all_processes(check_alive=False, allow_graceful=False)
        # a thread still on Ray (a stopped sweep's baseline, left to end with the process) must not
        # start a new instance through Ray's automatic ray.init
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False
    ray.shutdown()

ADDRESSES = "HOST:PORT (the cluster's GCS address, port 6379 by default), auto, local, or unset"
# Runs in a process of its own: the GCS client of Ray's core prints its warnings to the process's stderr,
# which the parent keeps, and cannot be stopped once it waits. `auto` enables token auth as ray.init does
# for it when a token exists; an explicit address uses RAY_AUTH_MODE as given, as ray.init does.
_PROBE = """
import sys
try:
    from ray._raylet import GcsClient
    if sys.argv[2] == "auto":
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
except ImportError:  # another Ray's internals: ray.init alone says what is wrong
    sys.exit(0)
try:
    GcsClient(address=sys.argv[1])
except Exception as e:
    print(type(e).__name__, e, file=sys.stderr)
    sys.exit(3)
"""


_JOINABLE: set[tuple[str | None, ...]] = set()  # (address, token settings) this process found joinable


def _joinable_key(address: str) -> tuple[str | None, ...]:
    return (address, *(os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")))


def check_address(address: str, timeout: float = 5.0, gcs_timeout: float = 20.0) -> None:
    """One line (a RaymiaError naming RAY_ADDRESS and what to do) when RAY_ADDRESS names no Ray cluster this
    process can join, before ray.init: for a cluster that is down, ray.init retries for minutes (20 tries
    of up to 40 s, printing Ray's warnings), and for a token the cluster refuses for 20 s, then raises a
    traceback naming neither the cause nor the fix. Checked: the scheme (a dashboard URL, which the `ray job`
    commands take, or a Ray Client address), that the GCS port accepts a connection within `timeout`, and
    that the GCS answers this process's token within `gcs_timeout`."""
    if _joinable_key(address) in _JOINABLE:  # a sweep checks before it creates its MLflow run, then ensure_ray
        return
    where = "RAY_ADDRESS"
    scheme = address.split("://", 1)[0].lower() if "://" in address else ""
    if scheme in ("http", "https"):
        raise RaymiaError(
            f"{address} is a dashboard / Jobs API address, which the `ray job` commands use, not one raymia can "
            f"join: run raymia on the cluster with `ray job submit --working-dir . -- raymia ...`, or on one of "
            f"its nodes with RAY_ADDRESS=HEAD_IP:6379; unset RAY_ADDRESS to run on a Ray of this run's own",
            where=where)
    if scheme == "ray":
        raise RaymiaError(
            f"{address} is a Ray Client address, which raymia does not use: submit it with `ray job submit "
            f"--working-dir . -- raymia ...` (RAY_ADDRESS=http://HEAD_IP:8265 for the `ray job` commands); "
            f"accepted here: {ADDRESSES}", where=where)
    if scheme:
        raise RaymiaError(f"{address} is not a Ray address; accepted: {ADDRESSES}", where=where)
    target = address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die
        except ImportError:
            return
        try:
            target = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError:
            raise RaymiaError(
                "auto: no Ray cluster was started on this machine (`ray start --head`); set RAY_ADDRESS to a "
                "cluster's HOST:PORT, or unset it to run on a Ray of this run's own", where=where) from None
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RaymiaError(f"{address} is not a Ray address; accepted: {ADDRESSES}", where=where)
    named = address if target == address else f"{address} ({target})"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        why = "connection refused" if isinstance(e, ConnectionRefusedError) else (
            f"no answer in {timeout:g} s" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__))
        raise RaymiaError(
            f"no Ray cluster at {named} ({why}): start it (`ray start --head --port={port}`) or set RAY_ADDRESS "
            f"to the address of a running one's head (`ray status` there); unset it to run on a Ray of this "
            f"run's own", where=where) from None
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE, target, address], capture_output=True, text=True,
                               timeout=gcs_timeout)
    except subprocess.TimeoutExpired:
        raise RaymiaError(
            f"{named} accepts connections, but no Ray GCS answered there in {gcs_timeout:g} s: is it the "
            f"head's GCS port (`ray start --head --port`, 6379 by default)?", where=where) from None
    if probe.returncode == 0:
        _JOINABLE.add(_joinable_key(address))
        return
    said = probe.stderr
    if "AuthenticationError" in said or "InvalidAuthToken" in said:
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" or address == "auto":
            how = ("give it the cluster's token (`ray get-auth-token` on its head) in RAY_AUTH_TOKEN, in a file "
                   "named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token")
        else:
            how = ("set RAY_AUTH_MODE=token, with the cluster's token (`ray get-auth-token` on its head) in "
                   "RAY_AUTH_TOKEN or ~/.ray/auth_token")
        raise RaymiaError(f"the Ray cluster at {named} refused this process's token: {how}", where=where)
    from raymia.errors import last_error_line

    raise RaymiaError(f"cannot join the Ray cluster at {named}: {last_error_line(said)}", where=where)


def keep_token_private(path: Path | None = None) -> None:
    """Make Ray's token file (default ~/.ray/auth_token) readable by its owner only. Ray writes it with the
    umask's mode (0644 under the usual 022), and whoever reads it can run code on the cluster as its owner."""
    path = path or Path.home() / ".ray" / "auth_token"
    try:
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            path.chmod(0o600)
    except OSError:  # no token file (a joined cluster's token may come from RAY_AUTH_TOKEN), or not ours
        pass


def _keep_progress_lines_whole() -> None:
    """Ray's log deduplication merges worker lines that differ only in their numbers ("pack 1 done (1/8)",
    "pack 2 done (2/8)"), which is what raymia's progress lines are. The driver's deduplicators let through
    every line that their allow pattern finds: raymia's lines are added to it (a pattern the user set in
    RAY_DEDUP_LOGS_ALLOW_REGEX still applies), and every other line is deduplicated as Ray does."""
    try:
        from ray._private import ray_logging
    except ImportError:
        return
    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        allow = dedup.allow_re
        if allow is not None and allow.pattern.startswith(_PROGRESS_LINE):
            continue
        dedup.allow_re = re.compile(_PROGRESS_LINE + (f"|{allow.pattern}" if allow is not None else ""))


_PROGRESS_LINE = r"^\[raymia\] "
_WORKER_DIED = "A worker died or was killed while executing a task by an unexpected system error"
_NODE_LOST = ("Raylet is terminated. Termination is unexpected.",  # the node's own process watcher
              "has been marked dead because the detector has missed too many heartbeats")  # the GCS
_BUNDLE_AT_DEAD_NODE = ("gcs_placement_group_scheduler", "Failed to remove")
# A worker that SIGTERM reaches inside a weakref callback (its node going down) prints Python's report of
# the SystemExit its Ray handler raised there, from "Exception ignored in" to "SystemExit: 1".
_IGNORED, _SIGTERM, _EXIT = "Exception ignored in", "sigterm_handler", "SystemExit"


def console_lines(pid, lines: list[str], said: set[str]) -> list[str]:
    """The lines of one batch of Ray's worker output that reach the console (`said`: what raymia has said
    already, shared across batches). Dropped: a worker's death and a node's end, which raymia says in a line
    of its own (the first node loss here, as one `[raymia]` warning), the placement-group bundles Ray could
    not free on a dead node, and a terminated worker's report of the SystemExit that SIGTERM raised."""
    out: list[str] = []
    skip_to = -1
    for i, line in enumerate(lines):
        if i <= skip_to:
            continue
        if line.startswith(_IGNORED):  # the whole report, when it is in this batch and is the SIGTERM one
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(_EXIT)), None)
            if end is not None and any(_SIGTERM in ln for ln in lines[i:end]):
                skip_to = end
                continue
        if pid == "raylet" and any(m in line for m in _NODE_LOST):
            if "node" not in said:
                said.add("node")
                log.warning("Ray lost a node: its raylet ended unexpectedly (killed, out of memory, or a crash; its "
                            "log is in that node's Ray session folder); its work runs again on the others")
            continue
        if pid == "raylet" and line.startswith(_WORKER_DIED):
            continue
        if pid == "gcs_server" and all(k in line for k in _BUNDLE_AT_DEAD_NODE):
            continue
        out.append(line)
    return out


def _drop_duplicate_worker_deaths() -> None:
    """Ray reports to the driver every worker killed mid-task, a node's end (with the last 20 lines of its
    raylet's log, and again when the GCS marks it dead) and the placement-group bundles it could not free
    on that node. raymia says each loss in one line of its own: the pool names the lost worker and the pack
    that goes back to the queue, a sweep names the trial Tune runs again, and a lost node is one line
    (`console_lines`). Every other message (memory pressure, scheduling) reaches the console as Ray prints
    it. Ray has no switch for these, so its log printer is wrapped."""
    try:
        import ray._private.worker as ray_worker

        original = ray_worker.print_worker_logs
    except (ImportError, AttributeError):
        return
    if getattr(original, "raymia_filtered", False):
        return
    said: set[str] = set()

    def filtered(data, print_file, ignore_prefix=False):
        lines = console_lines(data.get("pid"), [str(ln) for ln in data.get("lines", [])], said)
        if lines:
            original({**data, "lines": lines}, print_file, ignore_prefix)

    filtered.raymia_filtered = True
    ray_worker.print_worker_logs = filtered
