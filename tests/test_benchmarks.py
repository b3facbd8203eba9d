"""The benchmark scripts run end to end at a tiny size and report sane values (they are run by hand, at
full size, for benchmarks/RESULTS.md; this keeps them from rotting between runs)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bank_throughput_reports_both_sides_and_accuracies(tmp_path):
    out = tmp_path / "rows.jsonl"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bank_throughput.py"), "--setting", "digits-mlp",
                    "--epochs", "4", "--models", "2", "--plain-models", "1", "--repeats", "2", "--threads", "1",
                    "--json", str(out)], check=True, capture_output=True, text=True, timeout=600)
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["setting"] == "digits-mlp" and row["K"] == 2 and row["steps_per_model"] == 4 * 11
    assert row["pack_engine"] == "packed" and row["compile"] is False
    assert len(row["pack_ratios"]) == 2 and row["pack_ratio"] > 0
    assert abs(row["pack_models_per_hour"] * row["pack_s_per_model"] / 3600 - 1) < 0.02  # s/model rounds to ms
    # 4 epochs of the MLP on digits: both sides learn (chance is 0.1) and land close to each other.
    assert 0.6 < row["plain_test_accuracy"] <= 1 and 0.6 < row["pack_test_accuracy"] <= 1
    assert abs(row["plain_test_accuracy"] - row["pack_test_accuracy"]) < 0.15


def test_recipe_accuracy_trains_one_model_on_all_members_or_its_own():
    script = str(ROOT / "benchmarks" / "recipe_accuracy.py")
    rows = [json.loads(subprocess.run([sys.executable, script, "--setting", "digits-mlp", "--epochs", "3", "--threads", "1",
                                       *extra], check=True, capture_output=True, text=True, timeout=300).stdout)
            for extra in ([], ["--all-members"])]
    own, every = rows
    assert own["steps"] == every["steps"] == 3 * 11  # epochs of the bank's size
    assert 600 < own["members"] < 750 and every["members"] == 1346  # half the population, or all of it
    assert 0.6 < own["test_accuracy"] <= 1 and 0.6 < every["test_accuracy"] <= 1


@pytest.mark.slow
def test_attack_cost_runs_every_attack_finite(tmp_path):
    out = tmp_path / "cost.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attack_cost.py"), "--models", "8", "--points", "300",
                    "--z", "100", "--json", str(out)], check=True, capture_output=True, text=True, timeout=600)
    res = json.loads(out.read_text())
    assert res["shape"] == [8, 2, 300, 10]
    names = {r["attack"] for r in res["rows"]}
    assert {"loss", "lira_online", "rmia_online", "shokri", "label_only"} <= names
    assert all(r["finite"] and r["seconds"] >= 0 for r in res["rows"])


def test_attack_cost_times_many_targets_and_the_vote_against_their_baselines(tmp_path):
    script = str(ROOT / "benchmarks" / "attack_cost.py")
    out = tmp_path / "cost.json"
    subprocess.run([sys.executable, script, "--models", "8", "--points", "300", "--z", "100", "--targets", "3",
                    "--attacks", "loss", "rmia_offline", "--json", str(out)], check=True, capture_output=True,
                   text=True, timeout=600)
    rows = [r for r in json.loads(out.read_text())["rows"] if "targets" in r]
    assert [r["attack"] for r in rows] == ["loss", "rmia_offline"]
    assert all(r["targets"] == 3 and r["same_scores"] and r["ratio"] > 0 for r in rows)
    curve = subprocess.run([sys.executable, script, "--models", "8", "--points", "300", "--z", "100",
                            "--shadow-curve", "2", "--attacks", "lira_online", "rmia_offline"], check=True,
                           capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in curve.stdout.splitlines() if '"shadow_curve"' in line]
    assert [(r["attack"], r["shadow_curve"], r["same_auc"]) for r in rows] == [
        ("lira_online", "2 targets x sizes [2, 4, 6]", True), ("rmia_offline", "2 targets x sizes [2, 4, 6]", True)]
    vote = subprocess.run([sys.executable, script, "--vote", "--points", "400", "--z", "150"], check=True,
                          capture_output=True, text=True, timeout=600)
    row = json.loads(vote.stdout.strip().splitlines()[-1])  # it asserts that both counts agree
    assert row["vote"] == "P=400 Z=150" and row["blocks_s"] >= 0 and row["pairwise_s"] >= 0
    every = subprocess.run([sys.executable, script, "--models", "6", "--points", "200", "--z", "10", "--attacks",
                            "loss", "--every-target", "--params", '{"calibration": "per_class"}'], check=True,
                           capture_output=True, text=True, timeout=600)
    row = json.loads(every.stdout.strip().splitlines()[-1])
    assert row["attack"] == "loss" and row["attacked"] == 6 and row["finite"] and row["seconds"] >= 0


def test_tta_accuracy_equals_plain_accuracy_where_the_augmentations_change_nothing():
    """Known answers: on images equal to their mirror image, flip TTA averages the same logits twice; on
    images constant within each channel, flips and reflect-padded shifts change nothing either."""
    import pytest
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bank_throughput as bt

    from raymia.spec import AuditSpec
    from raymia.train.bank import BankContext, train_models_packed

    ctx = BankContext.from_spec(AuditSpec.model_validate({
        "plan": {"num_models": 2, "population": 600}, "train": {"epochs": 10, "augment": {"hflip": True}},
        "model": {"name": "cnn", "params": {"channels": [8], "hidden": 32}}}))
    pack = train_models_packed(ctx, [0, 1], torch.device("cpu"))
    cpu = torch.device("cpu")
    real = ctx.data
    x = real.x_test
    ctx.data = dataclasses.replace(real, x_test=(x + x.flip(-1)) / 2)
    plain = bt.test_accuracy(ctx, pack, cpu)
    assert len(plain) == 2 and plain == pytest.approx(bt.test_accuracy(ctx, pack, cpu, tta="flip"), abs=1e-9)
    ctx.data = dataclasses.replace(real, x_test=x.mean((-2, -1), keepdim=True).expand_as(x).contiguous())
    plain = bt.test_accuracy(ctx, pack, cpu)
    assert plain == pytest.approx(bt.test_accuracy(ctx, pack, cpu, tta="flip-translate"), abs=1e-9)
    ctx.data = real  # on the real images the models learnt something, and TTA changes some answers
    plain, flip, both = (bt.test_accuracy(ctx, pack, cpu, tta=t) for t in bt.TTA)
    assert all(a > 0.3 for a in plain + flip + both) and plain != flip and flip != both
    with pytest.raises(ValueError, match="tta 'level2': accepted none, flip, flip-translate"):
        bt.test_accuracy(ctx, pack, cpu, tta="level2")


def test_vmap_reference_times_three_sides_that_all_learn():
    row = json.loads(subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vmap_reference.py"), "--models", "2", "--steps", "30",
         "--repeats", "1", "--threads", "1"], check=True, capture_output=True, text=True, timeout=300).stdout)
    assert row["K"] == 2 and row["steps"] == 30
    for side in ("plain", "own", "shared"):
        assert row[f"{side}_s_per_model"] > 0
        assert row[f"{side}_final_loss"] < row["chance_loss"] - 0.2  # every side trains its models
    assert row["plain_over_own"] > 0 and row["plain_over_shared"] > 0


def test_selena_packs_times_both_ways_and_their_soft_labels_agree(tmp_path):
    out = tmp_path / "rows.jsonl"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "selena_packs.py"), "--sub-models", "4", "--excluded",
                    "2", "--pack-size", "2", "--hidden", "32", "--epochs", "2", "--repeats", "1", "--json", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["sub_models"] == 4 and row["pack_size"] == 2
    assert row["one_at_a_time_s"] > 0 and row["packed_s"] > 0 and row["ratio"] > 0
    assert row["soft_label_max_diff"] < 1e-4  # the same sub-models either way, to float tolerance


def test_kill_points_names_a_file_as_a_glob_that_matches_it_in_another_run():
    """A kill point is placed on a file's first appearance in another run: what varies between runs (MLflow's
    run ids, Tune's trial ids and times, temporary files' suffixes, TensorBoard logs' times) is a wildcard,
    the rest is kept."""
    import fnmatch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kill_points import pattern

    run = "0123456789abcdef0123456789abcdef"
    cases = {
        f"mlartifacts/1/{run}/artifacts/.artifact.uploading.k2_x9q1z": "mlartifacts/1/*/artifacts/.artifact.uploading.*",
        f"mlartifacts/1/{run}/artifacts/report.html": "mlartifacts/1/*/artifacts/report.html",
        "runs/signals/ab12/.k1-pack-3.npz.host.4242.x1y2.tmp": "runs/signals/ab12/.k1-pack-3*.tmp",
        "runs/ray/sweep-k/trial_2_2_defense=hamp,hamp_gamma=0.5923_2026-12-07_03-55-05/result.json":
            "runs/ray/sweep-k/trial_2_2_defense=hamp,hamp_gamma=0.5923_*/result.json",
        "runs/sweeps/k/trials/0bbf5fc1/result.json": "runs/sweeps/k/trials/*/result.json",
        "runs/ray/sweep-k/trial_1_1_defense=hamp_2026-12-07_03-55-05/events.out.tfevents.1796616241.vm":
            "runs/ray/sweep-k/trial_1_1_defense=hamp_*/events.out.tfevents.*",
    }
    for name, want in cases.items():
        got = pattern(name)
        assert got == want and fnmatch.fnmatch(name, got), (name, got)
    assert not fnmatch.fnmatch(f"mlartifacts/1/{run}/artifacts/report.html", pattern("mlartifacts/1/x/spec.yaml"))
