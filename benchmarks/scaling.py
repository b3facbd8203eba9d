"""Scaling of the warm bank pool: bank wall time against the number of workers, the fixed cost an audit pays
besides training (before and after the pool), and the share of a sweep's wall time that is training.

Parts (`--parts`, all by default), in one run:

  bank        One digits bank (default: 64 MLPs [512], Adam, 60 epochs, batch 64, population 400, packs of 4,
              `bank.vectorize: true`, queries identity + hflip, attacks [loss], no tracking) trained through
              `engine.pool.BankPool` with workers of 1 CPU each, every run into a fresh store: 1 and 2 workers on
              a local Ray instance of `--cpus` CPUs, and 2 workers on a two-node cluster on this machine
              (`ray.cluster_utils.Cluster`, 1 CPU per node); the three back to back in each of `--repeats`
              rounds (fresh Ray instances each), medians reported. The bank's wall time is `pool.run` alone
              (after `ready()`); the pool's start-up (`start` + `ready`: worker processes, imports, data) is its
              own column. "sum of pack s" adds the packs' `seconds` (each pack's training, as its manifest records
              it), so wall time minus sum / workers is what the pool adds around the training.
  fixed       The per-trial fixed cost: what one audit's bank costs besides its training, on a tiny bank of one
              pack (2 models, 1 epoch), with a new seed each round (a new fingerprint, so it really trains).
              after:  `pool.run` on an already warm pool (a sweep's trial), minus the pack's `seconds`.
              before: the engine raymia used before the pool, reproduced here (`old_bank_job`): a Ray Train
                      V2 `TorchTrainer` worker group started for the audit (ScalingConfig(num_workers=1,
                      resources_per_worker={"CPU": 1}), gloo), whose worker builds the bank's context and trains
                      and stores the pack; `trainer.fit()` minus the pack's `seconds`.
              Both paths alternate, on the same Ray instance, with the same seeds; the first round of each
              (one-time imports in the driver and the warm worker) is shown apart from the mean of the others.
  quickstart  `raymia sweep sweeps/quickstart.yaml` as a user runs it (its own Ray instance, in a fresh working
              folder), then the same sweep with a larger bank (`--large`, `--set` overrides), alternating,
              `--sweep-runs` times each (medians; the wall time of one run varies by a few seconds on a
              shared machine). Training share = sum of every stored pack's `seconds` over the wall time: the
              process's, and the sweep's own ("sweep NAME done in Ns").

Expected H100 figures (always computed, not measured): per pack, the larger of
  - the pack's FLOPs (`raymia.check.count_flops`, torch's FLOP counter: training steps x models, plus the
    forward passes of the queries) over an assumed sustained rate (`--h100-tflops`, default 20 TFLOP/s: about
    30% of the H100 SXM's 67 TFLOP/s fp32 peak, as the bank trains in fp32), and
  - the pack's launched operations (aten ops other than views, counted while one pack trains here; each is one
    kernel launch on a GPU) times an assumed host cost per operation (`--h100-op-us`, default 10 us: eager
    PyTorch's dispatch and launch),
(models this small are bound by launches, not FLOPs, on such a GPU). The pool's per-pack dispatch is left out.

    python benchmarks/scaling.py --out /tmp/scaling.md                     # about 6 minutes on 2 CPUs
    python benchmarks/scaling.py --parts bank,fixed --models 16 --epochs 10 --repeats 1 --fixed-rounds 1  # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The baseline's Ray Train V2, as raymia's `ensure_ray` enabled it before the pool (set before ray starts, so
# the raylet and its workers have it too).
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import ray  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raymia.engine.pool import BankPool  # noqa: E402
from raymia.spec import AuditSpec  # noqa: E402
from raymia.store import SignalStore  # noqa: E402

H100 = "expected, H100 (not measured)"


def bank_spec(a: argparse.Namespace, root: Path, workers: int = 1, seed: int | None = None,
              models: int | None = None, pack_size: int | None = None, epochs: int | None = None) -> AuditSpec:
    """The quickstart's model and recipe (sweeps/quickstart.yaml), as one audit of the given size."""
    return AuditSpec.model_validate({
        "name": "scaling", "seed": a.seed if seed is None else seed, "output_dir": str(root),
        "data": {"name": "digits"},
        "plan": {"num_models": models or a.models, "population": a.population},
        "model": {"name": "mlp", "params": {"hidden": [512]}},
        "train": {"optimizer": "adam", "lr": 0.001, "epochs": epochs or a.epochs, "batch_size": 64},
        "queries": ["identity", "hflip"],
        "attacks": [{"name": "loss"}],
        "bank": {"num_workers": workers, "cpus_per_worker": 1, "pack_size": pack_size or a.pack_size,
                 "vectorize": True, "device": "cpu"},
        "tracking": {"enabled": False},
    })


def store_of(spec: AuditSpec) -> SignalStore:
    return SignalStore(spec.output_dir, spec.fingerprint(), spec.bank.pack_size, spec.plan.num_models,
                       spec.pack_fingerprints())


def manifests(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(root).glob("signals/*/k*-pack-*.json"))]


def wait_released(timeout: float = 30.0) -> None:
    """Until every CPU is free again: `ray.kill` is asynchronous, and the next pool's workers would otherwise
    wait for the CPUs of the last one inside their start-up time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0) - 1e-6:
            return
        time.sleep(0.1)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# bank: wall time against the number of workers


def time_bank(spec: AuditSpec) -> dict:
    t0 = time.perf_counter()
    pool = BankPool.start(spec).ready()
    startup = time.perf_counter() - t0
    try:
        store = store_of(spec)
        t0 = time.perf_counter()
        pool.run(spec, store, list(range(store.num_packs)))
        wall = time.perf_counter() - t0
        nodes = len({p["node"] for p in pool.places})
        workers = len(pool.workers)
    finally:
        pool.shutdown()
    wait_released()
    packs = manifests(Path(spec.output_dir))
    assert len(packs) == store.num_packs, f"{len(packs)} of {store.num_packs} packs stored"
    # each worker's first pack pays one-time costs (kernel set-up, lazy imports) that its later packs do not
    firsts = {m["pid"]: m for m in sorted(packs, key=lambda m: m["pack"], reverse=True)}.values()
    later = [m["seconds"] for m in packs if m not in firsts]
    return {"workers": workers, "nodes": nodes, "startup_s": startup, "wall_s": wall,
            "models_per_hour": spec.plan.num_models / wall * 3600, "pack_s": sum(m["seconds"] for m in packs),
            "packs": store.num_packs, "first_pack_s": statistics.mean(m["seconds"] for m in firsts),
            "later_pack_s": statistics.median(later) if later else math.nan}


@contextlib.contextmanager
def local_ray(cpus: int):
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def two_node_ray():
    """Two nodes of 1 CPU each on this machine: the pool's workers spread one per node."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()


def part_bank(a: argparse.Namespace, tmp: Path) -> list[list[dict]]:
    """Rounds of the three settings back to back (the machine's speed drifts between minutes: ratios are
    taken within a round). Each round starts fresh Ray instances."""
    rounds = []
    for r in range(a.repeats):
        rows = []
        with local_ray(a.cpus):
            for n in (1, 2):
                log(f"bank: round {r}: local Ray, {n} worker(s)")
                rows.append({"setting": f"local Ray ({a.cpus} CPUs)",
                             **time_bank(bank_spec(a, tmp / f"bank-{r}-w{n}", n))})
        log(f"bank: round {r}: two-node cluster, 2 workers")
        with two_node_ray():
            rows.append({"setting": "two-node cluster (1 CPU each)", **time_bank(bank_spec(a, tmp / f"bank-{r}-2n", 2))})
        rounds.append(rows)
    return rounds


# --------------------------------------------------------------------------------------------------------
# fixed: per-trial cost besides training, before and after the pool


def _old_worker_loop(config: dict) -> None:
    """The Train worker of raymia's bank job before the pool (engine/bank_job.py `_worker_loop` and
    `_train_packs`): build the bank's context, choose how to train, train and store this rank's packs."""
    import ray.train

    from raymia.device import resolve_device
    from raymia.train.bank import BankContext, choose_vectorize, train_pack

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    spec = AuditSpec.model_validate(config["spec"])
    store = SignalStore(config["store_root"], config["fingerprint"], spec.bank.pack_size, spec.plan.num_models,
                        spec.pack_fingerprints())
    torch.set_num_threads(max(1, int(spec.bank.cpus_per_worker)))
    ctx = BankContext.from_spec(spec)
    device = resolve_device(spec.bank.device)
    mine = [p for p in config["packs"][rank::world] if store.check_pack(p) is not None]
    n_models = sum(len(ctx.pack_models(p)) for p in mine)
    vectorize = choose_vectorize(ctx, ctx.pack_models(mine[0]), device, worker_models=n_models) if mine else False
    for p in mine:
        t0 = time.perf_counter()
        arrays, reports = train_pack(ctx, p, device, vectorize=vectorize)
        store.write_pack(p, arrays, meta={"device": str(device), "seconds": time.perf_counter() - t0,
                                          "vectorized": vectorize, "defense_reports": reports})


def old_bank_job(spec: AuditSpec, store: SignalStore, packs: list[int]) -> None:
    """raymia's `run_bank_job` before the pool: one Ray Train worker group started per audit (CPU only here)."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _old_worker_loop,
        train_loop_config={"spec": spec.model_dump(mode="json"), "store_root": str(Path(store.root).resolve()),
                           "fingerprint": store.fingerprint, "packs": packs},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=min(spec.bank.num_workers, len(packs)), use_gpu=False,
                                     resources_per_worker={"CPU": spec.bank.cpus_per_worker}),
        run_config=RunConfig(name=f"bank-{store.fingerprint}-{int(time.time())}",
                             storage_path=str((Path(store.root) / "ray").resolve()),
                             failure_config=FailureConfig(max_failures=2),
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    trainer.fit()


def overhead(run, spec: AuditSpec) -> tuple[float, float]:
    """(wall time of `run(store, packs)` minus the packs' `seconds`, the packs' `seconds`) for a fresh store."""
    store = store_of(spec)
    t0 = time.perf_counter()
    run(store, list(range(store.num_packs)))
    wall = time.perf_counter() - t0
    trained = sum(m["seconds"] for m in manifests(Path(spec.output_dir)))
    assert len(manifests(Path(spec.output_dir))) == store.num_packs
    return wall - trained, trained


def part_fixed(a: argparse.Namespace, tmp: Path) -> list[dict]:
    tiny = {"models": 2, "pack_size": 2, "epochs": 1}
    pool = BankPool.start(bank_spec(a, tmp / "fixed-start", 1, **tiny)).ready()
    rounds = []
    try:
        for i in range(a.fixed_rounds + 1):  # round 0: one-time imports on both sides
            seed = a.seed + 1000 + i
            after_spec = bank_spec(a, tmp / f"fixed-after-{i}", 1, seed=seed, **tiny)
            before_spec = bank_spec(a, tmp / f"fixed-before-{i}", 1, seed=seed, **tiny)
            after = overhead(lambda store, packs, s=after_spec: pool.run(s, store, packs), after_spec)
            before = overhead(lambda store, packs, s=before_spec: old_bank_job(s, store, packs), before_spec)
            rounds.append({"after_s": after[0], "before_s": before[0], "after_pack_s": after[1],
                           "before_pack_s": before[1]})
            log(f"fixed: round {i}: before {before[0]:.2f}s, after {after[0]:.3f}s (pack {after[1]:.2f}s)")
    finally:
        pool.shutdown()
    wait_released()
    return rounds


# --------------------------------------------------------------------------------------------------------
# quickstart: training share of a sweep's wall time


def run_sweep(overrides: list[str], work: Path) -> dict:
    work.mkdir(parents=True)
    shutil.copy(ROOT / "sweeps" / "quickstart.yaml", work / "quickstart.yaml")
    out = work / "runs"
    # as a user runs it: its own Ray instance, without the baseline's Train V2 switch
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_V2_ENABLED")}
    cmd = [sys.executable, "-m", "raymia", "sweep", "quickstart.yaml", "--set", f"output_dir={out}"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    # read line by line: each line's arrival time places the trials' phase (first pack asked for -> last
    # trial done) inside the wall time; the rest is the fixed start-up and the final report
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timed = [(time.perf_counter() - t0, line) for line in proc.stdout]
    proc.wait()
    wall = time.perf_counter() - t0
    text = "".join(line for _, line in timed)
    (work / "sweep.log").write_text(text)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{text[-3000:]}")
    said = re.search(r"sweep \S+ done in (\d+)s", text)
    asked = [t for t, line in timed if re.search(r"trial \d+: training \d+ pack", line)]
    done = [t for t, line in timed if re.search(r"trial \d+ done \(", line)]
    packs = manifests(out)
    trained = sum(m["seconds"] for m in packs)
    return {"wall_s": wall, "sweep_s": float(said.group(1)) if said else math.nan, "train_s": trained,
            "first_pack_s": min(asked) if asked else math.nan,
            "trials_s": max(done) - min(asked) if asked and done else math.nan,
            "packs": len(packs), "models": sum(len(m["models"]) for m in packs)}


def part_quickstart(a: argparse.Namespace, tmp: Path) -> list[dict]:
    """Each setting `--sweep-runs` times, the settings alternating (so a slow spell of the machine falls on
    both); a row keeps every run."""
    rows = [{"setting": label, "overrides": overrides, "runs": []}
            for label, overrides in (("quickstart (the baseline + 7 trials x 8 models, packs of 8)", []),
                                     (a.large_label, a.large))]
    for i in range(a.sweep_runs):
        for j, row in enumerate(rows):
            log(f"quickstart: {row['setting']}, run {i + 1} of {a.sweep_runs}")
            row["runs"].append(run_sweep(row["overrides"], tmp / f"sweep-{j}-{i}"))
    return rows


def sweep_row(row: dict) -> str:
    """A table row: the median of each column over the runs; shares and wall times also run by run."""
    runs = row["runs"]
    med = {k: statistics.median(r[k] for r in runs) for k in ("train_s", "wall_s", "sweep_s", "first_pack_s", "trials_s")}
    share = [r["train_s"] / r["wall_s"] for r in runs]
    own = [r["train_s"] / r["sweep_s"] for r in runs]
    phase = [r["train_s"] / r["trials_s"] for r in runs]
    def runs_of(xs, f):
        return (f" ({', '.join(f(x) for x in xs)})" if len(xs) > 1 else "")
    pct, sec = (lambda x: f"{x:.1%}"), (lambda x: f"{x:.1f}")
    return (f"| {row['setting']} | {runs[0]['packs']} ({runs[0]['models']}) | {med['train_s']:.1f} "
            f"| {med['wall_s']:.1f}{runs_of([r['wall_s'] for r in runs], sec)} | {med['sweep_s']:.0f} "
            f"| **{statistics.median(share):.1%}**{runs_of(share, pct)} | {statistics.median(own):.1%}{runs_of(own, pct)} "
            f"| {med['first_pack_s']:.1f} | {med['trials_s']:.1f} | {statistics.median(phase):.1%} |")


# --------------------------------------------------------------------------------------------------------
# expected H100 figures from counted FLOPs and launched operations


def count_ops(ctx, pack: int) -> int:
    """aten operations other than views dispatched while pack `pack` trains and is queried here (on a GPU,
    each is one kernel launch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from raymia.train.bank import train_pack

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.namespace == "aten":
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        train_pack(ctx, pack, torch.device("cpu"), vectorize=True)
    return Count.n


def expected_h100(a: argparse.Namespace, tmp: Path) -> dict:
    """Per-pack FLOPs and launched operations of the bank, counted, and the H100 times they imply."""
    from raymia.check import count_flops
    from raymia.train.bank import BankContext

    spec = bank_spec(a, tmp / "flops")
    ctx = BankContext.from_spec(spec)
    per_step, per_query = count_flops(spec.model.name, spec.model.params, ctx.data.info, ctx.recipe.batch_size)
    steps = ctx.recipe.epochs * ctx.steps_per_epoch
    points = ctx.plan.keep.shape[1] + ctx.data.x_test.shape[0]
    per_model = per_step * steps + per_query * len(spec.queries) * points
    # operations grow with K only where a pack loops over its models: count two pack sizes, extrapolate
    small = BankContext.from_spec(bank_spec(a, tmp / "flops", pack_size=2))
    ops2, ops_k = count_ops(small, 0), count_ops(ctx, 0)
    k = spec.bank.pack_size
    per_model_ops = (ops_k - ops2) / (k - 2) if k > 2 else 0.0

    def pack_s(models: int) -> float:
        ops = ops_k + per_model_ops * (models - k)
        return max(per_model * models / (a.h100_tflops * 1e12), ops * a.h100_op_us * 1e-6)

    return {"flops_per_model": per_model, "steps": steps, "ops_per_pack": ops_k, "ops_per_model": per_model_ops,
            "pack_s": pack_s(k), "all_in_one_s": pack_s(spec.plan.num_models),
            "flop_bound_pack_s": per_model * k / (a.h100_tflops * 1e12),
            "check_bound_s": per_model * spec.plan.num_models / 989e12}


# --------------------------------------------------------------------------------------------------------
# report


def num(x: float, digits: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def each(rows: list[dict], key: str, digits: int) -> str:
    return ", ".join(f"{r[key]:.{digits}f}" for r in rows)


def report(a: argparse.Namespace, bank: list[list[dict]], fixed: list[dict], sweeps: list[dict], h100: dict) -> str:
    cpu = f"CPU, {os.cpu_count()} cores"
    lines = [f"benchmarks/scaling.py on {platform.machine()} {cpu} (no GPU), torch {torch.__version__}, "
             f"Ray {ray.__version__}, {time.strftime('%Y-%m-%d')}", ""]
    m, k = a.models, a.pack_size
    packs = -(-m // k)
    if bank or h100:
        lines += [f"Bank: {m} MLPs [512] on digits, population {a.population}, {a.epochs} epochs x "
                  f"{h100['steps'] // a.epochs} steps of 64, {packs} packs of {k}, vectorised, workers of 1 CPU "
                  "(1 torch thread).", "",
                  f"Medians over {len(bank)} round(s), each value of a round in brackets; the speed-up is the "
                  "median of the rounds' ratios (1-worker wall time over this setting's, within a round).", "",
                  "| setting | device | workers | nodes | pool start-up s | bank wall s | models/h | sum of pack s "
                  "| pack s: each worker's first / median of the rest | speed-up vs 1 worker |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for i in range(len(bank[0]) if bank else 0):
            rs = [rnd[i] for rnd in bank]
            med = {key: statistics.median(r[key] for r in rs)
                   for key in ("startup_s", "wall_s", "pack_s", "first_pack_s", "later_pack_s")}
            ratios = [rnd[0]["wall_s"] / rnd[i]["wall_s"] for rnd in bank]
            lines.append(f"| {rs[0]['setting']} | {cpu} | {rs[0]['workers']} | {rs[0]['nodes']} "
                         f"| {med['startup_s']:.1f} ({each(rs, 'startup_s', 1)}) "
                         f"| {med['wall_s']:.2f} ({each(rs, 'wall_s', 2)}) | {m / med['wall_s'] * 3600:,.0f} "
                         f"| {med['pack_s']:.2f} | {med['first_pack_s']:.2f} / {num(med['later_pack_s'])} "
                         f"| **{statistics.median(ratios):.2f}x** ({', '.join(f'{x:.2f}' for x in ratios)}) |")
        for gpus in (1, 2):
            wall = math.ceil(packs / gpus) * h100["pack_s"]
            lines.append(f"| packs of {k} | {H100} | {gpus} GPU{'s' * (gpus > 1)} | - | - | {wall:.2f} "
                         f"| {m / wall * 3600:,.0f} "
                         f"| {packs * h100['pack_s']:.2f} | - | {h100['pack_s'] * packs / wall:.2f}x |")
        wall = h100["all_in_one_s"]
        lines.append(f"| one pack of all {m} models | {H100} | 1 GPU | - | - | {wall:.2f} | {m / wall * 3600:,.0f} "
                     f"| {wall:.2f} | - | - |")
        lines += ["", f"Expected H100 rows: per pack the larger of FLOPs / {a.h100_tflops:g} TFLOP/s (assumed "
                  f"sustained fp32) and launched operations x {a.h100_op_us:g} us (assumed host cost per eager "
                  f"operation). Counted: {h100['flops_per_model'] / 1e9:.2f} GFLOP per model (training and "
                  f"queries; the FLOP-bound time of a pack of {k} is {1e3 * h100['flop_bound_pack_s']:.2f} ms), "
                  f"{h100['ops_per_pack']:,} operations per pack of {k} ({h100['ops_per_model']:,.0f} more per "
                  f"model beyond that). `raymia check`'s lower bound (dense bf16 peak, 989 TFLOP/s) for the "
                  f"whole bank: {1e3 * h100['check_bound_s']:.2f} ms. Estimates, not measurements."]
    if fixed:
        first, rest = fixed[0], fixed[1:] or fixed
        before = statistics.mean(r["before_s"] for r in rest)
        after = statistics.mean(r["after_s"] for r in rest)
        lines += ["", f"Per-trial fixed cost (wall time minus the pack's `seconds`) of a one-pack bank (2 models, "
                  f"1 epoch), {cpu}:", "",
                  f"| path | first round s | mean of the next {len(rest)} s | each s | the pack's `seconds` (each) |",
                  "|---|---|---|---|---|",
                  f"| before: Ray Train worker group per audit (TorchTrainer.fit) | {first['before_s']:.2f} "
                  f"| {before:.2f} | {each(rest, 'before_s', 2)} | {each(fixed, 'before_pack_s', 2)} |",
                  f"| after: warm pool (BankPool.run) | {first['after_s']:.3f} | {after:.3f} "
                  f"| {each(rest, 'after_s', 3)} | {each(fixed, 'after_pack_s', 2)} |",
                  "", f"before / after: {before / after:.0f}x (means of the rounds after the first)."]
    if sweeps:
        n = len(sweeps[0]["runs"])
        lines += ["", f"Training share of a sweep ({cpu}; `raymia sweep`, its own Ray instance"
                  + (f"; medians of {n} runs, the settings alternating, each run in brackets" if n > 1 else "") + "):", "",
                  "| sweep | packs (models) trained | sum of pack s | process wall s | sweep's own s "
                  "| share of process wall | share of sweep's own | first pack asked for at s | trials' phase s "
                  "| share of trials' phase |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [sweep_row(r) for r in sweeps]
        lines += ["", "Larger sweep: `" + " ".join(f"--set {o}" for o in sweeps[-1]["overrides"]) + "`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="bank,fixed,quickstart", help="comma-separated: bank, fixed, quickstart")
    ap.add_argument("--models", type=int, default=64)
    ap.add_argument("--pack-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--population", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the bank part (medians reported)")
    ap.add_argument("--work-dir", default=None, help="keep stores and logs here (default: a temporary folder)")
    ap.add_argument("--fixed-rounds", type=int, default=3, help="timed rounds after the first (untimed) one")
    ap.add_argument("--sweep-runs", type=int, default=3, help="runs of each sweep of the quickstart part (medians)")
    ap.add_argument("--large", nargs="*", default=["plan.num_models=64", "bank.pack_size=16", "sweep.num_trials=4"],
                    help="--set overrides of the larger sweep")
    ap.add_argument("--large-label", default="larger bank (the baseline + 4 trials x 64 models, packs of 16)")
    ap.add_argument("--h100-tflops", type=float, default=20.0, help="assumed sustained fp32 TFLOP/s of an H100")
    ap.add_argument("--h100-op-us", type=float, default=10.0, help="assumed host cost of one eager operation (us)")
    ap.add_argument("--out", default=None, help="also write the report to this file")
    a = ap.parse_args(argv)
    parts = set(a.parts.split(","))
    unknown = parts - {"bank", "fixed", "quickstart"}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")
    logging.getLogger("raymia").setLevel(logging.WARNING)
    bank, fixed, sweeps = [], [], []
    with tempfile.TemporaryDirectory(prefix="raymia-scaling-") as name:
        tmp = Path(a.work_dir or name)  # --work-dir keeps the stores and the sweeps' logs
        torch.set_num_threads(1)  # the counts below; the pool's workers set their own
        h100 = expected_h100(a, tmp)
        if "bank" in parts:
            bank = part_bank(a, tmp)
        if "fixed" in parts:
            with local_ray(a.cpus):
                fixed = part_fixed(a, tmp)
        if "quickstart" in parts:
            sweeps = part_quickstart(a, tmp)
    text = report(a, bank, fixed, sweeps, h100)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
