"""Connect to a running Ray cluster, or start a local instance when none is running."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("raymia")


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (or the one `ray start` left running); otherwise start a
    local instance. The dashboard stays off and Ray's own defaults (localhost binding, token
    authentication) are left as they are."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Tune's and Train's own console reporters are replaced by raymia's log lines: Tune's legacy reporter
    # at verbose=0 prints nothing (the new one still prints its configuration box and paths).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Save Tune's experiment state after every event so a killed sweep loses no finished trial.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    ray.init(
        address=os.environ.get("RAY_ADDRESS"),
        include_dashboard=False,
        logging_level=logging.WARNING,
        # Workers' Python loggers at ERROR: without the dashboard, Train's placement-group cleaner warns
        # every few seconds that the state API is unavailable. raymia's workers set their own logger's
        # level (`bank_job.worker_logging`).
        logging_config=ray.LoggingConfig(log_level="ERROR"),
        log_to_driver=True,
    )
    res = ray.cluster_resources()
    log.info("Ray: %g CPUs, %g GPUs", res.get("CPU", 0), res.get("GPU", 0))
