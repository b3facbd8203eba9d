"""SELENA's sub-models in packs against one at a time: seconds per bank model, side by side in one run.

SELENA trains K sub-models per bank model (25 by default) before the released one. With `bank.vectorize`
on (or `auto` where the bank's usual way is packs: CUDA, or a sequential architecture on a CPU) they
train `bank.pack_size` at a time as one pack (`raymia.train.bank.train_modules_packed`); with it off, one
after the other (`raymia.defenses.base.train_plain`). Both train the same sub-models on the same members with
the same batches; the ratio is the one-at-a-time time over the packed time (median over --repeats
alternating rounds), and the soft labels' largest difference between the two ways is reported. Only the
core is used (no Ray, MLflow or Optuna); the digits come from scikit-learn.

    python benchmarks/selena_packs.py                          # digits, MLP [512], K 25, packs of 8
    python benchmarks/selena_packs.py --pack-size 25 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import raymia.defenses.selena as selena_mod  # noqa: E402
from raymia.spec import AuditSpec  # noqa: E402
from raymia.train.bank import BankContext, train_model  # noqa: E402


def _spec(vectorize: bool, a: argparse.Namespace) -> AuditSpec:
    return AuditSpec.model_validate({
        "data": {"name": "digits"}, "plan": {"num_models": 2, "population": 400},
        "model": {"name": "mlp", "params": {"hidden": [a.hidden]}},
        "train": {"optimizer": "adam", "lr": 0.001, "epochs": a.epochs, "batch_size": 64},
        "defense": {"name": "selena", "params": {"sub_models": a.sub_models, "excluded_per_point": a.excluded}},
        "queries": ["identity"], "bank": {"vectorize": vectorize, "pack_size": a.pack_size},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sub-models", type=int, default=25)
    ap.add_argument("--excluded", type=int, default=10)
    ap.add_argument("--pack-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    a = ap.parse_args()
    device = torch.device(a.device)
    labels: dict[bool, torch.Tensor] = {}
    real = selena_mod.split_ai_labels

    def keep(vectorize: bool):
        def spy(probs, excluded):
            labels[vectorize] = real(probs, excluded)
            return labels[vectorize]
        return spy

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(a.repeats):
        for vectorize in (False, True):
            ctx = BankContext.from_spec(_spec(vectorize, a))
            selena_mod.split_ai_labels = keep(vectorize)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_model(ctx, 0, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[vectorize].append(time.perf_counter() - t0)
    selena_mod.split_ai_labels = real
    one, packed = statistics.median(times[False]), statistics.median(times[True])
    row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "sub_models": a.sub_models, "excluded": a.excluded,
           "pack_size": a.pack_size, "hidden": a.hidden, "epochs": a.epochs,
           "one_at_a_time_s": round(one, 3), "packed_s": round(packed, 3), "ratio": round(one / packed, 2),
           "soft_label_max_diff": float((labels[True] - labels[False]).abs().max())}
    print(json.dumps(row))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
