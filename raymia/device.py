"""The one rule for turning a device setting into a torch device."""

from __future__ import annotations

import torch

from raymia.errors import SpecError


def resolve_device(name: str, where: str = "bank.device") -> torch.device:
    """'auto': CUDA when torch sees a device, else the CPU; 'cuda' without a visible device is a SpecError
    naming `where` (the spec field that asked for it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecError("cuda requested but no CUDA device is visible; accepted here: auto, cpu", where=where)
    return torch.device(name)
