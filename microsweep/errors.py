"""Errors microsweep raises for bad input: each carries a one-line message saying what to do."""

from __future__ import annotations

__all__ = [
    "DataError",
    "MicrosweepError",
    "SpaceError",
    "SpaceWarning",
    "StorageError",
    "StorageUnavailable",
    "UsageError",
]


class MicrosweepError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""


class SpaceError(MicrosweepError, ValueError):
    """The search space, a knob or a policy is invalid (raised before any trial runs)."""


class StorageError(MicrosweepError):
    """The storage URL, schema version or a named sweep is wrong."""


class StorageUnavailable(StorageError):
    """The database cannot be reached or written right now (refused connection, restart, lock,
    full disk): worth retrying, unlike a wrong URL or schema."""


class UsageError(MicrosweepError, ValueError):
    """A command-line or API argument is wrong."""


class DataError(MicrosweepError):
    """A corpus cannot be found, read or downloaded."""


class SpaceWarning(UserWarning):
    """A space is valid but wasteful: levels the scoring rules make pointless, for example."""
