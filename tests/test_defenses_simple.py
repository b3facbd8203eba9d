"""Baselines that change one thing: each does what it claims, and a small bank trains with each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raymia.datainfo import DataInfo
from raymia.defenses import DEFENSES, build_defense
from raymia.defenses.simple import LOG_FLOOR
from raymia.errors import SpecError
from raymia.spec import AuditSpec, PlanSpec, TrainSpec
from raymia.train.bank import BankContext, train_pack

INFO = DataInfo(num_classes=5, input_shape=(4,), kind="tabular")


def test_label_smoothing_loss_is_smoothed_cross_entropy():
    d = build_defense("label_smoothing", {"smoothing": 0.2}, INFO, label_smoothing=0.05)
    logits, y = torch.randn(7, 5), torch.randint(0, 5, (7,))
    torch.testing.assert_close(d.loss(logits, y), F.cross_entropy(logits, y, label_smoothing=0.2))


def test_recipe_defenses():
    r = TrainSpec(epochs=40, weight_decay=0.0)
    assert build_defense("weight_decay", {"weight_decay": 0.01}, INFO).modify_recipe(r).weight_decay == 0.01
    assert build_defense("early_stopping", {"fraction": 0.25}, INFO).modify_recipe(r).epochs == 10
    assert build_defense("early_stopping", {"fraction": 0.001}, INFO).modify_recipe(r).epochs == 1
    ctx = BankContext.from_spec(AuditSpec.model_validate(
        {"plan": {"num_models": 2, "population": 100}, "train": {"epochs": 40},
         "defense": {"name": "early_stopping", "params": {"fraction": 0.5}}}))
    assert ctx.recipe.epochs == 20 and ctx.spec.train.epochs == 40


def test_confidence_postprocessing_keeps_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 5) * 3
    label = logits.argmax(1)
    hot = build_defense("confidence", {"temperature": 4.0}, INFO)
    out = hot.postprocess_logits(None, logits, g)
    assert torch.equal(out.argmax(1), label)
    assert (F.softmax(out, 1).max(1).values <= F.softmax(logits, 1).max(1).values + 1e-6).all()  # flatter
    top1 = build_defense("confidence", {"top_k": 1}, INFO).postprocess_logits(None, logits, g)
    assert torch.equal(top1.argmax(1), label)
    assert ((top1 > LOG_FLOOR).sum(1) == 1).all()  # only the top class is released
    torch.testing.assert_close(top1.exp().sum(1), torch.ones(500), atol=1e-6, rtol=0)
    r = build_defense("confidence", {"decimals": 1}, INFO).postprocess_logits(None, logits, g)
    assert torch.equal(r.argmax(1), label)
    p = r.exp()
    released = p[p > 1e-20]
    np.testing.assert_allclose(released.numpy() * 10, np.round(released.numpy() * 10), atol=1e-4)
    assert not build_defense("confidence", {}, INFO).modifies_outputs


@pytest.mark.parametrize(("name", "params", "needle"), [
    ("label_smoothing", {"smoothing": 1.0}, "smoothing"),
    ("weight_decay", {"weight_decay": -1}, "weight_decay"),
    ("early_stopping", {"fraction": 0}, "fraction"),
    ("confidence", {"temperature": 0}, "temperature"),
    ("confidence", {"top_k": 0}, "top_k"),
])
def test_bad_params(name, params, needle):
    with pytest.raises(SpecError, match=needle):
        DEFENSES.get(name).parse(params, where="defense.params")


@pytest.mark.parametrize("defense", [
    {"name": "label_smoothing", "params": {"smoothing": 0.1}},
    {"name": "weight_decay", "params": {"weight_decay": 1e-3}},
    {"name": "early_stopping", "params": {"fraction": 0.5}},
    {"name": "confidence", "params": {"temperature": 2.0, "top_k": 3, "decimals": 2}},
])
def test_small_bank_per_defense(defense):
    spec = AuditSpec.model_validate({"plan": {"num_models": 4, "population": 200}, "train": {"epochs": 3},
                                     "model": {"params": {"hidden": [32]}}, "defense": defense,
                                     "bank": {"pack_size": 4}})
    arrays, _ = train_pack(BankContext.from_spec(spec), 0, torch.device("cpu"))
    assert arrays["logits"].shape == (4, 2, 200, 10) and np.isfinite(arrays["logits"]).all()


def test_non_adaptive_bank_defends_only_the_targets():
    """attacker: non_adaptive trains the targets with the defense and every other model without it."""
    base = {"plan": {"num_models": 4, "population": 200, "targets": [0]}, "train": {"epochs": 3},
            "model": {"params": {"hidden": [32]}}, "bank": {"pack_size": 4},
            "defense": {"name": "confidence", "params": {"top_k": 1}}}
    na = AuditSpec.model_validate({**base, "attacker": "non_adaptive"})
    ad = AuditSpec.model_validate(base)
    assert na.fingerprint() != ad.fingerprint()
    out = train_pack(BankContext.from_spec(na), 0, torch.device("cpu"))[0]["logits"]
    released = (out > LOG_FLOOR).sum(-1)  # classes released per query
    assert (released[0] == 1).all()  # the target releases only its top class
    assert (released[1:] == 10).all()  # the shadows are undefended
    # changing the targets changes which models are defended, so the fingerprint moves too
    other = AuditSpec.model_validate({**base, "attacker": "non_adaptive",
                                      "plan": {**base["plan"], "targets": [1]}})
    assert other.fingerprint() != na.fingerprint()
    assert AuditSpec.model_validate({**base, "plan": {**base["plan"], "targets": [1]}}).fingerprint() \
        == ad.fingerprint()


def test_an_audit_attacks_every_model_by_default_and_a_non_adaptive_one_model_0():
    # leave-one-out over every model gives each metric its spread; a non-adaptive bank defends its targets,
    # and attacking all of them would leave no undefended shadow
    plan = {"num_models": 6}
    assert AuditSpec.model_validate({"plan": plan}).plan.target_list == [0, 1, 2, 3, 4, 5]
    na = AuditSpec.model_validate({"plan": plan, "attacker": "non_adaptive"})
    assert na.plan.target_list == [0]
    assert AuditSpec.model_validate(na.model_dump(mode="json")).plan.target_list == [0]  # as its spec.yaml reads
    given = AuditSpec.model_validate({"plan": {**plan, "targets": [2, 4]}, "attacker": "non_adaptive"})
    assert given.plan.target_list == [2, 4]
    assert AuditSpec(plan=PlanSpec(num_models=6), attacker="non_adaptive").plan.target_list == [0]  # from Python


def test_non_adaptive_banks_share_the_undefended_shadow_packs(tmp_path, caplog):
    """Two non-adaptive audits with different defense settings train the shadow-only packs once."""
    import logging

    from raymia.audit import run_audit

    caplog.set_level(logging.INFO, logger="raymia")
    base = {"plan": {"num_models": 8, "population": 200, "targets": [0]}, "train": {"epochs": 3},
            "model": {"params": {"hidden": [32]}}, "bank": {"pack_size": 4, "engine": "local"},
            "attacker": "non_adaptive", "tracking": {"enabled": False}, "output_dir": str(tmp_path),
            "attacks": [{"name": "loss"}, {"name": "lira_offline"}]}
    a = AuditSpec.model_validate({**base, "defense": {"name": "confidence", "params": {"top_k": 1}}})
    b = AuditSpec.model_validate({**base, "defense": {"name": "confidence", "params": {"top_k": 3}}})
    assert a.fingerprint() != b.fingerprint()
    assert a.pack_fingerprints() == b.pack_fingerprints() and set(a.pack_fingerprints()) == {1}
    run_audit(a, console=False)
    caplog.clear()
    res = run_audit(b, console=False)
    assert "reusing 1 of 2 stored packs" in caplog.text  # pack 1 (models 4-7, all shadows) is shared
    shared = tmp_path / "signals" / a.pack_fingerprints()[1] / "k4-pack-00001.npz"
    assert shared.exists()
    assert res.flat_metrics()["loss/auc"] is not None


def test_a_defense_states_its_name_once_and_its_own_loop_is_declared_by_fit():
    """The registry sets each class's `name`; `trains_itself` follows from overriding `fit`."""
    from raymia.defenses import DEFENSES

    own = {n for n in DEFENSES.names() if DEFENSES.get(n).obj.trains_itself()}
    assert all(DEFENSES.get(n).obj.name == n for n in DEFENSES.names())
    assert own == {"advreg", "dmp", "dpsgd", "llla", "memguard", "pruning", "relaxloss", "selena", "temperature_scaling", "tl_dmi"}


@pytest.mark.parametrize(
    ("name", "params", "recipe", "why"),
    [
        ("confidence", {}, {}, "temperature 1, no decimals and no top_k release the outputs unchanged"),
        ("confidence", {"top_k": 5}, {}, "top_k 5 of 5 classes release the outputs unchanged"),
        ("confidence", {"top_k": 4}, {}, None),
        ("confidence", {"decimals": 2}, {}, None),
        ("label_smoothing", {"smoothing": 0.1}, {"label_smoothing": 0.1}, "is the recipe's own train.label_smoothing"),
        ("label_smoothing", {"smoothing": 0.1}, {}, None),
        ("weight_decay", {"weight_decay": 5e-4}, {"weight_decay": 5e-4}, "is the recipe's own train.weight_decay"),
        ("weight_decay", {"weight_decay": 5e-4}, {}, None),
        ("early_stopping", {"fraction": 0.9}, {"epochs": 3}, "fraction 0.9 of the recipe's 3 epochs trains all"),
        ("early_stopping", {"fraction": 0.9}, {"epochs": 30}, None),
        ("advreg", {"lam": 0}, {}, "lam 0 gives the inference model's gain no weight"),
        ("advreg", {"lam": 0.5}, {}, None),
        ("memguard", {"epsilon": 0}, {}, "epsilon 0 allows no distortion"),
        ("memguard", {"epsilon": 0.1}, {}, None),
        ("dpsgd", {"noise_multiplier": 0}, {}, None),  # clipping still acts
    ],
)
def test_a_setting_that_releases_the_undefended_model_says_why(name, params, recipe, why):
    d = build_defense(name, params, INFO)
    got = d.inert(TrainSpec(**recipe))
    assert got == why if why is None else why in got
    if name in ("confidence", "memguard"):  # an output defense that does not act post-processes nothing
        assert d.modifies_outputs is (why is None)
