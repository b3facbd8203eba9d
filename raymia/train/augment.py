"""Training-time augmentation (random horizontal flips and padded random crops: zero or reflect padding).

The random draws come from each model's own CPU generator (`draw_augment`), the pixels move on the
model's device (`apply_augment`), so a model trained in a pack sees exactly the augmented batches it
would see trained alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raymia.spec import AugmentSpec


@dataclass(frozen=True)
class AugmentDraw:
    flip: torch.Tensor | None  # bool [B]
    offsets: torch.Tensor | None  # int64 [B, 2]: (row, col) of the crop in the padded image


def draw_augment(aug: AugmentSpec, shape: tuple[int, ...] | torch.Size, generator: torch.Generator) -> AugmentDraw:
    b = shape[0]
    flip = torch.rand(b, generator=generator) < 0.5 if aug.hflip else None
    offsets = torch.randint(0, 2 * aug.crop + 1, (b, 2), generator=generator) if aug.crop else None
    return AugmentDraw(flip=flip, offsets=offsets)


def apply_augment(x: torch.Tensor, draw: AugmentDraw, aug: AugmentSpec) -> torch.Tensor:
    """x: images [B, C, H, W] on any device."""
    if draw.flip is not None:
        x = torch.where(draw.flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    if draw.offsets is not None:
        p = aug.crop
        _, _, h, w = x.shape
        if aug.pad == "reflect":
            if p >= min(h, w):
                raise ValueError(f"train.augment: pad reflect needs crop < the image size; crop {p}, "
                                 f"images {h}x{w}")
            padded = F.pad(x, (p, p, p, p), mode="reflect")
        else:
            padded = F.pad(x, (p, p, p, p))
        off = draw.offsets.to(x.device)
        rows = off[:, 0:1] + torch.arange(h, device=x.device)[None]  # [B, H]
        cols = off[:, 1:2] + torch.arange(w, device=x.device)[None]  # [B, W]
        bidx = torch.arange(x.shape[0], device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return x
