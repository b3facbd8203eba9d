"""The compute core runs where Ray, MLflow and Optuna are not installed (a bare GPU machine)."""

from __future__ import annotations

import subprocess
import sys

GUARD = """
import builtins
real = builtins.__import__
def guard(name, *a, **k):
    if name.split(".")[0] in ("ray", "mlflow", "optuna"):
        raise ImportError("blocked " + name)
    return real(name, *a, **k)
builtins.__import__ = guard
import torch
from raymia.spec import AuditSpec
from raymia.store import SignalStore
from raymia.engine.bank_job import build_bank_locally
from raymia.train.bank import BankContext
from raymia.audit import load_signals
from raymia.attacks import run_attack
from raymia.metrics import attack_metrics
import raymia.defenses, raymia.models, raymia.data
spec = AuditSpec.model_validate({"plan": {"num_models": 4, "population": 200}, "train": {"epochs": 2},
                                 "model": {"params": {"hidden": [16]}}, "bank": {"pack_size": 2}})
ctx = BankContext.from_spec(spec)
store = SignalStore(sys.argv[1], spec.fingerprint(), 2, 4)
build_bank_locally(spec, store, store.missing_packs())
sig = load_signals(store, ctx.plan.keep, ctx.audited_y, ctx.data.y_test.numpy())
print("auc", attack_metrics(run_attack("lira_online", None, sig, 0), sig.keep[0])["auc"])
"""


def test_core_runs_without_ray_mlflow_optuna(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import sys\n" + GUARD, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    auc = float(out.stdout.split("auc", 1)[1])
    assert 0.0 <= auc <= 1.0
    # Progress: one line per pack, with the time left while packs remain.
    lines = [ln for ln in out.stdout.splitlines() if "done (" in ln]
    assert len(lines) == 2 and "pack 0 done (1/2," in lines[0] and "left)" in lines[0]
    assert "pack 1 done (2/2," in lines[1] and "left" not in lines[1]


def test_duration_format():
    from raymia.report.text import duration as _duration

    assert [_duration(s) for s in (0.4, 59.6, 61, 3599, 3600, 7440)] == ["0s", "1m00s", "1m01s", "59m59s", "1h00m",
                                                                         "2h04m"]
