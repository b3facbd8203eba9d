"""Eval-mode inference under query augmentations, with the defense's output post-processing applied."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymia.defenses.base import Defense
from raymia.seeding import derive_seed
from raymia.spec import parse_query


def augment(x: torch.Tensor, query: str) -> torch.Tensor:
    """Apply one query augmentation to a whole set of inputs [N, ...] (images [N, C, H, W] for flips and
    shifts). `noise:SIGMA` adds Gaussian noise of that standard deviation (in normalised units) drawn from a
    generator seeded by the query alone, so every model sees the same noisy queries; apply it to the whole
    set at once (not per chunk) so the noise of point i does not depend on batching."""
    q = parse_query(query)
    if q.kind == "identity":
        return x
    if q.kind == "noise":
        gen = torch.Generator().manual_seed(derive_seed(0, "query-noise", query))
        return x + q.sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    if x.ndim != 4:
        raise ValueError(f"query {query!r} needs image inputs [N, C, H, W], got shape {tuple(x.shape)}")
    if q.kind == "hflip":
        return torch.flip(x, dims=[3])
    dx, dy = q.dx, q.dy
    h, w = x.shape[2], x.shape[3]
    if abs(dx) >= w or abs(dy) >= h:
        raise ValueError(f"shift {query!r} is as large as the image ({h}x{w})")
    # Shift content by (dx, dy) pixels, filling the uncovered border by replicating the edge.
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    return _crop_shift(padded, dx, dy, h, w)


def _crop_shift(padded: torch.Tensor, dx: int, dy: int, h: int, w: int) -> torch.Tensor:
    # After padding left by max(dx,0) and top by max(dy,0), the shifted image starts at row/col 0 when the
    # shift is positive, and at |shift| when it is negative.
    r0 = 0 if dy >= 0 else -dy
    c0 = 0 if dx >= 0 else -dx
    return padded[:, :, r0 : r0 + h, c0 : c0 + w]


@torch.no_grad()
def query_logits(
    model: torch.nn.Module,
    defense: Defense,
    x: torch.Tensor,
    queries: list[str],
    generator: torch.Generator,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logits a querier sees: float32 [Q, N, C], model in eval mode, post-processing applied."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for q in queries:
            parts = []
            xq = augment(x, q)
            for i in range(0, x.shape[0], batch_size):
                xb = xq[i : i + batch_size].to(device)
                logits = model(xb).float()
                logits = defense.postprocess_logits(model, logits, generator)
                parts.append(logits.cpu())
            out.append(torch.cat(parts))
        return torch.stack(out)
    finally:
        model.train(was_training)
