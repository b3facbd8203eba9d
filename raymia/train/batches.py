"""The batch stream every trainer shares (the bank, and defenses that train models their own way)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def batch_stream(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Full batches of indices in [0, n) from a stream of fresh permutations (reshuffled on exhaustion)."""
    buf = torch.empty(0, dtype=torch.int64)
    while True:
        while buf.numel() < batch:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
        yield buf[:batch]
        buf = buf[batch:]
