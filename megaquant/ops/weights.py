"""Quantize each weight once per optimizer step: a cache of fake-quantized parameters.

Within one optimizer step every microbatch reads the same weights, so each microbatch's fake-quantized
copy of a weight is the same bits. With the cache on (`enable_weight_cache`), the first microbatch
quantizes a parameter (once per format, axis, layout and options) and the later ones reuse that copy:
with 8 microbatches per step, 7 of every 8 weight quantizations (and their launches) go away, and the
results do not change by a bit.

What may be cached: only leaf tensors that require grad (parameters) or views of them; activations and
gradients never are. An entry is used only while the parameter is the same object, at the same storage
address, with the same version counter, and within the same step: `next_step()` (the trainer calls it at
every optimizer step; megaquant.launch.pretrain does) drops everything. The step boundary is what makes
this safe: optimizers may write weights in place through `.data` (Megatron copies its fp32 main weights
into the bf16 model weights that way), which does not bump the version counter.

CUDA graphs: an entry is used only in the mode it was made in. A graph captured with a hit on an eagerly
made copy would keep reading that tensor's address after the step frees it (Megatron's validation graph is
captured on its second call, after an eager call filled the cache: the final evaluation replayed it into
freed memory and reported a NaN loss, H200, session 8). Under capture the first use quantizes again, so the
graph records the quantize kernel and owns its output, and later uses in the same capture hit that copy;
an eager lookup never returns a copy made under capture (its contents exist only when the graph replays).

Memory: one tensor per cached operand in the weight's dtype, i.e. up to twice the (bf16) linear weights for
a linear layer (the forward format along the input features and the gradient format along the output
features; once for HiF8, which is elementwise: megaquant.ops.operands keys the forward's W.t() and dgrad's W
to one copy), held from the first microbatch to the end of the step; `max_bytes` bounds it (operands past the
bound are quantized per use, as without the cache). `stats()` says what it holds and held at most.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["disable_weight_cache", "enable_weight_cache", "enabled", "lookup", "next_step", "stats", "store"]


@dataclass
class _Cache:
    enabled: bool = False
    max_bytes: int | None = None
    entries: dict[tuple[object, ...], tuple[Any, int, int, torch.Tensor, str, bool]] = field(
        default_factory=dict
    )
    bytes: int = 0
    peak_bytes: int = 0
    hits: int = 0
    misses: int = 0
    over_bound: int = 0


_CACHE = _Cache()


def enable_weight_cache(max_bytes: int | None = None) -> None:
    """Cache quantized parameters until the next `next_step()`; at most `max_bytes` (None: no bound).
    The statistics of `stats()` start over."""
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
    global _CACHE
    _CACHE = _Cache(enabled=True, max_bytes=max_bytes)  # statistics start over too


def enabled() -> bool:
    """True while the cache is on (callers skip building an operand key otherwise)."""
    return _CACHE.enabled


def disable_weight_cache() -> None:
    _CACHE.entries.clear()
    _CACHE.bytes = 0
    _CACHE.enabled = False


def next_step() -> None:
    """The weights may change now (an optimizer step): forget every cached copy."""
    _CACHE.entries.clear()
    _CACHE.bytes = 0


def stats() -> dict[str, Any]:
    return {
        "enabled": _CACHE.enabled,
        "max_bytes": _CACHE.max_bytes,
        "entries": len(_CACHE.entries),
        "bytes": _CACHE.bytes,
        "peak_bytes": _CACHE.peak_bytes,
        "hits": _CACHE.hits,
        "misses": _CACHE.misses,
        "over_bound": _CACHE.over_bound,
    }


def _param(t: torch.Tensor) -> torch.Tensor | None:
    """The parameter `t` is (or is a view of), else None."""
    base = t._base if t._base is not None else t
    return base if base.is_leaf and base.requires_grad else None


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _key(t: torch.Tensor, base: torch.Tensor, op_key: tuple[object, ...]) -> tuple[object, ...]:
    return (id(base), tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, *op_key)


def lookup(t: torch.Tensor, op_key: tuple[object, ...]) -> tuple[torch.Tensor, str] | None:
    """(the cached quantized copy of `t`, the path that made it) for this operand key, or None."""
    if not _CACHE.enabled:
        return None
    base = _param(t)
    if base is None:
        return None
    entry = _CACHE.entries.get(_key(t, base, op_key))
    if (
        entry is None
        or entry[0]() is not base
        or entry[1] != base._version
        or entry[2] != base.data_ptr()
        or entry[5] != _capturing()  # a copy is only good in the mode (eager / this capture) that made it
    ):
        _CACHE.misses += 1
        return None
    _CACHE.hits += 1
    return entry[3], entry[4]


def store(t: torch.Tensor, op_key: tuple[object, ...], q: torch.Tensor, path: str) -> None:
    """Remember `q` = the quantized copy of parameter `t` for this operand key (no-op for non-parameters,
    with the cache off, or past max_bytes)."""
    if not _CACHE.enabled:
        return
    base = _param(t)
    if base is None:
        return
    key = _key(t, base, op_key)
    size = q.numel() * q.element_size()
    old = _CACHE.entries.pop(key, None)
    if old is not None:
        _CACHE.bytes -= old[3].numel() * old[3].element_size()
    if _CACHE.max_bytes is not None and _CACHE.bytes + size > _CACHE.max_bytes:
        _CACHE.over_bound += 1
        return
    _CACHE.entries[key] = (weakref.ref(base), base._version, base.data_ptr(), q, path, _capturing())
    _CACHE.bytes += size
    _CACHE.peak_bytes = max(_CACHE.peak_bytes, _CACHE.bytes)
