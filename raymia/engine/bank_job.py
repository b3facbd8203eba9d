"""The bank job: packs of models trained on a Ray Train worker group, each pack's signals stored as soon
as it is done. Finished packs are never retrained: a re-run, or Train's restart of the group after a
worker failure, finds them in the store and skips them."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from raymia.report.text import duration
from raymia.spec import AuditSpec
from raymia.store import SignalStore

log = logging.getLogger("raymia")


def _train_packs(spec: AuditSpec, store: SignalStore, packs: list[int], rank: int, world: int) -> None:
    import torch

    from raymia.device import resolve_device
    from raymia.train.bank import BankContext, choose_vectorize, train_pack

    torch.set_num_threads(max(1, int(spec.bank.cpus_per_worker)))
    ctx = BankContext.from_spec(spec)
    device = resolve_device(spec.bank.device)
    mine = [p for p in packs[rank::world] if store.check_pack(p) is not None]  # skip packs done before a restart
    n_models = sum(len(ctx.pack_models(p)) for p in mine)
    vectorize = choose_vectorize(ctx, ctx.pack_models(mine[0]), device, worker_models=n_models) if mine else False
    if mine:
        log.info("worker %d: %d pack(s), %s on %s", rank, len(mine),
                 "vectorised packs" if vectorize else "one model at a time", device)
    start = time.perf_counter()
    for i, p in enumerate(mine, 1):
        t0 = time.perf_counter()
        arrays, reports = train_pack(ctx, p, device, vectorize=vectorize)
        store.write_pack(p, arrays, meta={"device": str(device), "seconds": time.perf_counter() - t0,
                                          "vectorized": vectorize, "defense_reports": reports})
        left = (time.perf_counter() - start) / i * (len(mine) - i)
        log.info("worker %d: pack %d done (%d/%d, %.1fs%s)", rank, p, i, len(mine), time.perf_counter() - t0,
                 f", about {duration(left)} left" if i < len(mine) else "")


class _PrefixFormatter(logging.Formatter):
    """`[raymia] <prefix><message>`; keeps the prefix (a sweep trial's number) so the bank workers this
    process starts inherit it (`current_prefix`)."""

    def __init__(self, prefix: str):
        super().__init__("[raymia] " + prefix.replace("%", "%%") + "%(message)s")
        self.prefix = prefix


def current_prefix() -> str:
    """The prefix of this process's raymia lines, as `worker_logging` set it ("" when it did not)."""
    for h in logging.getLogger("raymia").handlers:
        if isinstance(h.formatter, _PrefixFormatter):
            return h.formatter.prefix
    return ""


def worker_logging(level: int, prefix: str = "") -> None:
    """raymia's progress lines from a Ray process (a Tune trial, a Train worker), each once, as the
    driver's `[raymia] ...`, at the driver's level (`-q` reaches the workers), after `prefix`. Train V2
    routes a worker's print() through the root logger and also tees it to stdout, so a print shows twice;
    raymia's logger writes to the process's stdout itself, which Ray forwards to the driver."""
    rlog = logging.getLogger("raymia")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_PrefixFormatter(prefix))
    rlog.handlers[:] = [handler]
    rlog.propagate = False
    rlog.setLevel(level)


def _worker_loop(config: dict[str, Any]) -> None:
    import ray.train

    worker_logging(config.get("log_level", logging.INFO), config.get("log_prefix", ""))
    ctx = ray.train.get_context()
    spec = AuditSpec.model_validate(config["spec"])
    store = SignalStore(config["store_root"], config["fingerprint"], spec.bank.pack_size, spec.plan.num_models,
                        spec.pack_fingerprints())
    _train_packs(spec, store, config["packs"], ctx.get_world_rank(), ctx.get_world_size())


def build_bank_locally(spec: AuditSpec, store: SignalStore, packs: list[int]) -> None:
    """Train the given packs in this process (no Ray): for GPU machines and benchmarks. Progress goes to the
    `raymia` logger; a bare script that configured no logging gets it on stdout."""
    if not log.hasHandlers():
        worker_logging(logging.INFO)
    _train_packs(spec, store, packs, 0, 1)


def run_bank_job(spec: AuditSpec, store: SignalStore, packs: list[int]) -> None:
    """Train the missing packs on a Ray Train worker group (one group start per audit)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raymia.engine.cluster import ensure_ray
    ensure_ray()
    use_gpu = spec.bank.device == "cuda" or (spec.bank.device == "auto" and _cluster_has_gpu())
    workers = min(spec.bank.num_workers, len(packs))
    resources = {"CPU": spec.bank.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    device = "cuda" if use_gpu else "cpu"
    spec_for_workers = spec.model_copy(update={"bank": spec.bank.model_copy(update={"device": device})})
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "spec": spec_for_workers.model_dump(mode="json"),
            "store_root": str(Path(store.root).resolve()),
            "fingerprint": store.fingerprint,
            "packs": packs,
            "log_level": logging.getLogger("raymia").getEffectiveLevel(),
            "log_prefix": current_prefix(),
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"bank-{store.fingerprint}-{int(time.time())}",
            storage_path=str((Path(store.root) / "ray").resolve()),
            failure_config=FailureConfig(max_failures=2),
            **_train_quiet(),
        ),
    )
    log.info("training %d pack(s) on %d Ray Train worker(s)%s", len(packs), workers, " (GPU)" if use_gpu else "")
    trainer.fit()


def _train_quiet() -> dict[str, Any]:
    """RunConfig arguments that keep Train's own INFO lines (resource requests, worker group start), which
    repeat what raymia's say, off the console; Ray releases before Train's LoggingConfig need none."""
    try:
        from ray.train import LoggingConfig
    except ImportError:
        return {}
    return {"logging_config": LoggingConfig(log_level="WARNING")}


def _cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1
