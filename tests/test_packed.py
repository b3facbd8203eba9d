"""PackedSequential: K sequential models run as grouped kernels give each model's own outputs, gradients
and BatchNorm statistics; architectures it cannot run fall back to vmap."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import stack_module_state

from raymia.datainfo import DataInfo
from raymia.models import build_model
from raymia.train import packed
from raymia.train.bank import PackedModels
from raymia.train.packed import PackedSequential, _Act, maybe_packed, runs_packed

IMG = DataInfo(kind="image", input_shape=(1, 12, 12), num_classes=5)
RGB = DataInfo(kind="image", input_shape=(3, 8, 8), num_classes=4)
RGB16 = DataInfo(kind="image", input_shape=(3, 16, 16), num_classes=4)


def _pack(models: list[nn.Module], input_shape) -> PackedModels:
    pack = PackedModels(models, input_shape=input_shape, channels_last=True)
    assert isinstance(pack.sequential, PackedSequential)
    return pack


def _inputs(k: int, b: int, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, b, *shape, generator=g)
    if len(shape) == 3:
        x[..., : shape[1] // 2, :] = 0.0  # constant regions: ties inside max-pool windows
    return x


def _check_against_models(models, shape, train: bool):
    k = len(models)
    ref = [m.train(train) for m in models]
    pack = _pack([m for m in models], shape).train(train)
    x = _inputs(k, 6, shape)
    out = pack(x)
    ys = [m(x[i]) for i, m in enumerate(ref)]  # one forward each: BatchNorm statistics update once
    assert out.shape == (k, 6, ys[0].shape[-1])
    # gradients: every model's own loss, summed over the pack
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * target).sum().backward()
    for i, (m, y) in enumerate(zip(ref, ys)):
        torch.testing.assert_close(out[i], y, atol=1e-5, rtol=1e-5)
        (y * target[i]).sum().backward()
        for name, p in m.named_parameters():
            # float rounding relative to the gradient's scale (airbench's reach about 30)
            atol = 1e-5 * max(1.0, p.grad.abs().max().item())
            torch.testing.assert_close(pack.params[name].grad[i], p.grad, atol=atol, rtol=1e-4, msg=name)
        for name, buf in m.named_buffers():
            torch.testing.assert_close(pack.buffers[name][i], buf, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name,params,info", [
    ("lenet5", {}, IMG),  # ReLU -> MaxPool runs as MaxPool -> ReLU
    ("lenet5", {"activation": "tanh", "pooling": "avg"}, IMG),
    ("cnn", {"channels": [4, 6], "hidden": 8, "batch_norm": True}, RGB),
    ("cnn", {"channels": [4], "hidden": 8, "batch_norm": True, "global_pool": True}, RGB),
    ("mlp", {"hidden": [16, 8], "activation": "tanh"}, RGB),
    ("airbench", {"widths": [4, 6]}, RGB16),  # frozen stem and BN weights (buffers), GELU, BN after pooling,
    # global max pool, scaled logits
    ("airbench", {"widths": [4, 6], "whiten": False, "stem": 4, "bn_weight": True, "scale": 1, "dirac": False}, RGB16),
])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("convs", ["grouped", "split"])
def test_outputs_gradients_and_bn_statistics_match_each_model(name, params, info, train, convs, monkeypatch):
    if convs == "split":  # every convolution as K ordinary ones (the CPU rule for large maps)
        monkeypatch.setattr(packed, "SPLIT_MIN_OUTPUT", 0)
    torch.manual_seed(0)
    models = [build_model(name, params, info) for _ in range(3)]
    for m in models:  # non-trivial running statistics for eval mode
        for b in m.buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)
    _check_against_models(models, info.input_shape, train)


def test_flat_inputs_and_shared_queries():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 3)) for _ in range(4)]
    _check_against_models(models, (7,), True)
    pack = _pack(models, (7,)).eval()
    x = torch.randn(5, 7)
    out = pack(x, shared_input=True)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), atol=1e-6, rtol=1e-5)


def test_relu_maxpool_swap_is_exact_on_ties():
    """Pool-then-ReLU gives bit-identical values and input gradients to ReLU-then-pool, ties included."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(2 * 16, 3))
    x = _inputs(1, 4, (1, 8, 8))
    x[0, :, :, 4:, :] = -1.0  # negative constants: all-negative windows
    pack = _pack([conv], (1, 8, 8))
    names = [type(m).__name__ for _, m in pack.sequential.leaves]
    assert names == ["Conv2d", "MaxPool2d", "ReLU", "Flatten", "Linear"]
    xp = x.clone().requires_grad_(True)
    out = pack(xp)
    out.sum().backward()
    xr = x[0].clone().requires_grad_(True)
    ref = conv(xr)
    ref.sum().backward()
    torch.testing.assert_close(out[0], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(xp.grad[0], xr.grad, atol=1e-6, rtol=0)


def test_architectures_outside_the_sequential_set_use_vmap():
    assert runs_packed(build_model("lenet5", {}, IMG), IMG.input_shape)
    assert runs_packed(build_model("mlp", {}, RGB), RGB.input_shape)
    assert not runs_packed(build_model("resnet18", {}, RGB), RGB.input_shape)  # residual blocks
    assert not runs_packed(nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(8, 2)), (3, 8))
    assert not runs_packed(nn.Sequential(nn.Linear(8, 4)), (3, 8, 8))  # Linear on image maps (last axis)
    assert not runs_packed(nn.Sequential(nn.Conv2d(3, 4, 3)), RGB.input_shape)  # no flat logits
    assert not runs_packed(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                                         nn.Linear(256, 2)), RGB.input_shape)
    models = [build_model("resnet18", {}, RGB) for _ in range(2)]
    params, buffers = stack_module_state(models)
    assert maybe_packed(models[0], params, buffers, 2, RGB.input_shape, True) is None
    pack = PackedModels(models, input_shape=RGB.input_shape)
    assert pack.engine == "vmap"
    out = pack.eval()(torch.randn(3, *RGB.input_shape), shared_input=True)
    assert out.shape == (2, 3, 4)


def test_cpu_rule_splits_convolutions_with_large_maps():
    """Grouped for LeNet-5's small maps, K ordinary convolutions for a CIFAR CNN's (SPLIT_MIN_OUTPUT)."""
    pack = _pack([build_model("lenet5", {}, IMG) for _ in range(2)], IMG.input_shape).sequential
    lenet_conv1 = nn.Conv2d(1, 6, 5, padding=2)
    assert not pack._per_model(lenet_conv1, _Act("stack", torch.zeros(2 * 64, 1, 28, 28), 2, 64))
    cifar_conv1 = nn.Conv2d(3, 32, 3, padding=1)  # 128 x 32 x 32 x 32 = 4.2M outputs per model
    assert pack._per_model(cifar_conv1, _Act("stack", torch.zeros(2 * 128, 3, 32, 32), 2, 128))
    assert pack._per_model(nn.Conv2d(3, 32, 3, padding="same"), _Act("stack", torch.zeros(2 * 128, 3, 32, 32), 2, 128))
