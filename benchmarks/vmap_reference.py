"""The issue's reference point for small CNNs: torch.func.vmap over K LeNet-5s against the same K trained
one by one, outside raymia (plain PyTorch on both sides, the same recipe).

K LeNet-5s (28x28 inputs, batch 64, Adam lr 1e-3) train for --steps steps each on a learnable synthetic task
(noisy copies of 10 random class templates), three ways, alternating over --repeats rounds:
  plain   one model after another, the plainest loop;
  own     one vmap over the K models, each with its own batch (what a shadow bank needs: every model
          draws from its own members);
  shared  one vmap over the K models, all on the same batch (inputs not batched over the models).
Prints one JSON line: median seconds per model for each side, the median ratios plain / vmap, and each
side's mean training loss over its last 10 steps (chance level: log 10 = 2.30).

    python benchmarks/vmap_reference.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


def lenet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                         nn.Linear(84, 10))


def task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy copies of 10 random class templates (a task LeNet-5 learns in a few dozen steps)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return templates[y] + torch.randn(n, 1, 28, 28, generator=g), y


def plain(x, y, k: int, steps: int, batch: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    tail = []
    for _ in range(k):
        model = lenet()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for t in range(steps):
            i = torch.randint(0, x.shape[0], (batch,), generator=g)
            loss = F.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if t >= steps - 10:
                tail.append(loss.item())
    return statistics.mean(tail)


def vmapped(x, y, k: int, steps: int, batch: int, seed: int, shared: bool) -> float:
    g = torch.Generator().manual_seed(seed)
    params, buffers = stack_module_state([lenet() for _ in range(k)])
    base = copy.deepcopy(lenet()).to("meta")
    opt = torch.optim.Adam(params.values(), lr=1e-3)

    def one(p, b, xb):
        return functional_call(base, (p, b), (xb,))

    tail = []
    for t in range(steps):
        if shared:
            i = torch.randint(0, x.shape[0], (batch,), generator=g)
            out, labels = vmap(one, in_dims=(0, 0, None))(params, buffers, x[i]), y[i].repeat(k)
        else:
            i = torch.randint(0, x.shape[0], (k, batch), generator=g)
            out, labels = vmap(one)(params, buffers, x[i]), y[i].reshape(-1)
        loss = F.cross_entropy(out.reshape(-1, 10), labels) * k  # the sum of the K models' mean losses
        opt.zero_grad()
        loss.backward()
        opt.step()
        if t >= steps - 10:
            tail.append(loss.item() / k)
    return statistics.mean(tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=8, help="K")
    ap.add_argument("--steps", type=int, default=160, help="training steps per model")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    x, y = task(2000, 0)
    sides = {"plain": lambda: plain(x, y, a.models, a.steps, a.batch, 1),
             "own": lambda: vmapped(x, y, a.models, a.steps, a.batch, 1, shared=False),
             "shared": lambda: vmapped(x, y, a.models, a.steps, a.batch, 1, shared=True)}
    for fn in sides.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {s: [] for s in sides}
    losses: dict[str, float] = {}
    for _ in range(a.repeats):
        for s, fn in sides.items():
            t0 = time.perf_counter()
            losses[s] = fn()
            times[s].append((time.perf_counter() - t0) / a.models)
    row = {"device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "K": a.models, "steps": a.steps, "batch": a.batch,
           **{f"{s}_s_per_model": round(statistics.median(v), 4) for s, v in times.items()},
           **{f"plain_over_{s}": round(statistics.median(p / q for p, q in zip(times["plain"], times[s])), 2)
              for s in ("own", "shared")},
           **{f"{s}_final_loss": round(v, 3) for s, v in losses.items()},
           "chance_loss": round(math.log(10), 3)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
