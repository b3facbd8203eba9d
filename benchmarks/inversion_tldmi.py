"""TL-DMI against model inversion: attack accuracy at several freeze depths (REFERENCE 1.4).

Two data sets, each split by class into PRIVATE classes (the target's training data) and PUBLIC classes
(the only data TL-DMI pretrains on and the attacker's GAN sees):

- `digits`: scikit-learn's 8x8 digits (raymia's `digits` split), private = classes 0-4, public = 5-9;
  the target's held-out images are the private classes of the test split;
- `olivetti`: the Olivetti faces (40 people x 10 grey 64x64 images), private = 20 people drawn with the
  seed, public = the other 20; 2 images of each private person are held out for the target's test accuracy;
  images are downsampled to 32x32 by 2x2 averaging (`--size 64` keeps them) so the GAN and GMI fit a CPU.

The data are written to a temporary `npz` data set (uint8 pixels; `normalize: auto`) whose training split
is the private training images followed by every public image, with labels 0..K_priv-1 for the private
classes and K_priv..K-1 for the public ones, and whose test split is the held-out private images. Each
target is bank model 0 of an `AuditSpec` over that data set, built with raymia's own code:
`BankContext.from_spec` (data, defense, recipe), a membership plan whose population is exactly the private
training images and in which model 0 trains on ALL of them (a custom `MembershipPlan`: the bank's paired
plan would give it a random half), TL-DMI's `setup` on that population (so its public split is exactly the
public classes), and `raymia.train.bank.train_model`. The bank counts an epoch as ceil((P/2) / batch)
steps, so `--epochs E` bank epochs are E/2 passes over the private training images.

Settings: no defense (trained from scratch), and TL-DMI with `freeze: depth` at each of `--depths` (0 =
pretrained on the public classes, everything fine-tuned). The pretraining is the same for every depth
(cached). Attacks (`raymia.inversion`): MIFace, GMI (its GAN trained on the public images only, cached
and shared by every setting), LOMMA's GMI (the same GAN and search, with the logit identity loss and two
students distilled from each target on the public images, `STUDENTS`) and BREP-MI (label-only, in the same
GAN) reconstruct `--per-class` images of every private class. Scores
(`score_reconstructions`): an independent evaluation classifier of another architecture (`cached_evaluator`),
trained on ALL private images (training and held-out), gives top-1 / top-5 attack accuracy, the KNN distance
to the class's private images in its feature space and the FID of its features (not Inception's).

Prints a markdown table and writes two figures: `<out>/inversion_<data>_grid.png` (first row: the mean
private image per class; then one row per setting and attack with the first reconstruction per class) and
`<out>/inversion_<data>_trend.png` (attack top-1 per setting, with the target's test accuracy on a second
axis). No Ray, no MLflow.

    python benchmarks/inversion_tldmi.py --data digits --per-class 20 --out docs/img     # about 4 min on 2 CPUs
    python benchmarks/inversion_tldmi.py --data olivetti --per-class 5 --out docs/img    # about 52 min on 2 CPUs
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymia.data.plan import MembershipPlan  # noqa: E402
from raymia.defenses.tldmi import frozen_fraction  # noqa: E402
from raymia.inversion.evaluation import cached_evaluator, save_grid, score_reconstructions  # noqa: E402
from raymia.inversion.registry import InversionContext, run_inversion  # noqa: E402
from raymia.spec import AuditSpec  # noqa: E402
from raymia.train.bank import BankContext, train_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OLIVETTI = ROOT.parent / "shared" / "data" / "olivetti_faces.npz"

# The target (raymia's `cnn`, VGG-like: conv-BN-ReLU-pool blocks, so TL-DMI freezes conv layers first as in
# the paper; 5 parameterised layers: 3 convs, the hidden fc, the classifier) and, per data set, the evaluator
# (another architecture), the fine-tuning recipe and the CPU-sized defaults of the command line (`None` there).
TARGET = {"name": "cnn", "params": {"channels": [16, 32, 64], "batch_norm": True, "global_pool": True,
                                    "hidden": 128}}
# LOMMA's students: architectures other than the target's and the evaluators' (LOMMA: EfficientNet-B0/B1/B2)
STUDENTS = [{"name": "mlp", "params": {"hidden": [256]}}, {"name": "cnn", "params": {"channels": [8, 16], "hidden": 64}}]
# (column prefix, attack, display name, grid tag)
ATTACKS = [("miface", "miface", "MIFace", "MIF"), ("gmi", "gmi", "GMI", "GMI"), ("lomma", "gmi", "LOMMA-GMI", "LOM"),
           ("brep", "brep_mi", "BREP-MI", "BRP")]
CONFIG = {
    "digits": {"evaluator": ("mlp", {"hidden": [512, 256]}), "lr": 1e-3, "batch": 64,
               "defaults": {"epochs": 60, "pretrain_epochs": 30, "evaluator_epochs": 30, "per_class": 4,
                            "gmi_steps": 300, "gan_steps": 1500, "gan_batch": 64, "gan_width": 32}},
    "olivetti": {"evaluator": ("lenet5", {}), "lr": 1e-3, "batch": 32,
                 "defaults": {"epochs": 200, "pretrain_epochs": 100, "evaluator_epochs": 100, "per_class": 1,
                              "gmi_steps": 200, "gan_steps": 800, "gan_batch": 32, "gan_width": 16}},
}


# ---------------------------------------------------------------------------------------------------------
# data


def digits_split() -> dict[str, np.ndarray]:
    """raymia's digits split as uint8 pixels: private = classes 0-4 (train / held-out test), public = 5-9."""
    from raymia.data import load_dataset

    d = load_dataset("digits")
    m, s = d.info.mean[0], d.info.std[0]

    def pixels(x: torch.Tensor) -> np.ndarray:
        return np.rint((x[:, 0].numpy() * s + m).clip(0, 1) * 255).astype(np.uint8)

    xtr, ytr, xte, yte = pixels(d.x_train), d.y_train.numpy(), pixels(d.x_test), d.y_test.numpy()
    priv_tr, priv_te = ytr < 5, yte < 5
    return {"x_priv": xtr[priv_tr], "y_priv": ytr[priv_tr], "x_test": xte[priv_te], "y_test": yte[priv_te],
            "x_pub": np.concatenate([xtr[~priv_tr], xte[~priv_te]]),
            "y_pub": np.concatenate([ytr[~priv_tr], yte[~priv_te]]), "k_priv": 5, "k": 10}


def olivetti_split(path: Path, size: int, seed: int, n_private: int = 20, n_test: int = 2) -> dict[str, np.ndarray]:
    """Olivetti: `n_private` people drawn with the seed are private (labels 0..n_private-1, `n_test` images
    each held out), the rest public (labels n_private..39); images downsampled to size x size."""
    if not path.is_file():
        raise SystemExit(f"inversion_tldmi: Olivetti file not found: {path} (give --olivetti PATH)")
    with np.load(path, allow_pickle=False) as f:
        images, labels = f["images"], f["labels"].astype(np.int64)
    if size != images.shape[1]:
        r = images.shape[1] // size
        images = np.rint(images.reshape(-1, size, r, size, r).mean((2, 4))).astype(np.uint8)
    rng = np.random.default_rng(seed)
    people = rng.permutation(np.unique(labels))
    relabel = {int(p): i for i, p in enumerate(people)}  # private people first
    x_priv, y_priv, x_test, y_test, x_pub, y_pub = [], [], [], [], [], []
    for p in people:
        idx = np.flatnonzero(labels == p)
        new = relabel[int(p)]
        if new < n_private:
            idx = rng.permutation(idx)
            x_test.append(images[idx[:n_test]]), y_test.append(np.full(n_test, new))
            x_priv.append(images[idx[n_test:]]), y_priv.append(np.full(idx.size - n_test, new))
        else:
            x_pub.append(images[idx]), y_pub.append(np.full(idx.size, new))
    cat = np.concatenate
    return {"x_priv": cat(x_priv), "y_priv": cat(y_priv), "x_test": cat(x_test), "y_test": cat(y_test),
            "x_pub": cat(x_pub), "y_pub": cat(y_pub), "k_priv": n_private, "k": len(people)}


def write_npz(split: dict, path: Path) -> int:
    """The npz data set (train = private training images, then every public image); the private count."""
    np.savez(path, x_train=np.concatenate([split["x_priv"], split["x_pub"]]),
             y_train=np.concatenate([split["y_priv"], split["y_pub"]]).astype(np.int64),
             x_test=split["x_test"], y_test=split["y_test"].astype(np.int64))
    return int(split["x_priv"].shape[0])


# ---------------------------------------------------------------------------------------------------------
# targets


def spec_of(npz: Path, k: int, n_priv: int, defense: str, params: dict, a: argparse.Namespace,
            cache_root: Path) -> AuditSpec:
    cfg = CONFIG[a.data]
    return AuditSpec.model_validate({
        "name": "inversion-tldmi",
        "seed": a.seed,
        "data": {"name": "npz", "params": {"path": str(npz), "num_classes": k}},
        "plan": {"num_models": 2, "population": n_priv},
        "model": TARGET,
        "train": {"optimizer": "adam", "lr": cfg["lr"], "epochs": a.epochs, "batch_size": cfg["batch"]},
        "defense": {"name": defense, "params": params},
        "queries": ["identity"],
        "bank": {"engine": "local", "device": "cpu"},
        "tracking": {"enabled": False},
        "output_dir": str(cache_root),
    })


def train_target(spec: AuditSpec, n_priv: int) -> tuple[torch.nn.Module, BankContext, dict]:
    """Bank model 0 trained on all the private training images (indices 0..n_priv-1 of the training split);
    TL-DMI's public split is then exactly the public classes."""
    ctx = BankContext.from_spec(spec, setup=False)
    keep = np.zeros((2, n_priv), dtype=bool)
    keep[0] = True  # model 0: every private training image; model 1 (never trained): none
    plan = MembershipPlan(population=np.arange(n_priv, dtype=np.int64), keep=keep, targets=(0,))
    ctx.defense.setup(ctx.data, plan.population, Path(spec.output_dir) / "cache", spec.seed)
    ctx = replace(ctx, plan=plan)
    assert np.array_equal(ctx.public_index, np.arange(n_priv, ctx.data.x_train.shape[0]))
    report: dict[str, float] = {}
    model = train_model(ctx, 0, torch.device("cpu"), report=report)
    return model, ctx, report


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model.eval()(x).argmax(1) == y).double().mean())


# ---------------------------------------------------------------------------------------------------------
# the experiment


def settings(depths: list[int]) -> list[tuple[str, str, str, dict]]:
    """(key, label, defense, params)."""
    out = [("none", "no defense", "none", {})]
    for d in depths:
        out.append((f"d{d}", f"TL-DMI depth {d}", "tl_dmi", {"freeze": "depth", "freeze_depth": d}))
    return out


def run(a: argparse.Namespace, work: Path) -> dict:
    split = digits_split() if a.data == "digits" else olivetti_split(Path(a.olivetti), a.size, a.seed)
    npz = work / f"{a.data}.npz"
    n_priv = write_npz(split, npz)
    k, k_priv = int(split["k"]), int(split["k_priv"])
    classes = list(range(k_priv))
    miface = {"per_class": a.per_class, "steps": a.miface_steps, "restarts": a.restarts}
    gmi = {"per_class": a.per_class, "steps": a.gmi_steps, "restarts": a.restarts, "gan_steps": a.gan_steps,
           "gan_batch_size": a.gan_batch, "gan_loss": "dcgan", "n_critic": 1, "latent_dim": a.latent_dim, "width": a.gan_width}
    lomma = {**gmi, "identity_loss": "logit", "augment": STUDENTS}
    gan = {k: v for k, v in gmi.items() if k not in ("per_class", "steps", "restarts")}
    brep = {**gan, "per_class": a.per_class, "patience": a.brep_patience}
    params_of = {"miface": miface, "gmi": gmi, "lomma": lomma, "brep": brep}
    rows: dict[str, dict] = {}
    recs: dict[str, dict] = {}
    evaluator = private_x = private_y = None
    for key, label, defense, params in settings(a.depths):
        t0 = time.perf_counter()
        if defense == "tl_dmi":
            params = {**params, "pretrain_epochs": a.pretrain_epochs}
        spec = spec_of(npz, k, n_priv, defense, params, a, work)
        target, ctx, report = train_target(spec, n_priv)
        data = ctx.data
        if evaluator is None:  # the same for every setting: all private images, normalised as the target's
            private_x = torch.cat([data.x_train[:n_priv], data.x_test])
            private_y = torch.cat([data.y_train[:n_priv], data.y_test])
            arch, eparams = CONFIG[a.data]["evaluator"]
            ev = cached_evaluator(work / "cache", {"benchmark": "inversion_tldmi", "data": a.data}, private_x,
                                  private_y, k_priv, data.info.input_shape, arch=arch, params=eparams,
                                  epochs=a.evaluator_epochs, seed=a.seed + 1)
            evaluator = ev.model
        ictx = InversionContext(info=data.info, x_public=data.x_train[n_priv:], cache_dir=work / "cache",
                                seed=a.seed)
        row = {"label": label, "frozen_fraction": report.get("frozen_fraction", frozen_fraction(target)),
               "frozen_layers": report.get("frozen_layers", 0.0),
               "test_accuracy": accuracy(target, data.x_test, data.y_test),
               "train_accuracy": accuracy(target, data.x_train[:n_priv], data.y_train[:n_priv])}
        recs[key] = {}
        for col, attack, _, _ in ATTACKS:
            rec = run_inversion(attack, params_of[col], target, classes, ictx)
            # KNN distance and FID against the images the target trained on (the official evaluations')
            s = score_reconstructions(evaluator, rec.images, rec.labels, data.x_train[:n_priv], data.y_train[:n_priv])
            row.update({f"{col}_{m}": float(s[m]) for m in ("top1", "top5", "knn_dist", "fid")})
            recs[key][col] = rec
        rows[key] = row
        print(f"{label}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    info = data.info
    means = torch.stack([private_x[private_y == c].mean(0) for c in classes])
    return {"rows": rows, "recs": recs, "means": means, "info": info, "k_priv": k_priv, "n_priv": n_priv,
            "n_pub": int(data.x_train.shape[0]) - n_priv, "n_test": int(data.x_test.shape[0]),
            "input_shape": tuple(info.input_shape)}


# ---------------------------------------------------------------------------------------------------------
# reports


def table(rows: dict) -> str:
    head = ["setting", "frozen fraction", "target test acc"]
    for _, _, name, _ in ATTACKS:
        head += [f"{name} top-1", f"{name} top-5", f"{name} KNN dist"] + ([f"{name} FID"] if name != "MIFace" else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows.values():
        cells = [r["label"], f"{r['frozen_fraction']:.3f}", f"{r['test_accuracy']:.3f}"]
        for col, _, name, _ in ATTACKS:
            top5 = r[col + "_top5"]  # nan with 5 private classes or fewer: every class is in the top 5
            cells += [f"{r[col + '_top1']:.3f}", "n/a" if math.isnan(top5) else f"{top5:.3f}",
                      f"{r[col + '_knn_dist']:.2f}"]
            cells += [f"{r[col + '_fid']:.1f}"] if name != "MIFace" else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid(res: dict, path: Path, max_classes: int) -> Path:
    """Row 0: the mean private image per class; then per setting and attack the first reconstruction."""
    n = min(max_classes, res["k_priv"])
    images, labels = [res["means"][:n]], [f"mean {c}" if c == 0 else str(c) for c in range(n)]
    for key, recs in res["recs"].items():
        for col, _, _, tag in ATTACKS:
            rec = recs[col]
            first = torch.stack([rec.images[rec.labels == c][0] for c in range(n)])
            images.append(first)
            labels += [f"{key} {tag}" if c == 0 else str(c) for c in range(n)]
    info = res["info"]
    return save_grid(torch.cat(images), path, nrow=n, labels=labels, mean=info.mean, std=info.std,
                     scale=max(1, math.ceil(64 / info.input_shape[-1])))


def trend(rows: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(rows)
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for (col, _, name, _), color in zip(ATTACKS, ("tab:blue", "tab:red", "tab:purple", "tab:green")):
        ax.plot(x, [rows[k][f"{col}_top1"] for k in keys], "o-", color=color, label=f"{name} top-1")
        ax.plot(x, [rows[k][f"{col}_top5"] for k in keys], "o:", color=color, alpha=0.5,
                label=f"{name} top-5")
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("attack accuracy (evaluation classifier)")
    ticks = [("no\ndefense" if k == "none" else f"depth {k[1:]}") + f"\n{rows[k]['frozen_fraction']:.1%}"
             for k in keys]
    ax.set_xticks(x, ticks, fontsize=8)
    ax.set_xlabel("setting (TL-DMI freeze depth) and frozen share of the parameters")
    ax2 = ax.twinx()
    ax2.plot(x, [rows[k]["test_accuracy"] for k in keys], "s--", color="k", label="target test accuracy")
    ax2.set_ylim(-0.03, 1.03)
    ax2.set_ylabel("target test accuracy")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7.5, loc="lower left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=sorted(CONFIG), default="digits")
    ap.add_argument("--olivetti", default=str(OLIVETTI), help="the Olivetti faces .npz (images, labels)")
    ap.add_argument("--size", type=int, default=32, choices=[32, 64], help="Olivetti image side")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder of the two figures")
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 2, 3, 4], help="TL-DMI freeze depths")
    ap.add_argument("--epochs", type=int, help="bank epochs of the target (each = half a pass over its data)")
    ap.add_argument("--pretrain-epochs", type=int, help="TL-DMI pretraining epochs over the public images")
    ap.add_argument("--evaluator-epochs", type=int)
    ap.add_argument("--per-class", type=int, help="reconstructions per private class and attack")
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--miface-steps", type=int, default=300)
    ap.add_argument("--gmi-steps", type=int)
    ap.add_argument("--brep-patience", type=int, default=200, help="BREP-MI's steps without growth before it stops")
    ap.add_argument("--gan-steps", type=int)
    ap.add_argument("--gan-batch", type=int)
    ap.add_argument("--gan-width", type=int)
    ap.add_argument("--latent-dim", type=int, default=32)
    ap.add_argument("--grid-classes", type=int, default=10, help="classes shown in the grid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: fastest on a busy CPU)")
    ap.add_argument("--work-dir", default=None, help="data set and caches (default: a temporary folder)")
    a = ap.parse_args(argv)
    for key, value in CONFIG[a.data]["defaults"].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="inversion-tldmi-") as tmp:
        work = Path(a.work_dir) if a.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = run(a, work)
    rows = res["rows"]
    out = Path(a.out)
    shape = "x".join(str(s) for s in res["input_shape"][1:])
    title = (f"{a.data} ({shape}): {res['k_priv']} private classes, {res['n_priv']} private training images, "
             f"{res['n_pub']} public images")
    fig_grid = grid(res, out / f"inversion_{a.data}_grid.png", a.grid_classes)
    fig_trend = trend(rows, out / f"inversion_{a.data}_trend.png", title)
    print(f"{title}; target {TARGET['name']} {TARGET['params']}, {a.epochs} bank epochs "
          f"(= {a.epochs / 2:g} passes), TL-DMI pretraining {a.pretrain_epochs} epochs; evaluator "
          f"{CONFIG[a.data]['evaluator'][0]}; MIFace {a.miface_steps} steps, GMI {a.gmi_steps} steps, BREP-MI "
          f"patience {a.brep_patience}, GAN "
          f"{a.gan_steps} steps (dcgan, width {a.gan_width}, batch {a.gan_batch}); {a.per_class} reconstructions per class, {a.restarts} restarts; "
          f"held-out test images {res['n_test']}; seed {a.seed}; {time.perf_counter() - t0:.0f}s\n")
    print(table(rows))
    print(f"\nfigures: {fig_grid} {fig_trend}")
    return {"rows": rows, "table": table(rows), "grid": str(fig_grid), "trend": str(fig_trend), "k_priv": res["k_priv"]}


if __name__ == "__main__":
    main()
