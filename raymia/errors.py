"""User-facing errors: each one becomes a single line on stderr and exit code 2 in the CLI."""

from __future__ import annotations


class RaymiaError(Exception):
    """An error caused by the user's input (spec, data, arguments), not by a bug in raymia."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class SpecError(RaymiaError):
    """A spec field is malformed, unknown or out of range. `where` names the field (dotted path) or file."""


class DataError(RaymiaError):
    """A data file is missing or malformed. `where` names the path."""
