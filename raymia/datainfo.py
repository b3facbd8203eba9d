"""`DataInfo`: what a model builder or a defense may know about a data set (shape, classes, kind,
normalisation), and how to draw random inputs in its input space.

A bottom module (no raymia imports): data sets, models and defenses all use it without importing each
other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataInfo:
    """What a defense may know about the data: shape, classes, and how to draw random inputs."""

    num_classes: int
    input_shape: tuple[int, ...]
    kind: str  # "image" or "tabular"
    mean: tuple[float, ...] | None = None  # per-channel normalisation of image inputs in [0, 1]
    std: tuple[float, ...] | None = None

    def random_inputs(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        """Random inputs in the model's input space: images are uniform pixels in [0, 1] followed by the
        data set's normalisation; tabular inputs are Bernoulli(0.5) vectors (HAMP's choice)."""
        shape = (n, *self.input_shape)
        if self.kind == "image":
            x = torch.rand(shape, generator=generator)
            if self.mean is not None and self.std is not None:
                c = self.input_shape[0]
                mean = torch.tensor(self.mean, dtype=x.dtype).view(1, c, *([1] * (len(shape) - 2)))
                std = torch.tensor(self.std, dtype=x.dtype).view(1, c, *([1] * (len(shape) - 2)))
                x = (x - mean) / std
        elif self.kind == "tabular":
            x = torch.bernoulli(torch.full(shape, 0.5), generator=generator)
        else:
            raise ValueError(f"unknown data kind {self.kind!r}")
        return x.to(device)
