"""Calibration defenses (raymia.defenses.calibration): temperature scaling and the last-layer Laplace
approximation. Hand-computed posteriors, real digits models trained by the bank's own code, the audit's
`defense/temperature`, `raymia list defenses` and their search spaces."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from raymia.datainfo import DataInfo
from raymia.defenses import DEFENSES, build_defense
from raymia.defenses.base import outputs
from raymia.defenses.calibration import find_last_layer, fit_temperature, nll
from raymia.defenses.simple import LOG_FLOOR
from raymia.errors import SpecError
from raymia.metrics import ece
from raymia.models.base import Scale
from raymia.space import ActsWhen
from raymia.spec import AuditSpec
from raymia.train.bank import BankContext, reference_index, train_model, train_pack
from raymia.train.infer import query_logits

CPU = torch.device("cpu")
INFO = DataInfo(num_classes=3, input_shape=(2,), kind="tabular")
pytestmark = pytest.mark.usefixtures("one_thread")


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _spec(tmp_path, name: str, params: dict, population: int | None = 300, **train) -> AuditSpec:
    """A digits bank of wide MLPs: 40 epochs at lr 0.002 (as tests/conftest.py's tiny spec), or `train`."""
    return AuditSpec.model_validate({
        "seed": 0, "plan": {"num_models": 2, "population": population},
        "model": {"name": "mlp", "params": {"hidden": [256]}},
        "train": {"epochs": 40, "batch_size": 64, "lr": 0.002, **train},
        "defense": {"name": name, "params": params}, "queries": ["identity"],
        "bank": {"pack_size": 2, "vectorize": False}, "output_dir": str(tmp_path / "runs"),
    })


def _released(model, defense, x) -> torch.Tensor:
    """What a querier sees (the bank's query path: raymia.train.infer.query_logits)."""
    return query_logits(model, defense, x, ["identity"], _gen())[0]


# ---------------------------------------------------------------------------------------------------------
# last-layer Laplace: the posterior and the probit predictive by hand


def _hand_model(scale: float | None = None) -> nn.Module:
    """ReLU features (phi = relu(x)) into a Linear(2, 3) whose weights send both training points to the
    logits (ln 2, 0, 0): p = (1/2, 1/4, 1/4) on each."""
    layers = [nn.ReLU(), nn.Linear(2, 3)]
    if scale is not None:
        layers.append(Scale(scale))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -0.5], [0.5, -0.25], [-1.0, 0.5]]))
        model[1].bias.copy_(torch.tensor([math.log(2.0), 0.0, 0.0]))
    return model.eval()


def _probit(mu: list[float], var: list[float]) -> np.ndarray:
    z = np.array([m / math.sqrt(1.0 + math.pi / 8.0 * v) for m, v in zip(mu, var)])
    e = np.exp(z - z.max())
    return e / e.sum()


def test_llla_matches_the_hand_computed_diagonal_laplace_and_probit():
    train = torch.tensor([[1.0, 2.0], [2.0, 4.0]])  # phi = x; W phi = 0, so p = (1/2, 1/4, 1/4) on both
    model = _hand_model()
    d = build_defense("llla", {"prior_precision": 1.0, "hessian": "diag"}, INFO)
    post = d.attach(model, train)
    # p_k (1 - p_k) = (0.25, 0.1875, 0.1875); sum_i phi_ij^2 = (1 + 4, 4 + 16) = (5, 20); prior 1
    h_w = [[1 + 0.25 * 5, 1 + 0.25 * 20],
           [1 + 0.1875 * 5, 1 + 0.1875 * 20],
           [1 + 0.1875 * 5, 1 + 0.1875 * 20]]
    h_b = [1 + 2 * 0.25, 1 + 2 * 0.1875, 1 + 2 * 0.1875]
    assert h_w == [[2.25, 6.0], [1.9375, 4.75], [1.9375, 4.75]] and h_b == [1.5, 1.375, 1.375]
    # (p comes from the model's float32 logits: equal to the hand's p to float32 rounding)
    torch.testing.assert_close(post.var_w, 1 / torch.tensor(h_w, dtype=torch.float64), rtol=0, atol=1e-7)
    torch.testing.assert_close(post.var_b, 1 / torch.tensor(h_b, dtype=torch.float64), rtol=0, atol=1e-7)
    queries = torch.tensor([[3.0, 1.0], [-1.0, 0.5]])  # phi = (3, 1) and relu -> (0, 0.5)
    ln2 = math.log(2.0)
    expected = np.stack([
        _probit([3 - 0.5 + ln2, 1.5 - 0.25, -3 + 0.5],
                [9 / 2.25 + 1 / 6 + 1 / 1.5,
                 9 / 1.9375 + 1 / 4.75 + 1 / 1.375,
                 9 / 1.9375 + 1 / 4.75 + 1 / 1.375]),
        _probit([-0.25 + ln2, -0.125, 0.25],
                [0.25 / 6 + 1 / 1.5, 0.25 / 4.75 + 1 / 1.375, 0.25 / 4.75 + 1 / 1.375]),
    ])
    out = _released(model, d, queries).double()
    np.testing.assert_allclose(out.exp().numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.numpy(), np.log(expected), rtol=0, atol=1e-6)
    # the MAP model says 0.872 for class 0 on the first query, the posterior 0.743
    np.testing.assert_allclose(expected[0], [0.74277888, 0.2291291, 0.02809203], rtol=0, atol=1e-8)
    assert torch.softmax(model(queries[:1]), 1).max().item() == pytest.approx(0.8721, abs=1e-4)


@pytest.mark.parametrize("hessian", ["diag", "kfac"])
@pytest.mark.parametrize("scale", [None, 0.5])
def test_llla_variances_equal_a_dense_laplace(hessian, scale):
    """The posterior as dense matrices: the GGN sum_i J_i^T Lambda_i J_i of f = c (W phi + b) (its exact
    diagonal, or KFAC: c^2 mean(Lambda) x sum(phi phi^T) for W and c^2 sum(Lambda) for b), plus the prior,
    inverted; var_k = (J Sigma J^T)_kk at each query."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.ReLU(), nn.Linear(3, 4), *([Scale(scale)] if scale else [])).double().eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(4, 3, generator=g, dtype=torch.float64))
        model[1].bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    train, queries = torch.randn(7, 3, generator=g).double(), torch.randn(5, 3, generator=g).double() * 3
    delta, c = 0.7, scale or 1.0
    d = build_defense("llla", {"prior_precision": delta, "hessian": hessian}, DataInfo(4, (3,), "tabular"))
    d.attach(model, train)

    def jac(phi):  # [C, C*D + C]: d f_k / d (W (row-major), b)
        eye = torch.eye(4, dtype=phi.dtype)
        return c * torch.cat([torch.kron(eye, phi[None, :]), eye], 1)

    phis = torch.relu(train)
    lams = [torch.diag(p) - torch.outer(p, p) for p in torch.softmax(model(train), 1)]
    if hessian == "diag":
        ggn = sum(jac(f).T @ lam @ jac(f) for f, lam in zip(phis, lams))
        precision = torch.diag(torch.diagonal(ggn))
    else:
        weights = c ** 2 * torch.kron(sum(lams) / len(lams), sum(torch.outer(f, f) for f in phis))
        precision = torch.block_diag(weights, c ** 2 * sum(lams))
    sigma = torch.linalg.inv(precision + delta * torch.eye(16, dtype=torch.float64))
    for x, out in zip(queries, _released(model, d, queries)):
        j = jac(torch.relu(x))
        var = torch.diagonal(j @ sigma @ j.T)
        expected = torch.log_softmax(model(x[None])[0] / torch.sqrt(1 + math.pi / 8 * var), 0)
        torch.testing.assert_close(out.double(), expected.clamp_min(LOG_FLOOR), rtol=0, atol=1e-6)


def test_llla_finds_the_last_linear_and_refuses_other_heads():
    layer, c = find_last_layer(_hand_model(0.25), torch.ones(2, 2))
    assert isinstance(layer, nn.Linear) and c == 0.25
    with pytest.raises(SpecError, match="ReLU runs after it") as e:
        find_last_layer(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), torch.ones(2, 2))
    assert e.value.where == "model.name"
    info = DataInfo(10, (3, 32, 32), "image")
    d = build_defense("llla", {}, info)
    for name in ("airbench", "resnet18", "cnn"):  # a meta-device forward: no weights allocated
        d.check(name, info)
    with torch.device("meta"):
        from raymia.models import build_model

        layer, c = find_last_layer(build_model("airbench", {}, info), torch.empty(2, 3, 32, 32))
    assert layer.bias is None and c == pytest.approx(1 / 9)  # airbench's logits x 1/9


# ---------------------------------------------------------------------------------------------------------
# last-layer Laplace on a digits model


@pytest.fixture(scope="module")
def llla_bank(tmp_path_factory):
    ctx = BankContext.from_spec(_spec(tmp_path_factory.mktemp("llla"), "llla", {}))
    report: dict[str, float] = {}
    model = train_model(ctx, 0, CPU, report=report)
    return ctx, model, report


def test_llla_keeps_labels_in_distribution_and_is_unsure_far_from_the_data(llla_bank):
    ctx, model, report = llla_bank
    assert report["logit_var"] > 0
    members = ctx.data.x_train[torch.from_numpy(ctx.plan.members_of(0))]
    for x, least in ((members, 1.0), (ctx.data.x_test, 0.97)):
        released = _released(model, ctx.defense, x)
        torch.testing.assert_close(released.exp().sum(1), torch.ones(x.shape[0]), rtol=0, atol=1e-5)
        agree = (released.argmax(1) == outputs(model, x).argmax(1)).float().mean().item()
        assert agree >= least, agree  # measured: 1.0 on the members, 0.982 on the test split
    far = ctx.data.x_test * 100
    map_conf = torch.softmax(outputs(model, far), 1).max(1).values
    la_conf = _released(model, ctx.defense, far).exp().max(1).values
    assert map_conf.min() > 0.999  # the ReLU network is certain far away (measured min 0.99975)
    assert (la_conf < map_conf).all() and la_conf.mean() < 0.5  # measured: mean 0.235, max 0.383


def test_the_bank_releases_the_llla_predictive(llla_bank):
    """train_pack (the bank's path for a defense that trains itself) stores what the model's posterior
    gives; the per-model report travels with the pack."""
    ctx, model, report = llla_bank
    arrays, reports = train_pack(ctx, 0, CPU)
    assert reports[0] == pytest.approx(report) and reports[1]["logit_var"] > 0
    expected = _released(model, ctx.defense, ctx.audited_x).numpy()
    np.testing.assert_allclose(arrays["logits"][0, 0], expected, rtol=0, atol=1e-5)
    assert (arrays["test_logits"] <= 0).all()  # log-probabilities


# ---------------------------------------------------------------------------------------------------------
# temperature scaling


def test_fit_temperature_recovers_the_temperature_of_calibrated_logits():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 5, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)  # labels drawn from softmax(z)
    assert fit_temperature(z * 3, y) == pytest.approx(3.0, rel=0.05)  # logits 3x too sharp
    assert fit_temperature(torch.tensor([[5.0, 0.0]]), torch.tensor([0])) == 0.01  # separable: the end


@pytest.fixture(scope="module")
def ts_bank(tmp_path_factory):
    """An overconfident digits model: ~100 members, 100 epochs at lr 0.01."""
    ctx = BankContext.from_spec(_spec(tmp_path_factory.mktemp("ts"), "temperature_scaling",
                                      {"fit": "held_out"}, population=200, epochs=100, lr=0.01))
    report: dict[str, float] = {}
    model = train_model(ctx, 0, CPU, report=report)
    return ctx, model, report


def test_held_out_temperature_minimises_the_nll_and_lowers_the_ece(ts_bank):
    ctx, model, report = ts_bank
    t = report["temperature"]
    assert t == ctx.defense.temperature(model) and 1.5 < t < 3  # measured 1.905: the model is overconfident
    ref = reference_index(ctx, 0, ctx.plan.members_of(0).size)  # the public points fit() was given
    assert np.intersect1d(ref, ctx.plan.population).size == 0
    z, y = outputs(model, ctx.data.x_train[torch.from_numpy(ref)]), ctx.data.y_train[torch.from_numpy(ref)]
    assert nll(z, y, t) < nll(z, y, 0.8 * t) and nll(z, y, t) < nll(z, y, 1.25 * t)
    raw, released = outputs(model, ctx.data.x_test), _released(model, ctx.defense, ctx.data.x_test)
    torch.testing.assert_close(released, raw / t, rtol=0, atol=1e-6)
    assert torch.equal(released.argmax(1), raw.argmax(1))  # every label kept
    labels = ctx.data.y_test.numpy()
    before = ece(raw.numpy(), labels, from_logits=True)
    after = ece(released.numpy(), labels, from_logits=True)
    assert after < 0.75 * before, (before, after)  # measured 0.0673 -> 0.0404


def test_fixed_temperature_is_the_given_one(tmp_path):
    logits = torch.randn(50, 3, generator=_gen()) * 4
    d = build_defense("temperature_scaling", {"fit": "fixed", "temperature": 2.5}, INFO)
    assert torch.equal(d.postprocess_logits(None, logits, _gen()), logits / 2.5) and d.modifies_outputs
    one = build_defense("temperature_scaling", {"fit": "fixed", "temperature": 1.0}, INFO)
    assert not one.modifies_outputs
    assert build_defense("temperature_scaling", {}, INFO).modifies_outputs  # held_out: T is fitted
    # `fixed` needs no public point: every training point audited
    ctx = BankContext.from_spec(_spec(tmp_path, "temperature_scaling", {"fit": "fixed", "temperature": 2.5},
                                      population=None, epochs=1))
    report: dict[str, float] = {}
    model = train_model(ctx, 0, CPU, report=report)
    assert report == {"temperature": 2.5}
    x = ctx.data.x_test[:64]
    torch.testing.assert_close(_released(model, ctx.defense, x), outputs(model, x) / 2.5, rtol=0, atol=0)


def test_held_out_without_public_points_is_refused_in_one_line(tmp_path):
    spec = _spec(tmp_path, "temperature_scaling", {"fit": "held_out"}, population=None)
    for setup in (True, False):  # the audit / `raymia check` and sweeps (check_data only)
        with pytest.raises(SpecError, match="temperature_scaling needs public data") as e:
            BankContext.from_spec(spec, setup=setup)
        assert e.value.where == "plan.population" and "\n" not in str(e.value)
        assert str(e.value).startswith("plan.population: ") and "fit: fixed" in str(e.value)
    split = AuditSpec.model_validate({**spec.model_dump(mode="json"),
                                      "data": {"name": "digits", "private_classes": 5}})
    with pytest.raises(SpecError, match="public points of the audited classes") as e:
        BankContext.from_spec(split, setup=False)  # the public split holds only classes the model never sees
    assert e.value.where == "data.private_classes"


def test_the_audit_reports_the_mean_temperature(tmp_path):
    from raymia.audit import run_audit

    spec = AuditSpec.model_validate({
        "name": "ts", "seed": 0, "plan": {"num_models": 4, "population": 200, "targets": [0, 1]},
        "model": {"name": "mlp", "params": {"hidden": [256]}},
        "train": {"epochs": 100, "batch_size": 64, "lr": 0.01},
        "defense": {"name": "temperature_scaling", "params": {}}, "queries": ["identity"],
        "attacks": [{"name": "loss"}], "bank": {"engine": "local", "pack_size": 4},
        "tracking": {"enabled": False}, "output_dir": str(tmp_path),
    })
    metrics = run_audit(spec, console=False).flat_metrics()
    ctx = BankContext.from_spec(spec)
    per_model = []
    for m in range(4):
        report: dict[str, float] = {}
        train_model(ctx, m, CPU, report=report)
        per_model.append(report["temperature"])
    assert metrics["defense/temperature"] == pytest.approx(np.mean(per_model), rel=1e-9)
    assert all(t > 1 for t in per_model)
    assert 0.0 <= metrics["loss/auc"] <= 1.0


# ---------------------------------------------------------------------------------------------------------
# declarations


def test_both_are_listed_with_their_search_space(capsys):
    from raymia.cli import build_parser, cmd_list

    # cmd_list, not main: main configures the raymia logger for a console, which later tests' caplog would miss
    assert cmd_list(build_parser().parse_args(["list", "defenses"])) == 0
    text = capsys.readouterr().out
    for needle in ("defense temperature_scaling", "'held_out' | 'fixed'", "{'held_out', 'fixed'}",
                   "log [0.25, 4.0]", "defense llla", "prior_precision", "log [0.01, 100.0]",
                   "{'diag', 'kfac'}"):
        assert needle in text, needle


def test_sampled_spaces_give_valid_defenses(digits):
    import optuna

    from raymia.spec import SweepSpec
    from raymia.sweep_space import DefineByRun, resolve_space, split_config

    spec = SweepSpec.model_validate({"sweep": {"defenses": ["temperature_scaling", "llla"]}})
    space = resolve_space(spec)
    assert set(space) == {"temperature_scaling", "llla"}
    declared = {name: DEFENSES.get(name).obj.search_space() for name in space}
    assert space["llla"] == declared["llla"]
    assert space["temperature_scaling"] == {"fit": declared["temperature_scaling"]["fit"],  # T drawn when fixed
                                            "temperature": replace(declared["temperature_scaling"]["temperature"],
                                                                   when=ActsWhen("fit", ("fixed",)))}
    ask = DefineByRun(space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
    seen: dict[str, set] = {"temperature_scaling": set(), "llla": set()}
    population = np.arange(300)
    for _ in range(40):
        trial = study.ask()
        const = ask(trial)  # suggests the trial's params
        name, params = split_config({**trial.params, **const})
        d = build_defense(name, params, digits.info)  # validated by the params model
        d.check("mlp", digits.info)
        d.check_data(digits, population)
        for k, v in params.items():
            assert space[name][k].contains(v), (name, k, v)
        seen[name].add(params.get("fit", params.get("hessian")))
        assert ("temperature" in params) == (params.get("fit") == "fixed")  # held_out ignores it: not drawn
        study.tell(trial, [0.5, 0.5])
    assert seen == {"temperature_scaling": {"held_out", "fixed"}, "llla": {"diag", "kfac"}}
