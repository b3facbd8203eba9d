"""A bank trained in this process (`bank.engine: local`: no Ray), and the `[raymia]` progress lines of
every process that trains (this one, a sweep trial, a warm pool worker). Each pack's signals are stored as
soon as it is done; finished packs are never retrained (a re-run finds them in the store and skips them).
The Ray engine is `engine.pool`."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

from raymia import progress
from raymia.report.text import duration
from raymia.spec import AuditSpec
from raymia.store import SignalStore

log = logging.getLogger("raymia")


def _train_packs(spec: AuditSpec, store: SignalStore, packs: list[int], rank: int, world: int) -> None:
    import torch

    from raymia.device import resolve_device
    from raymia.train.bank import BankContext, choose_vectorize, train_pack

    torch.set_num_threads(max(1, int(spec.bank.cpus_per_worker)))
    ctx = BankContext.from_spec(spec, check_model=False)  # the audit checked it
    device = resolve_device(spec.bank.device)
    mine = [p for p in packs[rank::world] if store.check_pack(p) is not None]  # skip packs done before a restart
    n_models = sum(len(ctx.pack_models(p)) for p in mine)
    vectorize = choose_vectorize(ctx, ctx.pack_models(mine[0]), device, worker_models=n_models) if mine else False
    if mine:
        log.info("worker %d: %d pack(s), %s on %s", rank, len(mine),
                 "vectorised packs" if vectorize else "one model at a time", device)
    start = time.perf_counter()
    with progress.bar(f"{current_prefix()}bank packs", len(mine)) as shown:
        for i, p in enumerate(mine, 1):
            t0 = time.perf_counter()
            arrays, reports = train_pack(ctx, p, device, vectorize=vectorize)
            store.write_pack(p, arrays, meta={"device": str(device), "seconds": time.perf_counter() - t0,
                                              "vectorized": vectorize, "defense_reports": reports})
            left = (time.perf_counter() - start) / i * (len(mine) - i)
            log.info("worker %d: pack %d done (%d/%d, %.1fs%s)", rank, p, i, len(mine), time.perf_counter() - t0,
                     f", about {duration(left)} left" if i < len(mine) else "")
            shown.advance()


class _PrefixFormatter(logging.Formatter):
    """`[raymia] <prefix><message>`; keeps the prefix (a sweep trial's number) so the bank workers this
    process starts inherit it (`current_prefix`)."""

    def __init__(self, prefix: str):
        super().__init__("[raymia] " + prefix.replace("%", "%%") + "%(message)s")
        self.prefix = prefix


_THREAD_PREFIXES: dict[int, str] = {}  # thread id -> the prefix of its `prefixed` block
# A record with this attribute set (`extra={UNPREFIXED: True}`) is about the whole run, not the block's trial:
# the warm pool, started for the sweep, is first waited for by the baseline's thread.
UNPREFIXED = "raymia_unprefixed"


class _ThreadPrefixes(logging.Formatter):
    """A handler's formatter while `prefixed` blocks run: a line from a thread inside one carries that
    block's prefix, every other line is formatted as before (`base`)."""

    def __init__(self, base: logging.Formatter | None):
        super().__init__()
        self.base = base or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        prefix = _THREAD_PREFIXES.get(record.thread) if record.thread is not None else None
        if prefix is None or getattr(record, UNPREFIXED, False):
            return self.base.format(record)
        return _PrefixFormatter(prefix).format(record)


def current_prefix() -> str:
    """The prefix of this thread's raymia lines: its `prefixed` block's, else the one `worker_logging` set
    for the process ("" when neither did)."""
    if (prefix := _THREAD_PREFIXES.get(threading.get_ident())) is not None:
        return prefix
    for h in logging.getLogger("raymia").handlers:
        f = h.formatter.base if isinstance(h.formatter, _ThreadPrefixes) else h.formatter
        if isinstance(f, _PrefixFormatter):
            return f.prefix
    return ""


@contextlib.contextmanager
def prefixed(prefix: str):
    """While the block runs, this thread's raymia lines (and those of the bank workers it asks) carry
    `prefix`, as a Tune trial's do: a sweep's baseline audit, run by the driver itself beside the search,
    whose lines keep their own prefixes."""
    rlog = logging.getLogger("raymia")
    for h in rlog.handlers:
        if not isinstance(h.formatter, _ThreadPrefixes):
            h.setFormatter(_ThreadPrefixes(h.formatter))
    me = threading.get_ident()
    _THREAD_PREFIXES[me] = prefix
    try:
        yield
    finally:
        del _THREAD_PREFIXES[me]
        if not _THREAD_PREFIXES:
            for h in rlog.handlers:
                if isinstance(h.formatter, _ThreadPrefixes):
                    h.setFormatter(h.formatter.base)


def worker_logging(level: int, prefix: str = "", stream=None) -> None:
    """raymia's progress lines from a Ray process (a Tune trial, a pool worker), each once, as the
    driver's `[raymia] ...`, at the driver's level (`-q` reaches the workers), after `prefix`. Train V2
    routes a worker's print() through the root logger and also tees it to stdout, so a print shows twice;
    raymia's logger writes to the process's stderr itself, which Ray forwards to the driver's stderr,
    where the driver's own lines go (stdout keeps the results: tables, the front). `stream`: another
    stream (a bare script's stdout)."""
    rlog = logging.getLogger("raymia")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_PrefixFormatter(prefix))
    rlog.handlers[:] = [handler]
    rlog.propagate = False
    rlog.setLevel(level)


@contextlib.contextmanager
def progress_on_stdout():
    """While the block runs, raymia's progress lines reach a bare script or notebook that configured no
    logging, on stdout; the `raymia` logger is as it was afterwards, so logging the caller configures later
    reaches raymia's lines. Where logging is configured, nothing changes."""
    handlers, propagate, level = log.handlers[:], log.propagate, log.level
    if not log.hasHandlers():
        worker_logging(logging.INFO, stream=sys.stdout)
    try:
        yield
    finally:
        log.handlers[:] = handlers
        log.propagate = propagate
        log.setLevel(level)


def build_bank_locally(spec: AuditSpec, store: SignalStore, packs: list[int]) -> None:
    """Train the given packs in this process (no Ray): for GPU machines and benchmarks. Progress goes to the
    `raymia` logger (`progress_on_stdout`)."""
    with progress_on_stdout():
        _train_packs(spec, store, packs, 0, 1)
