"""Bank throughput: models per hour of raymia's pack trainer against a plain one-by-one PyTorch loop.

All sides train the same bank models with the same recipe (model, optimizer, schedule, batch size,
number of steps) on the same members, in one run:
  plain:     the plainest one-by-one PyTorch loop (`minimal_loop` below), the baseline of the ratio
  reference: raymia.train.bank.train_model, raymia's step loop for one model (the exact batches and augmentation
             draws of the pack; the parity reference of the tests)
  pack:      raymia.train.bank.train_models_packed, K models at once (raymia.train.packed for sequential
             models: grouped convolutions and batched matmuls; torch.func.vmap for the others)
  bank:      what an audit does with bank.vectorize=auto: time a few steps of both, train the faster way
pack_ratio and bank_ratio are models/hour over the plain loop's models/hour: the median over --repeats
rounds in which the plain loop, the pack and the bank run back to back. Only the core is used (no Ray,
no MLflow, no Optuna: torch, numpy, pydantic and PyYAML), so the script runs on a GPU machine without them
(benchmarks/gpu_suite.sh). On CUDA it also reports achieved TFLOP/s (FLOPs of one
training step counted by torch.utils.flop_counter) and the fraction of the GPU's dense bf16 peak. Every
row also gives the test accuracy of the plain loop's models and of the pack's (mean over models), and for
recipes that train with flips the pack's accuracy with test-time augmentation (flips; flips and
one-pixel translations, airbench's level 2).

    python benchmarks/bank_throughput.py --setting digits-mlp
    python benchmarks/bank_throughput.py --setting mnist-lenet5 --shared ../shared
    python benchmarks/bank_throughput.py --setting cifar10-cnn --shared ../shared
    python benchmarks/bank_throughput.py --setting cifar10-resnet18 --shared ../shared --device cuda --models 16
    python benchmarks/bank_throughput.py --setting cifar10-airbench --shared ../shared --device cuda --models 32

Settings that need real data read it from --shared (the folder holding data/ and tools/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymia.spec import AuditSpec  # noqa: E402
from raymia.train import packed  # noqa: E402
from raymia.train.bank import (  # noqa: E402
    BankContext,
    PackedModels,
    choose_vectorize,
    train_model,
    train_models_packed,
)
from raymia.train.loop import autocast, autocast_dtype, memory_format  # noqa: E402

# Dense bf16 peak (TFLOP/s) of the GPUs the project measures on.
PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _cifar_npz(shared: Path, limit: int | None) -> str:
    out = Path(tempfile.gettempdir()) / f"raymia-cifar10-{limit or 'all'}.npz"
    if not out.exists():
        cmd = [sys.executable, str(shared / "tools" / "cifar10_jpeg.py"), str(shared / "data" / "cifar10-jpeg.npz"),
               str(out)] + (["--limit", str(limit)] if limit else [])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return str(out)


def setting(name: str, shared: Path, epochs: int | None) -> dict:
    """The spec of each benchmark setting (the figures quoted in the issue use these recipes)."""
    if name == "digits-mlp":  # 64-256-256-10 MLP, 100 epochs, batch 64, ~900 members per model
        return {"plan": {"population": 1346}, "model": {"name": "mlp", "params": {"hidden": [256, 256]}},
                "train": {"epochs": epochs or 100, "batch_size": 64}}
    if name == "mnist-lenet5":  # LeNet-5 on 28x28 MNIST, batch 64, 1000 members per model
        return {"data": {"name": "npz", "params": {"path": str(shared / "data" / "mnist.npz")}},
                "plan": {"population": 2000}, "model": {"name": "lenet5"},
                "train": {"epochs": epochs or 10, "batch_size": 64}, "queries": ["identity"]}
    if name == "mnist-lenet5-classic":  # the same with LeCun's tanh and average-pool subsampling
        spec = setting("mnist-lenet5", shared, epochs)
        spec["model"]["params"] = {"activation": "tanh", "pooling": "avg"}
        return spec
    if name == "cifar10-cnn":  # a small CNN on a CIFAR-10 subset, batch 128
        return {"data": {"name": "npz", "params": {"path": _cifar_npz(shared, 5000)}},
                "plan": {"population": 4000}, "model": {"name": "cnn", "params": {"channels": [32, 64]}},
                "train": {"epochs": epochs or 5, "batch_size": 128}, "queries": ["identity"]}
    if name == "cifar10-airbench":  # airbench94 on 25k members, the 256-model bank target
        # airbench's optimizer in mean-loss terms: lr 11.5 per 1024 examples on a summed loss with momentum
        # 0.85 is 1.5 here; its decay of 0.002 per step is weight_decay 0.002 / 1.5; BN biases at 64x lr
        # (the model's bias_lr_scale).
        return {"data": {"name": "npz", "params": {"path": _cifar_npz(shared, None)}},
                "model": {"name": "airbench"}, "queries": ["identity"],
                "train": {"epochs": epochs or 10, "batch_size": 1024, "optimizer": "sgd", "lr": 1.5,
                          "momentum": 0.85, "nesterov": True, "weight_decay": 0.00133, "label_smoothing": 0.2,
                          "schedule": "triangle", "lookahead": (epochs or 10) > 3,
                          "augment": {"hflip": True, "flip": "alternate", "crop": 2, "pad": "reflect"}},
                "bank": {"precision": "bf16", "channels_last": True}}
    if name in ("cifar10-resnet18", "cifar10-wrn28-2"):  # full CIFAR-10, 25k members per model
        model = "resnet18" if name.endswith("resnet18") else "wrn28_2"
        return {"data": {"name": "npz", "params": {"path": _cifar_npz(shared, None)}},
                "model": {"name": model}, "queries": ["identity"],
                "train": {"epochs": epochs or 1, "batch_size": 512, "optimizer": "sgd", "lr": 0.1,
                          "augment": {"hflip": True, "crop": 4}},
                "bank": {"precision": "bf16", "channels_last": True}}
    raise SystemExit(f"unknown setting {name!r}")


def minimal_loop(ctx: BankContext, m: int, device: torch.device) -> torch.nn.Module:
    """The plainest PyTorch loop with the same recipe (model, optimizer, steps, batch size, schedule, label
    smoothing, lookahead, and on CUDA the bank's bf16 autocast and channels_last) as raymia's: an epoch is
    one pass over a fresh permutation of the model's members. No augmentation, no defense hooks: the floor
    a one-by-one trainer can reach."""
    from raymia.train.bank import init_model
    from raymia.train.recipe import Lookahead, make_optimizer, make_scheduler

    spec = ctx.spec
    fmt = memory_format(spec.bank.channels_last, device, ctx.data.info.input_shape)
    precision = autocast_dtype(device, spec.bank.precision)
    idx = torch.from_numpy(ctx.plan.members_of(m))
    x, y = ctx.data.x_train[idx].to(device), ctx.data.y_train[idx].to(device)
    if x.ndim == 4:
        x = x.contiguous(memory_format=fmt)
    model = init_model(ctx, m).to(device, memory_format=fmt).train()
    opt = make_optimizer(model, spec.train)
    sched = make_scheduler(opt, spec.train, spec.train.epochs * ctx.steps_per_epoch, ctx.steps_per_epoch)
    bs = spec.train.batch_size
    ahead = (Lookahead([*model.parameters(), *model.buffers()], spec.train.epochs * ctx.steps_per_epoch,
                       ctx.steps_per_epoch)
             if spec.train.lookahead else None)
    t = 0
    for _ in range(spec.train.epochs):
        perm = torch.randperm(len(y), device=device)
        for i in range(0, len(y), bs):
            b = perm[i:i + bs]
            with autocast(device, precision):
                logits = model(x[b])
            loss = torch.nn.functional.cross_entropy(logits.float(), y[b], label_smoothing=spec.train.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            t += 1
            if ahead is not None:
                ahead.step(t)
    if ahead is not None:
        ahead.finish()
    return model.eval()


TTA = ("none", "flip", "flip-translate")


@torch.no_grad()
def test_accuracy(ctx: BankContext, model, device: torch.device, tta: str = "none") -> list[float]:
    """Top-1 accuracy on the test split (eval mode): one value for a module, one per model for a pack.
    `tta` (test-time augmentation): none; flip: the mean logits of each image and its mirror image;
    flip-translate: airbench's level 2, half the flip logits and half those of the image shifted by one
    pixel up-left and down-right (reflect padding), each with its mirror image."""
    if tta not in TTA:
        raise ValueError(f"tta {tta!r}: accepted {', '.join(TTA)}")
    correct, y = None, ctx.data.y_test.to(device)

    def logits_of(xb: torch.Tensor) -> torch.Tensor:
        with autocast(device, autocast_dtype(device, ctx.spec.bank.precision)):
            out = model(xb, shared_input=True) if isinstance(model, PackedModels) else model(xb)[None]
        return out.float()

    def mirrored(xb: torch.Tensor) -> torch.Tensor:
        return 0.5 * (logits_of(xb) + logits_of(xb.flip(-1)))

    def translated(xb: torch.Tensor) -> torch.Tensor:
        h, w = xb.shape[-2:]
        padded = torch.nn.functional.pad(xb, (1, 1, 1, 1), mode="reflect")
        shifts = [padded[..., :h, :w], padded[..., 2:h + 2, 2:w + 2]]
        return 0.5 * mirrored(xb) + 0.25 * sum(mirrored(s) for s in shifts)

    for i in range(0, y.numel(), 1024):
        xb = ctx.data.x_test[i:i + 1024].to(device)
        logits = {"none": logits_of, "flip": mirrored, "flip-translate": translated}[tta](xb)
        hits = (logits.argmax(-1) == y[i:i + 1024]).sum(-1)
        correct = hits if correct is None else correct + hits
    return (correct.float() / y.numel()).tolist()


def step_flops(ctx: BankContext, device: torch.device) -> float:
    """FLOPs of one training step (forward + backward) of one model at the recipe's batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    from raymia.train.bank import init_model

    model = init_model(ctx, 0).to(device).train()
    x = ctx.data.x_train[: ctx.spec.train.batch_size].to(device)
    y = ctx.data.y_train[: ctx.spec.train.batch_size].to(device)
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return float(fc.get_total_flops())


def main() -> None:
    # Long by design: the benchmark's options and its steps, read top to bottom as one script.
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", required=True)
    ap.add_argument("--models", type=int, default=16, help="K: models in the pack")
    ap.add_argument("--plain-models", type=int, default=4, help="models trained one by one (time per model)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="alternating plain/pack timings; the median ratio is reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    ap.add_argument("--split-min-output", type=int, default=None,
                    help="override raymia.train.packed.SPLIT_MIN_OUTPUT (0: every CPU convolution per model)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the pack's forward and loss (pack and bank; the plain loop stays eager)")
    a = ap.parse_args()
    if a.split_min_output is not None:
        packed.SPLIT_MIN_OUTPUT = a.split_min_output
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    raw = setting(a.setting, Path(a.shared), a.epochs)
    raw.setdefault("plan", {})["num_models"] = max(2, a.models + a.models % 2)
    raw.setdefault("bank", {})["device"] = device.type
    spec = AuditSpec.model_validate(raw)
    ctx = BankContext.from_spec(spec)
    steps = spec.train.epochs * ctx.steps_per_epoch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Warm-up (allocator, kernels, vmap tracing), excluded from both timings.
    warm = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 1})})
    models = list(range(a.models))
    train_models_packed(BankContext.from_spec(warm), models, device, max_steps=3, compile=a.compile)
    train_model(BankContext.from_spec(warm), 0, device)
    minimal_loop(BankContext.from_spec(warm), 0, device)
    sync()

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def bank_run() -> None:
        """The bank as raymia runs it (bank.vectorize=auto): time both paths where the training is long
        enough (the probe's cost is included), then train the pack the faster way."""
        if choose_vectorize(ctx, models, device):
            train_models_packed(ctx, models, device, compile=a.compile)
        else:
            for m in models:
                train_model(ctx, m, device)

    # Plain loop, pack and bank alternate, `--repeats` times: on a shared machine the load drifts between
    # measurements, and each ratio compares runs taken back to back. Medians are reported.
    plains, packs, banks = [], [], []
    trained: dict[str, object] = {}
    for _ in range(a.repeats):
        plains.append(timed(lambda: trained.update(
            plain=[minimal_loop(ctx, m, device) for m in range(a.plain_models)])) / a.plain_models)
        packs.append(timed(lambda: trained.update(pack=train_models_packed(ctx, models, device, compile=a.compile))) / a.models)
        banks.append(timed(bank_run) / a.models)
    plain, pack, bank = statistics.median(plains), statistics.median(packs), statistics.median(banks)
    pack_ratio = statistics.median(p / q for p, q in zip(plains, packs))
    bank_ratio = statistics.median(p / q for p, q in zip(plains, banks))
    chosen = "pack" if choose_vectorize(ctx, models, device) else "one by one"
    reference = timed(lambda: [train_model(ctx, m, device) for m in range(a.plain_models)]) / a.plain_models
    engine = train_models_packed(BankContext.from_spec(warm), [0, 1], device, max_steps=1).engine
    row = {
        "setting": a.setting, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "K": a.models, "epochs": spec.train.epochs, "steps_per_model": steps,
        "plain_s_per_model": round(plain, 3), "reference_loop_s_per_model": round(reference, 3),
        "pack_s_per_model": round(pack, 3),
        "plain_models_per_hour": round(3600 / plain, 1), "pack_models_per_hour": round(3600 / pack, 1),
        "pack_engine": engine, "compile": a.compile, "split_min_output": packed.SPLIT_MIN_OUTPUT,
        "repeats": a.repeats, "pack_ratios": [round(p / q, 2) for p, q in zip(plains, packs)],
        "pack_ratio": round(pack_ratio, 2), "bank_auto_choice": chosen, "bank_s_per_model": round(bank, 3),
        "bank_ratio": round(bank_ratio, 2),
        "plain_test_accuracy": round(statistics.mean(test_accuracy(ctx, m, device)[0] for m in trained["plain"]), 4),
        "pack_test_accuracy": round(statistics.mean(test_accuracy(ctx, trained["pack"], device)), 4),
    }
    if spec.train.augment.hflip:
        for tta in TTA[1:]:
            row[f"pack_test_accuracy_{tta.replace('-', '_')}_tta"] = round(statistics.mean(
                test_accuracy(ctx, trained["pack"], device, tta=tta)), 4)
    if device.type == "cuda":
        flops = step_flops(ctx, device) * steps
        row["pack_tflops"] = round(flops / pack / 1e12, 1)
        row["plain_tflops"] = round(flops / plain / 1e12, 1)
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak:
            row["pack_fraction_of_bf16_peak"] = round(row["pack_tflops"] / peak, 3)
    print(json.dumps(row))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
