"""The values a flag takes in a Megatron argv list (`--flag value` or `--flag=value`), in order. Pure.

Megatron's parser keeps the last occurrence; callers that need the value it will use take `[-1]`.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["flag_values"]


def flag_values(argv: Sequence[str], flag: str) -> list[str]:
    """Every value given to `flag` in `argv`, in order ('' for a trailing flag without one)."""
    values = []
    for i, arg in enumerate(argv):
        name, eq, inline = arg.partition("=")
        if name == flag:
            values.append(inline if eq else (argv[i + 1] if i + 1 < len(argv) else ""))
    return values
