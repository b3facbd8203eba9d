"""Every random choice derives from the spec's seed and a role, so re-runs give the same numbers."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *role: object) -> int:
    """A 63-bit seed for (seed, role...), stable across processes and Python versions."""
    text = ":".join([str(seed), *map(str, role)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
