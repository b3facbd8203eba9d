"""Small convolutional networks: LeNet-5, a configurable plain CNN and an airbench94-style CIFAR CNN."""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from raymia.datainfo import DataInfo
from raymia.errors import SpecError
from raymia.models.base import MODELS, Scale, freeze, image_shape
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
    stem: int | None = Field(None, ge=1, description="channels of the 2x2 stem convolution; default (and "
                                                     "required with whiten) 2 x C x 2 x 2: 24 for RGB")
    bn_momentum: float = Field(0.4, gt=0, le=1, description="BatchNorm momentum (PyTorch convention)")
    bn_eps: float = Field(1e-12, gt=0, description="BatchNorm epsilon (airbench's 1e-12; PyTorch's default is 1e-5)")
    whiten: bool = Field(True, description="stem filters whiten the 2x2 patches of the model's own training "
                                           "images, and stay frozen")
    dirac: bool = Field(True, description="each 3x3 convolution starts as the identity on its first "
                                          "in_channels filters")
    bn_weight: bool = Field(False, description="train the BatchNorm weights (else frozen at 1)")
    scale: float = Field(1 / 9, gt=0, description="factor on the logits (airbench: 1/9)")
    bias_lr_scale: float = Field(64.0, gt=0, description="learning-rate factor of the BatchNorm biases (weight "
                                                         "decay per step unchanged)")
    whiten_bias_epochs: int | None = Field(3, ge=0, description="the whitening stem's bias trains for this many "
                                                                "epochs, then stays as it is (None: throughout)")


class WhiteningConv2d(nn.Conv2d):
    """airbench's stem: a frozen convolution whose 2 x C x kh x kw filters are the eigenvectors of the
    second-moment matrix of the training images' kh x kw patches, each scaled by 1 / sqrt(eigenvalue + eps),
    and their negatives. On the patches it was fitted to, the first half of its outputs (without bias) has
    second-moment matrix diag(eigenvalue / (eigenvalue + eps)): whitened. The weight is a buffer (not
    trained); the bias trains. `init_from_data` sets it from a model's own training inputs, so every bank
    model (target and shadows alike) whitens with its own members."""

    def __init__(self, in_channels: int, kernel_size: int = 2, eps: float = 5e-4, max_images: int = 5000):
        super().__init__(in_channels, 2 * in_channels * kernel_size * kernel_size, kernel_size)
        freeze(self, "weight")
        self.eps, self.max_images = eps, max_images

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """x: [N, C, H, W] training inputs; the first `max_images` are used (float64 moments, on x's
        device, in chunks)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[0] < 1:
            raise ValueError(f"whitening stem: expected images [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        kh, kw = self.kernel_size
        d = self.in_channels * kh * kw
        moment = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        count = 0
        for chunk in x[: self.max_images].split(500):
            patches = chunk.double().unfold(2, kh, 1).unfold(3, kw, 1)  # [n, C, H', W', kh, kw]
            flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, d)
            moment += flat.T @ flat
            count += flat.shape[0]
        values, vectors = torch.linalg.eigh(moment / count)  # ascending
        values, vectors = values.flip(0), vectors.flip(1)
        filters = (vectors.T / torch.sqrt(values.clamp_min(0) + self.eps)[:, None]).reshape(d, *self.weight.shape[1:])
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))


@MODELS.register("airbench", AirbenchParams,
                 doc="airbench94 CIFAR CNN: frozen whitening 2x2 stem, conv groups (conv-pool-BN-GELU-conv-BN-GELU), "
                     "global max pool, linear, logits x 1/9")
def airbench(p: AirbenchParams, info: DataInfo) -> nn.Module:
    """The network of airbench94 (Jordan, 2024: 94% on CIFAR-10 in a few seconds of an A100) with the
    parts of its training that live in the model: a 2x2 stem convolution (24 channels for RGB) whose frozen
    filters whiten the image patches of the model's own training set (`WhiteningConv2d`, set when the bank
    initialises the model), three groups of [conv3x3, maxpool2, BN, GELU, conv3x3, BN, GELU] with 64, 256,
    256 channels (convolutions start as identities on their first in_channels filters; BatchNorm weights
    frozen at 1, eps 1e-12; BatchNorm biases at 64x the learning rate; the stem's bias, at the
    base learning rate, trained for the first 3 epochs only), a global max pool
    (airbench's MaxPool2d(3) on its 3x3 map), a bias-free linear layer and the logits scaled by 1/9. Each
    part can be switched off by its parameter. Its lookahead is `train.lookahead`, its lr schedule
    `train.schedule: triangle`; test-time augmentation is not part of the model. A plain nn.Sequential,
    so packs of it run as grouped kernels. Needs H, W >= 16 (three halvings after the stem)."""
    c, h, w = image_shape(info, "airbench", min_size=16)
    stem_channels = 2 * c * 2 * 2
    if p.whiten and p.stem is not None and p.stem != stem_channels:
        raise SpecError(f"model 'airbench': a whitening stem has 2 x C x 2 x 2 = {stem_channels} channels for "
                        f"{c}-channel images, got stem {p.stem}; leave stem unset or set whiten: false",
                        where="model.params.stem")
    stem: nn.Conv2d = WhiteningConv2d(c) if p.whiten else nn.Conv2d(c, p.stem or stem_channels, 2)
    if p.whiten and p.whiten_bias_epochs is not None:  # airbench trains the whitening bias for 3 epochs
        stem.train_epochs = {"bias": p.whiten_bias_epochs}
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=stem, stem_act=nn.GELU())
    width = stem.out_channels

    def conv(cin: int, cout: int) -> nn.Conv2d:
        layer = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        if p.dirac:
            with torch.no_grad():
                nn.init.dirac_(layer.weight[:min(cin, cout)])
        return layer

    def norm(channels: int) -> nn.BatchNorm2d:
        layer = nn.BatchNorm2d(channels, eps=p.bn_eps, momentum=p.bn_momentum)
        if not p.bn_weight:
            freeze(layer, "weight")
        if p.bias_lr_scale != 1:
            layer.lr_scales = {"bias": p.bias_lr_scale}
        return layer

    for i, out in enumerate(p.widths, start=1):
        layers[f"group{i}"] = nn.Sequential(
            conv(width, out), nn.MaxPool2d(2), norm(out), nn.GELU(), conv(out, out), norm(out), nn.GELU())
        width = out
    layers["pool"] = nn.AdaptiveMaxPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["head"] = nn.Linear(width, info.num_classes, bias=False)
    if p.scale != 1:
        layers["scale"] = Scale(p.scale)
    return nn.Sequential(layers)
