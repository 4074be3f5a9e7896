"""The one error hierarchy every edgefleet part raises and the CLI turns into a one-line message.

Callers catch `EdgefleetError` (or a subclass) and print `str(err)`; each message says what was
wrong and, where there is one, what to do next (`hint`).
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Base class: a failure the user can act on (bad input, bad file, refused operation)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(EdgefleetError):
    """The command was called wrongly (maps to exit code 2)."""
