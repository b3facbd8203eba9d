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
    name: str = ""  # the data set's registry name (set by load_dataset): a defense's per-data-set defaults

    def pixel_stats(self, ndim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) shaped to broadcast over [N, C, ...] images (normalised = (pixel - mean) / std, pixels
        in [0, 1]); None for inputs without a normalisation (tabular data, or images kept as pixels)."""
        if self.kind != "image" or self.mean is None or self.std is None:
            return None
        view = (1, self.input_shape[0]) + (1,) * (ndim - 2)
        return (torch.tensor(self.mean, dtype=dtype, device=device).view(view),
                torch.tensor(self.std, dtype=dtype, device=device).view(view))

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> pixels (the identity without a normalisation)."""
        ms = self.pixel_stats(x.ndim, x.dtype, x.device)
        return x if ms is None else x * ms[1] + ms[0]

    def from_pixels(self, px: torch.Tensor) -> torch.Tensor:
        """Pixels -> normalised images (the identity without a normalisation)."""
        ms = self.pixel_stats(px.ndim, px.dtype, px.device)
        return px if ms is None else (px - ms[0]) / ms[1]

    def random_inputs(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        """Random inputs in the model's input space: images are uniform pixels in [0, 1] followed by the
        data set's normalisation; tabular inputs are Bernoulli(0.5) vectors (HAMP's choice)."""
        shape = (n, *self.input_shape)
        if self.kind == "image":
            x = self.from_pixels(torch.rand(shape, generator=generator))
        elif self.kind == "tabular":
            x = torch.bernoulli(torch.full(shape, 0.5), generator=generator)
        else:
            raise ValueError(f"unknown data kind {self.kind!r}")
        return x.to(device)
