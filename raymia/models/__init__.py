"""Architectures: a registry of builders `build(params, info) -> nn.Module` producing logits.

Entries: mlp (raymia.models.dense); lenet5, cnn, airbench (convnets); vgg11, vgg16 (vgg); resnet18, wrn, wrn16_4,
wrn28_2 (resnet); mobilenetv2 (mobilenet). See raymia.models.base for what every builder guarantees.
"""

from __future__ import annotations

from raymia.models import convnets, mobilenet, resnet, vgg  # noqa: F401  (registers the entries)
from raymia.models.base import MODELS, build_model
from raymia.models.dense import MLPParams, mlp

__all__ = ["MODELS", "MLPParams", "build_model", "mlp"]
