"""One quantization pass over an incoming gradient serves both backward GEMMs of a linear layer.

Megatron's linear backward quantizes the incoming gradient dy twice: for dgrad (`dy @ W`, dy quantized as
it is) and right after for wgrad (`dy.t() @ x`, the transposed view of the same storage).
- HiF8 is elementwise, and its per-tensor scale (current scaling) is the amax over the same elements
  either way, so q(dy.t()) is q(dy).t() bit for bit: megaquant.ops.operands offers dgrad's copy here and
  wgrad takes it, instead of quantizing dy again (one of the four activation-side casts of each linear
  per microbatch).
- MX formats block dy along its features in dgrad and along the tokens in wgrad: two different copies.
  dgrad makes both from one read of dy (formats.quantizer_both_axes) and offers the token-blocked one,
  which wgrad takes: the same bits as blocking dy on its own, one pass over dy fewer.
Stochastic rounding draws new bits per GEMM, a Hadamard transform differs per GEMM, and delayed scaling
keeps one amax history per GEMM: none of those is shared.

An offered copy is taken at most once, and only for the same elements of the same storage (the entry
holds the source tensor, so its memory cannot be reused by another tensor while the entry lives), at
the same version counter (views share it: an in-place write in between misses), in the same layout or
its transpose, and in the same CUDA-graph mode it was made in (as the weight cache: a copy made eagerly is
never read by a capture, nor one made under capture eagerly). At most one entry exists: the next offer
replaces it, a take or `clear()` drops it. Memory: one gradient-sized tensor held from dgrad to wgrad,
which wgrad would have allocated anyway (for MX it now exists during dgrad too: +0.32 GiB peak at the 8B
cut, docs/benchmarks.md §6g).

`MEGAQUANT_SHARED_GRADS=off` in the environment (read once, at import) quantizes each use again, for A/B
measurements; the bits are the same either way (tests/test_shared_grads.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["ENV", "clear", "enabled", "offer", "take"]

ENV = "MEGAQUANT_SHARED_GRADS"
_ENABLED = os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "false", "no")


@dataclass(frozen=True)
class _Entry:
    source: torch.Tensor
    key: tuple[object, ...]
    version: int
    capturing: bool
    q: torch.Tensor
    path: str


_SLOT: list[_Entry | None] = [None]


def enabled() -> bool:
    return _ENABLED


def _capturing(t: torch.Tensor) -> bool:
    import torch

    return bool(t.is_cuda and torch.cuda.is_current_stream_capturing())


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
    )


def offer(t: torch.Tensor, key: tuple[object, ...], q: torch.Tensor, path: str) -> None:
    """Remember q = the quantized `t` (2-D, in t's layout) under `key` (the quantization's options)."""
    if _ENABLED:
        _SLOT[0] = _Entry(t, key, t._version, _capturing(t), q, path)


def _order(t: torch.Tensor) -> str | None:
    """ "c" for a contiguous tensor, "t" for a transposed contiguous matrix, else None."""
    if t.is_contiguous():
        return "c"
    return "t" if t.dim() == 2 and t.t().is_contiguous() else None


def take(t: torch.Tensor, key: tuple[object, ...]) -> tuple[torch.Tensor, str] | None:
    """The offered copy for `t`, in t's shape and layout, and the path that made it, if `t` covers the
    same memory as the offered tensor (the same view; or both dense over the same elements, one possibly
    a reshape of the other or its transpose: `dy.view(-1, n).t()` of dgrad's `dy`), unchanged, under the
    same key and mode; else None. An entry whose storage matched is dropped either way: it has served its
    one use, or it is stale."""
    entry = _SLOT[0]
    if entry is None or entry.key != key:
        return None
    s, q = entry.source, entry.q
    if t.numel() != s.numel() or not _same_storage(t, s):
        return None
    _SLOT[0] = None
    if t._version != entry.version or _capturing(t) != entry.capturing:
        return None
    if t.shape == s.shape and t.stride() == s.stride():
        return q, entry.path
    mine, theirs = _order(t), _order(s)
    if theirs == "t":  # q is in s's layout: its transpose is contiguous, in the same memory order
        q, theirs = q.t(), "c"
    if theirs != "c" or not q.is_contiguous():
        return None
    if mine == "c":
        return q.view(t.shape), entry.path
    if mine == "t":
        return q.view(t.t().shape).t(), entry.path
    return None


def clear() -> None:
    """Drop the entry (the trainer's step boundary; nothing depends on it for correctness)."""
    _SLOT[0] = None
