"""HAMP: soft-label masses against the paper's values, the loss, and rank-preserving output modification."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymia.datainfo import DataInfo
from raymia.defenses import DEFENSES, build_defense
from raymia.defenses.hamp import (
    HAMP_DEFAULTS,
    Hamp,
    HampParams,
    rearrange_logits,
    soft_label_true_mass,
    soft_labels,
)
from raymia.errors import SpecError
from raymia.space import Categorical, Float

IMAGE_INFO = DataInfo(num_classes=10, input_shape=(1, 8, 8), kind="image", mean=(0.5,), std=(0.25,))

REFERENCE_MASSES = [
    (10, 0.95, 0.26),  # CIFAR-10
    (100, 0.5, 0.64),  # CIFAR-100
    (100, 0.8, 0.33),  # Purchase100
    (100, 0.6, 0.54),  # Texas100
    (30, 0.5, 0.68),  # Location30
]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.double()
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=-1)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).eval()


def _hamp(info: DataInfo = IMAGE_INFO, **params) -> Hamp:
    d = build_defense("hamp", params, info)
    assert isinstance(d, Hamp)
    return d


# --- soft labels -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,gamma,mass", REFERENCE_MASSES)
def test_soft_label_mass_matches_paper(k: int, gamma: float, mass: float) -> None:
    assert abs(soft_label_true_mass(k, gamma) - mass) < 1e-9


def test_defaults_table_reproduces_reference_masses() -> None:
    classes = {"cifar10": 10, "cifar100": 100, "purchase100": 100, "texas100": 100, "location30": 30}
    expected = {(k, g): m for k, g, m in REFERENCE_MASSES}
    for ds, (gamma, alpha) in HAMP_DEFAULTS.items():
        assert alpha > 0
        assert abs(soft_label_true_mass(classes[ds], gamma) - expected[(classes[ds], gamma)]) < 1e-9


def test_defaults_are_the_papers_setting_for_the_loaded_data_set_and_cifar10s_for_others() -> None:
    from raymia.data import load_dataset

    info = load_dataset("synthetic", {"num_train": 200, "num_test": 100, "num_classes": 100, "kind": "tabular",
                                      "num_features": 6}).info
    assert info.name == "synthetic"
    for name, (gamma, alpha) in {**HAMP_DEFAULTS, "synthetic": HAMP_DEFAULTS["cifar10"]}.items():
        d = _hamp(dataclasses.replace(info, name=name))
        assert (d.params.gamma, d.params.alpha) == (gamma, alpha), name
        soft = d.transform_train_data(torch.zeros(1, 6), torch.tensor([3]), torch.Generator())[1]
        assert soft[0, 3].item() == pytest.approx(soft_label_true_mass(100, gamma))  # the soft labels use it
    d = _hamp(dataclasses.replace(info, name="purchase100"), gamma=0.7)  # a given value is kept
    assert (d.params.gamma, d.params.alpha) == (0.7, 0.01)


@pytest.mark.parametrize("k,gamma,mass", REFERENCE_MASSES)
def test_soft_labels_entropy_is_first_step_above_target(k: int, gamma: float, mass: float) -> None:
    y = torch.arange(k)
    s = soft_labels(y, k, gamma)
    assert s.dtype == torch.float32 and s.shape == (k, k)
    assert torch.allclose(s.sum(dim=1), torch.ones(k), atol=1e-6)
    assert torch.equal(s.argmax(dim=1), y)
    assert torch.allclose(s[torch.arange(k), y], torch.full((k,), mass))
    target = gamma * math.log(k)
    assert float(_entropy(s[0])) >= target - 1e-6
    # One 0.01 step less (more mass on the true class) stays below the target.
    p_prev = mass + 0.01
    prev = torch.full((k,), (1 - p_prev) / (k - 1), dtype=torch.float64)
    prev[0] = p_prev
    assert float(_entropy(prev)) < target


def test_bad_soft_label_arguments() -> None:
    with pytest.raises(ValueError):
        soft_label_true_mass(1, 0.5)
    with pytest.raises(ValueError):
        soft_label_true_mass(10, 1.0)


def _official_true_mass(k: int, gamma: float) -> float | None:
    """The search of HAMP's official code (DependableSystemsLab/MIA_defense_HAMP, `get_top1`), re-written: a
    float64 vector starts one-hot at class 1; each step subtracts 0.01 from it and adds 0.01 / (K - 1) to every
    other class (the error accumulates), and the loop stops after the first step whose entropy (numpy, natural
    log) reaches gamma times the entropy of the uniform vector. None where it never stops (it would run on)."""
    uniform = np.full(k, 1.0 / k)
    target = gamma * float(np.sum(-uniform * np.log(uniform)))
    p = np.zeros(k)
    p[1] = 1.0
    for _ in range(100):
        p[1] -= 0.01
        p[:1] += 0.01 / (k - 1)
        p[2:] += 0.01 / (k - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = float(np.sum(-p * np.log(p)))
        if h >= target:
            return float(p[1])
    return None


def test_soft_label_mass_matches_the_official_float_loop() -> None:
    """Integer steps give the same stopping step as the official code's float accumulation on 594 cases."""
    for k in (2, 3, 5, 10, 30, 100):
        for step in range(1, 100):
            gamma = step / 100
            want = _official_true_mass(k, gamma)
            assert want is not None
            assert abs(soft_label_true_mass(k, gamma) - want) < 1e-12, (k, gamma)


def test_transform_train_data_returns_soft_labels() -> None:
    d = _hamp()
    x = torch.randn(5, 1, 8, 8)
    y = torch.tensor([0, 3, 9, 3, 1])
    x2, t = d.transform_train_data(x, y, torch.Generator().manual_seed(0))
    assert x2 is x
    assert t.dtype == torch.float32 and t.shape == (5, 10)
    assert torch.allclose(t, soft_labels(y, 10, 0.95))


# --- loss ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_loss_matches_hand_computation(reduction: str) -> None:
    k, gamma, alpha = 4, 0.7, 0.05
    logits = torch.tensor([[1.0, -0.5, 0.2, 2.0], [0.0, 0.3, -1.2, 0.7], [3.0, 0.0, 0.0, -3.0]])
    y = torch.tensor([3, 1, 0])
    info = DataInfo(num_classes=k, input_shape=(6,), kind="tabular")
    d = _hamp(info, gamma=gamma, alpha=alpha, kl_reduction=reduction)

    mass = soft_label_true_mass(k, gamma)
    soft = torch.full((3, k), (1 - mass) / (k - 1))
    soft[torch.arange(3), y] = mass
    probs = logits.softmax(dim=1)
    kl_sum = (soft * (soft.log() - probs.log())).sum()
    kl = kl_sum / (3 * k) if reduction == "mean" else kl_sum / 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that 'mean' will change meaning
        assert torch.allclose(kl, F.kl_div(logits.log_softmax(dim=1), soft, reduction=reduction))
    entropy = -(probs * probs.log()).sum(dim=1).mean()
    expected = kl - alpha * entropy

    assert torch.allclose(d.loss(logits, soft), expected, atol=1e-6)
    # Hard labels are converted to the same soft labels first.
    assert torch.allclose(d.loss(logits, y), expected, atol=1e-6)


def test_loss_is_differentiable() -> None:
    d = _hamp()
    logits = torch.randn(8, 10, requires_grad=True)
    d.loss(logits, torch.randint(0, 10, (8,))).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


# --- output modification ---------------------------------------------------------------------------------
def _queries(n: int = 500) -> torch.Tensor:
    return IMAGE_INFO.random_inputs(n, torch.Generator().manual_seed(123))


def test_output_modification_keeps_ranking_and_bounds_confidence() -> None:
    model = _mlp()
    d = _hamp()
    assert d.modifies_outputs
    x = _queries()
    with torch.no_grad():
        logits = model(x)
    out = d.postprocess_logits(model, logits, torch.Generator().manual_seed(7))
    assert out.shape == logits.shape
    assert not model.training  # mode untouched
    assert torch.equal(out.argmax(dim=1), logits.argmax(dim=1))
    assert torch.equal(out.argsort(dim=1, stable=True), logits.argsort(dim=1, stable=True))

    # The released values are exactly the random inputs' logits, re-ordered.
    rand_x = IMAGE_INFO.random_inputs(500, torch.Generator().manual_seed(7))
    with torch.no_grad():
        rand_logits = model(rand_x)
    assert torch.equal(out.sort(dim=1).values, rand_logits.sort(dim=1).values)
    assert torch.allclose(out.softmax(dim=1).max(dim=1).values, rand_logits.softmax(dim=1).max(dim=1).values)


def _official_rearrange(query: np.ndarray, random: np.ndarray) -> np.ndarray:
    """HAMP's official `alter_output`, re-written: both rows sorted ascending; the positions where the query
    equals its j-th smallest value receive the random row's j-th smallest value (tied positions all get the
    value of the last j they match)."""
    q_sorted = np.sort(query, axis=1)
    r_sorted = np.sort(random, axis=1)
    out = np.zeros(query.shape)
    for i in range(query.shape[0]):
        for j in range(query.shape[1]):
            out[i][query[i] == q_sorted[i][j]] = r_sorted[i][j]
    return out


def test_rearrange_matches_the_official_loop() -> None:
    # by hand: query ranks classes 1 > 2 > 0; the random row's values in descending order are 2, 0.5, -1
    q = torch.tensor([[1.0, 3.0, 2.0]])
    r = torch.tensor([[0.5, -1.0, 2.0]])
    assert torch.equal(rearrange_logits(q, r), torch.tensor([[-1.0, 2.0, 0.5]]))
    # 200 tie-free rows of 10 classes: equal to the official loop
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(200, 10, generator=g), torch.randn(200, 10, generator=g)
    want = _official_rearrange(q.double().numpy(), r.double().numpy())
    np.testing.assert_array_equal(rearrange_logits(q.double(), r.double()).numpy(), want)
    # ties: the official loop gives tied positions one value (both get the larger), raymia distinct values in
    # the query's order; the released argmax is the query's in both
    q = torch.tensor([[1.0, 3.0, 3.0, 0.0]], dtype=torch.float64)
    r = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    np.testing.assert_array_equal(_official_rearrange(q.numpy(), r.numpy()), [[0.2, 0.4, 0.4, 0.1]])
    assert torch.equal(rearrange_logits(q, r), torch.tensor([[0.2, 0.4, 0.3, 0.1]], dtype=torch.float64))


def test_output_modification_keeps_argmax_under_ties() -> None:
    model = _mlp()
    d = _hamp()
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 0, 0, 0, 0, 0, 0], [2.0] * 10])
    out = d.postprocess_logits(model, logits, torch.Generator().manual_seed(0))
    assert torch.equal(out.argmax(dim=1), logits.argmax(dim=1))
    assert out[0, 1] >= out[0, 2] >= out[0, 0]


def test_output_modification_is_deterministic_per_seed() -> None:
    model = _mlp()
    d = _hamp()
    with torch.no_grad():
        logits = model(_queries(50))
    a = d.postprocess_logits(model, logits, torch.Generator().manual_seed(3))
    b = d.postprocess_logits(model, logits, torch.Generator().manual_seed(3))
    c = d.postprocess_logits(model, logits, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_output_modification_off_is_identity() -> None:
    model = _mlp()
    d = _hamp(output_modification=False)
    assert not d.modifies_outputs
    with torch.no_grad():
        logits = model(_queries(20))
    assert d.postprocess_logits(model, logits, torch.Generator().manual_seed(0)) is logits


def test_tabular_random_inputs_are_binary() -> None:
    info = DataInfo(num_classes=5, input_shape=(40,), kind="tabular")
    seen: list[torch.Tensor] = []

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(40, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return self.fc(x)

    model = Recorder().eval()
    d = _hamp(info)
    logits = torch.randn(30, 5)
    out = d.postprocess_logits(model, logits, torch.Generator().manual_seed(0))
    assert torch.equal(out.argmax(dim=1), logits.argmax(dim=1))
    (x,) = seen
    assert x.shape == (30, 40)
    assert set(x.unique().tolist()) == {0.0, 1.0}


# --- declarations and validation -------------------------------------------------------------------------
def test_registry_entry_and_search_space() -> None:
    entry = DEFENSES.get("hamp")
    assert entry.obj is Hamp and entry.params is HampParams
    assert Hamp.name == "hamp"
    p = entry.parse({}, where="defense.params")
    assert (p.gamma, p.alpha, p.output_modification, p.kl_reduction) == (None, None, True, "mean")
    assert all(f.description for f in HampParams.model_fields.values())
    space = Hamp.search_space()
    assert space["gamma"] == Float(0.3, 0.99)
    assert space["alpha"] == Float(1e-4, 5e-2, log=True)
    assert space["output_modification"] == Categorical((True, False))
    assert _hamp().privacy_guarantee() is None


@pytest.mark.parametrize(
    "raw,field",
    [
        ({"gamma": 1.5}, "gamma"),
        ({"gamma": 0.0}, "gamma"),
        ({"alpha": -1.0}, "alpha"),
        ({"kl_reduction": "sum"}, "kl_reduction"),
        ({"gamma": 0.5, "beta": 1}, "beta"),
    ],
)
def test_bad_params_raise_spec_error(raw: dict, field: str) -> None:
    with pytest.raises(SpecError) as ei:
        DEFENSES.get("hamp").parse(raw, where="defense.params")
    assert ei.value.where == "defense.params"
    assert field in str(ei.value)
