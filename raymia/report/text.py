"""Plain-text formatting shared by the console lines and reports."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """12s, 3m05s, 2h04m (under a second: "0s")."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
