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


def first_of(values, at_most: int = 8) -> str:
    """'0, 1, 2' or, beyond `at_most` values, the first of them and ', ...': a bank's targets in one line."""
    values = list(values)
    return ", ".join(map(str, values[:at_most])) + (", ..." if len(values) > at_most else "")
