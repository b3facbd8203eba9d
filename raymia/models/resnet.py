"""Residual networks: CIFAR ResNet-18 (torchvision) and Wide ResNets (Zagoruyko & Komodakis, 2016)."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from raymia.datainfo import DataInfo
from raymia.errors import SpecError
from raymia.models.base import MODELS, image_shape, init_conv_bn, inplace_off
from raymia.registry import NoParams, Params


@MODELS.register("resnet18", NoParams, doc="ResNet-18 (torchvision) with the CIFAR stem: conv1 3x3 stride 1, no max-pool")
def resnet18(p: NoParams, info: DataInfo) -> nn.Module:
    """torchvision.models.resnet18(num_classes=K), randomly initialised, with conv1 replaced by a 3x3,
    stride-1, padding-1 conv from C input channels (Kaiming-normal fan_out, as torchvision initialises
    it) and the stem max-pool replaced by Identity; ReLUs are made non-inplace."""
    from torchvision.models import resnet18 as tv_resnet18  # torchvision is imported only when needed

    c, _, _ = image_shape(info, "resnet18")
    model = tv_resnet18(weights=None, num_classes=info.num_classes)
    model.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return inplace_off(model)


class WideBasic(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3(stride)-BN-ReLU-(dropout)-conv3x3, plus the input, or
    a 1x1 conv of the pre-activated input when the shape changes (as in the authors' code)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if (cin != cout or stride != 1) else None
        )

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        y = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(o)))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-width: conv3x3 16, three stages of (depth-4)/6 blocks with 16k, 32k, 64k channels
    (strides 1, 2, 2), BN-ReLU, global average pooling, Linear."""

    def __init__(self, depth: int, width: int, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [WideBasic(widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1, dropout)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.pool(self.relu(self.bn(x))).flatten(1))


_DROPOUT = Field(0.0, ge=0.0, lt=1.0, description="dropout between the convs of a block (vmap then needs randomness)")


class WRNParams(Params):
    depth: int = Field(28, ge=10, le=1000, description="total depth; 6n+4 (10, 16, 22, 28, 40, ...)")
    width: int = Field(2, ge=1, description="widening factor k (stage widths 16k, 32k, 64k)")
    dropout: float = _DROPOUT


class FixedWRNParams(Params):
    dropout: float = _DROPOUT


def _wrn(name: str, depth: int, width: int, dropout: float, info: DataInfo) -> nn.Module:
    if (depth - 4) % 6 != 0:
        raise SpecError(f"{name} depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}", where="model.params.depth")
    c, _, _ = image_shape(info, name)
    return WideResNet(depth, width, c, info.num_classes, dropout)


@MODELS.register("wrn", WRNParams, doc="Wide ResNet WRN-depth-width (pre-activation basic blocks)")
def wrn(p: WRNParams, info: DataInfo) -> nn.Module:
    return _wrn("wrn", p.depth, p.width, p.dropout, info)


@MODELS.register("wrn16_4", FixedWRNParams, doc="Wide ResNet WRN-16-4 (pre-activation basic blocks)")
def wrn16_4(p: FixedWRNParams, info: DataInfo) -> nn.Module:
    return _wrn("wrn16_4", 16, 4, p.dropout, info)


@MODELS.register("wrn28_2", FixedWRNParams, doc="Wide ResNet WRN-28-2 (pre-activation basic blocks)")
def wrn28_2(p: FixedWRNParams, info: DataInfo) -> nn.Module:
    return _wrn("wrn28_2", 28, 2, p.dropout, info)
