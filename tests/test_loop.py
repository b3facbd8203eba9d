"""The one step loop (raymia.train.loop): every defense trains through it, so bf16 autocast, lookahead and
the `Defense.loss` hook reach every defense; the hooks and the divergence check work as documented."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raymia.defenses import DEFENSES
from raymia.errors import SpecError, TrainingDiverged
from raymia.spec import AuditSpec, TrainSpec
from raymia.train.bank import BankContext, train_model
from raymia.train.loop import Hooks, autocast_dtype, member_batches, module_net, run_steps

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")

# Settings that keep every defense to about a second (a defense not named here runs with its defaults).
FAST: dict[str, dict] = {
    "advreg": {"lam": 1.0},
    "pruning": {"sparsity": 0.5, "minmax_lambda": 1.0, "method": "admm", "admm_epochs": 1},
    "vae_metric_privacy": {"vae_epochs": 2, "latent_dim": 4, "hidden": 32, "vae_batch_size": 64, "vae_device": "cpu"},
    "tl_dmi": {"pretrain_epochs": 1, "pretrain_device": "cpu"},
    "memguard": {"defense_epochs": 2},
    "selena": {"sub_models": 3, "excluded_per_point": 1},
    "early_stopping": {"fraction": 1.0},  # a shorter recipe would end before lookahead starts
}


def _ctx(tmp_path, name: str, **train) -> BankContext:
    return BankContext.from_spec(AuditSpec.model_validate({
        "plan": {"num_models": 2, "population": 200},
        "model": {"name": "mlp", "params": {"hidden": [16]}},
        "train": {"epochs": 4, "batch_size": 32, "lr": 0.01, **train},
        "defense": {"name": name, "params": FAST.get(name, {})},
        "queries": ["identity"],
        "bank": {"precision": "bf16", "vectorize": False},
        "output_dir": str(tmp_path / "runs"),
    }))


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_trains_under_bf16_autocast(tmp_path, name):
    """With `cpu_autocast`, `bank.precision: bf16` autocasts every defense's training steps (each Linear of
    the bank model ran in bf16); the weights stay float32 and finite, and differ from an fp32 run."""
    ctx = _ctx(tmp_path, name)
    dtypes: dict[int, set[torch.dtype]] = {}

    def record(module, args, out):
        if isinstance(module, torch.nn.Linear):
            dtypes.setdefault(id(module), set()).add(out.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        model = train_model(ctx, 0, CPU, cpu_autocast=True)
    finally:
        handle.remove()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(torch.bfloat16 in dtypes.get(id(m), set()) for m in linears)
    w = _weights(model)
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    assert not torch.equal(w, _weights(train_model(_ctx(tmp_path, name), 0, CPU)))


def test_bf16_stays_off_on_a_cpu_unless_asked():
    assert autocast_dtype(CPU, "bf16") is None
    assert autocast_dtype(CPU, "bf16", cpu=True) is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "bf16") is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "fp32") is None


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_trains_with_lookahead(tmp_path, name):
    """train.lookahead is no longer refused for defenses that train in `fit`: it acts (the weights differ
    from a run without it) and training stays finite."""
    epochs = 8 if name == "pruning" else 4  # pruning restarts the schedule for a retraining of half the epochs
    on = _weights(train_model(_ctx(tmp_path, name, lookahead=True, epochs=epochs), 0, CPU))
    off = _weights(train_model(_ctx(tmp_path, name, epochs=epochs), 0, CPU))
    assert torch.isfinite(on).all() and not torch.equal(on, off)


def test_pruning_refuses_lookahead_that_its_retraining_would_never_reach(tmp_path):
    """Refused where `raymia check` and the audit validate the spec (`setup=False`: nothing fitted), not when
    the first model's fit starts: 4 epochs, half of them retraining."""
    with pytest.raises(SpecError) as e:
        BankContext.from_spec(AuditSpec.model_validate({
            "plan": {"num_models": 2, "population": 200}, "model": {"name": "mlp", "params": {"hidden": [16]}},
            "train": {"epochs": 4, "lookahead": True}, "defense": "pruning", "output_dir": str(tmp_path)}),
            setup=False)
    assert str(e.value) == ("train.lookahead: pruning restarts the schedule for its 2-epoch masked retraining, which "
                            "ends before lookahead starts (after epoch 3); raise train.epochs or retrain_fraction, "
                            "or set lookahead: false")


@pytest.mark.parametrize("name", ["none", "advreg", "pruning", "tl_dmi", "memguard", "dpsgd", "dmp", "selena"])
def test_the_loss_hook_reaches_every_defense_that_trains_on_a_loss(tmp_path, name):
    """`Defense.loss` is the objective of the bank's loop and of every defense's `fit` (AdvReg and pruning
    ignored it before the loop); RelaxLoss's epoch-dependent loss replaces it by design."""
    ctx = _ctx(tmp_path, name)
    calls = []
    plain = ctx.defense.loss

    def loss(logits, y):
        calls.append(1)
        return plain(logits, y)

    ctx.defense.loss = loss
    train_model(ctx, 0, CPU)
    assert calls


def test_hooks_run_in_order_and_the_loop_checks_divergence():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    model = torch.nn.Linear(5, 3)
    recipe = TrainSpec(optimizer="sgd", lr=0.1, epochs=2, batch_size=10)
    events: list[str] = []
    hooks = Hooks(before_step=lambda t: events.append(f"before {t}"),
                  extra_loss=lambda logits, yb, t: events.append(f"extra {t}") or logits.sum() * 0,
                  before_update=lambda: events.append("update"),
                  after_step=lambda t: events.append(f"after {t}"))
    batches = member_batches(x, y, recipe, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    last = run_steps(module_net(model), batches, lambda logits, yb, t: F.cross_entropy(logits, yb), recipe,
                     8, 4, hooks=hooks)
    assert events[:4] == ["before 0", "extra 0", "update", "after 0"] and len(events) == 32
    assert torch.isfinite(last)
    bad = member_batches(x * float("nan"), y, recipe, torch.Generator(), torch.Generator())
    with pytest.raises(TrainingDiverged, match="model 7: training diverged .*; lower train.lr"):
        run_steps(module_net(torch.nn.Linear(5, 3)), bad, lambda logits, yb, t: F.cross_entropy(logits, yb),
                  recipe, 2, 1, names=["model 7"])


def test_divergence_is_caught_from_the_weights_when_the_gradient_hook_reports_no_loss():
    """DP-SGD computes its gradient itself and returns no loss: the weights are the loop's only evidence."""
    model = torch.nn.Linear(5, 3)
    recipe = TrainSpec(optimizer="sgd", lr=0.1, epochs=1, batch_size=10)

    def infinite(xb, yb):
        for p in model.parameters():
            p.grad = torch.full_like(p, float("inf"))
        return None

    g = torch.Generator().manual_seed(0)
    batches = member_batches(torch.randn(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g), recipe,
                             torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    with pytest.raises(TrainingDiverged, match="model 3: training diverged"):
        run_steps(module_net(model), batches, None, recipe, 2, 2, hooks=Hooks(gradient=infinite), names=["model 3"])
