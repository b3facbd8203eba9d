"""MobileNetV2 (torchvision) adapted to 32x32 inputs."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from raymia.datainfo import DataInfo
from raymia.models.base import MODELS, image_shape, inplace_off
from raymia.registry import Params

# torchvision's inverted-residual setting (t, c, n, s) with the second stage's stride 2 -> 1.
_CIFAR_SETTING = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


class MobileNetV2Params(Params):
    width: float = Field(1.0, gt=0, le=4, description="torchvision's width_mult (channels rounded to multiples of 8)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the classifier (vmap then needs randomness)")


@MODELS.register("mobilenetv2", MobileNetV2Params, doc="MobileNetV2 (torchvision) with the CIFAR strides (32x32 -> 4x4)")
def mobilenetv2(p: MobileNetV2Params, info: DataInfo) -> nn.Module:
    """torchvision.models.mobilenet_v2(num_classes=K), randomly initialised, changed as in the common
    CIFAR ports (e.g. kuangliu/pytorch-cifar) so that 32x32 inputs end on a 4x4 map instead of 1x1:
    - features[0]: the stem conv is 3x3 stride 1 (not 2) from C input channels (Kaiming-normal fan_out);
    - the second stage (t=6, c=24, n=2) has stride 1 (not 2): inverted_residual_setting[1][3] = 1;
    - the classifier's Dropout(0.2) is Identity unless `dropout` > 0; ReLU6s are made non-inplace.
    The shortcuts, last 1x1 conv (1280 channels) and Linear(1280, K) are torchvision's."""
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2  # imported only when needed

    c, _, _ = image_shape(info, "mobilenetv2")
    model = tv_mobilenet_v2(
        weights=None, num_classes=info.num_classes, width_mult=p.width,
        inverted_residual_setting=_CIFAR_SETTING, dropout=p.dropout,
    )
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(c, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    if p.dropout == 0:
        model.classifier[0] = nn.Identity()
    return inplace_off(model)
