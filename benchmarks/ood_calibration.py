"""Out-of-distribution false positives and calibration (Hintersdorf et al., IJCAI 2022) on digits.

Audits the quickstart setting (digits, MLP [512], 8 models, population 400, adam lr 1e-3, 60 epochs,
batch 64, identity queries, every model attacked in turn) with every non-member set of `raymia list ood`:
permuted pixels, scaled inputs (x255 after normalisation), no normalisation, uniform and Gaussian noise,
MNIST (another data set, adapted to 8x8; `--mnist`, skipped when the file is missing) and the fakes of a
class-conditional GAN trained on the public split. Settings: no defense, label smoothing (0.0083, the
paper's CIFAR-10 value, and 0.1), LLLA (prior precision 1 and 100) and temperature scaling fitted on
held-out (public) points. Attacks: the paper's threshold (max softmax) and entropy attacks and Salem's
top-3 MLP, raymia's confidence (p of the true label) and loss thresholds and LiRA offline. No Ray, no MLflow.

Prints two markdown tables (FPR per set at each attack's shadow-calibrated threshold for the undefended
model; and per setting the target's ECE and, for the entropy attack, held-out AUROC / FPR / recall and the
mean FPR over the OOD sets) and writes the undefended audit's bar plot to `--out`.

    python benchmarks/ood_calibration.py --out docs/img/ood_fpr_digits.png   # about 5 minutes on 2 CPUs
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymia.audit import run_audit  # noqa: E402
from raymia.resolve import validate_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
ATTACKS = ["max_confidence", "entropy", "salem", "confidence", "loss", "lira_offline"]
SETTINGS = [("no defense", "none", {}),
            ("label smoothing 0.0083", "label_smoothing", {"smoothing": 0.0083}),
            ("label smoothing 0.1", "label_smoothing", {"smoothing": 0.1}),
            ("LLLA, prior 1", "llla", {"prior_precision": 1.0}),
            ("LLLA, prior 100", "llla", {"prior_precision": 100.0}),
            ("temperature scaling (held-out)", "temperature_scaling", {"fit": "held_out"})]


def spec_of(defense: str, params: dict, a: argparse.Namespace, work: Path):
    sets: list = ["permuted", "scaled", "unnormalized", "uniform", "gaussian"]
    if Path(a.mnist).is_file():
        sets.append({"name": "dataset", "label": "mnist",
                     "params": {"name": "npz", "params": {"path": str(a.mnist)}}})
    sets.append({"name": "gan", "params": {"steps": a.gan_steps}})
    return validate_spec({
        "name": "ood-calibration", "seed": a.seed, "data": {"name": "digits"},
        "plan": {"num_models": 8, "population": 400, "targets": "all"},
        "model": {"name": "mlp", "params": {"hidden": [512]}},
        "train": {"optimizer": "adam", "lr": 1e-3, "epochs": a.epochs, "batch_size": 64},
        "queries": ["identity"], "attacks": ATTACKS,
        "defense": {"name": defense, "params": params},
        "bank": {"engine": "local", "device": "cpu"}, "tracking": {"enabled": False},
        "ood": {"size": a.size, "sets": sets}, "output_dir": str(work)})


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="where the undefended audit's bar plot is copied")
    ap.add_argument("--mnist", default=str(MNIST), help="MNIST .npz (x_train, y_train, x_test, y_test)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--size", type=int, default=400, help="inputs per non-member set")
    ap.add_argument("--gan-steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, defense, params in SETTINGS:
            t0 = time.perf_counter()
            res = run_audit(spec_of(defense, params, a, Path(tmp)), console=False)
            results.append((label, res))
            print(f"{label}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
            if a.out and defense == "none":
                shutil.copy(res.out_dir / "ood_fpr.png", a.out)
    ood0 = results[0][1].ood
    print("FPR at each attack's calibrated threshold, no defense (mean over 8 targets):\n")
    print("| set | labels | " + " | ".join(ood0.attacks) + " |")
    print("|---|---|" + "---|" * len(ood0.attacks))
    print("| (recall on members) | | " + " | ".join(pct(ood0.recall[x]) for x in ood0.attacks) + " |")
    for st in ood0.sets:
        print(f"| {st} | {ood0.label_sources[st]} | "
              + " | ".join(pct(ood0.attacks[x][st]["fpr"]) for x in ood0.attacks) + " |")
    print("\nCalibration vs leakage (entropy attack; AUROC / FPR against held-out data; mean OOD FPR):\n")
    print("| setting | test acc | test ECE | held-out AUROC | held-out FPR | recall | mean OOD FPR | LiRA offline AUC |")
    print("|---|---|---|---|---|---|---|---|")
    for label, res in results:
        o, m = res.ood, res.flat_metrics()
        h = o.attacks["entropy"]["held_out"]
        print(f"| {label} | {m['test_accuracy']:.3f} | {m['test_ece']:.3f} | {h['auroc']:.3f} | {pct(h['fpr'])} "
              f"| {pct(o.recall['entropy'])} | {pct(o.mean_fpr('entropy'))} | {m['lira_offline/auc']:.3f} |")


if __name__ == "__main__":
    main()
