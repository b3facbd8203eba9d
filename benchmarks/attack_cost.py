"""Attack cost: time and peak extra memory of every registered attack over a large synthetic bank.

Default: 256 models x 60,000 audited points x 2 queries x 10 classes (float32 logits, 1.23 GB), plus
10,000 population points z for RMIA. The signals are synthetic (membership shifts the true-class logit),
which is all an attack's cost depends on. Peak memory is what numpy/python allocate during one attack
call beyond the signals themselves (tracemalloc; numpy reports its buffers to it), so "x signals" is the
attack's extra memory as a multiple of the signals' size.

    python benchmarks/attack_cost.py                      # the full size
    python benchmarks/attack_cost.py --models 32 --points 5000
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymia.attacks import ATTACKS, run_attack  # noqa: E402
from raymia.signals import Signals  # noqa: E402


def synthetic(models: int, points: int, queries: int, classes: int, z: int, seed: int = 0) -> Signals:
    rng = np.random.default_rng(seed)
    keep = np.argsort(rng.random((models, points)), axis=0) < models // 2
    labels = rng.integers(0, classes, points)
    logits = rng.standard_normal((models, queries, points, classes), dtype=np.float32)
    boost = (1.0 + keep.astype(np.float32))[:, None, :]  # members' true-class logit is higher
    logits[:, :, np.arange(points), labels] += boost
    pop_labels = rng.integers(0, classes, z)
    pop = rng.standard_normal((models, queries, z, classes), dtype=np.float32)
    pop[:, :, np.arange(z), pop_labels] += 1.0
    return Signals(logits=logits, labels=labels, keep=keep, pop_logits=pop, pop_labels=pop_labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=256)
    ap.add_argument("--points", type=int, default=60_000)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--z", type=int, default=10_000)
    ap.add_argument("--attacks", nargs="*", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    sig = synthetic(a.models, a.points, a.queries, a.classes, a.z)
    size = sig.logits.nbytes + sig.pop_logits.nbytes
    print(f"signals: {sig.logits.shape} + z {sig.pop_logits.shape} = {size / 2**30:.2f} GiB "
          f"(built in {time.perf_counter() - t0:.0f}s) on {platform.machine()}", flush=True)
    rows = []
    for name in a.attacks or ATTACKS.names():
        tracemalloc.start()
        t0 = time.perf_counter()
        scores = run_attack(name, None, sig, 0)
        secs = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        row = {"attack": name, "seconds": round(secs, 2), "peak_extra_GiB": round(peak / 2**30, 3),
               "x_signals": round(peak / size, 2), "finite": bool(np.isfinite(scores).all())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": list(sig.logits.shape), "z": a.z, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
