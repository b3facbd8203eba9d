"""What a re-run promises (README, "Reproducibility"): the same spec gives the same numbers bit for bit,
whichever engine trains the bank (in the process, or a pool of Ray workers taking its packs in whatever
order), wherever the reports go, with or without the report page, and whatever the order of the attacks in
the spec; a bank that a killed run began is finished the way it began."""

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
    d["bank"] = {"pack_size": 2, **bank}
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


def test_a_bank_begun_one_way_is_finished_that_way_on_either_engine(tmp_path, ray_local):
    """The two ways of training (`bank.vectorize`) agree to float tolerance only. A run killed after its first
    pack, trained one model at a time, and run again with `vectorize: auto` (which on its own would pick packs
    here: the training is too short to time both) trains the rest one at a time too: its numbers are those of
    a run that trained every pack that way."""
    from raymia.audit import run_audit
    from raymia.engine.bank_job import build_bank_locally
    from raymia.spec import AuditSpec
    from raymia.store import SignalStore

    def spec(name: str, bank: dict) -> dict:
        d = tiny_spec_dict(tmp_path / name, plan={"num_models": 4, "population": 200}, train={"epochs": 4},
                           attacks=["loss"], tracking={"enabled": False})
        d["bank"] = {"pack_size": 2, **bank}
        return d

    run_audit(spec("ref", {"engine": "local", "vectorize": False}), page=False)
    reference = _signals({"spec": {"output_dir": str(tmp_path / "ref" / "runs")}})
    for engine in ("local", "ray"):
        begun = AuditSpec.model_validate(spec(engine, {"engine": engine, "vectorize": False}))
        store = SignalStore(begun.output_dir, begun.fingerprint(), 2, 4, begun.pack_fingerprints())
        build_bank_locally(begun, store, [0])  # the killed run's one pack
        run_audit(spec(engine, {"engine": engine}), page=False)
        manifests = [json.loads(p.read_text()) for p in sorted((tmp_path / engine / "runs").glob("signals/*/k2-*.json"))]
        assert [m["vectorized"] for m in manifests] == [False, False], engine
        got = _signals({"spec": {"output_dir": str(tmp_path / engine / "runs")}})
        assert got.keys() == reference.keys() and all(np.array_equal(got[k], reference[k]) for k in got), engine
