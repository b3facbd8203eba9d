"""Every ready spec in sweeps/ validates, names registered parts, and its search space resolves."""

from __future__ import annotations

from pathlib import Path

import pytest

from raymia.defenses import build_defense
from raymia.defenses.base import DataInfo
from raymia.spec import SweepSpec, load_spec
from raymia.sweep import _check_objective_names, resolve_space

SWEEPS = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))


def test_there_are_sweeps():
    names = {p.stem for p in SWEEPS}
    assert "quickstart" in names and any(n.startswith("cifar10-") for n in names)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_file_is_valid(path):
    spec = load_spec(path, kind=SweepSpec)
    space = resolve_space(spec)
    assert space, f"{path.name}: empty search space"
    _check_objective_names(spec, [o.metric for o in spec.sweep.objectives])
    suffix = path.stem.split("-", 1)[-1]
    if suffix == "all":
        assert len(space) >= 8, sorted(space)
    elif path.stem != "quickstart":
        assert suffix == spec.sweep.defense and list(space) == [suffix]
    # every searched defense accepts the spec's model (e.g. DP-SGD refuses BatchNorm models)
    info = {"digits": DataInfo(10, (1, 8, 8), "image"), "cifar10": DataInfo(10, (3, 32, 32), "image"),
            "purchase100": DataInfo(100, (600,), "tabular")}[spec.data.name]
    for d in space:
        build_defense(d, {}, info).check(spec.model.name, info)


def test_several_defenses_in_one_sweep():
    """defenses: each trial picks one defense and samples its own space; params are split back per defense."""
    import optuna

    from raymia.sweep import DefineByRun, split_config, trial_spec

    spec = SweepSpec.model_validate({"sweep": {"defenses": [
        "hamp", {"name": "confidence", "space": {"top_k": {"choices": [1, 2]}}}]}})
    space = resolve_space(spec)
    assert list(space) == ["hamp", "confidence"]
    ask = DefineByRun(space, include_undefended=True)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
    seen = []
    for _ in range(12):
        t = study.ask()
        const = ask(t)
        config = {**t.params, **const}
        name, params = split_config(config)
        seen.append(name)
        audit = trial_spec(spec.model_dump(mode="json"), config)
        assert audit["defense"] == {"name": name, "params": params} and "sweep" not in audit
        if name == "confidence":
            assert params["top_k"] in (1, 2) and set(params) == {"temperature", "top_k", "decimals"}
        study.tell(t, [0.5, 0.5])
    assert seen[0] == "none" and seen.count("none") == 1 and {"hamp", "confidence"} <= set(seen)
    with pytest.raises(Exception, match="either defense"):
        SweepSpec.model_validate({"sweep": {"defense": "hamp", "defenses": ["confidence"]}})
