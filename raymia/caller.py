"""`as_found`: what `run_audit` and `run_sweep` change in the caller's process, put back when they return.

A notebook or script calls them among its own work, so neither may leave the process otherwise than it
found it:
- torch's intra-op thread count and global CPU random state (a local bank trains in the caller's process,
  setting the bank's `cpus_per_worker` threads and seeding each model's initialisation);
- Ray: an instance the call started (none was running, or one joined through RAY_ADDRESS) is shut down, so
  the caller's own `ray.init(...)` later works and no idle instance holds the machine; a Ray the caller runs
  (or a Tune trial's, a pool worker's) is left running;
- the environment: the variables set for Ray and Tune (`engine.cluster.ensure_ray`: Tune's reporter,
  checkpoint period and trial errors), so the caller's own Tune runs get Tune's defaults;
- Optuna's verbosity (a sweep turns its INFO lines off: each trial has raymia's own line);
- the SIGTERM handler, where the call runs in the main thread (`ray.init` installs Ray's own, which
  `ensure_ray` replaces by the caller's where the caller had one, but leaves where it had none);
- raymia's progress lines: a bare script or notebook that configured no logging gets them on stdout while
  the call runs (training on a Ray pool is otherwise silent for minutes); the `raymia` logger is as it was
  afterwards, so logging configured later reaches raymia's lines.

Only the outermost call puts anything back: a call inside another (a sweep's baseline audit, in a thread
beside Tune; its final audit) would otherwise undo, mid-sweep, what the sweep set for its whole run (Optuna's
verbosity, Tune's settings). Ray and Optuna are not imported for this: one not imported yet has nothing to
put back (Optuna's verbosity is then its default, INFO).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from concurrent.futures import Future

_lock = threading.Lock()
_depth = 0  # calls of as_found's functions running in this process


def as_found(fn):
    """`fn` (an audit, a sweep) with the caller's process as it was afterwards, returned or raised."""

    @functools.wraps(fn)
    def kept(*args, **kwargs):
        global _depth
        with _lock:
            outermost = _depth == 0
            _depth += 1
        try:
            if not outermost:  # the outer call puts back what both change, once everything it started is done
                return fn(*args, **kwargs)
            return _put_back_after(fn, args, kwargs)
        finally:
            with _lock:
                _depth -= 1

    return kept


def in_daemon_thread(fn, *args) -> Future:
    """`fn(*args)` in a thread of its own that the process's exit does not wait for (an executor's thread
    is joined at exit, and a thread the stop cannot reach must not hold the exit): work that overlaps Ray's
    start, such as opening the MLflow store."""
    future: Future = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001  # the caller's result() raises it
                future.set_exception(e)

    threading.Thread(target=run, name=f"raymia-{fn.__name__.strip('_')}", daemon=True).start()
    return future


def _put_back_after(fn, args, kwargs):
    import torch  # every call trains or reads signals with it

    optuna = sys.modules.get("optuna")
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    verbosity = optuna.logging.get_verbosity() if optuna else None
    ray_before, env = _ray_running(), dict(os.environ)
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    from raymia.engine.bank_job import progress_on_stdout

    try:
        with progress_on_stdout():
            return fn(*args, **kwargs)
    finally:
        if not ray_before and _ray_running():
            from raymia.engine.cluster import shutdown

            shutdown()
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update({k: v for k, v in env.items() if os.environ.get(k) != v})
        if (optuna := sys.modules.get("optuna")) is not None:
            optuna.logging.set_verbosity(verbosity if verbosity is not None else optuna.logging.INFO)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        if main and sigterm is not None and signal.getsignal(signal.SIGTERM) is not sigterm:
            signal.signal(signal.SIGTERM, sigterm)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()
