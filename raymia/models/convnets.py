"""Small convolutional networks: LeNet-5, a configurable plain CNN and an airbench94-style CIFAR CNN."""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Literal

from pydantic import Field
from torch import nn

from raymia.defenses.base import DataInfo
from raymia.models.base import MODELS, image_shape
from raymia.registry import Params

_ACT = {"relu": nn.ReLU, "tanh": nn.Tanh}
_POOL = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


class LeNet5Params(Params):
    activation: Literal["relu", "tanh"] = Field("relu", description="activation after every conv and hidden fc layer")
    pooling: Literal["max", "avg"] = Field("max", description="2x2 stride-2 subsampling after each conv")


@MODELS.register("lenet5", LeNet5Params, doc="LeNet-5: conv 6@5x5, pool, conv 16@5x5, pool, fc 120, 84, K")
def lenet5(p: LeNet5Params, info: DataInfo) -> nn.Module:
    """Images smaller than 32x32 get padding=2 on conv1 (the usual 28x28 MNIST setting, as LeCun padded
    the digits to 32x32); 32x32 and larger are unpadded. The first fc layer takes whatever 16xhxw map
    remains (16x5x5 for 28x28 and 32x32). Needs H, W >= 12."""
    c, h, w = image_shape(info, "lenet5", min_size=12)
    pad = 2 if min(h, w) < 32 else 0

    def out(s: int) -> int:
        return ((s + 2 * pad - 4) // 2 - 4) // 2

    act, pool = _ACT[p.activation], _POOL[p.pooling]
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(c, 6, 5, padding=pad), act1=act(), pool1=pool(2, 2),
        conv2=nn.Conv2d(6, 16, 5), act2=act(), pool2=pool(2, 2),
        flatten=nn.Flatten(),
        fc1=nn.Linear(16 * out(h) * out(w), 120), act3=act(),
        fc2=nn.Linear(120, 84), act4=act(),
        fc3=nn.Linear(84, info.num_classes),
    ))


class CNNParams(Params):
    channels: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [32, 64], min_length=1, description="output channels of the conv blocks"
    )
    batch_norm: bool = Field(False, description="BatchNorm after each conv (the conv then has no bias)")
    global_pool: bool = Field(False, description="global average pooling before the fc layers (else flatten)")
    hidden: int = Field(128, ge=1, description="width of the hidden fc layer")


@MODELS.register("cnn", CNNParams, doc="Small CNN: conv3x3-(BN)-ReLU-maxpool2 blocks, fc hidden, fc K")
def cnn(p: CNNParams, info: DataInfo) -> nn.Module:
    """Each block halves the spatial size only while it is >= 2 (so 8x8 digits take any depth); a block
    without pooling keeps an Identity in its place, so parameter names never depend on the input size."""
    c, h, w = image_shape(info, "cnn")
    blocks = []
    for out in p.channels:
        layers: list[nn.Module] = [nn.Conv2d(c, out, 3, padding=1, bias=not p.batch_norm)]
        if p.batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU())
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2, 2))
            h, w = h // 2, w // 2
        else:
            layers.append(nn.Identity())
        blocks.append(nn.Sequential(*layers))
        c = out
    if p.global_pool:
        head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        feat = c
    else:
        head, feat = [nn.Flatten()], c * h * w
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(*blocks),
        pool=nn.Sequential(*head),
        classifier=nn.Sequential(nn.Linear(feat, p.hidden), nn.ReLU(), nn.Linear(p.hidden, info.num_classes)),
    ))


class AirbenchParams(Params):
    widths: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [64, 256, 256], min_length=1, description="output channels of the conv groups"
    )
    stem: int = Field(24, ge=1, description="channels of the 2x2 stem convolution")
    bn_momentum: float = Field(0.4, gt=0, le=1, description="BatchNorm momentum (PyTorch convention)")


@MODELS.register("airbench", AirbenchParams,
                 doc="airbench94-style CIFAR CNN: 2x2 conv stem, conv groups (conv-pool-BN-GELU-conv-BN-GELU), "
                     "global max pool, linear")
def airbench(p: AirbenchParams, info: DataInfo) -> nn.Module:
    """The layout of airbench94 (Jordan, 2024: 94% on CIFAR-10 in a few seconds of an A100): a 2x2 stem
    convolution (24 channels), three groups of [conv3x3, maxpool2, BN, GELU, conv3x3, BN, GELU] with 64,
    256, 256 channels, a global max pool (airbench's MaxPool2d(3) on its 3x3 map) and a bias-free linear
    layer. Its training tricks (frozen whitening stem initialised from data, lookahead, test-time
    augmentation, output scaling) are not part of the model. A plain nn.Sequential, so packs of it run as
    grouped kernels. Needs H, W >= 16 (three halvings after the stem)."""
    c, h, w = image_shape(info, "airbench", min_size=16)
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=nn.Conv2d(c, p.stem, 2), stem_act=nn.GELU())
    width = p.stem
    for i, out in enumerate(p.widths, start=1):
        layers[f"group{i}"] = nn.Sequential(
            nn.Conv2d(width, out, 3, padding=1, bias=False), nn.MaxPool2d(2),
            nn.BatchNorm2d(out, momentum=p.bn_momentum), nn.GELU(),
            nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out, momentum=p.bn_momentum), nn.GELU(),
        )
        width = out
    layers["pool"] = nn.AdaptiveMaxPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["head"] = nn.Linear(width, info.num_classes, bias=False)
    return nn.Sequential(layers)
