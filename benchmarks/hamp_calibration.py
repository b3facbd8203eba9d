"""HAMP without its output modification makes LiRA stronger, not weaker (so does plain label smoothing).

Audits the quickstart setting (digits, MLP [512], 8 models, population 400, adam lr 1e-3, 60 epochs,
batch 64, queries identity + hflip; every model attacked in turn with the other 7 as shadows) with no
defense, HAMP (gamma 0.95, alpha 0.001) with and without its output modification, and label smoothing at
two strengths. No Ray, no MLflow: `bank.engine: local`, `tracking.enabled: false`.

HAMP trains every model towards a soft label whose true-class mass is about 0.26 on 10 classes. Members'
true-class probabilities then sit close to that value with little spread, while non-members spread out
(mostly below it), and LiRA's Gaussian IN/OUT test picks the narrow IN distribution out. HAMP's
output modification (a random input's logits, re-ordered to the query's ranking) removes the signal.

Prints a markdown table (mean ± std over the 8 targets) and writes a figure with two panels: the target's
true-class probability on members vs non-members (undefended and HAMP without output modification), and
LiRA online's TPR at 1% FPR per setting.

    python benchmarks/hamp_calibration.py                        # under a minute on 2 CPUs
    python benchmarks/hamp_calibration.py --epochs 3 --population 200 --out /tmp/h.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymia.audit import AuditResult, load_signals, run_audit  # noqa: E402
from raymia.defenses.hamp import soft_label_true_mass  # noqa: E402
from raymia.spec import AuditSpec  # noqa: E402
from raymia.store import SignalStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ["loss", "lira_online", "lira_offline", "rmia_online"]
HAMP = {"gamma": 0.95, "alpha": 0.001}
# (key, label, defense, params)
SETTINGS: list[tuple[str, str, str, dict]] = [
    ("none", "no defense", "none", {}),
    ("hamp_no_om", "HAMP, no output mod.", "hamp", {**HAMP, "output_modification": False}),
    ("hamp_om", "HAMP, output mod.", "hamp", {**HAMP, "output_modification": True}),
    ("ls_0.1", "label smoothing 0.1", "label_smoothing", {"smoothing": 0.1}),
    ("ls_0.3", "label smoothing 0.3", "label_smoothing", {"smoothing": 0.3}),
]
LIRA = "lira_online"
TPR = "tpr_fpr_0.01"


def spec_of(defense: str, params: dict, a: argparse.Namespace) -> AuditSpec:
    """The quickstart setting as one audit (sweeps/quickstart.yaml without its sweep block)."""
    return AuditSpec.model_validate({
        "name": "hamp-calibration",
        "seed": a.seed,
        "data": {"name": "digits"},
        "plan": {"num_models": a.models, "population": a.population, "targets": "all"},
        "model": {"name": "mlp", "params": {"hidden": [512]}},
        "train": {"optimizer": "adam", "lr": 1e-3, "epochs": a.epochs, "batch_size": 64},
        "queries": ["identity", "hflip"],
        "attacks": [{"name": n} for n in ATTACKS],
        "defense": {"name": defense, "params": params},
        "metrics": {"fpr_levels": [0.1, 0.01]},
        "bank": {"engine": "local", "pack_size": a.models, "device": "cpu"},
        "tracking": {"enabled": False},
    })


def true_class_prob(result: AuditResult, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax true-class probability of the identity query, p [M, P], the bank's keep [M, P], and the
    logit-scaled confidence phi [M, P] LiRA models, read back from the audit's signal store."""
    from raymia.attacks.mia import log_softmax, logit_scaled_confidence
    from raymia.train.bank import BankContext

    spec = result.spec
    ctx = BankContext.from_spec(spec, setup=False)
    store = SignalStore(root, result.fingerprint, spec.bank.pack_size, spec.plan.num_models, spec.pack_fingerprints())
    sig = load_signals(store, ctx.plan.keep, ctx.audited_y, ctx.data.y_test.numpy())
    z = sig.logits[:, 0]  # [M, P, C], identity query
    p = np.exp(np.take_along_axis(log_softmax(z), sig.labels[None, :, None], axis=-1)[..., 0])
    return p, sig.keep, logit_scaled_confidence(z, sig.labels)


def pooled_std(phi: np.ndarray, w: np.ndarray) -> float:
    """Root mean square of phi [M, P] minus its point's mean over the models with w [M, P] (LiRA's pooled
    std of one side with fewer than 64 shadows, here over the whole bank)."""
    n = np.maximum(w.sum(0), 1)
    mean = (phi * w).sum(0) / n
    return float(np.sqrt((np.square(phi - mean) * w).sum() / w.sum()))


def plot(path: Path, probs: dict, rows: dict, soft_mass: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    bins = np.linspace(0, 1, 101)
    styles = {"none": ("tab:gray", "no defense"), "hamp_no_om": ("tab:red", "HAMP, no output mod.")}
    for key, (color, name) in styles.items():
        p, keep = probs[key]
        ax1.hist(p[keep], bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=color,
                 label=f"{name}: members")
        ax1.hist(p[~keep], bins=bins, density=True, histtype="step", lw=1.8, color=color, ls="--",
                 label=f"{name}: non-members")
    ax1.axvline(soft_mass, color="k", lw=0.8, ls=":", label=f"HAMP's soft label: p_y = {soft_mass:.2f}")
    ax1.set_yscale("log")
    ax1.set_xlabel("true-class probability (target model 0, identity query)")
    ax1.set_ylabel("density (log)")
    ax1.set_title("members collapse onto the soft label")
    ax1.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.62, 0.99))

    keys = list(rows)
    x = np.arange(len(keys))
    tpr = [rows[k]["lira_tpr"] for k in keys]
    err = [rows[k]["lira_tpr_std"] for k in keys]
    colors = ["tab:gray", "tab:red", "tab:blue", "tab:orange", "tab:orange"][: len(keys)]
    ax2.bar(x, tpr, yerr=err, capsize=4, color=colors, alpha=0.8)
    for i, v in enumerate(tpr):
        ax2.text(i, v + err[i], f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax2.axhline(0.01, color="k", lw=0.8, ls=":", label="chance (TPR = FPR)")
    ax2.set_xticks(x, [rows[k]["label"].replace(", ", ",\n").replace("smoothing ", "smoothing\n") for k in keys],
                   fontsize=8)
    ax2.set_ylabel("LiRA online TPR @ 1% FPR")
    ax2.set_title(f"mean ± std over {rows[keys[0]]['targets']} targets")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def fmt(m: float | None, s: float | None, digits: int = 3) -> str:
    return "n/a" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def table(rows: dict) -> str:
    lines = ["| setting | test acc | LiRA online TPR@1%FPR | LiRA online AUC | loss AUC | LiRA offline TPR@1%FPR "
             "| RMIA online TPR@1%FPR | p_y members | p_y non-members | σ_IN / σ_OUT of φ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['label']} | {fmt(r['test_accuracy'], r['test_accuracy_std'])} "
                     f"| {fmt(r['lira_tpr'], r['lira_tpr_std'])} | {fmt(r['lira_auc'], r['lira_auc_std'])} "
                     f"| {fmt(r['loss_auc'], r['loss_auc_std'])} | {fmt(r['lira_offline_tpr'], r['lira_offline_tpr_std'])} "
                     f"| {fmt(r['rmia_tpr'], r['rmia_tpr_std'])} | {fmt(r['p_in'], r['p_in_std'], 2)} "
                     f"| {fmt(r['p_out'], r['p_out_std'], 2)} | {r['phi_std_in']:.2f} / {r['phi_std_out']:.2f} |")
    return "\n".join(lines)


def run(a: argparse.Namespace, root: Path) -> dict:
    rows: dict[str, dict] = {}
    probs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, label, defense, params in SETTINGS:
        t0 = time.perf_counter()
        result = run_audit(spec_of(defense, params, a), output_dir=root, track=False, console=False)
        f = result.flat_metrics()
        p, keep, phi = true_class_prob(result, root)
        probs[key] = (p[0], keep[0])
        rows[key] = {
            "label": label, "targets": len(result.spec.plan.target_list),
            "test_accuracy": f["test_accuracy"], "test_accuracy_std": f["std/test_accuracy"],
            "lira_tpr": f[f"{LIRA}/{TPR}"], "lira_tpr_std": f[f"std/{LIRA}/{TPR}"],
            "lira_auc": f[f"{LIRA}/auc"], "lira_auc_std": f[f"std/{LIRA}/auc"],
            "loss_auc": f["loss/auc"], "loss_auc_std": f["std/loss/auc"],
            "lira_offline_tpr": f[f"lira_offline/{TPR}"], "lira_offline_tpr_std": f[f"std/lira_offline/{TPR}"],
            "rmia_tpr": f[f"rmia_online/{TPR}"], "rmia_tpr_std": f[f"std/rmia_online/{TPR}"],
            # every model's members / non-members (mean ± std over points), and the pooled std of phi per side
            "p_in": float(p[keep].mean()), "p_in_std": float(p[keep].std()),
            "p_out": float(p[~keep].mean()), "p_out_std": float(p[~keep].std()),
            "phi_std_in": pooled_std(phi, keep.astype(float)), "phi_std_out": pooled_std(phi, (~keep).astype(float)),
        }
        print(f"{label}: {time.perf_counter() - t0:.0f}s"
              + (" (stored signals)" if result.reused_signals else ""), file=sys.stderr, flush=True)
    return {"rows": rows, "probs": probs}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--population", type=int, default=400)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for this MLP)")
    ap.add_argument("--output-dir", default=None, help="signal store root (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "hamp_calibration.png"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="hamp-calibration-") as tmp:
        res = run(a, Path(a.output_dir) if a.output_dir else Path(tmp))
    rows = res["rows"]
    mass = soft_label_true_mass(10, HAMP["gamma"])
    fig = plot(Path(a.out), res["probs"], rows, mass)
    print(f"quickstart setting, {a.models} models, population {a.population}, {a.epochs} epochs, "
          f"mean ± std over {rows['none']['targets']} targets; p_y: true-class probability, identity query, "
          f"all models (mean ± std over points); HAMP soft label p_y = {mass:.2f}\n")
    print(table(rows))
    print(f"\nfigure: {fig}")
    return {"rows": rows, "figure": str(fig)}


if __name__ == "__main__":
    main()
