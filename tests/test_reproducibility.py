"""What a re-run promises (README, "Reproducibility"): the same spec gives the same numbers bit for bit,
whichever engine trains the bank (in the process, or a pool of Ray workers taking its packs in whatever
order), wherever the reports go, with or without the report page, and whatever the order of the attacks in
the spec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.conftest import tiny_spec_dict

ATTACKS = ["loss", "lira_offline", "rmia_online", {"name": "shokri", "params": {"max_train": 1000, "max_iter": 50}}]


def _audit(tmp_path: Path, name: str, attacks: list, bank: dict, page: bool) -> dict:
    from raymia.audit import run_audit

    d = tiny_spec_dict(tmp_path / name, plan={"num_models": 8, "population": 300, "targets": [0, 3]},
                       train={"epochs": 10, "batch_size": 64, "lr": 0.002}, attacks=attacks,
                       tracking={"enabled": False}, metrics={"bootstrap": 10})
    d["bank"] = {"pack_size": 2, "vectorize": True, **bank}
    run_audit(d, page=page)
    return json.loads(next((tmp_path / name / "runs").glob("audits/*/result.json")).read_text())


def _signals(result: dict) -> dict[tuple[str, int], np.ndarray]:
    out = {}
    for p in sorted(Path(result["spec"]["output_dir"]).glob("signals/*/k*-pack-*.npz")):
        with np.load(p) as z:
            for name in z.files:
                out.update({(name, int(m)): z[name][i] for i, m in enumerate(z["models"]) if name != "models"})
    return out


def test_the_same_spec_gives_the_same_numbers_on_any_engine_folder_page_and_attack_order(tmp_path, ray_local):
    here = _audit(tmp_path, "local", ATTACKS, {"engine": "local"}, page=True)
    pool = _audit(tmp_path, "pool", ATTACKS[::-1], {"engine": "ray", "num_workers": 2}, page=False)
    assert here["fingerprint"] == pool["fingerprint"]
    for key in ("utility", "utility_std_over_targets", "attacks", "attacks_std_over_targets", "attacks_per_target",
                "members_per_target"):
        assert here[key] == pool[key], key
    assert [(v["index"], sorted(v["attacks"]), v["score"]) for v in here["vulnerable"]] == \
        [(v["index"], sorted(v["attacks"]), v["score"]) for v in pool["vulnerable"]]
    a, b = _signals(here), _signals(pool)
    assert a.keys() == b.keys() and len(a) == 16  # logits and test_logits of 8 models
    assert all(np.array_equal(a[k], b[k]) for k in a)
