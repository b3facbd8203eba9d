"""No audited point reaches a defense's fitting except as a member of the model being trained.

For every registered defense (new ones are covered by the loop over `DEFENSES.names()`), a small digits
bank of two models is built with real components while a global forward pre-hook records every input row
of the data set's input shape that enters any nn.Module: during the defense's `setup` (inside
`BankContext.from_spec`: a VAE, say) and while bank model m trains (`train_model`: the bank's loop or the
defense's own `fit`, its min-max reference set, a lazily pretrained backbone). No recorded row may be an
audited non-member of m; m's members and public points (training split outside the population) may
appear. Rows are compared exactly (bytes of float32 rows; augmentation is off). A non-member row that
equals an allowed row (digits has duplicate images) cannot be told apart and is not counted. With the two
complementary models of the plan, every audited point is a non-member of one of them, so what `setup`
fits on (shared by every model) is checked against the whole population.

Not covered: data a defense reads without a module forward (plain tensor statistics), and the pack
trainer (it draws the same members as `train_model`, which tests/test_bank.py checks it matches).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from raymia.defenses import DEFENSES
from raymia.defenses.base import public_indices
from raymia.errors import SpecError
from raymia.spec import AuditSpec
from raymia.train.bank import BankContext, reference_index, train_model

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")

# Settings that make each defense fit in about a second, and switch on what draws on extra data (the
# min-max games). A defense not named here runs with its defaults.
FAST: dict[str, dict] = {
    "advreg": {"lam": 1.0},
    "pruning": {"sparsity": 0.5, "minmax_lambda": 1.0},
    "vae_metric_privacy": {"vae_epochs": 2, "latent_dim": 4, "hidden": 32, "vae_batch_size": 64, "vae_device": "cpu"},
    "tl_dmi": {"pretrain_epochs": 1, "pretrain_device": "cpu"},
    "memguard": {"defense_epochs": 20},
    "selena": {"sub_models": 4, "excluded_per_point": 2},
}
POPULATION = 200


def _spec(tmp_path, name: str, population: int | None = POPULATION, params: dict | None = None) -> AuditSpec:
    return AuditSpec.model_validate({
        "plan": {"num_models": 2, "population": population},
        "model": {"name": "mlp", "params": {"hidden": [16]}},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.01},
        "defense": {"name": name, "params": FAST.get(name, {}) if params is None else params},
        "queries": ["identity"],
        "bank": {"pack_size": 2, "vectorize": False},
        "output_dir": str(tmp_path / "runs"),
    })


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor under any torch.func wrappers (vmap's batched tensors keep their batch dimension)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _rows(x: torch.Tensor) -> set[bytes]:
    a = np.ascontiguousarray(x.detach().cpu().to(torch.float32).numpy())
    return {r.tobytes() for r in a.reshape(a.shape[0], -1)}


@contextmanager
def recording(input_shape: tuple[int, ...]) -> Iterator[set[bytes]]:
    """Every row of input shape entering any module's forward while the block runs."""
    seen: set[bytes] = set()
    k = len(input_shape)

    def hook(module, args):
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                t = _plain(a)
                if t.device.type == "meta":  # shapes only (the model's input check): no data flows
                    continue
                if t.dim() > k and tuple(t.shape[-k:]) == tuple(input_shape):
                    with torch._C._DisableFuncTorch():  # plain tensor ops, even inside vmap / grad
                        seen.update(_rows(t.reshape(-1, *input_shape)))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _forbidden(ctx: BankContext, m: int) -> set[bytes]:
    """Model m's audited non-members, less any row equal to an allowed one (a member of m, a public point)."""
    x = ctx.data.x_train
    pop, keep = ctx.plan.population, ctx.plan.keep[m]
    allowed = _rows(x[torch.from_numpy(pop[keep])]) | _rows(x[torch.from_numpy(ctx.public_index)])
    return _rows(x[torch.from_numpy(pop[~keep])]) - allowed


def test_the_recorder_sees_inputs_under_vmap_and_grad(digits) -> None:
    x = digits.x_train[:5]
    lin = torch.nn.Sequential(torch.nn.Flatten(0), torch.nn.Linear(64, 1))
    with recording(digits.info.input_shape) as seen:
        vmap(grad(lambda xi: lin(xi).sum()))(x)
    assert seen == _rows(x)


@pytest.mark.parametrize("name", DEFENSES.names())
def test_no_audited_non_member_reaches_the_fitting(tmp_path, digits, name: str) -> None:
    shape = digits.info.input_shape
    with recording(shape) as in_setup:
        ctx = BankContext.from_spec(_spec(tmp_path, name))
    assert ctx.spec.train.augment.hflip is False and not ctx.spec.train.augment.crop
    for m in range(ctx.plan.num_models):
        with recording(shape) as in_training:
            train_model(ctx, m, CPU)
        seen = in_setup | in_training
        assert seen, f"{name}: nothing recorded while model {m} trained"
        leaked = seen & _forbidden(ctx, m)
        assert not leaked, (f"{name}: {len(leaked)} audited non-members of model {m} reached its fitting "
                            f"(setup: {len(in_setup & leaked)}, training: {len(in_training & leaked)})")


def test_reference_set_is_public_and_sized_to_the_members(tmp_path) -> None:
    ctx = BankContext.from_spec(_spec(tmp_path, "advreg"))
    public = public_indices(ctx.data.x_train.shape[0], ctx.plan.population)
    assert np.array_equal(public, ctx.public_index) and np.intersect1d(public, ctx.plan.population).size == 0
    n = int(ctx.plan.keep[0].sum())
    ref0, ref1 = reference_index(ctx, 0, n), reference_index(ctx, 1, n)
    assert ref0.size == n and np.isin(ref0, public).all() and np.unique(ref0).size == n
    assert not np.array_equal(ref0, ref1) and np.array_equal(ref0, reference_index(ctx, 0, n))  # per model
    assert np.array_equal(reference_index(ctx, 0, 10**6), public)  # fewer public points: all of them


@pytest.mark.parametrize(("name", "params"), [
    ("advreg", {"lam": 1.0}),
    ("pruning", {"minmax_lambda": 0.5}),
    ("vae_metric_privacy", {}),
    ("tl_dmi", {}),
    ("memguard", {}),
    ("dmp", {}),
])
def test_no_public_data_is_refused_before_training(tmp_path, name: str, params: dict) -> None:
    spec = _spec(tmp_path, name, population=None, params=params)
    for setup in (True, False):  # the audit / `raymia check` and sweeps (check_data only)
        with pytest.raises(SpecError, match=f"{name} needs public data") as e:
            BankContext.from_spec(spec, setup=setup)
        assert e.value.where == "plan.population" and "accepted: 1..1346" in str(e.value)


@pytest.mark.parametrize(("name", "params"), [("advreg", {"lam": 0.0}), ("pruning", {"minmax_lambda": 0.0})])
def test_without_the_game_no_public_data_is_needed(tmp_path, name: str, params: dict) -> None:
    spec = _spec(tmp_path, name, population=None, params=params)
    BankContext.from_spec(spec, setup=False)
