"""Training-time defenses (adversarial regularisation, pruning): what each one promises; the parameter
validation of those and of RelaxLoss and MemGuard, and one small bank per defense through the bank's hooks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import raymia.defenses.pruning as pruning_mod
from raymia.datainfo import DataInfo
from raymia.defenses import DEFENSES, build_defense
from raymia.defenses.advreg import AdvReg, minmax_train
from raymia.defenses.base import FitJob
from raymia.defenses.pruning import Pruning, prunable_layers
from raymia.defenses.relaxloss import RelaxLoss
from raymia.errors import SpecError
from raymia.models import build_model
from raymia.space import Categorical
from raymia.spec import AuditSpec, TrainSpec
from raymia.train.bank import BankContext, train_pack

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def _job(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: TrainSpec, ref_x: torch.Tensor | None = None,
         ref_y: torch.Tensor | None = None, seed: int = 1) -> FitJob:
    return FitJob(m=0, model=model, x=x, y=y, recipe=recipe, device=CPU, seed=seed,
                  steps_per_epoch=math.ceil(x.shape[0] / recipe.batch_size), reference_x=ref_x, reference_y=ref_y)


def _model(name: str, params: dict, info: DataInfo, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, params, info)


# --- pruning ---------------------------------------------------------------------------------------------
def _fit_pruning(monkeypatch, model: nn.Module, job: FitJob, info: DataInfo, **params):
    """Fit with the pruning defense, capturing the masks it applies before retraining."""
    seen: list[dict[str, torch.Tensor]] = []
    real = pruning_mod.apply_masks

    def spy(m: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        seen.append({k: v.clone() for k, v in masks.items()})
        real(m, masks)

    monkeypatch.setattr(pruning_mod, "apply_masks", spy)
    d = build_defense("pruning", params, info)
    assert isinstance(d, Pruning) and d.trains_itself()
    trained = d.fit(job)
    assert len(seen) == 1
    return trained, seen[0]


def _assert_pruned_stay_zero(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][mask == 0] == 0.0), name
        assert torch.any(params[name][mask == 1] != 0.0), name  # the kept weights were trained


def _train_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(dim=1) == y).float().mean())


@pytest.mark.parametrize("method,recipe", [
    ("magnitude", TrainSpec(epochs=24, batch_size=64, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)),
    ("admm", TrainSpec(epochs=18, batch_size=64, optimizer="adam", lr=0.003, schedule="cosine")),
])
def test_unstructured_pruning_reaches_sparsity_and_keeps_zeros(monkeypatch, digits, method, recipe):
    x, y = digits.x_train[:400], digits.y_train[:400]
    model = _model("mlp", {"hidden": [128, 64]}, digits.info)
    job = _job(model, x, y, recipe)
    trained, masks = _fit_pruning(monkeypatch, model, job, digits.info, sparsity=0.7, method=method)
    layers = prunable_layers(trained)
    assert [n for n, _ in layers] == ["1", "3"]  # the classifier layer is not pruned
    assert abs(job.report["sparsity"] - 0.7) <= 0.01
    assert set(masks) == {"1.weight", "3.weight"}
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    assert abs(zeros / sum(m.numel() for m in masks.values()) - 0.7) <= 0.01
    _assert_pruned_stay_zero(trained, masks)
    assert _train_accuracy(trained, x, y) > 0.8


def test_filter_pruning_zeroes_whole_filters(monkeypatch, digits):
    x, y = digits.x_train[:300], digits.y_train[:300]
    model = _model("cnn", {"channels": [20, 40], "hidden": 40}, digits.info)
    job = _job(model, x, y, TrainSpec(epochs=12, batch_size=64, lr=0.01))
    trained, masks = _fit_pruning(monkeypatch, model, job, digits.info, sparsity=0.7, structure="filter")
    assert abs(job.report["sparsity"] - 0.7) <= 0.01
    _assert_pruned_stay_zero(trained, masks)
    layers = prunable_layers(trained)
    assert len(layers) == 3  # conv1, conv2, hidden fc
    for _, layer in layers:
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        dead = (w == 0).all(dim=1)
        assert int(dead.sum()) == round(0.7 * w.shape[0])
        assert torch.all(layer.bias[dead] == 0.0)
        assert int((w == 0).sum()) == int(dead.sum()) * w.shape[1]  # no zeros outside whole filters
    assert _train_accuracy(trained, x, y) > 0.8


def test_admm_follows_the_reference_z_u_recursion():
    """The ADMM pruning code MCMIA builds on (`admm.py`: admm_initialization, z_u_update, append_admm_loss):
    Z0 = Proj(W0), U0 = 0; at each update Z = Proj(W + U) (per layer: keep the largest magnitudes),
    U = U + W - Z; the W-step adds rho/2 sum ||W - Z + U||^2. The W-step's training is scripted here (the
    weights are set to known values at every step), so Z, U, the proximal term and the returned mask are
    known answers."""
    info = DataInfo(num_classes=2, input_shape=(4,), kind="tabular")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    layers = prunable_layers(model)
    d = build_defense("pruning", {"sparsity": 0.5, "method": "admm", "rho": 0.1}, info)
    assert isinstance(d, Pruning)
    spe, epochs = 2, 3
    g = torch.Generator().manual_seed(1)
    scripted = [{n: torch.randn(m.weight.shape, generator=g) for n, m in layers} for _ in range(spe * epochs)]

    def proj(w: torch.Tensor) -> torch.Tensor:
        k = round(0.5 * w.numel())
        keep = torch.ones(w.numel())
        keep[w.abs().flatten().argsort()[:k]] = 0.0
        return w * keep.view_as(w)

    z = {n: proj(m.weight.detach().clone()) for n, m in layers}
    u = {n: torch.zeros_like(m.weight) for n, m in layers}
    seen: list[float] = []

    def phase(name, epochs_, extra_loss=None, after_step=None):
        assert name == "admm" and epochs_ == epochs
        for step in range(epochs_ * spe):
            with torch.no_grad():
                for n, m in layers:
                    m.weight.copy_(scripted[step][n])
            seen.append(float(extra_loss().detach()))
            after_step(step)

    masks = d._admm(layers, phase, epochs, spe)
    want: list[float] = []
    for step in range(spe * epochs):
        w = scripted[step]
        want.append(float(0.05 * sum(((w[n] - z[n] + u[n]) ** 2).sum() for n in w)))
        if (step + 1) % spe == 0:
            z = {n: proj(w[n] + u[n]) for n in w}
            u = {n: u[n] + w[n] - z[n] for n in w}
    assert seen == pytest.approx(want, rel=1e-6)
    for n in z:
        assert torch.equal(masks[f"{n}.weight"], (z[n] != 0).float()), n
        assert int((masks[f"{n}.weight"] == 0).sum()) == round(0.5 * z[n].numel())


def test_pruning_with_minmax_game(monkeypatch):
    info = DataInfo(num_classes=4, input_shape=(16,), kind="tabular")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(160, 16, generator=g), torch.randint(0, 4, (160,), generator=g)
    model = _model("mlp", {"hidden": [64]}, info)
    job = _job(model, x[:80], y[:80], TrainSpec(epochs=6, batch_size=20, lr=0.003), x[80:], y[80:])
    trained, masks = _fit_pruning(monkeypatch, model, job, info, sparsity=0.5, minmax_lambda=1.0,
                                  method="admm", admm_epochs=2)
    _assert_pruned_stay_zero(trained, masks)
    assert abs(job.report["sparsity"] - 0.5) <= 0.01
    assert 0.0 <= job.report["inference_accuracy"] <= 1.0
    assert all(torch.isfinite(p).all() for p in trained.parameters())


def test_pruning_refuses_a_model_with_nothing_to_prune_before_training(tmp_path):
    """A lone classifier layer (mlp without hidden layers) is refused where `raymia check` and the audit
    validate the spec (the model counted on the meta device), not in the first model's fit."""
    spec = AuditSpec.model_validate({"plan": {"num_models": 4, "population": 200}, "defense": "pruning",
                                     "model": {"name": "mlp", "params": {"hidden": []}}, "output_dir": str(tmp_path)})
    with pytest.raises(SpecError) as e:
        BankContext.from_spec(spec, setup=False)
    assert str(e.value) == ("defense.name: pruning needs a conv or linear layer before the classifier layer; model "
                            "'mlp' has none")


# --- adversarial regularisation --------------------------------------------------------------------------
def test_advreg_refuses_a_warmup_that_leaves_the_game_no_epoch(tmp_path):
    """warmup_epochs >= train.epochs: the models would train plainly under the defense's name. Refused by
    `raymia check` (and every audit) before training; one epoch of the game is accepted, and lam 0 (plain
    training by definition) is not refused."""
    import yaml

    from raymia.check import check_spec

    def spec(warmup: int, lam: float = 1.0):
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump({
            "plan": {"num_models": 4, "population": 200}, "model": {"params": {"hidden": [16]}},
            "train": {"epochs": 5}, "defense": {"name": "advreg", "params": {"warmup_epochs": warmup, "lam": lam}},
            "tracking": {"enabled": False}, "output_dir": str(tmp_path / "runs")}))
        return path

    with pytest.raises(SpecError) as e:
        check_spec(spec(5))
    assert str(e.value) == ("defense.params.warmup_epochs: warmup_epochs 5 is not below train.epochs 5: the game "
                            "would never start; accepted: 0 to 4")
    assert "warmup_epochs=4" in dict(check_spec(spec(4)).rows)["defense"]
    check_spec(spec(5, lam=0.0))


def test_advreg_shrinks_member_confidence_gap():
    """Random labels: plain training memorises its members (confidence near 1, non-members near chance);
    the game with lambda = 3 brings the members' confidence back towards the non-members'."""
    info = DataInfo(num_classes=10, input_shape=(32,), kind="tabular")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 32, generator=g), torch.randint(0, 10, (400,), generator=g)
    xm, ym, xr, yr = x[:200], y[:200], x[200:], y[200:]

    def gap(lam: float) -> tuple[float, FitJob, nn.Module]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))
        job = _job(model, xm, ym, TrainSpec(epochs=40, batch_size=50, lr=0.003), xr, yr)
        d = build_defense("advreg", {"lam": lam}, info)
        assert isinstance(d, AdvReg) and d.trains_itself()
        trained = d.fit(job)
        assert all(torch.isfinite(p).all() for p in trained.parameters())
        with torch.no_grad():
            cm = trained(xm).softmax(dim=1).gather(1, ym[:, None]).mean()
            cr = trained(xr).softmax(dim=1).gather(1, yr[:, None]).mean()
        return float(cm - cr), job, trained

    plain, job0, _ = gap(0.0)
    game, job3, _ = gap(3.0)
    assert plain > 0.7
    assert game < plain - 0.3
    assert "inference_accuracy" not in job0.report
    assert 0.5 <= job3.report["inference_accuracy"] <= 1.0


def test_minmax_step_is_nasr_et_al_algorithm_1_by_hand():
    """Nasr, Shokri, Houmansadr 2018, Algorithm 1, re-written: k = 2 Adam steps of h ascending
    mean log h(f(x), y) over members + mean log(1 - h(f(x'), y')) over reference points (classifier in eval
    mode), then one SGD step of the classifier on CE + lambda * mean log h over members (h frozen). With
    full batches (batch = members = reference points) the batches' order does not matter, so one call of
    minmax_train must equal the hand-written step."""
    import torch.nn.functional as F

    from raymia.defenses.advreg import InferenceModel
    from raymia.seeding import derive_seed

    info = DataInfo(num_classes=3, input_shape=(6,), kind="tabular")
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    xm, ym, xr, yr = x[:20], y[:20], x[20:], y[20:]
    recipe = TrainSpec(epochs=1, batch_size=20, optimizer="sgd", lr=0.5, momentum=0.0)
    lam, k, seed = 3.0, 2, 11

    model = _model("mlp", {"hidden": [16]}, info)
    ref = _model("mlp", {"hidden": [16]}, info)
    minmax_train(model, xm, ym, xr, yr, recipe, 1, lam, num_classes=3, inference_steps=k, seed=seed)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "inference-init"))
        h = InferenceModel(3)
    h_opt = torch.optim.Adam(h.parameters(), lr=1e-3)
    om, orf = torch.eye(3)[ym], torch.eye(3)[yr]
    for _ in range(k):
        with torch.no_grad():
            pm, pr = ref.eval()(xm), ref(xr)
        gain = torch.log(torch.sigmoid(h(pm, om))).mean() + torch.log(1 - torch.sigmoid(h(pr, orf))).mean()
        h_opt.zero_grad()
        (-gain).backward()  # ascend the gain
        h_opt.step()
    h.requires_grad_(False)
    logits = ref.train()(xm)
    loss = F.cross_entropy(logits, ym) + lam * torch.log(torch.sigmoid(h(logits, om))).mean()
    ref.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.5 * p.grad
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_minmax_train_is_seeded_and_respects_masks():
    info = DataInfo(num_classes=3, input_shape=(8,), kind="tabular")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(60, 8, generator=g), torch.randint(0, 3, (60,), generator=g)
    recipe = TrainSpec(epochs=1, batch_size=10, optimizer="sgd", lr=0.1, momentum=0.9)
    outs = []
    for _ in range(2):
        model = _model("mlp", {"hidden": [16]}, info)
        mask = {"1.weight": (torch.rand(16, 8, generator=torch.Generator().manual_seed(2)) > 0.5).float()}
        minmax_train(model, x[:30], y[:30], x[30:], y[30:], recipe, 12, 2.0, num_classes=3, seed=5,
                     inference_steps=2, param_mask=mask)
        assert torch.all(model[1].weight[mask["1.weight"] == 0] == 0.0)
        outs.append(model(x).detach())
    torch.testing.assert_close(outs[0], outs[1])
    with pytest.raises(ValueError, match="reference"):
        minmax_train(_model("mlp", {"hidden": [16]}, info), x, y, None, None, recipe, 2, 1.0, num_classes=3)


# RelaxLoss and MemGuard: tests/test_relaxloss_memguard.py (known answers, training, attacks).


# --- declarations and validation -------------------------------------------------------------------------
@pytest.mark.parametrize("name,raw,field", [
    ("advreg", {"lam": -1.0}, "lam"),
    ("advreg", {"inference_steps": 0}, "inference_steps"),
    ("advreg", {"inference_lr": 0.0}, "inference_lr"),
    ("advreg", {"warmup_epochs": -1}, "warmup_epochs"),
    ("advreg", {"lambda": 1.0}, "lambda"),
    ("relaxloss", {"alpha": 0.0}, "alpha"),
    ("relaxloss", {"alpha": "high"}, "alpha"),
    ("relaxloss", {"upper": 0.0}, "upper"),
    ("relaxloss", {"flatten": "both"}, "flatten"),
    ("memguard", {"epsilon": -0.1}, "epsilon"),
    ("memguard", {"mode": "flatten"}, "mode"),
    ("memguard", {"defense_optimizer": "rmsprop"}, "defense_optimizer"),
    ("memguard", {"max_iter": 1}, "max_iter"),
    ("pruning", {"sparsity": 1.0}, "sparsity"),
    ("pruning", {"structure": "channel"}, "structure"),
    ("pruning", {"method": "lottery"}, "method"),
    ("pruning", {"rho": 0.0}, "rho"),
    ("pruning", {"admm_epochs": -1}, "admm_epochs"),
    ("pruning", {"retrain_fraction": 0.0}, "retrain_fraction"),
    ("pruning", {"minmax_lambda": -0.5}, "minmax_lambda"),
])
def test_bad_params_raise_spec_error(name, raw, field):
    with pytest.raises(SpecError) as ei:
        DEFENSES.get(name).parse(raw, where="defense.params")
    assert ei.value.where == "defense.params"
    assert field in str(ei.value)


@pytest.mark.parametrize("name", ["advreg", "relaxloss", "memguard", "pruning", "dmp", "selena", "vae_metric_privacy",
                                  "tl_dmi"])
def test_declarations(name):
    entry = DEFENSES.get(name)
    assert entry.obj.name == name
    assert all(f.description for f in entry.params.model_fields.values())
    defaults = entry.parse({}, where="defense.params")
    space = entry.obj.search_space()
    assert space
    for param, domain in space.items():
        assert param in entry.params.model_fields
        assert domain.contains(getattr(defaults, param)), param
        bounds = domain.choices if isinstance(domain, Categorical) else (domain.low, domain.high)
        for v in bounds:  # every corner of the space is a valid setting (as the sweep checks: alone, its mode
            entry.parse({param: v}, where="defense.params", alone=True)  # checked with the space's)


def test_declared_ranges():
    # REFERENCE 1.1: eps log [0.1, 100], latent_dim, beta, VAE epochs / lr, mean or sample, class-conditional
    assert set(DEFENSES.get("vae_metric_privacy").obj.search_space()) == {
        "epsilon", "latent_dim", "beta", "vae_epochs", "vae_lr", "encode", "class_conditional"}
    assert set(AdvReg.search_space()["lam"].choices) == {0.5, 1.0, 3.0, 6.0, 10.0}
    space = Pruning.search_space()
    assert (space["sparsity"].low, space["sparsity"].high) == (0.5, 0.95)
    assert (space["rho"].low, space["rho"].high, space["rho"].log) == (1e-4, 1e-2, True)
    assert set(space["structure"].choices) == {"unstructured", "filter"}
    relax = RelaxLoss.search_space()["alpha"]
    assert (relax.low, relax.high, relax.log) == (0.01, 2.0, True)  # below ln 10: see RelaxLoss.check


# --- one small bank per defense --------------------------------------------------------------------------
BANK_CASES = {
    "advreg": ({"lam": 1.0, "warmup_epochs": 1}, None),
    "relaxloss": ({"alpha": 0.3}, None),
    "memguard": ({"epsilon": 0.5, "defense_optimizer": "adam", "defense_epochs": 20, "max_iter": 30}, None),
    "pruning": ({"sparsity": 0.6, "method": "admm", "admm_epochs": 1, "minmax_lambda": 1.0}, None),
}


@pytest.mark.parametrize("name", list(BANK_CASES))
def test_bank_with_defense(name):
    params, vectorize = BANK_CASES[name]
    spec = AuditSpec.model_validate({
        "plan": {"num_models": 4, "population": 200},
        "model": {"name": "mlp", "params": {"hidden": [32]}},
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.01},
        "defense": {"name": name, "params": params},
        "queries": ["identity", "hflip"],
        "bank": {"pack_size": 4},
    })
    ctx = BankContext.from_spec(spec)
    out, reports = train_pack(ctx, 0, CPU, vectorize=vectorize)
    n_test = ctx.data.x_test.shape[0]
    assert out["logits"].shape == (4, 2, 200, 10)
    assert out["test_logits"].shape == (4, 2, n_test, 10)
    assert np.isfinite(out["logits"]).all() and np.isfinite(out["test_logits"]).all()
    assert list(out["models"]) == [0, 1, 2, 3]
    assert len(reports) == 4
    if name == "pruning":
        assert all(abs(r["sparsity"] - 0.6) <= 0.01 for r in reports)
    if name == "advreg":
        assert all(0.0 <= r["inference_accuracy"] <= 1.0 for r in reports)
    if name == "memguard":
        assert all(0.0 <= r["defense_model_accuracy"] <= 1.0 for r in reports)
    if name == "relaxloss":
        assert all(r["train_ce"] > 0.0 for r in reports)
