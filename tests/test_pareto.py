"""Fronts read back from MLflow: hypervolume by hand, trials from a real SQLite store, `raymia pareto`."""

from __future__ import annotations

import copy
import csv
import io
import itertools
import random
import subprocess

import numpy as np
import pytest
import yaml

from raymia.errors import RaymiaError
from raymia.pareto import hypervolume, print_front, trials_from_mlflow, write_front
from tests.conftest import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ACC, TPR = "test_accuracy", "lira_online/tpr_fpr_0.01"
OBJ2 = [(ACC, "max"), (TPR, "min")]
REF2 = {ACC: 0.90, TPR: 0.20}


def _pts(*pairs: tuple[float, float]) -> list[dict]:
    return [{ACC: a, TPR: t} for a, t in pairs]


# --- hypervolume -----------------------------------------------------------------------------------------
def test_hypervolume_two_objectives_by_hand():
    # Reference (acc 0.90, tpr 0.20); maximise acc, minimise tpr. Each point spans the box between itself
    # and the reference:
    #   (0.92, 0.10): acc 0.90..0.92 x tpr 0.10..0.20 = 0.02 * 0.10 = 0.0020
    #   (0.95, 0.15): acc 0.90..0.95 x tpr 0.15..0.20 = 0.05 * 0.05 = 0.0025
    #   overlap:      acc 0.90..0.92 x tpr 0.15..0.20 = 0.02 * 0.05 = 0.0010
    #   (0.89, 0.01): accuracy below the reference -> its box is empty, contributes 0
    # union = 0.0020 + 0.0025 - 0.0010 = 0.0035
    pts = _pts((0.92, 0.10), (0.95, 0.15), (0.89, 0.01))
    assert hypervolume(pts, OBJ2, REF2) == pytest.approx(0.0035, abs=1e-12)
    assert hypervolume(pts[:1], OBJ2, REF2) == pytest.approx(0.0020, abs=1e-12)
    assert hypervolume(pts[2:], OBJ2, REF2) == 0.0
    # The reference itself, and a point equal to it in one objective, span nothing.
    assert hypervolume(_pts((0.90, 0.20), (0.97, 0.20)), OBJ2, REF2) == 0.0


def test_dominated_and_duplicate_points_add_nothing():
    base = _pts((0.92, 0.10), (0.95, 0.15))
    more = base + _pts((0.91, 0.12), (0.95, 0.15), (0.92, 0.10)) + [{ACC: None, TPR: 0.0}, {ACC: 0.99}]
    assert hypervolume(more, OBJ2, REF2) == pytest.approx(hypervolume(base, OBJ2, REF2), abs=1e-12)


def test_hypervolume_three_objectives_cube():
    obj = [("a", "min"), ("b", "min"), ("c", "min")]
    ref = {"a": 1.0, "b": 1.0, "c": 1.0}
    # A corner point spans the unit cube.
    assert hypervolume([{"a": 0, "b": 0, "c": 0}], obj, ref) == pytest.approx(1.0)
    # (0, 0, 0.5) spans 1 * 1 * 0.5 = 0.5, (0.5, 0.5, 0) spans 0.5 * 0.5 * 1 = 0.25, they share
    # [0.5, 1]^3 = 0.125: union 0.625. A point outside the reference in c adds 0.
    pts = [{"a": 0, "b": 0, "c": 0.5}, {"a": 0.5, "b": 0.5, "c": 0}, {"a": 0, "b": 0, "c": 1.5}]
    assert hypervolume(pts, obj, ref) == pytest.approx(0.625)
    # Directions: maximising a with reference 0 is the mirror image of minimising it with reference 1.
    mirrored = [{"a": 1 - p["a"], "b": p["b"], "c": p["c"]} for p in pts]
    assert hypervolume(mirrored, [("a", "max"), ("b", "min"), ("c", "min")], {**ref, "a": 0.0}) == \
        pytest.approx(0.625)


def _inclusion_exclusion(pts: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    total = 0.0
    for k in range(1, len(pts) + 1):
        for sub in itertools.combinations(pts, k):
            vol = 1.0
            for i, r in enumerate(ref):
                vol *= max(0.0, r - max(p[i] for p in sub))
            total += (-1) ** (k + 1) * vol
    return total


@pytest.mark.parametrize("dims", [2, 3])
def test_hypervolume_matches_inclusion_exclusion(dims):
    rng = random.Random(dims)
    obj = [(f"f{i}", "min") for i in range(dims)]
    ref = {f"f{i}": 1.0 for i in range(dims)}
    for _ in range(20):
        pts = [tuple(round(rng.uniform(-0.2, 1.1), 2) for _ in range(dims)) for _ in range(6)]
        expected = _inclusion_exclusion([p for p in pts if all(v < 1.0 for v in p)], (1.0,) * dims)
        got = hypervolume([{f"f{i}": v for i, v in enumerate(p)} for p in pts], obj, ref)
        assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dims", [2, 3, 4])
def test_front_and_hypervolume_with_mixed_directions_agree_with_optuna_and_brute_force(dims):
    """Random points on a 5-step grid (many ties and duplicates), each objective maximised or minimised: the
    front is the brute-force set of points no other point dominates, and the hypervolume is Optuna's WFG over
    the points (negated where maximised) that improve on the reference everywhere."""
    from optuna._hypervolume import compute_hypervolume

    from raymia.pareto import pareto_front

    rng = np.random.default_rng(dims)
    for _ in range(40):
        modes = [str(m) for m in rng.choice(["max", "min"], dims)]
        obj = [(f"f{i}", m) for i, m in enumerate(modes)]
        ref = {f"f{i}": 0.0 if m == "max" else 1.0 for i, m in enumerate(modes)}
        pts = rng.integers(0, 5, (int(rng.integers(1, 12)), dims)) / 4
        dicts = [{f"f{i}": float(v) for i, v in enumerate(p)} for p in pts]
        loss = np.where(np.array(modes) == "max", -pts, pts)  # smaller is better everywhere
        r = np.where(np.array(modes) == "max", -1.0, 1.0) * np.array([ref[f"f{i}"] for i in range(dims)])
        brute = [i for i in range(len(pts))
                 if not any((loss[j] <= loss[i]).all() and (loss[j] < loss[i]).any() for j in range(len(pts)))]
        assert pareto_front(dicts, obj) == brute
        inside = loss[(loss < r).all(axis=1)]
        want = compute_hypervolume(inside, r) if len(inside) else 0.0
        assert hypervolume(dicts, obj, ref) == pytest.approx(want, abs=1e-12)


def test_hypervolume_rejects_a_bad_reference_or_mode():
    with pytest.raises(ValueError, match="reference has no finite value"):
        hypervolume(_pts((0.92, 0.1)), OBJ2, {ACC: 0.9})
    with pytest.raises(ValueError, match="mode must be"):
        hypervolume(_pts((0.92, 0.1)), [(ACC, "up")], REF2)


# --- trials from MLflow ----------------------------------------------------------------------------------
T0 = 1_700_000_000_000

# (start offset s, defense, params, test_accuracy, tpr): created out of start order on purpose.
CHILDREN = [
    (30, "hamp", {"gamma": "0.9", "output_modification": "True"}, 0.89, 0.25),  # trial 3: dominated by 0
    (0, "none", None, 0.90, 0.20),  # trial 0: the undefended reference, dominated by 1
    (20, "hamp", {"gamma": "0.7", "output_modification": "False"}, 0.95, 0.15),  # trial 2: front
    (10, "hamp", {"gamma": "0.5", "output_modification": "True"}, 0.92, 0.10),  # trial 1: front
]


def _parent(client, exp_id: str, name: str, start: int, status: str) -> str:
    from mlflow.entities import Param

    run = client.create_run(exp_id, start_time=start, run_name=f"sweep-{name}", tags={"raymia.kind": "sweep"})
    params = {"name": name, "sweep.defense": "hamp", "sweep.objectives.0.metric": ACC,
              "sweep.objectives.0.mode": "max", "sweep.objectives.1.metric": TPR, "sweep.objectives.1.mode": "min"}
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _child(client, exp_id: str, parent: str, i: int, offset: int, defense: str, params, acc, tpr) -> str:
    from mlflow.entities import Metric, Param

    tags = {"mlflow.parentRunId": parent, "raymia.parent": parent, "raymia.kind": "trial",
            "raymia.trial_id": f"t{i:05d}", "raymia.status": "ok", "raymia.defense": defense}
    run = client.create_run(exp_id, start_time=T0 + offset * 1000, run_name=f"demo-t{i:05d}", tags=tags)
    logged = {"defense.name": defense, "data.name": "digits"}
    logged.update({f"defense.params.{k}": v for k, v in params.items()} if params else {"defense.params": "{}"})
    metrics = {ACC: acc, TPR: tpr, "lira_online/auc": 0.5 + tpr}
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, T0, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in logged.items()])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An SQLite MLflow store with sweep 'demo' (4 trials), an older failed 'demo' and a sweep 'other'."""
    from mlflow.tracking import MlflowClient

    d = tmp_path_factory.mktemp("pareto")
    uri = f"sqlite:///{d}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("X")
    old = _parent(client, exp_id, "demo", T0 - 10_000_000, "FAILED")
    _child(client, exp_id, old, 0, -9000, "none", None, 0.5, 0.5)
    _parent(client, exp_id, "other", T0 - 5_000_000, "FINISHED")
    pid = _parent(client, exp_id, "demo", T0 - 1000, "FINISHED")
    for i, (offset, defense, params, acc, tpr) in enumerate(CHILDREN):
        _child(client, exp_id, pid, i, offset, defense, params, acc, tpr)
    return {"dir": d, "uri": uri, "parent": pid, "old": old}


def test_trials_from_mlflow_rebuilds_the_sweep(store):
    trials, info = trials_from_mlflow(store["uri"], "X", sweep="demo")
    assert info["parent_run_id"] == store["parent"] and info["sweep"] == "demo"
    assert [(o["metric"], o["mode"]) for o in info["objectives"]] == OBJ2
    assert [o["reference"] for o in info["objectives"]] == [None, None]  # the undefended trial's values
    assert [t["trial"] for t in trials] == [0, 1, 2, 3]
    assert [t["defense"] for t in trials] == ["none", "hamp", "hamp", "hamp"]
    assert [t[ACC] for t in trials] == pytest.approx([0.90, 0.92, 0.95, 0.89])
    assert trials[0]["params"] == {}
    assert trials[1]["params"] == {"gamma": 0.5, "output_modification": True}
    assert trials[2]["params"] == {"gamma": 0.7, "output_modification": False}
    assert trials[1]["trial_id"] == "t00003" and trials[1]["status"] == "ok"
    assert trials[3]["lira_online/auc"] == pytest.approx(0.75)
    # By parent run id: the same trials; the failed older 'demo' only when asked for by id.
    again, _ = trials_from_mlflow(store["uri"], "X", parent_run_id=store["parent"])
    assert [t["run_id"] for t in again] == [t["run_id"] for t in trials]
    old, _ = trials_from_mlflow(store["uri"], "X", parent_run_id=store["old"])
    assert len(old) == 1 and old[0][ACC] == 0.5
    # Neither: the experiment's newest live sweep.
    assert trials_from_mlflow(store["uri"], "X")[1]["parent_run_id"] == store["parent"]


def test_write_front_from_mlflow(store, tmp_path):
    trials, info = trials_from_mlflow(store["uri"], "X", sweep="demo")
    res = write_front(trials, info["objectives"], tmp_path / "out", "sweep demo")
    assert res["front"] == [1, 2]
    assert res["hypervolume"] == pytest.approx(0.0035, abs=1e-12)  # as in the hand-computed case above
    rows = list(csv.DictReader((tmp_path / "out" / "front.csv").open()))
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["on_front"] for r in rows] == ["0", "1", "1", "0"]
    assert list(rows[0]) == ["trial", "defense", "params", ACC, TPR, "on_front"]
    assert float(rows[2][ACC]) == pytest.approx(0.95)
    md = (tmp_path / "out" / "front.md").read_text()
    assert "| 1 | hamp | gamma=0.5, output_modification=True | 0.9200 | 0.1000 | * |" in md
    assert "Hypervolume vs the undefended trial: 0.0035" in md
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:8] == PNG_SIGNATURE
    # Without an undefended trial there is no reference: no hypervolume, still a front.
    res = write_front(trials[1:], info["objectives"], tmp_path / "noref", "no reference")
    assert res["front"] == [1, 2] and res["hypervolume"] is None


def test_unknown_sweep_or_experiment_is_a_raymia_error(store):
    with pytest.raises(RaymiaError, match=r"no sweep 'nope' in experiment 'X'; sweeps: demo, other"):
        trials_from_mlflow(store["uri"], "X", sweep="nope")
    with pytest.raises(RaymiaError, match=r"no sweep 'dem' in experiment 'X' \(did you mean 'demo'\?\); sweeps: "):
        trials_from_mlflow(store["uri"], "X", sweep="dem")
    with pytest.raises(RaymiaError, match=r"no MLflow experiment 'Y'.*experiments: .*X"):
        trials_from_mlflow(store["uri"], "Y")
    with pytest.raises(RaymiaError, match="no MLflow run"):
        trials_from_mlflow(store["uri"], "X", parent_run_id="0" * 32)
    with pytest.raises(RaymiaError, match="no MLflow store"):
        trials_from_mlflow(f"sqlite:///{store['dir']}/missing.db", "X")


def test_console_front_hides_no_value_at_80_columns():
    """A log file's console is 80 columns wide: the table folds, it never cuts a parameter's value or a
    metric's name short with rich's ellipsis; one defense on the front is named in the title."""
    from rich.console import Console

    objectives = [("test_accuracy", "max"), ("lira_online/tpr_fpr_0.01", "min")]
    trials = [{"trial": 0, "defense": "none", "params": {}, "status": "ok", "test_accuracy": 0.9367,
               "lira_online/tpr_fpr_0.01": 0.1137}]
    for n, (g, a) in enumerate([(0.679, 0.00852), (0.314, 0.0435), (0.838, 0.000119)], start=1):
        trials.append({"trial": n, "defense": "hamp", "status": "ok", "test_accuracy": 0.95 + n / 1000,
                       "std/test_accuracy": 0.01, "lira_online/tpr_fpr_0.01": 0.01 * n,
                       "std/lira_online/tpr_fpr_0.01": 0.008,
                       "params": {"gamma": g, "alpha": a, "output_modification": True}})
    for front, title in (([1, 2, 3], "Pareto front (3 of 4 trials), all hamp"), ([1, 2, 3, 0], "(4 of 4 trials)")):
        console = Console(width=80, file=io.StringIO(), record=True)
        print_front("quickstart", trials, objectives, front, "done", console=console)
        lines = console.export_text().splitlines()
        text = "\n".join(lines)
        assert title in text and "…" not in text and max(len(ln) for ln in lines) <= 80
        cells = "".join(ln.split("│")[-4].strip() for ln in lines if "│" in ln)  # the params column
        assert cells.count("output_modification=True") == 3  # whole, once folding is undone
        assert "lira_online/tpr_fpr_0.01 (min)" in "".join(ln.split("┃")[-2].strip() for ln in lines if "┃" in ln)
        assert ("defense" in text) == (0 in front)



def test_a_parameter_wider_than_its_column_breaks_after_its_equals_sign():
    """The undefended trial on a one-defense front brings the defense column, and at 80 columns the params
    column is then narrower than "weight_decay=0.00258": rich folded it inside the value, "weight_decay=0.00"
    over "258", which reads as a weight decay of 0. It breaks after the "=" instead."""
    from rich.console import Console

    objectives = [("test_accuracy", "max"), ("lira_online/tpr_fpr_0.01", "min")]
    trials = [{"trial": 0, "defense": "none", "params": {}, "status": "ok", "test_accuracy": 0.9367,
               "std/test_accuracy": 0.0097, "lira_online/tpr_fpr_0.01": 0.1137, "std/lira_online/tpr_fpr_0.01": 0.0405}]
    for n, wd in ((3, 0.00258), (4, 1.21e-05)):
        trials.append({"trial": n, "defense": "weight_decay", "status": "ok", "params": {"weight_decay": wd},
                       "test_accuracy": 0.937 + n / 1000, "std/test_accuracy": 0.009,
                       "lira_online/tpr_fpr_0.01": 0.11 + n / 100, "std/lira_online/tpr_fpr_0.01": 0.04})
    console = Console(width=80, file=io.StringIO(), record=True)
    print_front("digits-weight_decay", trials, objectives, [0, 3, 4], "done", console=console)
    lines = console.export_text().splitlines()
    assert max(len(ln) for ln in lines) <= 80 and "defense" in "\n".join(lines)
    cells = [ln.split("│")[3].strip() for ln in lines if ln.count("│") > 3]  # the params column, line by line
    assert cells == ["-", "weight_decay=", "0.00258", "weight_decay=", "1.21e-05"], cells
    wide = Console(width=120, file=io.StringIO(), record=True)  # room for it: on one line, as before
    print_front("digits-weight_decay", trials, objectives, [0, 3, 4], "done", console=wide)
    assert "│ weight_decay=0.00258 " in wide.export_text()


def test_two_settings_that_round_alike_are_printed_with_the_digits_that_tell_them_apart():
    """At 3 significant digits weight_decay 1.2060e-05 and 1.2108e-05 both printed 1.21e-05: two rows of one
    setting with different results, as if a repeat had not reused its signals. The front's tables print as
    many digits as tell the settings apart; a setting proposed again (the same value) needs none more."""
    from rich.console import Console

    from raymia.pareto import front_markdown, params_digits

    objectives = [("test_accuracy", "max"), ("lira_online/tpr_fpr_0.01", "min")]
    trials = [{"trial": 0, "defense": "none", "params": {}, "status": "ok", "test_accuracy": 0.9367,
               "lira_online/tpr_fpr_0.01": 0.1137}]
    for n, (wd, tpr) in enumerate([(0.0025766385746135885, 0.1294), (1.2059738380975284e-05, 0.12),
                                   (1.21080815981134e-05, 0.1206), (1.2059738380975284e-05, 0.12)], start=1):
        trials.append({"trial": n, "defense": "weight_decay", "status": "ok", "params": {"weight_decay": wd},
                       "test_accuracy": 0.9372, "lira_online/tpr_fpr_0.01": tpr})
    assert params_digits(trials) == 4 and params_digits(trials[:3] + trials[4:]) == 3  # trial 4 repeats trial 2
    md = front_markdown(trials, objectives, [0, 2, 4])
    assert "| 2 | weight_decay | weight_decay=1.206e-05 |" in md and "| 3 | weight_decay | weight_decay=1.211e-05 |" in md
    console = Console(width=120, file=io.StringIO(), record=True)
    print_front("digits-weight_decay", trials, objectives, [0, 2, 3, 4], "done", console=console)
    text = console.export_text()
    assert "weight_decay=1.206e-05" in text and "weight_decay=1.211e-05" in text and "2, 4" in text
    plain = front_markdown(trials[:2], objectives, [0, 1])
    assert "weight_decay=0.00258 |" in plain  # nothing to tell apart: 3 digits, as before


def test_a_setting_proposed_again_is_one_row_of_the_console_front():
    """A discrete space lets the sampler propose a setting again; the repeat reuses the stored signals (the
    same metrics), and the console's front shows it once, its trials joined: "5, 7, 8"."""
    from rich.console import Console

    from raymia.pareto import same_settings

    objectives = [("test_accuracy", "max"), ("lira_online/tpr_fpr_0.01", "min")]
    trials = [{"trial": 0, "defense": "none", "params": {}, "status": "ok", "test_accuracy": 0.9367,
               "lira_online/tpr_fpr_0.01": 0.1137}]
    for n, ell in ((5, 2), (7, 2), (8, 2), (12, 4)):
        trials.append({"trial": n, "defense": "selena", "status": "ok", "params": {"excluded_per_point": ell},
                       "test_accuracy": 0.9103 if ell == 2 else 0.9108,
                       "lira_online/tpr_fpr_0.01": 0.0194 if ell == 2 else 0.0269})
    assert [[t["trial"] for t in g] for g in same_settings(trials)] == [[0], [5, 7, 8], [12]]
    console = Console(width=80, file=io.StringIO(), record=True)
    print_front("digits-selena", trials, objectives, [0, 5, 7, 8, 12], "done", console=console)
    text = console.export_text()
    rows = [ln.split("│")[1].strip() for ln in text.splitlines() if ln.count("│") > 3]
    assert rows == ["0", "5, 7, 8", "12"]
    assert "Pareto front (5 of 5 trials)" in text



def test_a_zero_hypervolume_says_why():
    """Every defended trial pays accuracy for its privacy: nothing lies beyond the undefended point, and
    the line says so instead of a bare 0."""
    from raymia.pareto import front_and_hypervolume, front_markdown

    objectives = [("test_accuracy", "max"), ("lira_online/tpr_fpr_0.01", "min")]
    trials = [{"trial": 0, "defense": "none", "params": {}, "status": "ok", "test_accuracy": 0.937,
               "lira_online/tpr_fpr_0.01": 0.114},
              {"trial": 1, "defense": "dmp", "params": {"temperature": 2.4}, "status": "ok", "test_accuracy": 0.927,
               "lira_online/tpr_fpr_0.01": 0.058}]
    front, hv, ref = front_and_hypervolume(trials, objectives)
    assert front == [0, 1] and hv == 0.0
    assert ("Hypervolume vs the undefended trial: 0 (no trial is better than the reference on every "
            "objective; an objective's `reference`") in front_markdown(trials, objectives, front, hv, ref)


def test_an_objectives_own_reference_credits_trade_offs():
    """A reference on test_accuracy below the undefended trial's counts what a defense buys with the
    accuracy it pays, here (0.927 - 0.90) x (0.114 - 0.058) by hand."""
    from raymia.pareto import front_and_hypervolume, front_markdown

    objectives = [{"metric": ACC, "mode": "max", "reference": 0.90}, {"metric": TPR, "mode": "min"}]
    trials = [{"trial": 0, "defense": "none", "params": {}, "status": "ok", ACC: 0.937, TPR: 0.114},
              {"trial": 1, "defense": "dmp", "params": {}, "status": "ok", ACC: 0.927, TPR: 0.058},
              {"trial": 2, "defense": "dmp", "params": {}, "status": "ok", ACC: 0.85, TPR: 0.01}]
    front, hv, ref = front_and_hypervolume(trials, objectives)
    # trial 0 spans (0.937 - 0.90) x 0 (it is the reference's TPR); trial 2 lies below 0.90 and spans nothing
    assert front == [0, 1, 2] and hv == pytest.approx((0.927 - 0.90) * (0.114 - 0.058), abs=1e-12)
    assert ref == {ACC: 0.90, TPR: 0.114, "given": [ACC], "trial": 0}
    line = front_markdown(trials, objectives, front, hv, ref).splitlines()[-1]
    assert line == f"Hypervolume vs test_accuracy 0.9, the undefended trial's {TPR}: {hv:.6g}"
    # every objective given: no undefended trial needed
    both = [objectives[0], {**objectives[1], "reference": 0.2}]
    _, hv2, ref2 = front_and_hypervolume(trials[1:], both)
    assert ref2["trial"] is None and hv2 == pytest.approx(0.027 * 0.142, abs=1e-12)
    # one objective with neither a reference nor an undefended trial: no hypervolume
    assert front_and_hypervolume(trials[1:], objectives)[1:] == (None, None)


# --- the command -----------------------------------------------------------------------------------------
def raymia(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd)  # in this process; a real one where the process is what is tested


@pytest.mark.slow
def test_one_front_over_two_sweeps(tmp_path):
    """`raymia pareto --sweep A --sweep B`: the front of both sweeps' trials, numbered sweep:trial, against
    the first sweep's reference; sweeps with other objectives are refused in one line."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("X")
    demo = _parent(client, exp_id, "demo", T0 - 1000, "FINISHED")
    for i, (offset, defense, params, acc, tpr) in enumerate(CHILDREN):
        _child(client, exp_id, demo, i, offset, defense, params, acc, tpr)
    second = _parent(client, exp_id, "second", T0 - 500, "FINISHED")
    for i, (defense, params, acc, tpr) in enumerate([
            ("none", None, 0.91, 0.22),  # its own undefended trial: not the reference, demo's is
            ("dpsgd", {"noise_multiplier": "1.1"}, 0.85, 0.05),  # on the front: the lowest TPR
            ("dpsgd", {"noise_multiplier": "0.6"}, 0.93, 0.18)]):  # dominated by demo's trial 2
        _child(client, exp_id, second, 10 + i, 100 + i, defense, params, acc, tpr)
    out = raymia("pareto", "--experiment", "X", "--sweep", "demo", "--sweep", "second", "--uri", uri,
                 "--output-dir", str(tmp_path / "both"))
    assert out.returncode == 0, out.stderr
    rows = {r["trial"]: r for r in csv.DictReader((tmp_path / "both" / "front.csv").open())}
    assert [t for t, r in rows.items() if r["on_front"] == "1"] == ["demo:1", "demo:2", "second:1"]
    assert len(rows) == 7 and rows["second:1"]["defense"] == "dpsgd"
    # against demo's undefended trial (0.90, 0.20) second:1 (accuracy 0.85) spans nothing: demo's 0.0035
    assert "hypervolume vs the undefended trial: 0.0035" in out.stdout
    assert "demo:1" in out.stdout and "second:1" in out.stdout and "MLflow parent runs" in out.stdout
    assert (f"note: the sweeps' undefended trials differ (demo: {ACC} 0.9, {TPR} 0.2; second: {ACC} 0.91, "
            f"{TPR} 0.22): their data, model or recipe differ") in out.stdout
    # the same from the sweeps' spec files (their names, store and experiment)
    for name in ("demo", "second"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(
            {"name": name, "tracking": {"uri": uri, "experiment": "X"}, "sweep": {"defense": "hamp"}}))
    by_spec = raymia("pareto", str(tmp_path / "demo.yaml"), str(tmp_path / "second.yaml"),
                     "--output-dir", str(tmp_path / "by-spec"))
    assert by_spec.returncode == 0, by_spec.stderr
    assert (tmp_path / "by-spec" / "front.csv").read_text() == (tmp_path / "both" / "front.csv").read_text()
    # from accuracy 0.8, by hand: strips 0.15 x 0.05 + 0.12 x 0.05 + 0.05 x 0.05 = 0.016
    out = raymia("pareto", "--experiment", "X", "--sweep", "demo", "--sweep", "second", "--uri", uri,
                 "--reference", f"{ACC}=0.8", "--output-dir", str(tmp_path / "from08"))
    assert f"hypervolume vs test_accuracy 0.8, the undefended trial's {TPR}: 0.016" in out.stdout, out.stdout

    client.log_batch(second, params=[Param("sweep.objectives.2.metric", "lira_online/auc"),
                                     Param("sweep.objectives.2.mode", "min")])
    out = raymia("pareto", "--experiment", "X", "--sweep", "demo", "--sweep", "second", "--uri", uri,
                 cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith(
        "raymia: error: --sweep: sweeps 'demo' and 'second' have different objectives"), out.stderr
    assert not (tmp_path / "raymia-runs").exists()


def test_two_runs_of_one_sweep_are_told_apart_and_one_run_twice_is_refused():
    from raymia.pareto import merge_sweeps

    def part(run: str) -> tuple[list[dict], dict]:
        info = {"sweep": "demo", "parent_run_id": run, "objectives": [{"metric": ACC, "mode": "max"}],
                "constraints": [], "defense": "hamp"}
        return [{"trial": 0, "defense": "none", "params": {}, "status": "ok", ACC: 0.9}], info

    trials, info = merge_sweeps([part("aaaaaaaa1111"), part("bbbbbbbb2222")], where="--run-id")
    assert [t["trial"] for t in trials] == ["demo@aaaaaaaa:0", "demo@bbbbbbbb:0"]
    assert info["sweep"] == "demo@aaaaaaaa+demo@bbbbbbbb" and info["parent_run_id"] == "aaaaaaaa1111, bbbbbbbb2222"
    assert info["note"] is None  # one recipe: the same undefended trial
    with pytest.raises(RaymiaError, match=r"^--run-id: a sweep is given twice: runs aaaaaaaa1111, aaaaaaaa1111$"):
        merge_sweeps([part("aaaaaaaa1111"), part("aaaaaaaa1111")], where="--run-id")


@pytest.mark.slow
def test_cli_pareto_prints_the_front_and_writes_the_files(store, tmp_path):
    out = raymia("pareto", "--experiment", "X", "--sweep", "demo", "--uri", store["uri"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Pareto front (2 of 4 trials)" in text
    assert "0.9200" in text and "0.9500" in text and "0.8900" not in text
    assert "hypervolume vs the undefended trial: 0.0035" in text
    d = tmp_path / "raymia-runs" / "pareto" / "demo"
    assert (d / "front.csv").is_file() and (d / "front.md").is_file()
    assert (d / "pareto.png").read_bytes()[:8] == PNG_SIGNATURE

    # Scored against another accuracy: (0.85, 0.20) by hand, over the front's trials 1 (0.92, 0.10) and
    # 2 (0.95, 0.15): 0.07 x 0.10 + 0.10 x 0.05 - their overlap 0.07 x 0.05 = 0.0085
    out = raymia("pareto", "--experiment", "X", "--sweep", "demo", "--uri", store["uri"],
                 "--reference", f"{ACC}=0.85", "--output-dir", str(tmp_path / "scored"))
    assert out.returncode == 0, out.stderr
    assert f"hypervolume vs test_accuracy 0.85, the undefended trial's {TPR}: 0.0085" in out.stdout

    out = raymia("pareto", "--experiment", "X", "--run-id", store["parent"], "--uri", store["uri"],
                 "--output-dir", str(tmp_path / "by-id"))
    assert out.returncode == 0, out.stderr
    assert {p.name for p in (tmp_path / "by-id").iterdir()} == {"front.csv", "front.md", "pareto.png", "result.json",
                                                               "report.html"}
    page = (tmp_path / "by-id" / "report.html").read_text()  # the page a sweep's folder has
    assert "<h1>Sweep demo</h1>" in page and "hypervolume vs the undefended trial: 0.0035" in page
    assert page.count("<tr class='front'>") == 2
    # a run id names its experiment: --experiment may be left out
    out = raymia("pareto", "--run-id", store["parent"], "--uri", store["uri"], "--output-dir", str(tmp_path / "id-only"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "id-only" / "front.csv").read_text() == (tmp_path / "by-id" / "front.csv").read_text()
    out = raymia("pareto", "--run-id", "0123abcd", "--uri", store["uri"])
    assert out.returncode == 2 and out.stderr.strip() == f"raymia: error: --run-id: no MLflow run '0123abcd' in {store['uri']}"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--experiment", "X", "--sweep", "nope"], "--sweep: no sweep 'nope' in experiment 'X'; sweeps: demo, other"),
        (["--experiment", "Y"], "--experiment: no MLflow experiment 'Y'"),
        (["--experiment", "X", "--reference", "loss/auc=0.6"],
         f"--reference: 'loss/auc' is no objective of the sweep; objectives: {ACC}, {TPR}"),
        (["--experiment", "X", "--reference", f"{ACC}=high"], "--reference: expected METRIC=VALUE with a finite number"),
        (["--experiment", "X", "--reference", f"{ACC}=85"],
         f"--reference: 85 is outside the values of {ACC}; accepted: 0 to 1"),
        (["--sweep", "demo"], "--experiment: name the MLflow experiment, or give the sweeps' spec files"),
    ],
)
def test_cli_pareto_unknown_sweep_is_one_line_exit_2(store, tmp_path, args, needle):
    out = raymia("pareto", *args, "--uri", store["uri"], cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("raymia: error: "), out.stderr
    assert needle in lines[0]
    assert not (tmp_path / "raymia-runs").exists()


# --- one front: the sweep's, `raymia pareto`'s and Optuna's best_trials agree -----------------------------
AUC = "lira_online/auc"


def _constrained_study_and_trials(spec):
    """A real Optuna study asked as a sweep asks (DefineByRun; trial 0 the undefended baseline, here an
    Optuna trial without parameters so that the numbers match), told each trial's
    objectives and, with Trial.set_constraint, its constraints (<= 0: met); and the same trials shaped as
    run_sweep collects them. Metrics move with gamma rounded to 0.1, so several trials tie exactly."""
    import optuna

    from raymia.sweep_space import DefineByRun, resolve_space, split_config

    rng = random.Random(5)
    ask = DefineByRun(resolve_space(spec))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(5))
    trials = []
    for i in range(24):
        t = study.ask()
        const = {"defense": "none"} if i == 0 else ask(t)  # suggests the trial's parameters
        defense, params = split_config({**t.params, **const})
        row = {"trial": i, "trial_id": f"agree_{i:05d}", "defense": defense, "params": params}
        if i == 9:  # a failed trial: Optuna marks it failed, the sweep keeps it off the front
            study.tell(t, state=optuna.trial.TrialState.FAIL)
            trials.append({**row, "status": "failed", "error": "ValueError: objective is n/a"})
            continue
        if defense == "none":  # undefended: the hypervolume's reference, and it breaks the AUC constraint
            m = {ACC: 0.80, TPR: 0.35, AUC: 0.90}
        else:
            g = round(params["gamma"], 1)
            noise = rng.choice([0.0, 0.0, 0.02]) if i % 3 else 0.0
            m = {ACC: round(0.55 + 0.4 * g - noise, 2), TPR: round(0.05 + 0.3 * g, 2), AUC: round(0.5 + 0.35 * g, 2)}
        m.update({f"std/{k}": 0.01 for k in m})
        for k, c in enumerate(spec.sweep.constraints):
            v = m[c.metric]
            t.set_constraint(str(k), c.value - v if c.op == ">=" else v - c.value)
        study.tell(t, [m[ACC], m[TPR]])
        trials.append({**row, "status": "ok", **m})
    return study, trials


@pytest.mark.parametrize("acc_reference", [None, 0.7])
def test_sweep_front_raymia_pareto_and_optuna_agree_with_constraints(tmp_path, acc_reference):
    """acc_reference: the hypervolume's reference on accuracy given by the objective (None: the undefended
    trial's), read back from the MLflow parent run by `raymia pareto`."""
    from optuna._hypervolume import compute_hypervolume

    from raymia.pareto import front_and_hypervolume
    from raymia.spec import SweepSpec
    from raymia.sweep import trial_spec
    from raymia.tracking import KIND_SWEEP, TAG_KIND, finish_parent, log_run, start_parent, trial_tags

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = SweepSpec.model_validate({
        "name": "agree", "tracking": {"uri": uri, "experiment": "agree"},
        "sweep": {"defense": "hamp", "objectives": [{"metric": ACC, "mode": "max", "reference": acc_reference},
                                                    {"metric": TPR, "mode": "min"}],
                  "constraints": [{"metric": ACC, "op": ">=", "value": 0.7}, {"metric": AUC, "op": "<=", "value": 0.8}]},
    })
    study, trials = _constrained_study_and_trials(spec)

    # the sweep's front: run_sweep's call on the trials it collected
    front, hv, ref = front_and_hypervolume(trials, spec.sweep.objectives, spec.sweep.constraints)
    # Optuna's, on the same trials (feasible: every constraint value <= 0)
    assert front == sorted(t.number for t in study.best_trials)
    # the case is not trivial: the constraints change the front, an exact tie is kept twice, the reference
    # breaks a constraint, and one trial failed
    unconstrained, _, _ = front_and_hypervolume(copy.deepcopy(trials), spec.sweep.objectives)
    assert unconstrained != front
    on = [(trials[n][ACC], trials[n][TPR]) for n in front]
    assert len(set(on)) < len(on)
    assert ref["trial"] == 0 and not trials[0]["feasible"] and trials[9]["status"] == "failed"
    assert (ref[ACC], ref[TPR], ref["given"]) == (acc_reference or 0.80, 0.35, [ACC] if acc_reference else [])
    assert [t.get("feasible") for t in trials if t["status"] == "ok"].count(False) >= 3

    # hypervolume as Optuna computes it, over the front points that improve on the reference everywhere
    loss = [(-trials[n][ACC], trials[n][TPR]) for n in front]
    r = (-ref[ACC], ref[TPR])
    better = [p for p in loss if all(a < b for a, b in zip(p, r))]
    assert better and hv == pytest.approx(compute_hypervolume(np.asarray(better), np.asarray(r)), abs=1e-12)

    # `raymia pareto`: the same trials logged as the sweep logs them, read back from MLflow
    pid = start_parent(uri, "agree", "sweep-agree", params=spec.model_dump(mode="json"), tags={TAG_KIND: KIND_SWEEP})
    base = spec.model_dump(mode="json")
    for t in trials:
        config = {"defense": t["defense"], **{f"{t['defense']}.{k}": v for k, v in t["params"].items()}}
        metrics = {k: v for k, v in t.items() if "/" in k or k == ACC}
        log_run(uri, "agree", run_name=f"agree-{t['trial_id']}", params=trial_spec(base, config), metrics=metrics,
                tags=trial_tags(t["trial_id"], t["status"], t["defense"], t.get("error")), parent_run_id=pid)
    finish_parent(uri, pid, {}, [])
    back, info = trials_from_mlflow(uri, "agree", sweep="agree")
    assert info["constraints"] == [c.model_dump() for c in spec.sweep.constraints]
    assert [(t["trial"], t["status"], t["defense"]) for t in back] == [
        (t["trial"], t["status"], t["defense"]) for t in trials]
    back_front, back_hv, _ = front_and_hypervolume(back, info["objectives"], info["constraints"])
    assert back_front == front and back_hv == pytest.approx(hv, abs=1e-12)

    out = raymia("pareto", "--experiment", "agree", "--uri", uri, "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert f"Pareto front ({len(front)} of {len(trials)} trials)" in out.stdout
    against = f"test_accuracy 0.7, the undefended trial's {TPR}" if acc_reference else "the undefended trial"
    assert f"hypervolume vs {against}: {hv:.6g}" in out.stdout
    rows = list(csv.DictReader((tmp_path / "out" / "front.csv").open()))
    assert [int(r["trial"]) for r in rows if r["on_front"] == "1"] == front
    assert "± 0.0100" in (tmp_path / "out" / "front.md").read_text()


def test_a_dp_defenses_accounted_epsilon_is_shown_beside_the_objectives():
    """DP-SGD's accounted epsilon is no searched parameter: the trial's console line, the console front
    (after the setting, which wraps between parameters at 80 columns), front.md and report.html show it."""
    from rich.console import Console

    from raymia.pareto import front_markdown
    from raymia.sweep import result_text

    objectives = [("test_accuracy", "max"), ("lira_online/tpr_fpr_0.01", "min")]
    objs = [k for k, _ in objectives]
    trials = [{"trial": 0, "defense": "none", "params": {}, "status": "ok", "test_accuracy": 0.9367,
               "lira_online/tpr_fpr_0.01": 0.1137}]
    for n, (sigma, eps) in enumerate([(0.988, 55.5016), (1.41, 35.0085)], start=1):
        trials.append({"trial": n, "defense": "dpsgd", "status": "ok", "test_accuracy": 0.9 - n / 100,
                       "lira_online/tpr_fpr_0.01": 0.05 / n, "defense/epsilon": eps, "defense/delta": 673 ** -1.1,
                       "params": {"noise_multiplier": sigma, "max_grad_norm": 1.96, "lr": 0.0205, "batch_size": 379}})
    assert result_text(trials[1], objs) == ("test_accuracy=0.8900  lira_online/tpr_fpr_0.01=0.0500  "
                                            "defense/epsilon=55.5")
    assert result_text(trials[0], objs) == "test_accuracy=0.9367  lira_online/tpr_fpr_0.01=0.1137"
    assert result_text(trials[1], [*objs, "defense/epsilon"]).count("defense/epsilon=") == 1  # an objective
    console = Console(width=80, file=io.StringIO(), record=True)
    print_front("dp", trials, objectives, [0, 1, 2], "done", console=console)
    lines = console.export_text().splitlines()
    cells = [ln.split("│")[3].strip() for ln in lines if ln.count("│") > 3]  # the params column, line by line
    words = " ".join(cells).split()
    for w in ("noise_multiplier=0.988", "max_grad_norm=1.96", "batch_size=379", "(epsilon=55.5)", "(epsilon=35)"):
        assert w in words, (w, cells)  # never cut across two lines
    assert "epsilon: the defense's accounted epsilon at delta 0.00077" in "\n".join(lines)  # what it means
    md = front_markdown(trials, objectives, [0, 1, 2])
    assert "| defense/epsilon | front |" in md and "| 55.5016 | * |" in md and "| 0.1137 | n/a | * |" in md
    assert "Epsilon: the defense's accounted epsilon at delta 0.00077." in md
    plain = front_markdown(trials[:1], objectives, [0])
    assert "epsilon" not in plain  # no DP trial: no column


def test_pareto_checks_its_uri_as_a_sweep_checks_tracking_uri(tmp_path):
    """--uri was used as given: a bad scheme or a garbage file gave MLflow's traceback, a server that does not
    answer 4 minutes of retries and then a traceback."""
    (tmp_path / "bad.db").write_text("garbage")
    for uri, needle in (("bogus", "--uri: must be a tracking URI"), ("file:///tmp/x", "file:// is MLflow's"),
                        ("http://127.0.0.1:1", "cannot be reached (ConnectionError: connection refused)"),
                        (f"sqlite:///{tmp_path}/bad.db", "MLflow cannot open")):
        out = raymia("pareto", "--uri", uri, "--experiment", "X", cwd=tmp_path)
        lines = [x for x in out.stderr.splitlines() if x.strip()]
        assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], out.stderr


def test_a_renamed_parameter_logged_under_its_old_name_shares_the_new_names_column():
    """A sweep logged before vae_metric_privacy's `eps` became `epsilon` compares beside one logged after."""
    from raymia.pareto import _defense_params

    old = {"defense.params.eps": "2.0", "defense.params.vae_batch": "64", "defense.name": "vae_metric_privacy"}
    assert _defense_params(old, "vae_metric_privacy") == {"epsilon": 2.0, "vae_batch_size": 64}
    assert _defense_params({"defense.params.epsilon": "2.0"}, "vae_metric_privacy") == {"epsilon": 2.0}
    assert _defense_params(old, "my_module:defense") == {"eps": 2.0, "vae_batch": 64}  # not registered: as logged
