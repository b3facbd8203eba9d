"""The batch stream every trainer shares (through raymia.train.loop: the bank and every defense)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def batch_passes(n: int, batch: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Full batches of indices in [0, n) from a stream of fresh permutations (reshuffled on exhaustion),
    each with its indices' pass numbers: 0 for the first permutation, 1 for the second, ... (a batch
    that straddles two permutations holds both)."""
    if n < 1:
        raise ValueError(f"no indices to draw batches from (n={n})")  # the loop below would never end
    buf = torch.empty(0, dtype=torch.int64)
    passes = torch.empty(0, dtype=torch.int64)
    p = 0
    while True:
        while buf.numel() < batch:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
            passes = torch.cat([passes, torch.full((n,), p, dtype=torch.int64)])
            p += 1
        yield buf[:batch], passes[:batch]
        buf, passes = buf[batch:], passes[batch:]


def batch_stream(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`batch_passes` without the pass numbers (the same batches for the same generator)."""
    for b, _ in batch_passes(n, batch, generator):
        yield b
