"""VGG with BatchNorm, CIFAR-style (Simonyan & Zisserman configs 'A' = VGG-11 and 'D' = VGG-16)."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from raymia.datainfo import DataInfo
from raymia.models.base import MODELS, image_shape, init_conv_bn
from raymia.registry import Params


class VGGParams(Params):
    width: float = Field(1.0, gt=0, le=8, description="multiplier of every conv's channel count (1.0: 64..512)")


class VGG(nn.Module):
    """torchvision's VGG-BN feature extractor and initialisation with a CIFAR head.

    Differences from torchvision.models.vgg11_bn / vgg16_bn, all as in the usual CIFAR ports:
    - features: the layers of torchvision.models.vgg.make_layers(cfg, batch_norm=True) (conv3x3 with
      bias, BN, ReLU; 'M' = 2x2 max-pool), built here so that the input channel count and a width
      multiplier can differ from (3, 1.0), with ReLU(inplace=False) and max-pools in ceil_mode: this
      changes nothing for 32x32 (every map size is even) but lets 28x28 (14, 7, 4, 2, 1) and 8x8 inputs
      through all five pools;
    - classifier: adaptive average pooling to 1x1 and one Linear(512 * width, K) instead of the
      7x7 pool and the 4096-4096 MLP with Dropout (for 32x32 inputs the map is already 1x1).
    """

    def __init__(self, cfg: list[int | str], in_channels: int, num_classes: int, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                out = max(1, round(int(v) * width))
                layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
                c = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        init_conv_bn(self)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@MODELS.register("vgg11", VGGParams, doc="VGG-11 with BatchNorm, CIFAR head (global avg pool -> Linear(512, K))")
def vgg11(p: VGGParams, info: DataInfo) -> nn.Module:
    from torchvision.models.vgg import cfgs  # torchvision is imported only when needed

    c, _, _ = image_shape(info, "vgg11")
    return VGG(cfgs["A"], c, info.num_classes, p.width)


@MODELS.register("vgg16", VGGParams, doc="VGG-16 with BatchNorm, CIFAR head (global avg pool -> Linear(512, K))")
def vgg16(p: VGGParams, info: DataInfo) -> nn.Module:
    from torchvision.models.vgg import cfgs

    c, _, _ = image_shape(info, "vgg16")
    return VGG(cfgs["D"], c, info.num_classes, p.width)
