"""Connect to a running Ray cluster, or start a local instance when none is running."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

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
    _keep_progress_lines_whole()
    if ray.is_initialized():
        return
    if not sys.stdout.isatty():  # Ray colours its prefixes even in a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # Ray announces on every start that token authentication is on; it is, as raymia wants it
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ray applies the LoggingConfig to the driver's root logger too (its level set to WARNING, a handler of
    # its own added): the caller's logging (a notebook's basicConfig, a script's handlers) is put back.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or "local",
            include_dashboard=False,
            logging_level=logging.WARNING,
            # Ray's own warnings from the workers still reach the console; raymia's workers set their own
            # logger's level (`bank_job.worker_logging`).
            logging_config=ray.LoggingConfig(log_level="WARNING"),
            log_to_driver=True,
        )
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    keep_token_private()
    _drop_duplicate_worker_deaths()
    res = ray.cluster_resources()
    log.info("Ray: %g CPUs, %g GPUs", res.get("CPU", 0), res.get("GPU", 0))


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
