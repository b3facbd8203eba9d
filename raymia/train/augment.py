"""Training-time augmentation (horizontal flips, random or alternating, and padded random crops: zero or
reflect padding).

The draws come from each model's own CPU generator (`Augmenter`), the pixels move on the model's device
(`apply_augment`), so a model trained in a pack sees exactly the augmented batches it would see trained
alone.
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


class Augmenter:
    """One model's augmentation draws over its n training images, from its own generator.

    `flip: random` flips each drawn image with p = 0.5. `flip: alternate` is airbench's alternating flip:
    a random half of the n images (drawn once, here) is flipped on its first pass, and every later pass
    flips each image the other way from its previous pass (image i on pass p: flipped iff mask[i] xor p
    is odd), so any two consecutive passes show every image both ways. Crops are drawn afresh each time.
    """

    def __init__(self, aug: AugmentSpec, n: int, generator: torch.Generator):
        self.aug, self.generator = aug, generator
        self.active = aug.hflip or aug.crop > 0
        alternate = aug.hflip and aug.flip == "alternate"
        self.mask = torch.rand(n, generator=generator) < 0.5 if alternate else None

    def draw(self, index: torch.Tensor, passes: torch.Tensor) -> AugmentDraw:
        """index, passes: int64 [B] on the CPU: each image's position in the model's n and its pass number."""
        b = index.shape[0]
        if self.mask is not None:
            flip = self.mask[index] ^ (passes % 2 == 1)
        else:
            flip = torch.rand(b, generator=self.generator) < 0.5 if self.aug.hflip else None
        offsets = torch.randint(0, 2 * self.aug.crop + 1, (b, 2), generator=self.generator) if self.aug.crop else None
        return AugmentDraw(flip=flip, offsets=offsets)

    def __call__(self, x: torch.Tensor, index: torch.Tensor, passes: torch.Tensor) -> torch.Tensor:
        """x: the images [B, C, H, W] at those positions, on any device; returned augmented (x itself when
        the recipe has no augmentation)."""
        return apply_augment(x, self.draw(index, passes), self.aug) if self.active else x


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
