"""`raymia check`: validates like audit/sweep, describes the run, reads the store without changing it, and
needs neither Ray nor MLflow nor Optuna."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from raymia.check import check_spec
from raymia.errors import DataError, SpecError
from raymia.resolve import load_spec
from raymia.spec import AuditSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(tmp_path, d: dict, name: str = "spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return path


def _audit_dict(tmp_path) -> dict:
    return {"name": "chk", "plan": {"num_models": 4, "population": 200}, "model": {"params": {"hidden": [16]}},
            "train": {"epochs": 3, "batch_size": 32}, "queries": ["identity"], "attacks": ["loss", "lira_online"],
            "bank": {"engine": "local", "pack_size": 2}, "tracking": {"enabled": False},
            "output_dir": str(tmp_path / "runs")}


def test_check_audit_counts_stored_packs_and_leaves_the_store_alone(tmp_path):
    from raymia.audit import run_audit

    path = _write(tmp_path, _audit_dict(tmp_path))
    rep = check_spec(path)
    spec = load_spec(path, kind=AuditSpec)
    assert rep.kind == "audit" and rep.fingerprint == spec.fingerprint()
    assert rep.packs == 2 and rep.stored == [] and rep.invalid == {}
    rows = dict(rep.rows)
    # 100 members per model (half of 200), 4 steps of 32 per epoch (ceil(100 / 32)), 3 epochs
    assert "3 epochs x 4 steps of 32 = 12 steps per model, 48 in all" in rows["training"]
    assert rows["plan"] == "4 models, 4 attacked (0, 1, 2, 3); 200 audited points, each in the training set of 2 models; 100 members per model"
    assert rows["model"].startswith("mlp: 1,210 parameters")  # 64*16+16 + 16*10+10
    assert "0 of 2 packs stored" in rows["signals"]
    # FLOPs by hand for the 64-16-10 MLP at batch 32: forward 2*32*(64*16 + 16*10) = 75,776; backward the
    # two weight gradients (75,776 again) and the hidden layer's input gradient 2*32*16*10 = 10,240
    # (the data needs none). 12 steps x 4 models of training; querying: one example's forward 2*(1,184)
    # for 4 models x 1 query x 650 points.
    assert rows["compute"].startswith(f"{161_792 * 48 / 1e6:.3g} MFLOP to train the bank and "
                                      f"{2_368 * 4 * 650 / 1e6:.3g} MFLOP to query it, counted on the meta device")

    # 4 models x 1 query x (200 audited + 450 test points) x 10 classes x 4 bytes
    assert rep.signal_bytes == 104_000 and "101.6 KiB in all" in rows["signals"]

    run_audit(spec, track=False, console=False)
    rep = check_spec(path)
    assert rep.stored == [0, 1] and "all stored: the audit trains nothing" in dict(rep.rows)["signals"]
    files = list((tmp_path / "runs" / "signals" / spec.fingerprint()).glob("*.npz"))
    assert 0 <= sum(f.stat().st_size for f in files) - rep.signal_bytes < 2 * 2048  # .npz headers only

    data = next((tmp_path / "runs" / "signals" / spec.fingerprint()).glob("k2-pack-00001.npz"))
    data.write_bytes(data.read_bytes()[:-10])
    rep = check_spec(path)
    assert rep.stored == [0] and list(rep.invalid) == [1] and "truncated" in rep.invalid[1]
    assert data.exists()  # check reports; the next run rebuilds

    # --set and --output-dir apply as they do for audit: another store root holds nothing yet
    rep = check_spec(path, ["train.epochs=4"], output_dir=tmp_path / "other")
    assert rep.stored == [] and rep.fingerprint != spec.fingerprint()


def test_check_cli_prints_the_summary_without_ray_mlflow_or_optuna(tmp_path):
    d = _audit_dict(tmp_path)
    d["sweep"] = {"defense": "hamp", "num_trials": 3, "space": {"gamma": {"low": 0.5, "high": 0.9}}}
    path = _write(tmp_path, d)
    code = ("import sys; from raymia.cli import main; rc = main(['check', sys.argv[1]]); "
            "print('loaded:', [m for m in ('ray', 'mlflow', 'optuna') if m in sys.modules]); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "loaded: []"
    by_label = {line.split()[0]: line for line in lines[:-1]}
    assert "a valid sweep spec, name 'chk'" in by_label["spec"]
    assert "hamp: gamma [0.5, 0.9], alpha log [0.0001, 0.05]" in by_label["search"]
    assert ("3 searched trials after the undefended baseline (trial 0), 101.6 KiB of signals each (sampler tpe, "
            "2 random first" in by_label["sweep"])
    assert by_label["progress"].endswith("not started")
    assert by_label["tracking"].endswith("off")


@pytest.mark.parametrize(
    ("over", "err", "needle"),
    [
        # the objective's FPR level needs 1/0.001 = 1000 non-members; the targets have about 100
        ({"sweep": {"objectives": [{"metric": "test_accuracy", "mode": "max"},
                                   {"metric": "lira_online/tpr_fpr_0.001", "mode": "min"}]}},
         SpecError, "sweep.objectives.1.metric: lira_online/tpr_fpr_0.001 needs at least 1000 non-members per target"),
        ({"sweep": {"constraints": [{"metric": "loss/tnr_fnr_0.001", "op": "<=", "value": 0.5}]}},
         SpecError, "sweep.constraints.0.metric: loss/tnr_fnr_0.001 needs at least 1000 members per target"),
        ({"defense": {"name": "tl_dmi", "params": {"weights": "/nonexistent/backbone.pt"}}},
         DataError, "/nonexistent/backbone.pt: tl_dmi weights: file not found"),
        ({"defense": "tl_dmi", "plan": {"num_models": 4}},
         SpecError, "plan.population: tl_dmi needs public data"),
        # a searched defense is checked against the data too (with the space's constants)
        ({"sweep": {"defense": "tl_dmi"}, "plan": {"num_models": 4}},
         SpecError, "plan.population: tl_dmi needs public data"),
        # the default space's pretrain_epochs is dropped: with weights nothing pretrains
        ({"sweep": {"defense": "tl_dmi", "space": {"weights": "/nonexistent/w.pt"}}},
         DataError, "/nonexistent/w.pt: tl_dmi weights: file not found"),
        ({"model": {"name": "cnn", "params": {"batch_norm": True}}, "defense": "dpsgd"},
         SpecError, "defense.name: defense 'dpsgd' cannot train model 'cnn': it has BatchNorm layers"),
    ],
)
def test_check_refuses_what_the_run_would_refuse(tmp_path, over, err, needle):
    d = _audit_dict(tmp_path)
    d.update(over)
    with pytest.raises(err) as e:
        check_spec(_write(tmp_path, d))
    assert needle in str(e.value)


def test_sweep_refuses_an_unresolvable_objective_before_starting(tmp_path):
    d = _audit_dict(tmp_path)
    d["sweep"] = {"objectives": [{"metric": "test_accuracy", "mode": "max"},
                                 {"metric": "worst/tpr_fpr_0.001", "mode": "min"}]}
    out = subprocess.run([sys.executable, "-m", "raymia", "sweep", str(_write(tmp_path, d))], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert ": sweep.objectives.1.metric: worst/tpr_fpr_0.001 needs at least 1000" in out.stderr
    assert not (tmp_path / "runs" / "ray").exists()  # Tune never started


def test_flops_counted_on_the_meta_device_equal_a_real_count():
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from raymia.check import count_flops
    from raymia.datainfo import DataInfo
    from raymia.models import build_model

    info = DataInfo(num_classes=10, input_shape=(1, 28, 28), kind="image")
    step, query = count_flops("lenet5", {}, info, 16)
    torch.manual_seed(0)
    model = build_model("lenet5", {}, info)
    with FlopCounterMode(display=False) as real:
        F.cross_entropy(model(torch.randn(16, 1, 28, 28)), torch.zeros(16, dtype=torch.long)).backward()
    assert step == real.get_total_flops() > 0
    # forward only: one example's conv1 alone is 2 * 6*28*28 outputs * 25 taps
    assert query > 2 * 6 * 28 * 28 * 25 and query < step / 16


def test_check_gives_dpsgds_accounted_epsilon_before_training(tmp_path):
    """The accountant's epsilon needs no training: `raymia check` prints it for a DP-SGD spec, and it is the
    epsilon every model of the audit then reports; a defense without an accountant has no such row."""
    from raymia.audit import run_audit

    assert "privacy" not in dict(check_spec(_write(tmp_path, _audit_dict(tmp_path))).rows)
    d = {**_audit_dict(tmp_path), "defense": {"name": "dpsgd", "params": {"noise_multiplier": 1.1}}}
    path = _write(tmp_path, d, "dp.yaml")
    row = dict(check_spec(path).rows)["privacy"]
    # 100 members, batches of 32: sampling rate 0.32, 3 epochs x ceil(100 / 32) = 12 steps, delta 1/100^1.1
    assert row.startswith("epsilon ") and "(sigma 1.1, sampling rate 0.32, 12 steps, delta 0.0063)" in row
    result = run_audit(load_spec(path, kind=AuditSpec), track=False, console=False)
    assert row.startswith(f"epsilon {result.defense_report['epsilon']:.3g} per model ")


def test_a_discrete_space_smaller_than_the_sweep_is_named(tmp_path):
    """An integer or categorical space of fewer settings than trials means repeats: `raymia check` says so
    (a repeat reuses the stored signals); a continuous parameter makes the space unbounded. A searched
    defense that trains several models per bank model says how many."""
    from raymia.space import Categorical, Float, Int
    from raymia.sweep_space import count_settings

    assert count_settings({"selena": {"excluded_per_point": Int(2, 12)}}) == 11
    assert count_settings({"a": {"k": Int(1, 3), "c": Categorical((True, False)), "x": 0.5},
                           "b": {"c": Categorical(("u", "v", "w"))}}) == 9
    assert count_settings({"a": {"k": Int(1, 3)}, "b": {"x": Float(0.0, 1.0)}}) is None
    base = {"sweep": {"defense": "selena", "num_trials": 12, "include_undefended": False}}
    d = {**_audit_dict(tmp_path), **base}
    rows = check_spec(_write(tmp_path, d, "s.yaml")).rows
    assert any("the space holds 11 setting(s), fewer than the 12 trials" in text for _, text in rows)
    assert dict(rows)["defense"] == "each trial's, from the search below"  # not the spec's unused `defense`
    selena = [text for _, text in rows if text.startswith("a selena trial trains 16x the recipe's steps per model at "
                                                           "its defaults (25 sub-models on 15 of every 25 members each, "
                                                           "then the released model): ")]
    # the trial's bank at 16x the plain recipe that the compute row counts (to display precision)
    plain = re.search(r"^([\d.]+) (\w)FLOP to train the bank", dict(rows)["compute"])
    total = re.search(r": ([\d.]+) (\w)FLOP to train its bank$", selena[0])
    assert plain and total, (selena, dict(rows)["compute"])
    scale = {"M": 1e6, "G": 1e9, "T": 1e12}
    ratio = (float(total.group(1)) * scale[total.group(2)]) / (float(plain.group(1)) * scale[plain.group(2)])
    assert ratio == pytest.approx(16, rel=0.01), (selena, dict(rows)["compute"])
    assert "(each trial at the plain recipe; a defense that trains more says so below)" in dict(rows)["compute"]
    d["sweep"] = {**base["sweep"], "num_trials": 11}
    assert not any("setting(s), fewer than" in text for _, text in check_spec(_write(tmp_path, d, "s.yaml")).rows)


def test_check_counts_a_defenses_extra_trainings(tmp_path):
    """SELENA trains K sub-models on (K - L) / K of the members each and the released model (K - L + 1
    plain trainings: 16 at the paper's 25 and 10); DMP a teacher and a student (2 with the whole
    reference set): `raymia check` scales the training FLOPs and says why."""
    def compute(defense: dict | None) -> str:
        d = _audit_dict(tmp_path) if defense is None else {**_audit_dict(tmp_path), "defense": defense}
        return dict(check_spec(_write(tmp_path, d, "c.yaml")).rows)["compute"]

    def gflop(text: str) -> float:
        value, unit = text.split(" to train")[0].split()
        return float(value) * {"MFLOP": 1e-3, "GFLOP": 1.0, "TFLOP": 1e3}[unit]

    plain, selena = compute(None), compute({"name": "selena"})
    assert "trains 16x the recipe's steps per model (25 sub-models on 15 of every 25 members each" in selena
    assert gflop(selena) == pytest.approx(16 * gflop(plain), rel=0.01)
    dmp = compute({"name": "dmp", "params": {"keep_fraction": 0.5, "distill_epochs": 6}})
    assert "trains 2x the recipe's steps per model (a teacher, then a student" in dmp  # 3 epochs: 1 + 0.5 x 2


def test_a_dp_sgd_sweep_gives_the_accounted_epsilon_at_its_defaults(tmp_path):
    """Before a DP-SGD sweep trains anything, `raymia check` gives the epsilon a trial at the defense's
    defaults is accounted: the privacy row of an audit of that setting."""
    sweep = {**_audit_dict(tmp_path), "sweep": {"defense": "dpsgd", "num_trials": 2, "include_undefended": False}}
    rows = check_spec(_write(tmp_path, sweep, "sweep.yaml")).rows
    audit = {**_audit_dict(tmp_path), "defense": {"name": "dpsgd"}}
    privacy = dict(check_spec(_write(tmp_path, audit, "audit.yaml")).rows)["privacy"]
    assert privacy.startswith("epsilon ") and ("", f"a dpsgd trial at its defaults: {privacy}") in rows


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"bank": {"engine": "ray", "cpus_per_worker": 4096}},
         "bank.cpus_per_worker: 4096 CPUs per worker, but this machine (where a run without RAY_ADDRESS starts its "
         "own Ray) has"),
        ({"sweep": {"defense": "hamp", "trial_cpu": 4096}},
         "sweep.trial_cpu: 4096 CPUs per trial driver, but this machine (where a run without RAY_ADDRESS starts "
         "its own Ray) has"),
        ({"bank": {"engine": "ray", "device": "cuda"}},
         "bank.device: cuda asks for 1 GPU per worker, but this machine (where a run without RAY_ADDRESS starts "
         "its own Ray) has 0; use bank.device: auto or cpu, or set RAY_ADDRESS to a cluster with GPUs"),
    ],
)
def test_check_refuses_a_request_this_machines_local_ray_cannot_meet(tmp_path, monkeypatch, over, needle):
    """Without RAY_ADDRESS the run starts a local Ray on this machine, so its CPUs and GPUs are known before any
    Ray starts, and the error says it was this machine's (a spec written for a GPU cluster, checked on a
    laptop); with an address they are the cluster's, checked when the run connects."""
    from raymia.errors import RaymiaError

    if "device" in over.get("bank", {}):
        import torch

        if torch.cuda.device_count():
            pytest.skip("this machine has a GPU: a cuda bank fits it")
    d = _audit_dict(tmp_path)
    d.update(over)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RaymiaError) as e:
        check_spec(_write(tmp_path, d))
    assert needle in str(e.value)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # never contacted: check starts no Ray
    report = check_spec(_write(tmp_path, d))  # no longer refused here
    if "bank" in over:
        assert "checked against the cluster's nodes when the run connects" in dict(report.rows)["bank"]


def test_check_and_the_audit_say_when_the_defense_does_not_act(tmp_path, caplog):
    """A bare `defense: confidence` releases the model's outputs as they are: the audit's numbers are the
    undefended model's, which both say (not an error: a sweep's range may end at such a setting)."""
    import logging

    from raymia.audit import run_audit

    d = _audit_dict(tmp_path)
    d["defense"] = "confidence"
    d["attacks"] = ["loss"]
    report = check_spec(_write(tmp_path, d))
    assert dict(report.rows)["defense"].endswith(
        "does not act: temperature 1, no decimals and no top_k release the outputs unchanged, so the audit "
        "measures the undefended model")
    caplog.set_level(logging.WARNING, logger="raymia")
    run_audit(load_spec(_write(tmp_path, d)), console=False)
    assert ("defense confidence: temperature 1, no decimals and no top_k release the outputs unchanged, so this "
            "audit measures the undefended model under the defense's name") in caplog.text
    d["defense"] = {"name": "confidence", "params": {"top_k": 1}}
    assert "does not act" not in dict(check_spec(_write(tmp_path, d)).rows)["defense"]


def test_a_banks_targets_are_named_in_one_line():
    from raymia.report.text import first_of

    assert first_of([0, 1, 2, 3]) == "0, 1, 2, 3"
    assert first_of(range(256)) == "0, 1, 2, 3, 4, 5, 6, 7, ..."  # every model a target: not 256 numbers
