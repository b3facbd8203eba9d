"""An audit's gate: conditions on its results, checked by name before training and by value after it;
`raymia audit` exits with status 3 when one fails, after writing every result (a CI's privacy check)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from raymia.audit import run_audit
from raymia.errors import SpecError
from raymia.metric_names import check_gate, gate_line
from raymia.resolve import as_spec
from raymia.spec import AuditSpec, Constraint
from tests.conftest import tiny_spec_dict


def _spec(tmp_path, gate: list[dict]) -> dict:
    return {**tiny_spec_dict(tmp_path), "plan": {"num_models": 4, "population": 300},
            "train": {"epochs": 15, "batch_size": 64, "lr": 0.002}, "attacks": ["loss", "lira_offline"],
            "bank": {"engine": "local", "pack_size": 4}, "gate": gate,
            "tracking": {"enabled": False, "uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "gate"}}


def test_a_gate_leaves_the_bank_and_a_spec_without_one_as_they_were(tmp_path):
    d = _spec(tmp_path, [{"metric": "loss/auc", "op": "<=", "value": 0.6}])
    assert AuditSpec.model_validate(d).fingerprint() == AuditSpec.model_validate({**d, "gate": []}).fingerprint()
    assert "gate" not in AuditSpec().model_dump(mode="json")  # specs without one keep their resume hashes


@pytest.mark.parametrize(("gate", "message"), [
    ({"metric": "lira/auc", "op": "<=", "value": 0.6},
     r"^gate.0.metric: unknown metric 'lira/auc' \(did you mean 'lira_offline/auc'\?\); accepted: "),
    ({"metric": "loss/auc", "op": "<", "value": 0.6}, r"^gate.0.op: "),
    ({"metric": "loss/tpr_fpr_0.01", "op": "<=", "value": 5}, r"^gate.0.value: 5 is outside the values of "),
])
def test_a_gate_condition_that_cannot_hold_is_one_line_before_any_training(tmp_path, gate, message):
    with pytest.raises(SpecError, match=message):
        as_spec(_spec(tmp_path, [gate]))


def test_a_sweep_keeps_its_conditions_in_sweep_constraints(tmp_path):
    with pytest.raises(SpecError, match=r"^gate: a sweep keeps the conditions .* in sweep.constraints"):
        as_spec({**_spec(tmp_path, [{"metric": "loss/auc", "op": "<=", "value": 0.6}]),
                 "sweep": {"defense": "hamp"}}, kind="sweep")


def test_a_gate_on_a_rate_the_plan_cannot_resolve_is_refused_before_training(tmp_path):
    spec = as_spec(_spec(tmp_path, [{"metric": "loss/tpr_fpr_0.001", "op": "<=", "value": 0.01}]))
    with pytest.raises(SpecError, match=r"^gate.0.metric: loss/tpr_fpr_0.001 needs at least 1000 non-members"):
        run_audit(spec, console=False)
    assert not list((tmp_path / "runs").rglob("*.npz"))  # nothing trained


def test_each_condition_is_checked_against_the_mean_over_targets_and_n_a_never_holds():
    flat = {"loss/auc": 0.61, "test_accuracy": 0.9, "defense/epsilon": None}
    gate = [Constraint(metric="loss/auc", op="<=", value=0.6), Constraint(metric="test_accuracy", op=">=", value=0.9),
            Constraint(metric="defense/epsilon", op="<=", value=8)]
    out = check_gate(gate, flat)
    assert [g["passed"] for g in out] == [False, True, False]  # 0.9 >= 0.9 holds: the bound is inclusive
    assert [g["actual"] for g in out] == [0.61, 0.9, None]
    assert gate_line(out[0]) == "loss/auc = 0.61, must be <= 0.6"
    assert gate_line(out[2]) == "defense/epsilon is n/a, must be <= 8"


def test_raymia_audit_exits_3_when_the_gate_fails_and_0_when_it_holds(tmp_path):
    d = _spec(tmp_path, [{"metric": "lira_offline/auc", "op": "<=", "value": 0.99},
                         {"metric": "test_accuracy", "op": ">=", "value": 0.5}])
    res = run_audit(d, console=False, track=True)  # trains the bank; the commands below reuse it
    flat = res.flat_metrics()
    assert res.gate_failures == [] and [g["actual"] for g in res.gate] == [flat["lira_offline/auc"],
                                                                         flat["test_accuracy"]]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(d["tracking"]["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("gate").experiment_id])
    assert run.data.tags["raymia.gate"] == "passed"
    path = tmp_path / "audit.yaml"
    path.write_text(json.dumps(d))  # YAML reads JSON
    auc = flat["lira_offline/auc"]

    def audit(*sets: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "raymia", "audit", str(path), *[f"--set={s}" for s in sets]],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300)

    ok = audit()
    assert ok.returncode == 0, ok.stderr
    assert "gate: passed (2 of 2 conditions hold)" in ok.stdout
    below = float(f"{auc - 0.01:.4f}")  # below the audit's own AUC: that condition fails
    bad = audit(f"gate.0.value={below}")
    assert bad.returncode == 3, bad.stderr
    assert "no training needed" in bad.stderr  # the stored bank was reused
    assert bad.stderr.strip().splitlines()[-1] == (  # the last line a CI's log shows
        f"[raymia] gate: 1 of 2 condition(s) failed: lira_offline/auc = {auc:.4g}, must be <= {below:g}")
    saved = json.loads(next((tmp_path / "runs").rglob("result.json")).read_text())
    assert [g["passed"] for g in saved["gate"]] == [False, True] and saved["gate"][0]["actual"] == pytest.approx(auc)
