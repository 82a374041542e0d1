"""The one exception family megaquant raises; the CLI turns it into `error: ...` and exit 1."""

from __future__ import annotations

__all__ = [
    "MegaquantError",
    "SourceError",
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
