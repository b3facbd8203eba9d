"""Refactors must not move the numbers: small banks trained now give the same signals as the ones stored in
tests/data/reference_signals.npz for the same specs (undefended, HAMP, DP-SGD, AdvReg, TL-DMI).

A change that is meant to change the numbers (a bug fix, a new default) regenerates the file, in the same
commit, with
    RAYMIA_REGENERATE_REFERENCE=1 python3 -m pytest tests/test_reference_signals.py
and says why in the commit message. The tolerance is far below what any change of the recipe, the seeds or
the order of random draws produces, and above the rounding differences of another CPU's kernels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from raymia.engine.bank_job import build_bank_locally
from raymia.spec import AuditSpec
from raymia.store import SignalStore

REFERENCE = Path(__file__).parent / "data" / "reference_signals.npz"
REGENERATE = os.environ.get("RAYMIA_REGENERATE_REFERENCE") == "1"

DEFENSES = {
    "none": {},
    "hamp": {"gamma": 0.9, "alpha": 0.01},
    "dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
    "advreg": {"lam": 1.0},
    "tl_dmi": {"pretrain_epochs": 2, "pretrain_device": "cpu"},
}


def _spec(tmp_path: Path, name: str) -> AuditSpec:
    return AuditSpec.model_validate({
        "plan": {"num_models": 4, "population": 120},
        "model": {"name": "mlp", "params": {"hidden": [32]}},
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.01},
        "queries": ["identity", "hflip"],
        "defense": {"name": name, "params": DEFENSES[name]},
        "bank": {"pack_size": 4, "engine": "local"},
        "tracking": {"enabled": False},
        "output_dir": str(tmp_path),
    })


def _signals(tmp_path: Path, name: str) -> dict[str, np.ndarray]:
    spec = _spec(tmp_path, name)
    store = SignalStore(tmp_path, spec.fingerprint(), spec.bank.pack_size, spec.plan.num_models)
    build_bank_locally(spec, store, store.missing_packs())
    pack = store.read_pack(0)
    return {f"{name}/logits": pack["logits"], f"{name}/test_logits": pack["test_logits"][:, :, :100]}


@pytest.mark.parametrize("name", list(DEFENSES))
def test_bank_signals_match_the_stored_reference(tmp_path, name, one_thread):
    got = _signals(tmp_path, name)
    if REGENERATE:
        old = dict(np.load(REFERENCE)) if REFERENCE.exists() else {}
        REFERENCE.parent.mkdir(exist_ok=True)
        np.savez_compressed(REFERENCE, **{**old, **got})
        pytest.skip("reference regenerated")
    if not REFERENCE.exists():
        pytest.fail(f"{REFERENCE} is missing: regenerate it (see this module's docstring)")
    ref = np.load(REFERENCE)
    for key, value in got.items():
        assert key in ref, f"{key} is not in {REFERENCE.name}: regenerate it"
        np.testing.assert_allclose(value, ref[key], rtol=0, atol=1e-5, err_msg=key)
