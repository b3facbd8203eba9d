"""Attack cost: time and peak extra memory of every registered attack over a large synthetic bank.

Default: 256 models x 60,000 audited points x 2 queries x 10 classes (float32 logits, 1.23 GB), plus
10,000 population points z for RMIA. The signals are synthetic (membership shifts the true-class logit;
models in complementary pairs, as raymia's plans draw them),
which is all an attack's cost depends on. Peak memory is what numpy/python allocate during one attack
call beyond the signals themselves (tracemalloc; numpy reports its buffers to it), so "x signals" is the
attack's extra memory as a multiple of the signals' size. On Linux each row also gives the process's peak
resident memory during the call beyond what it held before (`rss_x_signals`; the kernel's peak counter is
reset before each attack), which counts what tracemalloc cannot see (scikit-learn's and torch's own buffers).

With `--targets T` each attack also runs against T targets the way an audit does (one Signals object, whose
per-model transforms every target shares) and, side by side, against each target on a fresh copy of the
signals (every transform computed again: the plain baseline), and reports the ratio. `--vote` times RMIA's
two-query vote by sorted blocks against the pairwise count of every (x, z) pair, and checks they agree.

    python benchmarks/attack_cost.py                      # the full size
    python benchmarks/attack_cost.py --models 32 --points 5000
    python benchmarks/attack_cost.py --models 64 --points 20000 --targets 8 --attacks loss lira_online
    python benchmarks/attack_cost.py --vote --points 50000 --z 10000
    python benchmarks/attack_cost.py --models 128 --points 20000 --every-target --attacks loss
    python benchmarks/attack_cost.py --models 64 --points 20000 --every-target --attacks loss \
        --params '{"calibration": "per_class"}'

`--every-target` times each attack against every model on one Signals, as an audit's leave-one-out does (the
seconds and the peak memory are those of the whole run, the targets' scores discarded as they come).

`--shadow-curve T` times `raymia.shadow_curve` over T targets (each smaller shadow set a view that reads the
full signals' per-model transforms) against attacking each target and size on fresh signals with that
pool (the plain baseline), and checks both give the same AUCs:

    python benchmarks/attack_cost.py --models 64 --points 20000 --shadow-curve 4 --attacks loss lira_online
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymia.attacks import ATTACKS, run_attack  # noqa: E402
from raymia.data.plan import paired_keep  # noqa: E402
from raymia.signals import Signals  # noqa: E402


def synthetic(models: int, points: int, queries: int, classes: int, z: int, seed: int = 0) -> Signals:
    rng = np.random.default_rng(seed)
    keep = paired_keep(models, points, rng)  # as raymia's plans draw it: model 2j+1 holds the rest of 2j's
    labels = rng.integers(0, classes, points)
    logits = rng.standard_normal((models, queries, points, classes), dtype=np.float32)
    boost = (1.0 + keep.astype(np.float32))[:, None, :]  # members' true-class logit is higher
    logits[:, :, np.arange(points), labels] += boost
    pop_labels = rng.integers(0, classes, z)
    pop = rng.standard_normal((models, queries, z, classes), dtype=np.float32)
    pop[:, :, np.arange(z), pop_labels] += 1.0
    return Signals(logits=logits, labels=labels, keep=keep, pop_logits=pop, pop_labels=pop_labels)


def pairwise_vote(lx: np.ndarray, lz: np.ndarray, gamma: float) -> np.ndarray:
    """RMIA's two-query vote by comparing every (x, z) pair in blocks of x (the general path's way)."""
    from raymia.attacks.mia import rmia

    thr, z, p = lx - math.log(gamma), lz.shape[1], lx.shape[1]
    block, out = max(1, rmia._BLOCK_ELEMENTS // z), np.empty(p)
    for s in range(0, p, block):
        e = min(p, s + block)
        wins = (lz[0][None, :] < thr[0, s:e, None]) & (lz[1][None, :] < thr[1, s:e, None])
        out[s:e] = np.count_nonzero(wins, axis=1) / z
    return out


def vote_cost(points: int, z: int, rounds: int = 3) -> dict:
    from raymia.attacks.mia.rmia import combine_queries

    rng = np.random.default_rng(0)
    lx, lz = rng.normal(size=(2, points)), rng.normal(size=(2, z))
    blocks, pairs = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a = combine_queries(lx, lz, 1.0, "vote")
        blocks.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = pairwise_vote(lx, lz, 1.0)
        pairs.append(time.perf_counter() - t0)
        assert np.array_equal(a, b), "the block count and the pairwise count disagree"
    return {"vote": f"P={points} Z={z}", "blocks_s": round(min(blocks), 3), "pairwise_s": round(min(pairs), 3),
            "ratio": round(min(pairs) / min(blocks), 1)}


def targets_cost(name: str, sig: Signals, targets: int) -> dict:
    """`targets` targets on one Signals (transforms shared) against each on a fresh copy (recomputed)."""
    sig.forget_derived()
    t0 = time.perf_counter()
    shared = [run_attack(name, None, sig, t) for t in range(targets)]
    t_shared = time.perf_counter() - t0
    sig.forget_derived()
    t0 = time.perf_counter()
    fresh = [run_attack(name, None, dataclasses.replace(sig), t) for t in range(targets)]
    t_fresh = time.perf_counter() - t0
    same = all(np.array_equal(a, b) for a, b in zip(shared, fresh, strict=True))
    return {"attack": name, "targets": targets, "shared_s": round(t_shared, 2), "fresh_s": round(t_fresh, 2),
            "ratio": round(t_fresh / t_shared, 2), "same_scores": same}


def shadow_curve_cost(name: str, sig: Signals, targets: int) -> dict:
    """`shadow_curve` over `targets` targets (subsets as views that read the full signals' transforms)
    against each (target, size) attacked on fresh signals with that pool (every transform computed again)."""
    from raymia.metrics import attack_metrics
    from raymia.shadows import shadow_curve, shadow_pools

    sig.forget_derived()
    t0 = time.perf_counter()
    curve = shadow_curve(signals=sig, attacks=[name], targets=range(targets))
    t_curve = time.perf_counter() - t0
    t0 = time.perf_counter()
    auc = np.full((len(curve.shadows), targets), np.nan)
    for t, by_size in shadow_pools(sig, range(targets)).items():
        for i, pool in enumerate(by_size.values()):
            fresh = dataclasses.replace(sig, shadow_pool=pool)
            try:
                auc[i, t] = attack_metrics(run_attack(name, None, fresh, t), sig.keep[t])["auc"]
            except ValueError:  # too few shadows for the attack: n/a in the curve too
                pass
    t_fresh = time.perf_counter() - t0
    same = bool(np.array_equal(np.isnan(auc), np.isnan(curve.values[name]["auc"]))
                and np.allclose(np.nan_to_num(auc), np.nan_to_num(curve.values[name]["auc"]), rtol=0, atol=1e-12))
    return {"attack": name, "shadow_curve": f"{targets} targets x sizes {list(curve.shadows)}",
            "views_s": round(t_curve, 2), "fresh_s": round(t_fresh, 2), "ratio": round(t_fresh / t_curve, 2),
            "same_auc": same}


def _rss(key: str) -> int | None:
    """VmRSS or VmHWM of this process in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set (VmHWM) starts again from the current one
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=256)
    ap.add_argument("--points", type=int, default=60_000)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--z", type=int, default=10_000)
    ap.add_argument("--attacks", nargs="*", default=None)
    ap.add_argument("--targets", type=int, default=0, help="also time T targets: shared transforms vs fresh")
    ap.add_argument("--vote", action="store_true", help="only RMIA's two-query vote: blocks vs pairwise")
    ap.add_argument("--every-target", action="store_true", help="attack every model, as an audit does")
    ap.add_argument("--shadow-curve", type=int, default=0, metavar="T",
                    help="also time shadow_curve over T targets against fresh signals per target and size")
    ap.add_argument("--params", type=json.loads, default=None, help='the attacks\' params, e.g. \'{"calibration": "per_class"}\'')
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.vote:
        print(json.dumps(vote_cost(a.points, a.z)), flush=True)
        return
    t0 = time.perf_counter()
    sig = synthetic(a.models, a.points, a.queries, a.classes, a.z)
    size = sig.logits.nbytes + sig.pop_logits.nbytes
    print(f"signals: {sig.logits.shape} + z {sig.pop_logits.shape} = {size / 2**30:.2f} GiB "
          f"(built in {time.perf_counter() - t0:.0f}s) on {platform.machine()}", flush=True)
    rows = []
    for name in a.attacks or ATTACKS.names():
        sig.forget_derived()  # as the audit does after each attack: nothing carried over from the last one
        rss0 = _rss("VmRSS:") if _reset_peak_rss() else None
        tracemalloc.start()
        t0 = time.perf_counter()
        attacked = a.models if a.every_target else 1
        for target in range(attacked):
            scores = run_attack(name, a.params, sig, target)
        secs = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        row = {"attack": name, "attacked": attacked, "seconds": round(secs, 2), "peak_extra_GiB": round(peak / 2**30, 3),
               "x_signals": round(peak / size, 2), "finite": bool(np.isfinite(scores).all())}
        if rss0 is not None:
            row["rss_x_signals"] = round((_rss("VmHWM:") - rss0) / size, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.targets:
            row = targets_cost(name, sig, a.targets)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if a.shadow_curve:
            row = shadow_curve_cost(name, sig, a.shadow_curve)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": list(sig.logits.shape), "z": a.z, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
