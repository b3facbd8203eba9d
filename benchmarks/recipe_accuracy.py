"""Test accuracy of one model trained with a benchmark setting's recipe (the airbench rows of RESULTS.md).

Trains bank model 0 with raymia.train.bank.train_model (the exact recipe: augmentation, schedule,
lookahead, label smoothing) and prints one JSON line with its test accuracy without and, for recipes that
train with flips, with test-time augmentation (flips; flips and one-pixel translations). `--all-members`
makes model 0 a member of every training image (airbench94's own setting: 50,000 CIFAR-10 images);
`--epochs` counts epochs of the bank's size (half the population), so `--all-members --epochs 20` is 500
steps of 1,024 on CIFAR-10.

    python benchmarks/recipe_accuracy.py --setting cifar10-airbench --shared ../shared
    python benchmarks/recipe_accuracy.py --setting cifar10-airbench --shared ../shared --all-members --epochs 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bank_throughput as bt  # noqa: E402

from raymia.spec import AuditSpec  # noqa: E402
from raymia.train.bank import BankContext, train_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", required=True, help="a setting of bank_throughput.py")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--all-members", action="store_true", help="model 0 trains on the whole training split")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    raw = bt.setting(a.setting, Path(a.shared), a.epochs)
    raw.setdefault("plan", {})["num_models"] = 2
    raw.setdefault("bank", {})["device"] = device.type
    ctx = BankContext.from_spec(AuditSpec.model_validate(raw))
    if a.all_members:
        ctx.plan.keep[0, :] = True
    t0 = time.perf_counter()
    model = train_model(ctx, 0, device)
    seconds = time.perf_counter() - t0
    row = {"setting": a.setting, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
           "members": int(ctx.plan.keep[0].sum()), "steps": ctx.spec.train.epochs * ctx.steps_per_epoch,
           "train_seconds": round(seconds, 1), "test_accuracy": round(bt.test_accuracy(ctx, model, device)[0], 4)}
    if ctx.spec.train.augment.hflip:
        for tta in bt.TTA[1:]:
            row[f"test_accuracy_{tta.replace('-', '_')}_tta"] = round(bt.test_accuracy(ctx, model, device, tta)[0], 4)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
