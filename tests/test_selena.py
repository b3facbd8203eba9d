"""SELENA: the Split-AI assignment and soft labels by hand, a member's soft label owes nothing to the member,
memorised members stop standing out, and an audit on digits measures less leakage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import raymia.defenses.selena as selena_mod
from raymia.audit import run_audit
from raymia.datainfo import DataInfo
from raymia.defenses import DEFENSES, build_defense
from raymia.defenses.base import FitJob, train_plain
from raymia.defenses.selena import Selena, split_ai_labels, split_assignment
from raymia.errors import SpecError
from raymia.spec import AuditSpec, TrainSpec

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")
INFO = DataInfo(num_classes=10, input_shape=(32,), kind="tabular")


def test_each_member_is_left_out_of_exactly_l_sub_models_drawn_uniformly():
    a = split_assignment(5000, 25, 10, seed=7)
    assert a.shape == (5000, 25) and (a.sum(axis=1) == 10).all()
    assert np.array_equal(a, split_assignment(5000, 25, 10, seed=7))
    assert not np.array_equal(a, split_assignment(5000, 25, 10, seed=8))
    per_sub = a.sum(axis=0)  # Binomial(5000, 0.4) each: mean 2000, std 34.6
    assert np.abs(per_sub - 2000).max() < 5 * 34.6


def test_soft_labels_by_hand():
    probs = torch.tensor([[[0.5, 0.5], [1.0, 0.0]],    # sub-model 0 on members 0 and 1
                          [[0.1, 0.9], [0.2, 0.8]],    # sub-model 1
                          [[0.3, 0.7], [0.6, 0.4]]])   # sub-model 2
    excluded = np.array([[True, False, True],          # member 0: left out of 0 and 2
                         [False, True, False]])        # member 1: left out of 1 only
    soft = split_ai_labels(probs, excluded)
    assert torch.allclose(soft, torch.tensor([[0.4, 0.6], [0.2, 0.8]]))


def test_l_must_be_below_k():
    with pytest.raises(SpecError) as e:
        DEFENSES.get("selena").parse({"sub_models": 4, "excluded_per_point": 4}, where="defense.params")
    assert e.value.where == "defense.params" and "excluded_per_point" in str(e.value)


def _job(x, y, recipe: TrainSpec) -> FitJob:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))
    return FitJob(m=0, model=model, x=x, y=y, recipe=recipe, device=CPU, seed=3,
                  steps_per_epoch=math.ceil(x.shape[0] / recipe.batch_size))


def _soft_labels(monkeypatch, job: FitJob, params: dict) -> tuple[torch.Tensor, nn.Module]:
    seen = []
    real = selena_mod.split_ai_labels

    def spy(probs, excluded):
        seen.append(real(probs, excluded))
        return seen[-1]

    monkeypatch.setattr(selena_mod, "split_ai_labels", spy)
    model = build_defense("selena", params, INFO).fit(job)
    return seen[0], model


def test_a_members_soft_label_owes_nothing_to_the_member(monkeypatch):
    """Changing member 0's label changes only the sub-models that train on it, none of which labels member
    0: its soft label is bit-identical, while other members' labels (from those sub-models) move."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(60, 32, generator=g), torch.randint(0, 10, (60,), generator=g)
    recipe = TrainSpec(epochs=5, batch_size=20, lr=0.01)
    params = {"sub_models": 4, "excluded_per_point": 2}
    soft, _ = _soft_labels(monkeypatch, _job(x, y, recipe), params)
    y2 = y.clone()
    y2[0] = (y[0] + 1) % 10
    soft2, _ = _soft_labels(monkeypatch, _job(x, y2, recipe), params)
    assert torch.equal(soft[0], soft2[0])
    assert not torch.equal(soft[1:], soft2[1:])


def test_memorised_members_stop_standing_out(monkeypatch):
    """Random labels: plain training memorises its members (a confidence gap of 0.85 over held-out points);
    SELENA's soft labels come from sub-models that never saw the member, which cannot know its random
    label (soft-label accuracy 0.11, chance), and the released model's gap falls to 0.02."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(600, 32, generator=g), torch.randint(0, 10, (600,), generator=g)
    xm, ym, xh, yh = x[:200], y[:200], x[400:], y[400:]
    recipe = TrainSpec(epochs=40, batch_size=50, lr=0.003)

    def gap(m: nn.Module) -> float:
        with torch.no_grad():
            cm = m(xm).softmax(dim=1).gather(1, ym[:, None]).mean()
            ch = m(xh).softmax(dim=1).gather(1, yh[:, None]).mean()
        return float(cm - ch)

    assert gap(train_plain(build_defense("none", {}, INFO), _job(xm, ym, recipe))) > 0.8
    d = build_defense("selena", {"sub_models": 6, "excluded_per_point": 3}, INFO)
    assert isinstance(d, Selena) and d.trains_itself()
    job = _job(xm, ym, recipe)
    soft, released = _soft_labels(monkeypatch, job, {"sub_models": 6, "excluded_per_point": 3})
    assert abs(gap(released)) < 0.1
    assert job.report["soft_label_accuracy"] < 0.2
    assert soft.shape == (200, 10) and torch.allclose(soft.sum(dim=1), torch.ones(200))


def test_too_few_members_for_the_split_is_one_line():
    x, y = torch.randn(2, 32), torch.tensor([0, 1])
    with pytest.raises(SpecError, match="has no member to train on") as e:
        build_defense("selena", {"sub_models": 25, "excluded_per_point": 24}, INFO).fit(
            _job(x, y, TrainSpec(epochs=1, batch_size=2)))
    assert e.value.where == "defense.params"


def test_audit_on_digits_measures_less_leakage_than_undefended(tmp_path):
    """The same bank recipe undefended and with SELENA (K 10, L 4): LiRA online's AUC drops by more than
    0.06 (measured 0.720 and 0.607), test accuracy within 0.06 (0.924 and 0.889)."""
    metrics = {}
    for name, params in (("none", {}), ("selena", {"sub_models": 10, "excluded_per_point": 4})):
        spec = AuditSpec.model_validate({
            "name": f"selena-{name}", "plan": {"num_models": 8, "population": 400},
            "model": {"params": {"hidden": [128]}}, "train": {"epochs": 30},
            "defense": {"name": name, "params": params},
            "attacks": [{"name": "lira_online"}],
            "bank": {"engine": "local", "pack_size": 8}, "tracking": {"enabled": False},
            "output_dir": str(tmp_path),
        })
        metrics[name] = run_audit(spec, console=False).flat_metrics()
    none, sel = metrics["none"], metrics["selena"]
    assert sel["lira_online/auc"] < none["lira_online/auc"] - 0.06
    assert sel["test_accuracy"] > none["test_accuracy"] - 0.06
    assert 0.8 < sel["defense/soft_label_accuracy"] <= 1.0


def test_a_long_sub_model_prints_a_progress_line(monkeypatch, caplog):
    """A CIFAR-10 ResNet's sub-models take hours: each one that trains long gets a line (here every one,
    with the threshold at 0 s); a digits-sized one prints nothing."""
    import logging

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 32, generator=g), torch.randint(0, 10, (40,), generator=g)
    params = {"sub_models": 3, "excluded_per_point": 1}
    with caplog.at_level(logging.INFO, logger="raymia"):
        build_defense("selena", params, INFO).fit(_job(x, y, TrainSpec(epochs=1, batch_size=20)))
    assert "SELENA sub-model" not in caplog.text
    monkeypatch.setattr(selena_mod, "PROGRESS_AFTER_S", 0.0)
    with caplog.at_level(logging.INFO, logger="raymia"):
        build_defense("selena", params, INFO).fit(_job(x, y, TrainSpec(epochs=1, batch_size=20)))
    lines = [r.getMessage() for r in caplog.records if "SELENA sub-model" in r.getMessage()]
    assert [ln.split(" trained")[0] for ln in lines] == [f"model 0: SELENA sub-model {k}/3" for k in (1, 2, 3)]


def test_sub_models_in_packs_are_the_sub_models_one_at_a_time(monkeypatch):
    """Where the bank trains packs (`FitJob.vectorize`), the sub-models train `pack_size` at a time: each
    draws its own batches, so the soft labels match those of one-at-a-time training to float tolerance,
    and member 0's soft label still owes nothing to member 0."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(60, 32, generator=g), torch.randint(0, 10, (60,), generator=g)
    recipe = TrainSpec(epochs=5, batch_size=20, lr=0.01)
    params = {"sub_models": 5, "excluded_per_point": 2}
    one, _ = _soft_labels(monkeypatch, _job(x, y, recipe), params)
    packed, _ = _soft_labels(monkeypatch, replace(_job(x, y, recipe), vectorize=True, pack_size=2), params)
    torch.testing.assert_close(packed, one, rtol=0, atol=1e-5)
    y2 = y.clone()
    y2[0] = (y[0] + 1) % 10
    packed2, _ = _soft_labels(monkeypatch, replace(_job(x, y2, recipe), vectorize=True, pack_size=2), params)
    assert torch.equal(packed[0], packed2[0]) and not torch.equal(packed[1:], packed2[1:])
