"""Architectures: a registry of builders `build(params, info) -> nn.Module` producing logits.

Entries: mlp (raymia.models.dense); lenet5, cnn, airbench (convnets); vgg11, vgg16 (vgg); resnet18, wrn, wrn16_4,
wrn28_2 (resnet); mobilenetv2 (mobilenet). See raymia.models.base for what every builder guarantees. The
registry imports every module of this package the first time it is read (raymia.plugins), so adding an
architecture is adding a module (docs/extending.md).
"""

from __future__ import annotations

from raymia.models.base import MODELS, build_model

__all__ = ["MODELS", "build_model"]
