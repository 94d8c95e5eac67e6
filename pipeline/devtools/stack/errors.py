"""One base class, so callers (the CLI) can report any stack failure in one place."""

from __future__ import annotations


class StackError(Exception):
    """The stack could not be brought to the requested state; the message says why."""
