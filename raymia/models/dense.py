"""Dense models over the flattened input."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field
from torch import nn

from raymia.datainfo import DataInfo
from raymia.models.base import MODELS
from raymia.registry import Params


class MLPParams(Params):
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [256, 256], description="widths of the hidden layers")
    activation: Literal["relu", "tanh"] = Field("relu", description="tanh gives HAMP's tabular MLP")


_ACT = {"relu": nn.ReLU, "tanh": nn.Tanh}


@MODELS.register("mlp", MLPParams, doc="Multi-layer perceptron over the flattened input")
def mlp(p: MLPParams, info: DataInfo) -> nn.Module:
    dims = [math.prod(info.input_shape), *p.hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), _ACT[p.activation]()]
    layers.append(nn.Linear(dims[-1], info.num_classes))
    return nn.Sequential(*layers)
