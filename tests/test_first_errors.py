"""What used to fail late, with a traceback, or after minutes of retries is one line before any training:
an MLflow server that does not answer, a shift query as large as the image, a model that does not accept
the data's inputs (the check `raymia check` made), a search range upside down, a bank too small for
leave-one-out; and an MLflow store that fails at the very end leaves the audit's results on disk."""

from __future__ import annotations

import logging
import socket

import pytest
import yaml

import raymia
from raymia.errors import RaymiaError, SpecError


def _spec(tmp_path, **over) -> dict:
    d = {"name": "first", "plan": {"num_models": 4, "population": 100}, "model": {"params": {"hidden": [8]}},
         "train": {"epochs": 2}, "attacks": ["loss"], "bank": {"engine": "local"},
         "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "output_dir": str(tmp_path / "runs")}
    d.update(over)
    return d


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


def test_an_unreachable_tracking_server_is_one_line_before_training(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(RaymiaError, match=rf"^tracking.uri: the MLflow tracking server at {uri} cannot be reached "
                                          r"\(ConnectionError: connection refused\); start it"):
        raymia.run_audit(_spec(tmp_path, tracking={"uri": uri}))
    assert not (tmp_path / "runs" / "signals").exists()  # nothing trained
    with pytest.raises(RaymiaError, match=r"^tracking.uri: the MLflow tracking server"):
        raymia.run_sweep(_spec(tmp_path, tracking={"uri": uri}, sweep={
            "num_trials": 1, "objectives": [{"metric": "test_accuracy", "mode": "max"},
                                            {"metric": "loss/auc", "mode": "min"}]}))


def test_a_tracking_store_that_cannot_be_opened_stops_an_audit_before_training(tmp_path):
    """The store is opened in a thread beside Ray's start (MLflow's import takes seconds); the audit waits for
    it before its first pack, so a database MLflow cannot open is still one line with nothing trained."""
    (tmp_path / "bad.db").write_text("garbage")
    with pytest.raises(RaymiaError, match=rf"^tracking.uri: MLflow cannot open sqlite:///{tmp_path}/bad.db: "):
        raymia.run_audit(_spec(tmp_path, tracking={"uri": f"sqlite:///{tmp_path}/bad.db"}), console=False)
    assert not (tmp_path / "runs" / "signals").exists()  # nothing written, nothing trained


def test_a_tracking_store_failing_at_the_end_leaves_the_results_on_disk(tmp_path, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    def refuse(self, *args, **kwargs):
        raise ConnectionError("the server went away")

    monkeypatch.setattr(MlflowClient, "create_run", refuse)  # after the pre-flight check: the store then fails
    with caplog.at_level(logging.ERROR, logger="raymia"):
        result = raymia.run_audit(_spec(tmp_path), console=False)
    assert (result.out_dir / "result.json").is_file() and (result.out_dir / "records.parquet").is_file()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "raymia" and r.levelno == logging.ERROR]
    assert line.startswith(f"MLflow: the audit's results are on disk in {result.out_dir} but not in MLflow")
    assert line.endswith("the server went away")


def test_queries_and_models_that_do_not_fit_the_data_are_refused_before_training(tmp_path, monkeypatch):
    with pytest.raises(SpecError, match=r"^queries.1: 'shift:0:-8' shifts by as much as the 8x8 image; "
                                        r"accepted: \|DX\| < 8, \|DY\| < 8"):
        raymia.run_audit(_spec(tmp_path, queries=["identity", "shift:0:-8"]))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "firstnets.py").write_text(
        "from torch import nn\n\n"
        "def narrow(params, info):\n    return nn.Sequential(nn.Flatten(), nn.Linear(32, info.num_classes))\n\n"
        "def five(params, info):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))\n")
    with pytest.raises(SpecError, match=r"^model.name: model 'firstnets:narrow' does not accept the data's inputs of "
                                        r"shape \[1, 8, 8\]: .*2x64 and 32x10"):
        raymia.run_audit(_spec(tmp_path, model="firstnets:narrow"))
    with pytest.raises(SpecError, match=r"^model.name: model 'firstnets:five' returns \[2, 5\] for 2 inputs; "
                                        r"expected logits \[2, 10\]"):
        raymia.run_audit(_spec(tmp_path, model="firstnets:five"))
    assert not (tmp_path / "runs" / "signals").exists()
    # the check runs where the spec is first checked; the processes it hands the spec to (pool workers, a
    # sweep's trials) skip it, and it is all they skip
    from raymia.spec import AuditSpec
    from raymia.train.bank import BankContext

    five = AuditSpec.model_validate(_spec(tmp_path, model="firstnets:five"))
    assert BankContext.from_spec(five, check_model=False).plan.num_models == 4
    too_many = AuditSpec.model_validate(_spec(tmp_path, model="firstnets:five", plan={"num_models": 4, "population": 5000}))
    with pytest.raises(SpecError, match=r"^plan.population: 5000 exceeds the 1347 training points"):
        BankContext.from_spec(too_many, check_model=False)
    with pytest.raises(SpecError, match=r"^plan.num_models: leave-one-out .* needs at least 4 models, got 2"):
        raymia.run_audit(_spec(tmp_path, plan={"num_models": 2}))
    with pytest.raises(SpecError, match=r"^plan.num_models: .* needs at least 4 models"):  # as run_audit takes it
        raymia.run_audit(AuditSpec.model_validate(_spec(tmp_path, plan={"num_models": 2})))
    # attacker: non_adaptive: a target needs an undefended shadow outside its pair; every model a target
    # leaves none (it failed after training, saying the bank needed 4 models)
    every = _spec(tmp_path, attacker="non_adaptive", defense="confidence", plan={"num_models": 4, "targets": "all"})
    with pytest.raises(SpecError, match=r"^plan.targets: attacker: non_adaptive .* target 0 has none \(4 of the 4"):
        raymia.run_audit(every)
    assert raymia.as_spec({**every, "plan": {"num_models": 4, "targets": [0, 2]}}).plan.target_list == [0, 2]
    from raymia.check import check_spec  # `raymia check` refuses what the run would: before Ray starts

    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"sweep": {"defense": "hamp"}, "plan": {"num_models": 2}}))
    with pytest.raises(SpecError, match=r"plan.num_models: .* needs at least 4 models"):
        check_spec(path)


@pytest.mark.parametrize("space, message", [
    ({"gamma": {"low": 0.9, "high": 0.5}}, r"sweep.space.gamma: low 0.9 must be below high 0.5"),
    ({"top_k": {"low": 5, "high": 2}}, r"sweep.space.top_k: low 5 is above high 2"),
    # a typo in a range's key names the key, then what is accepted
    ({"gamma": {"low": 0.1, "hgh": 0.5}}, r"sweep.space.gamma: unknown key 'hgh' \(did you mean 'high'\?\); expected \{low, high\[, log\]\}"),
    ({"gamma": {"low": 0.1, "high": 0.5, "lg": True}}, r"sweep.space.gamma: unknown key 'lg' \(did you mean 'log'\?\); expected \{low, high"),
    ({"gamma": {"choices": [0.5], "low": 0.1}}, r"sweep.space.gamma: unknown key 'low'; expected \{choices: "),
    ({"gamma": {"low": 0.1}}, r"sweep.space.gamma: expected \{low, high\[, log\]\} or \{choices"),
    # a bound that is no number ("'<' not supported between instances"; NaN's "low nan must be below high")
    ({"gamma": {"low": "x", "high": 0.5}}, r"sweep.space.gamma: low must be a finite number, got 'x'"),
    ({"gamma": {"low": 0.1, "high": float("nan")}}, r"sweep.space.gamma: high must be a finite number, got nan"),
    ({"gamma": {"low": 0.1, "high": 0.5, "log": "maybe"}}, r"sweep.space.gamma: log must be true or false, got 'maybe'"),
])
def test_a_search_range_upside_down_is_one_line(space, message):
    from raymia.sweep_space import resolve_space

    spec = raymia.as_spec({"sweep": {"defense": "hamp" if "gamma" in space else "confidence", "space": space}},
                          kind=raymia.SweepSpec)
    with pytest.raises(SpecError, match="^" + message):
        resolve_space(spec)


def test_a_range_bound_yaml_reads_as_text_is_its_number():
    """YAML reads 1e-4 (no dot) as text, which a number field takes as its number: so does a range (it was
    "'<' not supported between instances of 'str' and 'float'")."""
    from raymia.space import Float
    from raymia.sweep_space import resolve_space

    spec = raymia.as_spec({"sweep": {"defense": "hamp", "space": {"alpha": {"low": "1e-4", "high": 0.05, "log": True}}}},
                          kind=raymia.SweepSpec)
    assert resolve_space(spec)["hamp"]["alpha"] == Float(1e-4, 0.05, True)


@pytest.mark.parametrize("override, message", [
    ({"final_audit": {"num_models": 2}}, r"^sweep.final_audit: plan.num_models: .* at least 4 models, got 2"),
    ({"final_audit": {"num_models": 4, "targets": [9]}}, r"^sweep.final_audit.targets: \[9\] out of range \[0, 4\)"),
    ({"storage": "bogus://x"}, r"^sweep.storage: cannot open 'bogus://x': .*accepted: an SQLAlchemy URL"),
])
def test_what_a_sweep_uses_after_its_search_is_checked_before_it(override, message):
    """The final audit's plan and the study's storage were first used after Ray started (the storage) or
    after every trial (the final audit: a traceback, or a one-line error with no front written)."""
    from raymia.errors import SpecError
    from raymia.resolve import validate_spec
    from raymia.spec import SweepSpec
    from raymia.sweep import validate_sweep

    spec = validate_spec({"plan": {"num_models": 4, "population": 200},
                          "sweep": {"defense": "hamp", **override}}, SweepSpec)
    with pytest.raises(SpecError, match=message):
        validate_sweep(spec, setup=False)


def test_a_non_adaptive_sweeps_final_audit_needs_an_undefended_shadow_for_each_target():
    from raymia.errors import SpecError
    from raymia.resolve import validate_spec
    from raymia.spec import SweepSpec
    from raymia.sweep import validate_sweep

    spec = validate_spec({"plan": {"num_models": 4, "population": 200}, "attacker": "non_adaptive",
                          "sweep": {"defense": "hamp", "final_audit": {"num_models": 4, "targets": "all"}}}, SweepSpec)
    with pytest.raises(SpecError, match=r"^sweep.final_audit: plan.targets: attacker: non_adaptive .* target 0 has none"):
        validate_sweep(spec, setup=False)


def test_the_python_api_names_what_it_accepts(tmp_path):
    from raymia.errors import SpecError

    for bad in ([1, 2], 5, b"x.yaml"):
        with pytest.raises(SpecError, match=r"^spec: a spec is a spec object, a dict, a YAML file's path or None; got"):
            raymia.as_spec(bad)
    with pytest.raises(SpecError, match=r"^overrides: must be a list .* not one string \(write \['train.epochs=2'\]\)"):
        raymia.run_audit({}, "train.epochs=2")


def test_spec_files_refuse_what_would_be_read_silently_otherwise(tmp_path):
    """A key given twice (the second won), a seed numpy cannot take (a traceback after the baseline), a NaN
    constraint (every trial infeasible, an empty front without a word)."""
    from raymia.errors import SpecError
    from raymia.resolve import load_spec
    from raymia.spec import SweepSpec

    path = tmp_path / "s.yaml"
    path.write_text("plan: {num_models: 8}\nseed: 1\nplan: {num_models: 4}\n")
    with pytest.raises(SpecError, match=r"s.yaml: malformed YAML at line 3, column 1: 'plan' is given twice"):
        load_spec(path)
    path.write_text("base: &b {lr: 0.1, epochs: 2}\ntrain: {<<: *b, lr: 0.2}\n")  # a merge key's override is no repeat
    from raymia.spec import load_raw

    assert load_raw(path)["train"] == {"lr": 0.2, "epochs": 2}
    path.write_text("sweep: {defense: hamp}\n")
    with pytest.raises(SpecError, match=r"seed: Input should be less than or equal to 4294967295"):
        load_spec(path, ["seed=4294967296"], kind=SweepSpec)
    with pytest.raises(SpecError, match=r"sweep.constraints.0.value: Input should be a finite number"):
        load_spec(path, ["sweep.constraints=[{metric: test_accuracy, op: '>=', value: .nan}]"], kind=SweepSpec)


@pytest.mark.parametrize("override, message", [
    ("data.private_classes=1000000000000", r"^data.private_classes: 1000000000000 private classes leave no public "
                                           r"class among the 10 classes; accepted: 1..9"),  # a MemoryError
    ("model.params.hidden=[1000000000000]", r"^model.params: model 'mlp' has 75,000,000,000,010 parameters "
                                            r"\(2.79e\+05 GiB in float32\), more than this machine can allocate"),
    # sizes torch cannot describe on the meta device (a RuntimeError traceback), a depth that never finished building
    ("model={name: wrn, params: {width: 16000000000000}}", r"^model.params: model 'wrn' cannot be built: Storage size "
                                                           r"calculation overflowed"),
    ("model={name: wrn, params: {depth: 1000000000000}}", r"^model.params: depth: Input should be less than or equal "
                                                          r"to 1000"),
    # RMIA's population z is the test split (a ValueError when the attack ran, after training)
    ("attacks=[{name: rmia_online, params: {num_z: 451}}]", r"^attacks.0.params: num_z: 451 exceeds the 450 test "
                                                             r"points the population z is drawn from; accepted: at most 450"),
    ("train.batch_size=1000000000000", r"^train.batch_size: 1000000000000 exceeds the 100 audited points, of which "
                                       r"each model trains on half; accepted: 1 to 100"),  # training never ended
])
def test_sizes_no_machine_holds_are_one_line_before_training(override, message):
    from raymia.train.bank import BankContext

    with pytest.raises(SpecError, match=message):  # the schema's bounds, or the checks of `raymia check`
        BankContext.from_spec(raymia.as_spec({"plan": {"num_models": 4, "population": 100}}, [override]), setup=False)


def test_a_model_too_wide_to_allocate_names_the_params_of_its_field():
    from raymia.data import load_dataset
    from raymia.models.base import check_forward

    info = load_dataset("digits").info
    for where, params_field in (("inversion.evaluator.model", "inversion.evaluator.params"),
                                ("inversion.attacks.0.params.augment.1", "inversion.attacks.0.params.augment.1.params")):
        with pytest.raises(SpecError, match=rf"^{params_field}: model 'mlp' has 75,000,000,000,010 parameters"):
            check_forward("mlp", {"hidden": [10**12]}, info, where=where)


def test_too_few_audited_points_are_refused_before_training(tmp_path):
    """Population 2 or 3 trained and then failed in the metrics; a one-row training split (population: all)
    gave half the models no member, and the batch loop waited forever for one."""
    import numpy as np

    from raymia.errors import SpecError
    from raymia.spec import AuditSpec
    from raymia.train.bank import BankContext

    with pytest.raises(SpecError, match=r"^plan.population: 3 audited points; an audit needs at least 4"):
        BankContext.from_spec(AuditSpec.model_validate({"plan": {"num_models": 4, "population": 3}}), setup=False)
    path = tmp_path / "one.npz"
    np.savez(path, x_train=np.ones((1, 3)), y_train=[1], x_test=np.ones((2, 3)), y_test=[0, 1])
    spec = AuditSpec.model_validate({"data": {"name": "npz", "params": {"path": str(path)}}, "plan": {"num_models": 4}})
    with pytest.raises(SpecError, match=r"^data npz: 1 audited points; an audit needs at least 4"):
        BankContext.from_spec(spec, setup=False)


def test_a_default_objective_the_attacks_cannot_give_says_it_is_the_default():
    """A sweep spec without `objectives` gets LiRA online's TPR at 1% FPR; with attacks that leave LiRA out,
    the error named a metric the spec never wrote. It says where it comes from; an objective the spec gives
    is named as given."""
    from raymia.metric_names import check_metric_names

    spec = raymia.as_spec({"attacks": ["loss"], "sweep": {"defense": "hamp"}}, kind=raymia.SweepSpec)
    with pytest.raises(SpecError, match=r"^sweep.objectives.1.metric: unknown metric 'lira_online/tpr_fpr_0.01' "
                                        r"\(a default objective: the spec gives no sweep.objectives\); accepted: "):
        check_metric_names(spec, [o.metric for o in spec.sweep.objectives], "sweep.objectives")
    given = raymia.as_spec({"attacks": ["loss"], "sweep": {"defense": "hamp", "objectives": [
        {"metric": "test_accuracy", "mode": "max"}, {"metric": "lira/auc", "mode": "min"}]}}, kind=raymia.SweepSpec)
    with pytest.raises(SpecError, match=r"^sweep.objectives.1.metric: unknown metric 'lira/auc'; accepted: "):
        check_metric_names(given, [o.metric for o in given.sweep.objectives], "sweep.objectives")


@pytest.mark.parametrize("over, message", [
    ({"plan": {"num_models": 4, "populaton": 100}},  # a typo
     "plan.populaton: unknown field (did you mean 'population'?); accepted: num_models, population, targets"),
    ({"attacks": ["lira"]},  # a name's start: both names it begins
     "attacks.0.name: unknown attack 'lira' (did you mean 'lira_offline' or 'lira_online'?); accepted: "),
    ({"attacks": ["LOSS"]}, "attacks.0.name: unknown attack 'LOSS' (did you mean 'loss'?); accepted: "),  # the case
    ({"model": {"params": {"hidden_size": [8]}}},  # a suffix added to a parameter's name
     "model.params: hidden_size: unknown parameter of 'mlp' (did you mean 'hidden'?); accepted: hidden, activation"),
    ({"attacks": ["rain"]}, "attacks.0.name: unknown attack 'rain'; accepted: "),  # nothing near: no guess
    ({"sweep": {"defense": "hamp", "objectives": [{"metric": "lira/auc", "mode": "min"}]}},  # each half on its own
     "sweep.objectives.0.metric: unknown metric 'lira/auc' (did you mean 'lira_offline/auc' or 'lira_online/auc'?)"),
    ({"metrics": {"raw_outputs": True},  # before the defense's output modification: the prefix stays
      "sweep": {"defense": "hamp", "objectives": [{"metric": "raw/lira/auc", "mode": "min"}]}},
     "sweep.objectives.0.metric: unknown metric 'raw/lira/auc' (did you mean 'raw/lira_offline/auc' or "
     "'raw/lira_online/auc'?)"),
    # a rate in percent is not its nearest name (0.1, a hundred times the rate meant)
    ({"sweep": {"defense": "hamp", "objectives": [{"metric": "loss/tpr_fpr_0.1%", "mode": "min"}]}},
     "sweep.objectives.0.metric: unknown metric 'loss/tpr_fpr_0.1%' (did you mean 'loss/tpr_fpr_0.001'?); accepted:"),
    ({"sweep": {"defense": "hamp", "space": {"gama": {"low": 0.1, "high": 0.5}}}},  # a searched parameter
     "sweep.space.gama: 'hamp' has no parameter 'gama' (did you mean 'gamma'?); accepted: gamma, alpha"),
    ({"sweep": {"defense": "hamp", "objectives": [{"metric": "test_acc", "mode": "max"}]}},
     "sweep.objectives.0.metric: unknown metric 'test_acc' (did you mean 'test_accuracy'?); accepted:"),
])
def test_a_name_near_an_accepted_one_is_suggested_before_the_accepted_list(tmp_path, over, message):
    from raymia.check import check_spec

    d = _spec(tmp_path, **over)
    if "sweep" in over:
        d["attacks"] = ["loss", "lira_online", "lira_offline"]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(SpecError) as e:
        check_spec(path)
    assert str(e.value).removeprefix(f"{path}: ").startswith(message), str(e.value)
