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
    if path.stem != "quickstart":
        assert path.stem.split("-", 1)[1] == spec.sweep.defense
    # the searched defense accepts the spec's model (e.g. DP-SGD refuses BatchNorm models)
    shape = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}[spec.data.name]
    info = DataInfo(num_classes=10, input_shape=shape, kind="image")
    build_defense(spec.sweep.defense, {}, info).check(spec.model.name, info)
