"""megaquant: exact, safe low-precision training experiments on Megatron-LM.

`import megaquant` never imports torch, triton or megatron; the API (libcst, GitPython) loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from megaquant.errors import MegaquantError

if TYPE_CHECKING:
    from megaquant.api import ApplyResult, Base, RestoreResult, Status, apply, diff, restore, status

__all__ = [
    "ApplyResult",
    "Base",
    "MegaquantError",
    "RestoreResult",
    "Status",
    "__version__",
    "apply",
    "diff",
    "restore",
    "status",
]

__version__ = "0.1.0"

_API_NAMES = frozenset(
    {"ApplyResult", "Base", "RestoreResult", "Status", "apply", "diff", "restore", "status"}
)


def __getattr__(name: str) -> object:
    # `megaquant.api` is also reachable as an attribute (submodule import sets it on first use).
    if name in _API_NAMES:
        return getattr(importlib.import_module("megaquant.api"), name)
    if name == "api":
        return importlib.import_module("megaquant.api")
    raise AttributeError(f"module 'megaquant' has no attribute {name!r}")
