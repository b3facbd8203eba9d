"""Parameters that act only in a mode of their block (`Params.acts_when`), and a sweep's space checked at its
ends (`sweep_space.space_points`) before any trial runs."""

from __future__ import annotations

import pytest

from raymia.attacks import ATTACKS
from raymia.defenses import DEFENSES
from raymia.errors import SpecError
from raymia.inversion.registry import INVERSION
from raymia.registry import param_table
from raymia.resolve import validate_spec
from raymia.spec import AuditSpec, SweepSpec
from raymia.sweep import validate_sweep
from raymia.sweep_space import resolve_space

PLAN = {"num_models": 4, "population": 200}


def audit(**fields) -> AuditSpec:
    return validate_spec({"plan": PLAN, **fields}, AuditSpec)


def sweep(space: dict, name: str = "tl_dmi", **fields) -> SweepSpec:
    return validate_spec({"plan": PLAN, "model": {"params": {"hidden": [16]}},
                          "sweep": {"defense": name, "space": space}, **fields}, SweepSpec)


def test_a_parameter_given_without_its_mode_is_refused_naming_both():
    """`freeze_depth: 3` alone trained with the default freeze: fraction (0.6 of the parameters frozen)."""
    with pytest.raises(SpecError) as e:
        audit(defense={"name": "tl_dmi", "params": {"freeze_depth": 3}})
    assert str(e.value) == ("defense.params.freeze_depth: acts only with freeze: depth; freeze is fraction (its "
                            "default): set freeze too, or leave freeze_depth out")
    with pytest.raises(SpecError) as e:
        audit(defense={"name": "pruning", "params": {"inference_lr": 0.01}})
    assert str(e.value) == ("defense.params.inference_lr: acts only with minmax_lambda > 0; minmax_lambda is 0.0 "
                            "(its default): set minmax_lambda too, or leave inference_lr out")
    with pytest.raises(SpecError) as e:  # an attack's too
        audit(attacks=[{"name": "rmia_online", "params": {"seed": 3}}])
    assert str(e.value) == ("attacks.0.params.seed: acts only with num_z set; num_z is null (its default): set "
                            "num_z too, or leave seed out")
    # the mode given beside it: the spec chose it (a sweep's trial pins both modes' parameters)
    audit(defense={"name": "tl_dmi", "params": {"freeze": "depth", "freeze_depth": 1, "freeze_fraction": 0.6}})
    audit(defense={"name": "tl_dmi", "params": {"freeze_fraction": 0.3}})  # its default mode turns it on


@pytest.mark.parametrize("registry", [DEFENSES, ATTACKS, INVERSION], ids=["defenses", "attacks", "inversion"])
def test_every_declared_dependency_is_listed_and_every_default_space_acts(registry):
    for entry in registry.entries():
        rows = {r[0]: r[3] for r in param_table(entry.params)}
        for name, cond in entry.params.acts_when.items():
            assert f"(acts only with {cond})" in rows[name], (entry.name, name)
        if registry is DEFENSES:  # no dimension of a defense's own space is idle under its defaults
            space = entry.obj.search_space()
            for name, cond in entry.params.acts_when.items():
                if name in space and cond.field not in space:
                    assert cond.holds(entry.params.model_fields[cond.field].default), (entry.name, name)


def test_a_sweeps_space_is_checked_against_the_modes():
    with pytest.raises(SpecError) as e:  # searched, while the default mode never turns it on
        resolve_space(sweep({"freeze_depth": {"choices": [1, 2]}}))
    assert str(e.value) == ("sweep.space.freeze_depth: searched ({1, 2}), but freeze_depth acts only with freeze: "
                            "depth, and freeze is fraction (its default): give freeze_depth one value, or search "
                            "freeze too")
    with pytest.raises(SpecError) as e:  # given alone: the audit's case
        resolve_space(sweep({"freeze_depth": 3}))
    assert str(e.value) == ("sweep.space.freeze_depth: freeze_depth acts only with freeze: depth; freeze is fraction "
                            "(its default): add freeze to the space, or leave freeze_depth out")
    with pytest.raises(SpecError) as e:  # the spec's own freeze_fraction would be searched for nothing
        resolve_space(sweep({"freeze": "depth", "freeze_fraction": {"low": 0.1, "high": 0.5}}))
    assert str(e.value) == ("sweep.space.freeze_fraction: searched ([0.1, 0.5]), but freeze_fraction acts only "
                            "with freeze: fraction, and freeze is depth in this space: give freeze_fraction one "
                            "value, or search freeze too")
    # the default space's freeze_fraction, idle under the spec's freeze: depth, is left out of the search
    space = resolve_space(sweep({"freeze": "depth", "freeze_depth": {"choices": [0, 1]}}))["tl_dmi"]
    assert "freeze_fraction" not in space and space["freeze"] == "depth" and "pretrain_epochs" in space
    space = resolve_space(sweep({"weights": "w.pt"}))["tl_dmi"]  # nothing pretrains: its epochs are not searched
    assert "pretrain_epochs" not in space and "freeze_fraction" in space
    # pinned beside its pinned mode (the shipped inversion sweeps), or with the mode searched: accepted
    resolve_space(sweep({"freeze": "depth", "freeze_depth": {"choices": [0, 1]}, "freeze_fraction": 0.6}))
    resolve_space(sweep({"freeze": {"choices": ["depth", "fraction"]}, "freeze_depth": {"choices": [0, 1]}}))
    resolve_space(sweep({"lam": {"low": 0.0, "high": 3.0}, "warmup_epochs": {"low": 0, "high": 2}}, "advreg"))


@pytest.mark.parametrize("name, space, train, message", [
    ("advreg", {"warmup_epochs": {"low": 0, "high": 10}}, {"epochs": 5},
     "sweep.space.warmup_epochs: 10, the high end of [0, 10], is refused: warmup_epochs 10 is not below "
     "train.epochs 5: the game would never start; accepted: 0 to 4"),
    # checked under the mode that turns it on, though the base setting is the default fraction
    ("tl_dmi", {"freeze": {"choices": ["fraction", "depth"]}, "freeze_depth": {"choices": [0, 2]}}, {},
     "sweep.space.freeze_depth: 2, a choice of {0, 2}, is refused: freeze_depth 2 leaves nothing to fine-tune: "
     "the model has 2 parameterised layers; accepted: 0 to 1"),
    ("pruning", {"retrain_fraction": {"low": 0.2, "high": 1.0}}, {"epochs": 8, "lookahead": True},
     "sweep.space.retrain_fraction: 0.2, the low end of [0.2, 1.0], is refused: train.lookahead: pruning restarts "
     "the schedule for its 2-epoch masked retraining, which ends before lookahead starts (after epoch 3); raise "
     "train.epochs or retrain_fraction, or set lookahead: false"),
    # a constant the defense refuses names the space's field too, not the audit's defense.params
    ("advreg", {"warmup_epochs": 5}, {"epochs": 5},
     "sweep.space.warmup_epochs: warmup_epochs 5 is not below train.epochs 5: the game would never start; "
     "accepted: 0 to 4"),
])
def test_a_range_that_reaches_a_refused_setting_is_one_line_before_the_sweep(name, space, train, message):
    with pytest.raises(SpecError) as e:
        validate_sweep(sweep(space, name, train=train), setup=False)
    assert str(e.value) == message


def test_two_ranges_the_defense_refuses_together_are_one_line_before_the_sweep():
    """SELENA's excluded_per_point must stay below sub_models: each end passes beside the other's base value
    (10 and 25), and a trial drawing 12 with 11 failed. The corners of every two searched dimensions are
    checked too; a pair no trial draws (freeze_depth beside freeze: fraction) is not."""
    with pytest.raises(SpecError) as e:
        validate_sweep(sweep({"sub_models": {"low": 11, "high": 30}, "excluded_per_point": {"low": 2, "high": 12}},
                             "selena"), setup=False)
    assert str(e.value) == (
        "sweep.space: excluded_per_point 12, the high end of [2, 12], with sub_models 11, the low end of [11, 30], "
        "is refused together: excluded_per_point (12) must be below sub_models (11): every sub-model must train "
        "on some members")
    validate_sweep(sweep({"sub_models": {"low": 13, "high": 30}, "excluded_per_point": {"low": 2, "high": 12}},
                         "selena"), setup=False)
    validate_sweep(sweep({"freeze": {"choices": ["depth", "fraction"]}, "freeze_depth": {"choices": [0, 1]},
                          "freeze_fraction": {"low": 0.2, "high": 0.8}}), setup=False)


def test_the_checks_of_one_model_share_its_meta_device_build():
    """A sweep's checks at every end and pair of ends built the model each time (85 ResNet-18s, 5.7 s, for
    CIFAR-10's pruning sweep); a model redefined since is built again."""
    import torch

    from raymia.datainfo import DataInfo
    from raymia.defenses.base import meta_model
    from raymia.models import MODELS

    info = DataInfo(num_classes=10, input_shape=(1, 8, 8), kind="image")
    one = meta_model("mlp", {"hidden": [16]}, info)
    assert one is meta_model("mlp", {"hidden": [16]}, info) and one is not meta_model("mlp", {"hidden": [8]}, info)
    assert meta_model("no-such-model", {}, info) is None
    listed = DataInfo(num_classes=10, input_shape=(1, 8, 8), kind="image", mean=[0.5], std=[0.2])  # as a plug-in may
    assert meta_model("mlp", {"hidden": [16]}, listed) is meta_model("mlp", {"hidden": [16]}, listed)

    def define(width: int) -> None:  # the same code run again defines the name again (a notebook cell)
        @MODELS.register("modes-test-net")
        def net(params, info):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width))

    try:
        define(3)
        assert meta_model("modes-test-net", {}, info)[1].out_features == 3
        define(5)
        assert meta_model("modes-test-net", {}, info)[1].out_features == 5
    finally:
        MODELS._entries.pop("modes-test-net", None)


def test_a_range_inside_what_the_defense_accepts_passes_and_an_inert_end_is_only_mentioned(tmp_path):
    import yaml

    from raymia.check import check_spec

    validate_sweep(sweep({"warmup_epochs": {"low": 0, "high": 4}}, "advreg", train={"epochs": 5}), setup=False)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"plan": PLAN, "model": {"params": {"hidden": [16]}}, "train": {"epochs": 5},
                                    "sweep": {"defense": "advreg", "space": {"lam": {"choices": [0.0, 1.0]}}},
                                    "tracking": {"enabled": False}, "output_dir": str(tmp_path / "runs")}))
    rows = [text for _, text in check_spec(path).rows]
    assert ("advreg at lam 0.0 (a choice of {0.0, 1.0}) releases the undefended model: lam 0 gives the inference "
            "model's gain no weight: plain training") in rows
