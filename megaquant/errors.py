"""The one exception family megaquant raises; the CLI turns it into `error: ...` and exit 1."""

from __future__ import annotations

__all__ = [
    "MegaquantError",
    "SourceError",
    "UnparsableError",
    "SpecError",
    "RoleError",
    "ValueNameError",
    "GitStateError",
    "LockedError",
    "LaunchError",
]


class MegaquantError(Exception):
    """Base class: every message is meant to be read by a user and acted on."""


class SourceError(MegaquantError):
    """A source file cannot be read or parsed (message names file:line and the cause)."""


class UnparsableError(SourceError):
    """A file is not valid Python (or cannot be decoded): `file`, `line` and `cause` name where and why."""

    def __init__(self, message: str, *, file: str, line: int, cause: str) -> None:
        super().__init__(message)
        self.file = file
        self.line = line
        self.cause = cause


class SpecError(MegaquantError):
    """A rewrite spec in `rewrites/` is malformed."""


class RoleError(MegaquantError):
    """A role was asked for that the spec or the tree does not have (asking is never a silent no-op)."""


class ValueNameError(MegaquantError):
    """An unknown quantization value was asked for (message lists the known ones)."""


class GitStateError(MegaquantError):
    """The repository is not in a state the operation can safely act on."""


class LockedError(GitStateError):
    """Another megaquant process holds the repository lock."""


class LaunchError(MegaquantError):
    """A training run cannot be built or started as asked."""
