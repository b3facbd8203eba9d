"""DP-SGD: the mechanism (Poisson batch, per-example clipping, noise scale), the accountant, the BatchNorm
check, and an audit with label-flipped canaries: the empirical epsilon lower bound must stay below the
accounted epsilon of a DP-SGD bank, while the same audit finds a large bound on an undefended bank."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from raymia.attacks import run_attack
from raymia.datainfo import DataInfo
from raymia.defenses import DEFENSES, build_defense
from raymia.defenses.base import FitJob
from raymia.defenses.dpsgd import (
    DpSgd,
    accounted_epsilon,
    clip_and_sum,
    noisy_gradient,
    per_example_grads,
    poisson_batch,
)
from raymia.errors import SpecError
from raymia.metrics import accuracy, epsilon_lower_bound
from raymia.models import build_model
from raymia.signals import Signals
from raymia.spec import AuditSpec, TrainSpec
from raymia.train.bank import BankContext, train_model
from raymia.train.infer import query_logits

TAB_INFO = DataInfo(num_classes=3, input_shape=(5,), kind="tabular")
CIFAR_INFO = DataInfo(num_classes=10, input_shape=(3, 32, 32), kind="image")


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _data(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _defense(**params) -> DpSgd:
    d = build_defense("dpsgd", params, TAB_INFO)
    assert isinstance(d, DpSgd)
    return d


# ------------------------------------------------------------------------------------------- the mechanism
def test_noise_free_unclipped_step_is_an_sgd_step_on_the_poisson_batch():
    x, y = _data()
    n, q = x.shape[0], 0.25
    idx = poisson_batch(n, q, torch.Generator().manual_seed(3))
    assert 0 < idx.numel() < n
    dp, ref = _tiny(), _tiny()
    g = noisy_gradient(dp, _defense().loss_per_example, x[idx], y[idx], 0.0, 1e6, q * n,
                       torch.Generator().manual_seed(0))
    # Plain SGD on the same batch: summed loss over the drawn examples, divided by the EXPECTED size q n.
    (F.cross_entropy(ref(x[idx]), y[idx], reduction="sum") / (q * n)).backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(g[name], p.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        for name, p in dp.named_parameters():
            p -= 0.1 * g[name]
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    for a, b in zip(dp.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


def test_fit_with_full_batch_and_no_noise_matches_plain_sgd():
    """q = 1 (batch >= n) and one epoch: fit takes exactly one step on the whole set."""
    x, y = _data(n=24)
    recipe = TrainSpec(optimizer="sgd", lr=0.5, momentum=0.0, epochs=1, batch_size=24)
    job = FitJob(m=0, model=_tiny(), x=x, y=y, recipe=recipe, device=torch.device("cpu"), seed=7, steps_per_epoch=1)
    trained = _defense(noise_multiplier=0.0, max_grad_norm=1e6).fit(job)
    ref = _tiny()
    F.cross_entropy(ref(x), y).backward()
    torch.optim.SGD(ref.parameters(), lr=0.5).step()
    for a, b in zip(trained.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    assert job.report["sampling_rate"] == 1.0 and job.report["steps"] == 1.0
    assert job.report["epsilon"] == math.inf  # no noise, no privacy


def test_every_per_example_gradient_is_clipped():
    x, y = _data()
    model, c = _tiny(), 0.01
    grads, _ = per_example_grads(model, _defense().loss_per_example, x, y)
    summed, norms = clip_and_sum(grads, c)
    assert torch.all(norms > c)  # clipping is active for every example
    scale = (c / (norms + 1e-6)).clamp(max=1.0)
    clipped = torch.sqrt(sum((scale[:, None] * g.flatten(1)).pow(2).sum(1) for g in grads.values()))
    assert torch.all(clipped <= c * (1 + 1e-5))
    total = torch.sqrt(sum(s.pow(2).sum() for s in summed.values()))
    assert total <= x.shape[0] * c * (1 + 1e-5)
    # Chunked computation (physical batches) gives the same clipped sum.
    g = noisy_gradient(model, _defense().loss_per_example, x, y, 0.0, c, 1.0, torch.Generator(), physical_batch_size=7)
    for k in summed:
        torch.testing.assert_close(g[k], summed[k], rtol=1e-5, atol=1e-8)


def test_noise_std_is_sigma_c_over_expected_batch_and_an_empty_batch_still_gets_noise():
    x, y = _data()
    model, sigma, c, expected = _tiny(), 1.5, 0.5, 8.0
    gen = torch.Generator().manual_seed(11)
    loss = _defense().loss_per_example
    draws = [torch.cat([v.flatten() for v in noisy_gradient(model, loss, x[:0], y[:0], sigma, c, expected,
                                                            gen).values()]) for _ in range(100)]
    noise = torch.stack(draws)  # empty batch: the gradient is pure noise
    want = sigma * c / expected
    assert abs(noise.std().item() / want - 1) < 0.1
    assert abs(noise.mean().item()) < 0.1 * want
    # On a real batch, the noise is the same variable added to the clipped sum.
    clean = noisy_gradient(model, loss, x, y, 0.0, c, expected, gen)
    noisy = noisy_gradient(model, loss, x, y, sigma, c, expected, gen)
    diff = torch.cat([(noisy[k] - clean[k]).flatten() for k in clean])
    assert abs(diff.std().item() / want - 1) < 0.1


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_clipped_noised_gradient_equals_opacus_dp_optimizer():
    """Reference code: opacus' GradSampleModule + DPOptimizer (clip_and_accumulate, add_noise, scale_grad
    with expected_batch_size, loss_reduction 'mean') on the same Poisson batch. Without noise the two
    gradients agree to float32 rounding with every example clipped; with noise, opacus' deviation from the
    clean gradient has raymia's std sigma C / expected batch."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    x, y = _data()
    idx = poisson_batch(x.shape[0], 0.25, torch.Generator().manual_seed(3))
    c, sigma, expected = 0.05, 2.0, 10
    loss = _defense().loss_per_example

    def opacus_grad(noise: float, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        m = GradSampleModule(_tiny())
        opt = DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=noise, max_grad_norm=c,
                          expected_batch_size=expected)
        F.cross_entropy(m(x[idx]), y[idx]).backward()
        opt.pre_step()
        return torch.cat([p.grad.flatten() for p in m._module.parameters()])

    ours = noisy_gradient(_tiny(), loss, x[idx], y[idx], 0.0, c, float(expected), torch.Generator())
    grads, _ = per_example_grads(_tiny(), loss, x[idx], y[idx])
    assert torch.all(clip_and_sum(grads, c)[1] > c)  # clipping active for every drawn example
    ours_flat = torch.cat([ours[k].flatten() for k, _ in _tiny().named_parameters()])
    torch.testing.assert_close(ours_flat, opacus_grad(0.0, 0), rtol=1e-5, atol=1e-9)
    dev = torch.stack([opacus_grad(sigma, s) - ours_flat for s in range(40)])
    assert abs(dev.std().item() / (sigma * c / expected) - 1) < 0.1


def test_poisson_batch_has_rate_q():
    sizes = [poisson_batch(1000, 0.1, torch.Generator().manual_seed(s)).numel() for s in range(50)]
    assert abs(np.mean(sizes) - 100) < 5
    assert len(set(sizes)) > 5  # the size varies: sampling is per example, not a fixed-size batch


# ------------------------------------------------------------------------------------------- the accountant
def test_epsilon_falls_as_noise_rises_and_matches_opacus():
    q, steps, delta = 0.01, 1000, 1e-5
    eps = [accounted_epsilon(s, q, steps, delta) for s in (0.5, 1.0, 2.0)]
    assert eps[0] > eps[1] > eps[2] > 0, eps
    for s, e in zip((0.5, 1.0, 2.0), eps):
        acc = RDPAccountant()
        for _ in range(steps):
            acc.step(noise_multiplier=s, sample_rate=q)
        assert e == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-9)
    prv = PRVAccountant()
    prv.history = [(1.0, q, steps)]
    assert accounted_epsilon(1.0, q, steps, delta, "prv") == pytest.approx(prv.get_epsilon(delta=delta), rel=1e-3)
    assert accounted_epsilon(1.0, q, steps, delta, "prv") < eps[1]  # PRV is the tighter accountant
    assert accounted_epsilon(0.0, q, steps, delta) == math.inf


def test_smallest_alpha_warning_becomes_one_line_per_setting(caplog, recwarn):
    """Opacus warns once per model that its best Renyi order is the smallest; a bank of 8 models with one
    setting gets one raymia line that carries the epsilon it qualifies, and no Python warning."""
    import logging

    from raymia.defenses import dpsgd

    dpsgd._NOTED.clear()
    with caplog.at_level(logging.WARNING, logger="raymia"):
        eps = [accounted_epsilon(0.3, 0.5, 1000, 1e-5) for _ in range(8)]
        accounted_epsilon(1.0, 0.01, 100, 1e-5)  # a moderate epsilon: nothing to say
    lines = [r.getMessage() for r in caplog.records if "smallest" in r.getMessage()]
    assert len(lines) == 1 and f"epsilon {eps[0]:.4g} " in lines[0] and "upper bound" in lines[0]
    assert not [w for w in recwarn if "alpha" in str(w.message)]
    assert all(e == eps[0] for e in eps) and eps[0] > 100


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_target_epsilon_mode(accountant):
    d = _defense(target_epsilon=2.0, delta=1e-5, accountant=accountant, noise_multiplier=0.1)
    run = d.resolve(n=673, epochs=20, recipe_batch=64)
    assert run["sampling_rate"] == pytest.approx(64 / 673) and run["steps"] == 20 * 11
    assert run["noise_multiplier"] > 1.0  # the target overrides noise_multiplier
    eps = accounted_epsilon(run["noise_multiplier"], run["sampling_rate"], int(run["steps"]), 1e-5, accountant)
    assert 0.95 * 2.0 <= eps <= 2.0
    assert d.privacy_guarantee() == {"epsilon_target": 2.0}


def test_default_delta_and_overrides():
    d = _defense(batch_size=32)
    run = d.resolve(n=1000, epochs=3, recipe_batch=64)
    assert run["delta"] == pytest.approx(1000 ** -1.1) and run["delta"] < 1 / 1000
    assert run["sampling_rate"] == pytest.approx(0.032) and run["steps"] == 3 * 32
    assert run["noise_multiplier"] == 1.0
    assert d.privacy_guarantee() is None


# ------------------------------------------------------------------------------- registration and checks
def test_registered_with_validated_params_and_space():
    entry = DEFENSES.get("dpsgd")
    assert entry.obj is DpSgd and DpSgd.trains_itself()
    for bad in ({"noise_multiplier": -1.0}, {"max_grad_norm": 0.0}, {"accountant": "gdp"}, {"delta": 1.0},
                {"target_epsilon": 0.0}, {"sigma": 1.0}):
        with pytest.raises(SpecError):
            build_defense("dpsgd", bad, TAB_INFO)
    for name, dom in DpSgd.search_space().items():
        entry.parse({name: dom.low}, where="x")
        entry.parse({name: dom.high}, where="x")
    assert all(f.description for f in entry.params.model_fields.values())


def test_check_refuses_batch_norm_models():
    d = build_defense("dpsgd", {}, CIFAR_INFO)
    with pytest.raises(SpecError, match="dpsgd.*resnet18.*BatchNorm"):
        d.check("resnet18", CIFAR_INFO)  # ResNet-18 always has BatchNorm
    for ok in ("mlp", "cnn", "lenet5"):
        d.check(ok, CIFAR_INFO)
    # ... and a model that has BatchNorm through its params: before training (from the spec's params) ...
    with pytest.raises(SpecError, match="dpsgd.*'cnn'.*BatchNorm"):
        d.check("cnn", CIFAR_INFO, {"batch_norm": True})
    d.check("cnn", CIFAR_INFO, {"batch_norm": False})
    # ... and again when it is trained (a model built some other way).
    torch.manual_seed(0)
    model = build_model("cnn", {"batch_norm": True}, CIFAR_INFO)
    job = FitJob(m=0, model=model, x=torch.zeros(4, 3, 32, 32), y=torch.zeros(4, dtype=torch.int64),
                 recipe=TrainSpec(), device=torch.device("cpu"), seed=0, steps_per_epoch=1)
    with pytest.raises(SpecError, match="dpsgd.*BatchNorm"):
        d.fit(job)


# ---------------------------------------------------------------------------------- the canary audit
NUM_MODELS, NUM_CANARIES, DELTA = 16, 200, 1e-5
ATTACKS_AUDITED = ("lira_online", "lira_offline", "loss")


def _canary_bank(defense: dict, epochs: int) -> tuple[Signals, list[dict[str, float]], float]:
    """16 digits MLPs trained on the whole training split, 200 of whose points have their label flipped to
    a random other class (canaries, each IN for exactly half the bank by the plan). Returns the signals of
    the canaries, the defense's per-model reports and the mean test accuracy."""
    spec = AuditSpec.model_validate({
        "plan": {"num_models": NUM_MODELS},
        "model": {"params": {"hidden": [256]}},
        "train": {"epochs": epochs, "lr": 0.002, "batch_size": 64},
        "defense": defense,
    })
    ctx = BankContext.from_spec(spec)
    rng = np.random.default_rng(0)
    pos = np.sort(rng.choice(ctx.plan.population.shape[0], NUM_CANARIES, replace=False))
    idx = ctx.plan.population[pos]
    y = ctx.data.y_train.clone()
    y[idx] = (y[idx] + torch.from_numpy(rng.integers(1, 10, NUM_CANARIES))) % 10
    ctx.data = dataclasses.replace(ctx.data, y_train=y)
    xs = ctx.data.x_train[torch.from_numpy(idx)]
    logits, reports, accs = [], [], []
    for m in range(NUM_MODELS):
        reports.append({})
        model = train_model(ctx, m, torch.device("cpu"), report=reports[-1])
        g = torch.Generator().manual_seed(m)
        logits.append(query_logits(model, ctx.defense, xs, ["identity"], g))
        test = query_logits(model, ctx.defense, ctx.data.x_test, ["identity"], g)[0]
        accs.append(accuracy(test.numpy(), ctx.data.y_test.numpy()))
    sig = Signals(logits=torch.stack(logits).numpy(), labels=y[idx].numpy(), keep=ctx.plan.keep[:, pos])
    return sig, reports, float(np.mean(accs))


def _epsilon_lb(sig: Signals) -> dict[str, float]:
    """Per attack: the lower bound over the scores of every target pooled (leave-one-out, 16 x 200 trials)."""
    out = {}
    for a in ATTACKS_AUDITED:
        scores = np.concatenate([run_attack(a, None, sig, t) for t in range(sig.num_models)])
        member = np.concatenate([sig.keep[t] for t in range(sig.num_models)])
        out[a] = float(epsilon_lower_bound(scores, member, delta=DELTA)["epsilon_lb"])
    return out


@pytest.mark.slow
def test_canary_audit_bound_stays_below_accounted_epsilon(one_thread):
    plain, _, acc_plain = _canary_bank({"name": "none"}, epochs=30)
    lb_plain = _epsilon_lb(plain)
    dp, reports, acc_dp = _canary_bank(
        {"name": "dpsgd", "params": {"target_epsilon": 2.0, "delta": DELTA}}, epochs=10)
    lb_dp = _epsilon_lb(dp)
    eps = max(r["epsilon"] for r in reports)
    print(f"\nundefended: eps LB {lb_plain} (test acc {acc_plain:.3f})"
          f"\nDP-SGD: eps LB {lb_dp} vs accounted epsilon {eps:.3f} "
          f"(sigma {reports[0]['noise_multiplier']:.3f}, q {reports[0]['sampling_rate']:.4f}, test acc {acc_dp:.3f})")
    # The audit is strong: undefended canaries leak far more than the DP bank is allowed to.
    assert max(lb_plain.values()) > 1.0
    assert max(lb_plain.values()) > eps
    # Soundness: no attack beats the accountant (a violation is a bug in training, accounting or attack).
    assert all(r["epsilon"] <= 2.0 for r in reports)
    assert max(lb_dp.values()) <= eps
    assert acc_dp > 0.5  # DP-SGD still learns


@pytest.mark.slow
def test_an_audits_epsilon_bound_is_taken_at_the_delta_dp_sgd_states(tmp_path, one_thread):
    """A DP guarantee is (eps, delta): TPR <= e^eps FPR + delta. Its audit subtracts the model's own delta
    (1 / n^1.1 here); at delta 0 the bound would be that of pure DP, above what the guarantee allows."""
    from raymia.audit import run_audit

    spec = AuditSpec.model_validate({
        "name": "dp-delta", "plan": {"num_models": 4, "population": 300, "targets": [0, 1]},
        "model": {"params": {"hidden": [256]}}, "train": {"epochs": 40},
        # almost no noise and no clipping: the models leak enough for a bound above 0
        "defense": {"name": "dpsgd", "params": {"noise_multiplier": 0.01, "max_grad_norm": 100.0}},
        "attacks": [{"name": "lira_offline"}, {"name": "rmia_online"}],
        "bank": {"engine": "local", "pack_size": 4}, "tracking": {"enabled": False},
        "output_dir": str(tmp_path),
    })
    res = run_audit(spec, console=False)
    delta = res.defense_report["delta"]
    assert delta == pytest.approx(1 / 150**1.1)  # each model trains on half of the 300 points
    below_pure = 0
    for a in ("lira_offline", "rmia_online"):
        for row in range(len(res.targets)):
            s, member = res.points.scores[a][row], res.points.member[row]
            at_delta = epsilon_lower_bound(s, member, delta=delta, seed=spec.seed)["epsilon_lb"]
            assert res.per_target[a][row]["epsilon_lb"] == pytest.approx(at_delta, abs=1e-12)
            below_pure += at_delta < epsilon_lower_bound(s, member, delta=0.0, seed=spec.seed)["epsilon_lb"]
    assert below_pure >= 1  # the delta made a difference, so the check above could tell
