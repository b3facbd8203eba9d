"""A small audit per defense on digits runs end to end (bank trained in-process: bank.engine local), and
its parameters and per-model facts reach result.json and the metrics."""

from __future__ import annotations

import json
import math

import pytest

from raymia.audit import run_audit
from raymia.spec import AuditSpec

DEFENSES = {
    "none": {},
    "hamp": {"gamma": 0.9},
    "label_smoothing": {"smoothing": 0.2},
    "weight_decay": {"weight_decay": 0.01},
    "early_stopping": {"fraction": 0.5},
    "confidence": {"temperature": 3.0, "top_k": 3},
    "memguard": {"epsilon": 0.5, "defense_optimizer": "adam", "defense_epochs": 20, "max_iter": 30},
    "relaxloss": {"alpha": 0.5},
    "advreg": {"lam": 1.0},
    "dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
    "pruning": {"sparsity": 0.7},
    "vae_metric_privacy": {"epsilon": 100.0, "vae_epochs": 15},
    "tl_dmi": {"freeze_fraction": 0.5, "pretrain_epochs": 2},
    "dmp": {"temperature": 2.0},
    "selena": {"sub_models": 4, "excluded_per_point": 2},
}
REPORTED = {"dpsgd": "defense/epsilon", "pruning": "defense/sparsity", "tl_dmi": "defense/frozen_fraction",
            "relaxloss": "defense/train_ce", "memguard": "defense/defense_model_accuracy",
            "dmp": "defense/teacher_agreement", "selena": "defense/soft_label_accuracy"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DEFENSES))
def test_small_audit_per_defense(name, tmp_path):
    spec = AuditSpec.model_validate({
        "name": f"d-{name}", "plan": {"num_models": 4, "population": 300, "targets": [0, 1]},
        "model": {"params": {"hidden": [64]}}, "train": {"epochs": 4},
        "defense": {"name": name, "params": DEFENSES[name]},
        "attacks": [{"name": "loss"}, {"name": "lira_offline"}, {"name": "rmia_online"}],
        "bank": {"engine": "local", "pack_size": 4}, "tracking": {"enabled": False},
        "output_dir": str(tmp_path),
    })
    res = run_audit(spec, console=False)
    m = res.flat_metrics()
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["test_accuracy"] > 0.15  # learned something
    for a in ("loss", "lira_offline", "rmia_online"):
        assert 0.0 <= m[f"{a}/auc"] <= 1.0
    saved = json.loads((res.out_dir / "result.json").read_text())
    assert saved["defense"]["name"] == name and saved["defense"]["params"] == DEFENSES[name]
    if name in REPORTED:
        value = m[REPORTED[name]]
        assert value is not None and math.isfinite(value) and value > 0
