"""The user's own model: a builder that raymia calls as `net:build` (module:function).

raymia calls `build(params, info)` once per model, under a fixed seed: `params` holds `model.params` of the
spec as attributes, `info` the data set's facts (`info.input_shape`, `info.num_classes`). It returns an
`nn.Module` whose output is logits. The same builder makes the target here (train_target.py) and the
shadows in the audit, so the checkpoint fits the architecture raymia trains.
"""

from math import prod

from torch import nn


def build(params, info) -> nn.Module:
    width = getattr(params, "width", 256)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(prod(info.input_shape), width),
        nn.ReLU(),
        nn.Linear(width, info.num_classes),
    )
