"""Spec loading, overrides, fingerprints, and the one-line errors for bad input."""

from __future__ import annotations

import pytest

from raymia.errors import SpecError
from raymia.resolve import load_spec
from raymia.spec import AuditSpec, SweepSpec


def write(tmp_path, text: str, name: str = "spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "name: a\nplan: {num_models: 4}\nattacks: [{name: loss}, {name: lira_online}]\n")
    spec = load_spec(p, ["train.epochs=7", "model.params.hidden=[32, 16]", "attacks.1.name=lira_offline"])
    assert spec.plan.num_models == 4
    assert spec.train.epochs == 7
    assert spec.model.params == {"hidden": [32, 16]}
    assert spec.data.name == "digits" and spec.defense.name == "none"
    assert [a.name for a in spec.attacks] == ["loss", "lira_offline"]
    assert [a.name for a in load_spec(None).attacks] == ["loss", "modified_entropy", "lira_online", "lira_offline",
                                                         "rmia_online"]
    with pytest.raises(SpecError, match="queries: is not set in the spec"):
        load_spec(p, ["queries.0=hflip"])


def test_a_bare_name_stands_for_the_entry_with_its_defaults(tmp_path):
    p = write(tmp_path, "model: lenet5\ndefense: hamp\ndata: digits\nattacks: [loss, {name: lira_online}]\n")
    spec = load_spec(p, ["attacks.0=rmia_online"])
    assert spec.model.name == "lenet5" and spec.model.params == {} and spec.defense.name == "hamp"
    assert [a.name for a in spec.attacks] == ["rmia_online", "lira_online"]
    longhand = write(tmp_path, "model: {name: lenet5}\ndefense: {name: hamp}\n"
                               "attacks: [{name: rmia_online}, {name: lira_online}]\n", "long.yaml")
    assert load_spec(longhand).fingerprint() == spec.fingerprint()
    with pytest.raises(SpecError, match="attacks.0"):
        load_spec(p, ["attacks.0=3"])
    # --set reaches into a bare name's entry (a list's was an AttributeError traceback, a field's "is not a mapping")
    spec = load_spec(p, ["defense.params.gamma=0.5", "attacks.0.params.query=1", "attacks.0.label=l"])
    assert spec.defense.name == "hamp" and spec.defense.params == {"gamma": 0.5}
    assert (spec.attacks[0].name, spec.attacks[0].params, spec.attacks[0].key) == ("loss", {"query": 1}, "l")
    with pytest.raises(SpecError, match=r"^attacks.0: is not a mapping; cannot set a sub-key"):
        load_spec(p, ["attacks.0.bogus.x=1"])


def test_fingerprint_tracks_what_changes_the_bank():
    base = AuditSpec()
    assert base.fingerprint() == AuditSpec().fingerprint()
    # Things that change the trained models or their signals change the fingerprint...
    for change in (
        {"seed": 1},
        {"train": {"epochs": 99}},
        {"defense": {"name": "hamp", "params": {"gamma": 0.9}}},
        {"queries": ["identity"]},
        {"plan": {"num_models": 4}},
        {"model": {"params": {"hidden": [8]}}},
        {"data": {"params": {"test_fraction": 0.3}}},
    ):
        assert AuditSpec.model_validate(change).fingerprint() != base.fingerprint(), change
    # ... while attacks, tracking, the store location and the pack layout do not.
    for same in (
        {"attacks": [{"name": "loss"}]},
        {"tracking": {"uri": "sqlite:///x.db"}},
        {"output_dir": "elsewhere"},
        {"bank": {"pack_size": 2, "num_workers": 3}},
        {"name": "other"},
    ):
        assert AuditSpec.model_validate(same).fingerprint() == base.fingerprint(), same


@pytest.mark.parametrize(
    ("text", "overrides", "needle"),
    [
        ("plan: {num_models: 3}\n", [], "plan.num_models: must be even"),
        ("plan: {num_models: 4}\n", ["plan.targets=[0, 9]"], "plan.targets: [9] out of range [0, 4)"),
        ("plan: {targets: [1, 1]}\n", [], "plan.targets: a target given twice"),
        ("plan: {num_models: 0}\n", [], "plan.num_models: Input should be greater than or equal to 2"),
        ("bogus: 1\n", [], "bogus: unknown field; accepted: name, seed"),
        ("train: {epochs: 5, optimiser: sgd}\n", [], "train.optimiser: unknown field (did you mean 'optimizer'?); accepted: optimizer"),
        ("train: {optimizer: rmsprop}\n", [], "train.optimizer: accepted: 'sgd', 'adam' or 'adamw'"),
        ("data: {name: imagenet}\n", [], "data.name: unknown data set 'imagenet'; accepted: cifar10, cifar100, digits"),
        ("model: {name: resnet9000}\n", [], "model.name: unknown model 'resnet9000'; accepted: airbench, cnn, lenet5, mlp"),
        ("defense: {name: magic}\n", [], "defense.name: unknown defense 'magic'; accepted: "),
        ("attacks: [{name: oracle}]\n", [], "attacks.0.name: unknown attack 'oracle'"),
        ("defense: {name: hamp, params: {gamma: 1.5}}\n", [], "defense.params: gamma"),
        ("model: {params: {depth: 3}}\n", [], "model.params: depth: unknown parameter of 'mlp'; accepted: hidden,"),
        ("model: {name: resnet18, params: {hidden: [8]}}\n", [],
         "model.params: hidden: unknown parameter: 'resnet18' takes none"),
        ("attacks: [{name: loss, params: {x: 1}}]\n", [],
         "attacks.0.params: x: unknown parameter of 'loss'; accepted: query, calibration"),
        ("queries: [identity, rotate]\n", [], "unknown query augmentation 'rotate'"),
        ("metrics: {fpr_levels: [2]}\n", [], "metrics.fpr_levels: each level must lie in (0, 1)"),
        ("metrics: {fpr_levels: [0.01, 0.0100000001]}\n", [], "metrics.fpr_levels: levels [0.01, 0.0100000001] "
                                                             "are one level to 6 significant digits (0.01)"),
        ("tracking: {uri: ./mlruns}\n", [], "tracking.uri: must be a tracking URI"),
        ("tracking: {uri: 'sqlit:///x.db'}\n", [], "tracking.uri: unknown scheme 'sqlit'; accepted: sqlite:///mlflow.db,"),
        ("tracking: {uri: 'file:///tmp/mlruns'}\n", [], "tracking.uri: file:// is MLflow's filesystem store, which "
                                                       "MLflow 3 refuses"),
        ("", ["train.lr=-1"], "train.lr: Input should be greater than 0"),
        # YAML's true, yes and on are booleans, which pydantic would take for 1
        ("seed: true\n", [], "seed: a number is expected, got true"),
        # a typo's extra zeros in how long something trains or searches: refused, not a run that never ends
        ("defense: {name: memguard, params: {defense_epochs: 4000000}}\n", [],
         "defense.params: defense_epochs: Input should be less than or equal to 100000"),
        ("defense: {name: dmp, params: {distill_epochs: 1000000000000}}\n", [],
         "defense.params: distill_epochs: Input should be less than or equal to 100000"),
        ("train: {epochs: on}\n", [], "train.epochs: a number is expected, got true"),
        ("defense: {name: dpsgd, params: {noise_multiplier: yes}}\n", [],
         "defense.params: noise_multiplier: a number is expected, got true"),
        # nor does a list of numbers (a layer of one unit), and no number field takes NaN or infinity
        ("model: {params: {hidden: [64, on]}}\n", [], "model.params: hidden: a list of numbers is expected, got "
                                                      "true at position 1"),
        ("plan: {targets: [yes]}\n", [], "plan.targets: a list of numbers is expected, got true at position 0"),
        ("", ["train.weight_decay=.inf"], "train.weight_decay: Input should be a finite number"),
        ("defense: {name: dpsgd, params: {noise_multiplier: .inf}}\n", [],  # the accountant never returned
         "defense.params: noise_multiplier: Input should be a finite number"),
        ("attacks: [{name: lira_online, params: {min_std: .inf}}]\n", [],  # NaN scores after training
         "attacks.0.params: min_std: Input should be a finite number"),
        # sizes that failed with a traceback (numpy's seed, a MemoryError) or ran for ever
        ("data: {params: {split_seed: 4294967296}}\n", [],
         "data.params: split_seed: Input should be less than or equal to 4294967295"),
        ("", ["plan.num_models=1000000000000"], "plan.num_models: Input should be less than or equal to 10000"),
        ("", ["metrics.bootstrap=1000000000000"], "metrics.bootstrap: Input should be less than or equal to 100000"),
        # an attack's query index past the spec's queries failed when the attack ran, after training
        ("attacks: [{name: loss, params: {query: 2}}]\n", [], "attacks.0.params: query: 2 is no query index: the "
                                                               "spec's queries are ['identity', 'hflip']; accepted: 0 to 1"),
        ("queries: [identity]\nattacks: [{name: label_only, params: {queries: [0, 1]}}]\n", [],
         "attacks.0.params: queries: 1 is no query index"),
        # another data set as the inversion's public data is named as such, not as data.name
        ("inversion: {attacks: [miface], public: imagenet}\n", [], "inversion.public.name: unknown data set 'imagenet'"),
        # empty names and paths: MLflow's "Invalid experiment name" named tracking.uri; the others meant the default
        ("tracking: {experiment: ''}\n", [], "tracking.experiment: String should have at least 1 character"),
        ("output_dir: ''\n", [], "output_dir: String should have at least 1 character"),
        ("store: ''\n", [], "store: String should have at least 1 character"),
        ("target: {checkpoint: t.pt, members: []}\n", [], "target.members: must be a non-empty list of indices"),
        # a field of several types: named without pydantic's tag of the type tried, with what each accepts
        ("plan: {targets: {a: 1}}\n", [], "plan.targets: Input should be a valid list, or accepted: 'all'"),
        ("bank: {vectorize: maybe}\n", [], "bank.vectorize: Input should be a valid boolean, unable to interpret "
                                           "input, or accepted: 'auto'"),
        ("inversion: {attacks: [miface], classes: []}\n", [], "inversion.classes: must be 'all', a count >= 1 or a "
                                                              "list of distinct classes, got []"),
        # RMIA's z subset drew from numpy's generator, which refuses a negative seed, after training; a VAE too
        # wide to allocate failed when the run fitted it
        ("attacks: [{name: rmia_online, params: {num_z: 10, seed: -1}}]\n", [],
         "attacks.0.params: seed: Input should be greater than or equal to 0"),
        ("defense: {name: vae_metric_privacy, params: {hidden: 1000000000000}}\n", [],
         "defense.params: hidden: Input should be less than or equal to 65536"),
        ("train: {schedule: step, milestones: []}\n", [], "train.milestones: the step schedule needs at least one "
                                                         "milestone"),
        ("", ["noequals"], "--set: expected dotted.key=value"),
        # an unclosed list (the shell split "attacks=[loss, lira_online]" unquoted): the bracket, not "a valid list"
        ("", ["attacks=[loss, lira_online"], "--set: attacks: malformed YAML value '[loss, lira_online' (expected ',' or ']'"),
        ("", ["defense={name: hamp"], "--set: defense: malformed YAML value '{name: hamp'"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(tmp_path, text, overrides, needle):
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(p, overrides)
    msg = str(e.value)
    assert needle in msg, msg
    assert "\n" not in msg
    assert msg.startswith(str(p)) or msg.startswith("--set")


def test_a_spec_built_in_python_is_checked_as_a_file_is():
    """`raymia.AuditSpec(...)` gives the same one-line SpecError, naming the nested field, as a spec file;
    a sub-spec built alone names its own field."""
    from raymia.spec import PlanSpec

    with pytest.raises(SpecError, match=r"^plan\.num_models: must be even") as e:
        AuditSpec(plan={"num_models": 3})
    assert e.value.where == "plan.num_models" and "\n" not in str(e.value)
    with pytest.raises(SpecError, match=r"^sweep\.num_trials: a number is expected, got false$"):
        SweepSpec(sweep={"defense": "hamp", "num_trials": False})
    with pytest.raises(SpecError, match=r"^population: Input should be a valid integer"):
        PlanSpec(population="many")
    assert AuditSpec(plan=PlanSpec(num_models=6)).plan.num_models == 6  # a valid one is built as before
    assert AuditSpec(train={"augment": {"hflip": True}}).train.augment.hflip  # a boolean field keeps booleans


def test_file_errors(tmp_path):
    with pytest.raises(SpecError, match=r"missing\.yaml: file not found"):
        load_spec(tmp_path / "missing.yaml")
    bad = write(tmp_path, "plan: {num_models: 4\n", "bad.yaml")
    with pytest.raises(SpecError, match=r"bad\.yaml: malformed YAML at line \d+"):
        load_spec(bad)
    lst = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec(lst)
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)
    # a key that is not text (pydantic's traceback "keywords must be strings"; an unhashable key's TypeError)
    for text, key in (("1: 2\n", "the key '1'"), ("plan: {yes: 4}\n", "the key 'yes'"),
                      ("? [a, b]\n: 1\n", "a list or mapping as a key")):
        with pytest.raises(SpecError, match=rf"keys\.yaml: malformed YAML at line 1, column \d+: {key} is not a name"):
            load_spec(write(tmp_path, text, "keys.yaml"))
    deep = write(tmp_path, "x: " + "[" * 5000 + "]" * 5000 + "\n", "deep.yaml")  # a RecursionError's traceback
    with pytest.raises(SpecError, match=r"deep\.yaml: malformed YAML: lists or mappings nested too deeply"):
        load_spec(deep)


def test_sweep_spec_and_audit_of_a_sweep_file(tmp_path):
    p = write(tmp_path, "sweep: {defense: hamp, num_trials: 3}\n")
    sw = load_spec(p, kind=SweepSpec)
    assert isinstance(sw, SweepSpec) and sw.sweep.num_trials == 3
    assert [o.metric for o in sw.sweep.objectives] == ["test_accuracy", "lira_online/tpr_fpr_0.01"]
    audit = load_spec(p)  # the audit of a sweep file audits its base setting
    assert not isinstance(audit, SweepSpec)
    with pytest.raises(SpecError, match="sweep.defense: unknown defense"):
        load_spec(write(tmp_path, "sweep: {defense: nope}\n", "s2.yaml"), kind=SweepSpec)


def test_objective_references_and_constraint_bounds_lie_within_their_metrics_values():
    """A percent written for a fraction (a reference of 80 on test_accuracy: no trial passes it, every front's
    hypervolume 0) or an AUC bound above 1 is refused when the spec is read, naming the field and the range."""
    from raymia.metrics import metric_range

    def sweep(objectives=None, constraints=None) -> dict:
        return {"sweep": {"defense": "hamp", **({"objectives": objectives} if objectives else {}),
                          **({"constraints": constraints} if constraints else {})}}

    for objectives, field, message in (
        ([{"metric": "test_accuracy", "mode": "max", "reference": 80}], "sweep.objectives.0.reference",
         "80 is outside the values of test_accuracy; accepted: 0 to 1"),
        ([{"metric": "test_accuracy", "mode": "max"}, {"metric": "worst/auc", "mode": "min", "reference": 1.5}],
         "sweep.objectives.1.reference", "1.5 is outside the values of worst/auc; accepted: 0 to 1"),
        ([{"metric": "loss/epsilon_lb", "mode": "min", "reference": -0.5}], "sweep.objectives.0.reference",
         "-0.5 is outside the values of loss/epsilon_lb; accepted: at least 0"),
    ):
        with pytest.raises(SpecError) as e:
            SweepSpec.model_validate(sweep(objectives))
        assert str(e.value) == f"{field}: {message}"
    with pytest.raises(SpecError) as e:
        SweepSpec.model_validate(sweep(constraints=[{"metric": "lira_online/tpr_fpr_0.01", "op": "<=", "value": 5}]))
    assert str(e.value) == ("sweep.constraints.0.value: 5 is outside the values of lira_online/tpr_fpr_0.01; "
                            "accepted: 0 to 1")
    ok = SweepSpec.model_validate(sweep([{"metric": "generalization_gap", "mode": "min", "reference": -0.2},
                                         {"metric": "mi/worst/fid", "mode": "max", "reference": 250.0}],
                                        [{"metric": "defense/epsilon", "op": "<=", "value": 8}]))
    assert [o.reference for o in ok.sweep.objectives] == [-0.2, 250.0]
    assert metric_range("ood/loss/gaussian/aupr") == (0, 1) and metric_range("defense/epsilon") is None


@pytest.mark.parametrize("name", ["quickstart.yaml", "cifar10-all.yaml", "purchase100-all.yaml"])
def test_the_written_spec_file_reads_back_to_the_same_spec(tmp_path, name):
    """write_spec_file (beside every report and in its MLflow run) round-trips every field, including a sweep
    over several defenses (whose unused defense/space keys it leaves out: they would be refused)."""
    from pathlib import Path

    from raymia.audit import write_spec_file

    src = Path(__file__).resolve().parents[1] / "sweeps" / name
    for kind in (SweepSpec, AuditSpec):
        spec = load_spec(src, kind=kind)
        path = write_spec_file(spec, tmp_path / f"{kind.__name__}.yaml", "a test")
        text = path.read_text()
        assert text.startswith("# a test (raymia ")
        assert f"`raymia {'sweep' if kind is SweepSpec else 'audit'} {path.name}`" in text
        again = load_spec(path, kind=kind)
        assert again == spec and again.fingerprint() == spec.fingerprint()


def test_a_label_names_one_entry_of_each_list():
    """Results and metric names are keyed by label (default: the name): two sets or two inversion attacks
    under one key would overwrite each other's numbers."""
    from raymia.errors import SpecError
    from raymia.resolve import validate_spec

    with pytest.raises(SpecError, match=r"^ood: 'uniform' names two non-member sets; give each its own label"):
        validate_spec({"ood": {"sets": [{"name": "uniform"}, {"name": "uniform"}]}})
    with pytest.raises(SpecError, match=r"^inversion: 'miface' names two inversion attacks"):
        validate_spec({"inversion": {"attacks": [{"name": "miface"}, {"name": "miface"}]}})
    ok = validate_spec({"ood": {"sets": [{"name": "uniform"}, {"name": "uniform", "label": "u2",
                                                               "params": {}}]}})
    assert [s.key for s in ok.ood.sets] == ["uniform", "u2"]
