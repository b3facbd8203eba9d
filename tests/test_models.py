"""The model registry: shapes, parameter counts, no in-place ops, determinism and vmap(functional_call)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from raymia.datainfo import DataInfo
from raymia.errors import SpecError
from raymia.models import MODELS, build_model

pytestmark = pytest.mark.usefixtures("one_thread")

K = 10
DIGITS, MNIST, CIFAR, TABULAR = (1, 8, 8), (1, 28, 28), (3, 32, 32), (600,)
ALL_SHAPES = (DIGITS, MNIST, CIFAR, TABULAR)
CONV_MODELS = ["airbench", "cnn", "lenet5", "mobilenetv2", "resnet18", "vgg11", "vgg16", "wrn", "wrn16_4", "wrn28_2"]

# The data shapes each entry is built for; every other shape of ALL_SHAPES must raise SpecError.
SUPPORTED = {
    "mlp": ALL_SHAPES,
    "lenet5": (MNIST, CIFAR),  # needs H, W >= 12
    "airbench": (MNIST, CIFAR),  # needs H, W >= 16
    **{name: (DIGITS, MNIST, CIFAR) for name in CONV_MODELS if name not in ("lenet5", "airbench")},
}

# Small variants exercise the parameters (and keep the test fast where the default is large).
PARAM_CASES = {
    "wrn": {"depth": 10, "width": 1},
    "vgg11": {"width": 0.25},
}

# Parameter counts with the default params, K=10, 3x32x32; PUBLISHED pairs them with the published
# figures (all within 2%, checked below).
PARAM_COUNTS = {
    # Flatten(3072) -> 256 -> 256 -> 10: 786,688 + 65,792 + 2,570.
    "mlp": 855_050,
    # conv 3->32, conv 32->64 (with bias), 64*8*8 -> 128 -> 10: 896 + 18,496 + 524,416 + 1,290.
    "cnn": 545_098,
    # Trained parameters: stem 3->24 2x2 bias (24; its 288 weights are a frozen buffer); groups 24->64,
    # 64->256, 256->256 of two bias-free 3x3 convs and two BN biases (13,824 + 36,864 + 128; 147,456 +
    # 589,824 + 512; 589,824 + 589,824 + 512; the BN weights are frozen buffers); head 256 x 10 (2,560).
    "airbench": 1_971_352,
}
PUBLISHED = {
    "lenet5": (62_006, 62_000),  # LeNet-5 ~62k (456 + 2,416 + 48,120 + 10,164 + 850)
    "resnet18": (11_173_962, 11_170_000),  # CIFAR ResNet-18 ~11.17M
    "wrn28_2": (1_467_610, 1_470_000),  # WRN-28-2 ~1.47M
    "wrn": (1_467_610, 1_470_000),  # defaults depth 28, width 2
    "wrn16_4": (2_748_890, 2_750_000),  # WRN-16-4 ~2.75M (2.7M in the WRN paper's table)
    "vgg16": (14_728_266, 14_700_000),  # VGG-16-BN features ~14.72M + Linear(512, 10)
    "vgg11": (9_231_114, 9_230_000),  # VGG-11-BN CIFAR ~9.23M (e.g. kuangliu/pytorch-cifar)
    "mobilenetv2": (2_236_682, 2_240_000),  # MobileNetV2, torchvision's blocks, Linear(1280, 10) ~2.24M
}


def _info(shape: tuple[int, ...]) -> DataInfo:
    return DataInfo(num_classes=K, input_shape=shape, kind="tabular" if len(shape) == 1 else "image")


def _build(name: str, shape: tuple[int, ...], seed: int = 0, params: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, PARAM_CASES.get(name) if params is None else params, _info(shape))


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_entry_is_covered():
    assert set(MODELS.names()) == set(SUPPORTED) == set(PARAM_COUNTS) | set(PUBLISHED)


@pytest.mark.parametrize("shape", ALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_builds_and_returns_logits(name, shape):
    if shape not in SUPPORTED[name]:
        with pytest.raises(SpecError, match=name) as e:
            _build(name, shape)
        assert e.value.where == "model.name"
        return
    model = _build(name, shape)
    assert not [n for n, m in model.named_modules() if getattr(m, "inplace", False)], "in-place module"
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules()), "Dropout by default"
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for train in (True, False):
            out = model.train(train)(x)
            assert out.shape == (2, K) and out.dtype == torch.float32
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_parameter_counts_and_deterministic_init(name):
    a = _build(name, CIFAR, seed=3, params={})
    b = _build(name, CIFAR, seed=3, params={})
    n = _n_params(a)
    if name in PUBLISHED:
        exact, published = PUBLISHED[name]
        assert n == exact
        assert abs(n - published) / published < 0.02
    else:
        assert n == PARAM_COUNTS[name]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "construction is not deterministic under manual_seed"
    assert not [m for m in a.modules() if getattr(m, "inplace", False)]


def test_model_params():
    assert _n_params(_build("wrn", CIFAR, params={"depth": 16, "width": 4})) == PUBLISHED["wrn16_4"][0]
    assert _n_params(_build("cnn", CIFAR, params={"global_pool": True})) == 896 + 18_496 + 64 * 128 + 128 + 1_290
    assert _n_params(_build("vgg16", CIFAR, params={"width": 0.5})) < PUBLISHED["vgg16"][0] / 3
    assert any(isinstance(m, torch.nn.Tanh) for m in _build("lenet5", MNIST, params={"activation": "tanh"}).modules())
    assert any(isinstance(m, torch.nn.Dropout) for m in _build("wrn16_4", CIFAR, params={"dropout": 0.3}).modules())
    with pytest.raises(SpecError, match="6n\\+4") as e:
        _build("wrn", CIFAR, params={"depth": 20})
    assert e.value.where == "model.params.depth"
    with pytest.raises(SpecError) as e:
        build_model("cnn", {"chanels": [8]}, _info(CIFAR))
    assert e.value.where == "model.params"


@pytest.mark.parametrize("name", CONV_MODELS)
def test_conv_model_on_tabular_data_is_a_spec_error(name):
    with pytest.raises(SpecError) as e:
        build_model(name, None, _info(TABULAR))
    msg = str(e.value)
    assert e.value.where == "model.name" and "\n" not in msg
    assert repr(name) in msg and "(C, H, W)" in msg and "(600,)" in msg


VMAP_CASES = [(name, None) for name in sorted(SUPPORTED)] + [("cnn", {"batch_norm": True})]


@pytest.mark.parametrize("name,params", VMAP_CASES, ids=lambda v: str(v) if v is None or isinstance(v, str) else "bn")
def test_vmap_functional_call_matches_single_models(name, params):
    # 3x16x16 is small enough to be fast and large enough that train-mode BatchNorm never normalises
    # over just 2 values (at 8x8 the last maps are 1x1, and BN over 2 samples amplifies float rounding
    # differences between the batched and the single kernels far beyond 1e-4).
    shape = (3, 16, 16)
    models = [_build(name, shape, seed=s, params=params) for s in (0, 1)]
    with torch.device("meta"):  # the base copy holds no data: functional_call supplies every tensor
        base = _build(name, shape, params=params)
    stacked_p, stacked_b = stack_module_state(models)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))

    def one(p, b, x):
        return functional_call(base, (p, b), (x,))

    run = vmap(one, in_dims=(0, 0, None))

    base.eval()
    with torch.no_grad():
        out = run(stacked_p, stacked_b, x)
        assert out.shape == (2, 3, K)
        for k, m in enumerate(models):
            torch.testing.assert_close(out[k], m.eval()(x), atol=1e-4, rtol=1e-4)

    base.train()
    before = {n: b.clone() for n, b in stacked_b.items()}
    out = run(stacked_p, stacked_b, x)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stacked_p.values())
    for k, m in enumerate(models):
        torch.testing.assert_close(out[k].detach(), m.train()(x).detach(), atol=1e-4, rtol=1e-4)
    running = [n for n in stacked_b if n.endswith("running_mean")]
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in models[0].modules())
    assert bool(running) == has_bn
    for n in running:
        assert not torch.equal(stacked_b[n], before[n]), f"{n} not updated under vmap"
        for k, m in enumerate(models):  # the single models took the same step on their own buffers
            torch.testing.assert_close(stacked_b[n][k], m.state_dict()[n], atol=1e-5, rtol=1e-4)
