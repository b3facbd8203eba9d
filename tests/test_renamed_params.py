"""Renamed parameters keep their old names: accepted wherever a parameter is named (a spec's params, --set, a
sweep's space), refused beside the new name, listed beside it, and hashed under the old name so stores,
caches and sweeps written before the rename are found again.

The hashes hard-coded here were computed by raymia before the rename (commit d26d28c) from the specs
spelled with the old names."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from raymia.errors import SpecError
from raymia.resolve import as_spec
from raymia.spec import AuditSpec, SweepSpec
from raymia.sweep_state import resume_hash

# (registry's spec path, entry, old name, new name, a value other than the default)
RENAMED = [
    ("inversion", "plg_mi", "n_dis", "n_critic", 2),
    ("ood", "gan", "n_dis", "n_critic", 3),
    ("defense", "tl_dmi", "pretrain_batch", "pretrain_batch_size", 32),
    ("defense", "vae_metric_privacy", "vae_batch", "vae_batch_size", 32),
    ("defense", "vae_metric_privacy", "eps", "epsilon", 3.0),
    ("defense", "memguard", "defense_batch", "defense_batch_size", 16),
    ("data", "synthetic", "n_train", "num_train", 400),
    ("data", "synthetic", "n_test", "num_test", 200),
]


def _entry(kind: str, name: str):
    from raymia.data import DATASETS
    from raymia.data.ood import NONMEMBER_SETS
    from raymia.defenses import DEFENSES
    from raymia.inversion.registry import INVERSION

    return {"data": DATASETS, "defense": DEFENSES, "ood": NONMEMBER_SETS, "inversion": INVERSION}[kind].get(name)


@pytest.mark.parametrize(("kind", "name", "old", "new", "value"), RENAMED)
def test_either_spelling_parses_to_the_same_params(kind, name, old, new, value):
    entry = _entry(kind, name)
    by_old, by_new = entry.parse({old: value}, "x"), entry.parse({new: value}, "x")
    assert by_old == by_new and getattr(by_new, new) == value
    assert getattr(entry.parse({}, "x"), new) != value  # the value is no default that would hide a miss
    assert entry.params(**{old: value}) == by_new  # the Python API takes the old keyword too
    with pytest.raises(SpecError, match=rf"^x: {new} and {old} are two names of one parameter: give it once, "
                                        rf"as {new}$"):
        entry.parse({old: value, new: value}, "x")


def test_an_error_names_the_parameter_as_written():
    with pytest.raises(SpecError, match=r"^defense.params: defense_batch: Input should be greater than or equal "
                                        r"to 1$"):
        as_spec({"defense": {"name": "memguard", "params": {"defense_batch": 0}}})
    with pytest.raises(SpecError, match=r"^defense.params: defense_batch_size: Input should be greater"):
        as_spec({"defense": {"name": "memguard", "params": {"defense_batch_size": 0}}})


OLD = {
    "data": {"name": "synthetic", "params": {"n_train": 400, "n_test": 200}},
    "defense": {"name": "vae_metric_privacy", "params": {"eps": 3.0, "vae_batch": 64}},
    "ood": {"sets": [{"name": "gan", "params": {"n_dis": 3}}]},
}
NEW = {
    "data": {"name": "synthetic", "params": {"num_train": 400, "num_test": 200}},
    "defense": {"name": "vae_metric_privacy", "params": {"epsilon": 3.0, "vae_batch_size": 64}},
    "ood": {"sets": [{"name": "gan", "params": {"n_critic": 3}}]},
}


@pytest.mark.parametrize("spelling", [OLD, NEW], ids=["old", "new"])
def test_fingerprints_are_those_of_the_old_names(spelling):
    assert AuditSpec.model_validate(spelling).fingerprint() == "c41434f2febdd261"
    memguard = {"defense_batch": 32} if spelling is OLD else {"defense_batch_size": 32}
    assert AuditSpec.model_validate({"defense": {"name": "memguard", "params": memguard}}).fingerprint() == \
        "433990d7ec818488"
    tldmi = {"pretrain_batch": 32} if spelling is OLD else {"pretrain_batch_size": 32}
    assert AuditSpec.model_validate({"defense": {"name": "tl_dmi", "params": tldmi}}).fingerprint() == \
        "eecca95d7e6dff0f"


def test_a_sweep_written_with_the_old_names_resumes_under_the_new_ones():
    def sweep(n_train, n_dis, eps, vae_batch, defense_batch):
        return SweepSpec.model_validate({
            "data": {"name": "synthetic", "params": {n_train: 400}},
            "inversion": {"attacks": [{"name": "plg_mi", "params": {n_dis: 2}}]},
            "sweep": {"defenses": [
                {"name": "vae_metric_privacy", "space": {eps: {"low": 1.0, "high": 10.0}, vae_batch: 64}},
                {"name": "memguard", "space": {defense_batch: 32}}]}})

    old = sweep("n_train", "n_dis", "eps", "vae_batch", "defense_batch")
    new = sweep("num_train", "n_critic", "epsilon", "vae_batch_size", "defense_batch_size")
    assert resume_hash(old) == resume_hash(new) == "93846a0e86c7aa33"


def test_set_takes_the_old_name_and_replaces_the_other_spelling():
    new = {"defense": {"name": "vae_metric_privacy", "params": {"vae_batch_size": 64, "epsilon": 2.0}}}
    spec = as_spec(new, ["defense.params.vae_batch=32"])
    assert spec.defense.params == {"epsilon": 2.0, "vae_batch": 32}
    old = {"defense": {"name": "vae_metric_privacy", "params": {"vae_batch": 64}}}
    assert as_spec(old, ["defense.params.vae_batch_size=16"]).defense.params == {"vae_batch_size": 16}
    # a bare name, a list's entry and a set with no params yet
    spec = as_spec({"defense": "memguard", "ood": {"sets": ["gan"]}},
                   ["defense.params.defense_batch=8", "ood.sets.0.params.n_dis=4"])
    assert spec.defense.params == {"defense_batch": 8} and spec.ood.sets[0].params == {"n_dis": 4}
    assert spec.fingerprint() == as_spec({"defense": {"name": "memguard", "params": {"defense_batch_size": 8}},
                                          "ood": {"sets": [{"name": "gan", "params": {"n_critic": 4}}]}}
                                         ).fingerprint()
    # a sweep's space key, by its old name over the new
    sweep = as_spec({"sweep": {"defenses": [{"name": "vae_metric_privacy", "space": {"epsilon": 1.0}}]}},
                    ["sweep.defenses.0.space.eps=2.0"], kind="sweep")
    assert sweep.sweep.defenses[0].space == {"eps": 2.0}


def test_a_space_key_with_the_old_name_overrides_the_declared_parameter():
    import optuna

    from raymia.space import Float
    from raymia.sweep import trial_spec
    from raymia.sweep_space import DefineByRun, resolve_space, split_config

    spec = as_spec({"sweep": {"defense": "vae_metric_privacy", "space": {"eps": {"low": 1.0, "high": 5.0},
                                                                         "vae_batch": 32}}}, kind="sweep")
    space = resolve_space(spec)["vae_metric_privacy"]
    assert space["epsilon"] == Float(1.0, 5.0) and space["vae_batch_size"] == 32
    assert "eps" not in space and "vae_batch" not in space  # one parameter, under its name
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0))
    t = study.ask()
    const = DefineByRun({"vae_metric_privacy": space})(t)
    config = {**t.params, **const}
    name, params = split_config(config)
    audit = as_spec(trial_spec(spec.model_dump(mode="json"), config))
    assert 1.0 <= params["epsilon"] <= 5.0 and audit.defense.params["vae_batch_size"] == 32
    with pytest.raises(SpecError, match=r"^sweep.space: eps and epsilon are two names of one parameter: give it "
                                        r"once, as epsilon$"):
        resolve_space(as_spec({"sweep": {"defense": "vae_metric_privacy", "space": {"eps": 1.0, "epsilon": 2.0}}},
                              kind="sweep"))
    with pytest.raises(SpecError, match=r"^sweep.space.eps: eps: Input should be greater than 0$"):
        resolve_space(as_spec({"sweep": {"defense": "vae_metric_privacy", "space": {"eps": -1.0}}}, kind="sweep"))


def test_the_caches_keep_their_keys():
    """GANs, cGANs and VAEs cached before the rename are found with either spelling."""
    from raymia.data import load_dataset
    from raymia.data.ood import GanParams, ood_gan_key
    from raymia.defenses import build_defense
    from raymia.inversion.gan import cache_key
    from raymia.inversion.plgmi import PLGMIParams

    data = load_dataset("synthetic", {"num_train": 40, "num_test": 10, "kind": "image", "image_size": 8})
    x, y, cpu = data.x_train, data.y_train, torch.device("cpu")
    for old in (True, False):
        ood = GanParams.model_validate({"n_dis" if old else "n_critic": 3}).settings()
        assert ood_gan_key(x, y, data.info, ood, 0, cpu) == "4138d5add0ba29230719"
        cgan = PLGMIParams.model_validate({"n_dis" if old else "n_critic": 3}).cgan()
        assert cache_key("plgmi-cgan", 1, x, data.info, cgan, 0, cpu) == "bcc86cd8670c4b52ef25"
        vae = build_defense("vae_metric_privacy", {"vae_batch" if old else "vae_batch_size": 32,
                                                   "vae_device": "cpu"}, data.info)
        assert vae.cache_key(data, 0, np.arange(10)) == "5339e9fb82b219bcb144"  # the VAE of the step loop (_ARCH_VERSION 2)


def test_list_and_help_show_the_new_name_and_mention_the_old(capsys):
    from raymia.cli import build_parser, cmd_list
    from raymia.inversion.plgmi import PLGMIParams
    from raymia.registry import param_table

    rows = {r[0]: r for r in param_table(PLGMIParams)}
    assert "n_dis" not in rows and rows["n_critic"][3].endswith("(also: n_dis)")
    assert "n_critic" in inspect.signature(PLGMIParams).parameters  # pydantic's would name the alias
    assert "n_dis" not in inspect.signature(PLGMIParams).parameters
    assert "n_critic (also: n_dis)" in PLGMIParams.__doc__
    assert cmd_list(build_parser().parse_args(["list", "ood"])) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "n_critic" in out and "(also: n_dis)" in out
