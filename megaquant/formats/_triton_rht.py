"""The random Hadamard transform's Triton kernels (formats.hadamard): the signed matrix R in one launch, and
the block product as one pass over memory.

`rht_matrix(block, seed, word, device, scale)` is hadamard.hadamard_matrix on the device (the signs from
the seed and the device word, no host-to-device copy, so it can run inside a CUDA graph capture).

`transform(x, m, axis, block)` is hadamard._apply on CUDA: every `block` consecutive elements of x along
`axis` replaced by v @ m (m = R, block x block fp32, or its transpose), computed with fp32 sums and
rounded once to x.dtype, written contiguous (whatever x's layout: the stochastic-rounding quantizers that
follow in the recipes read contiguous tensors, formats._triton_nvfp4). The torch form moves the axis, makes
an fp32 copy, runs an fp32 matmul with K = N = block and casts back: about 24 bytes of traffic per element
and a matmul off the tensor cores (docs/benchmarks.md §6j: 107 ms of `mxfp4_tseng`'s 183 ms extra per
step of the 8B cut); this reads x once and writes the result once.

The products: R's entries are +-1/sqrt(block), a power of two when block is a power of 4 (16, 64, 256),
so for bf16 / fp16 input each product v_k * R[k, i] is exact and the tensor cores' fp32 sums give the
torch form's value wherever a block's sum is exact in fp32 (its elements within ~24 - 8 - log2(block)
binades of each other, e.g. 10 for block 64 and bf16); both forms sum in an unspecified order otherwise,
as any fp32 matmul does. Other blocks (32, 128) and fp32 input take Triton's IEEE fp32 dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaquant.formats._triton_nvfp4 import _hash32, _key_arg, _store_rounded, _stream_key

__all__ = ["rht_matrix", "serves", "transform"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MIN_BLOCK, _MAX_BLOCK = 16, 128
"""tl.dot needs 16 along every dimension; a 256 x 256 fp32 R does not fit one program's registers."""
_TILE_ELEMS = 8192
"""Elements of x per program (block x tile), 64 x 128 for the Tseng recipe's blocks: 16 KB of bf16."""
_NUM_WARPS = 4


@triton.jit(do_not_specialize=["key"])
def _rht_matrix_kernel(out_ptr, word_ptr, key, scale, BLOCK: tl.constexpr, MIX: tl.constexpr):
    """R = diag(signs) H / sqrt(BLOCK) (fp32, BLOCK x BLOCK) in one program, as hadamard.hadamard_matrix:
    sign i = bit 31 of hash32(i ^ stream key) (formats._random.device_key), H[i, j] = (-1)^popcount(i & j)
    (Sylvester's), `scale` the reference's fp32 1/sqrt(BLOCK); every entry is +-scale, so exact."""
    k = _stream_key(key, word_ptr, MIX)
    i = tl.arange(0, BLOCK)
    flip = (_hash32(i.to(tl.uint32) ^ k) >> 31).to(tl.int32)
    p = i[:, None] & i[None, :]
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)  # bit 0: the parity of the low 8 bits (BLOCK <= 256)
    negative = ((p ^ flip[:, None]) & 1) != 0
    tl.store(out_ptr + i[:, None] * BLOCK + i[None, :], tl.where(negative, -scale, scale))


@triton.jit
def _rht_kernel(
    x_ptr,
    m_ptr,
    out_ptr,
    n_other,
    sx_ax,
    sx_o,
    so_ax,
    so_o,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
    ROWS: tl.constexpr,
    NATIVE: tl.constexpr,
    BF16_RNE: tl.constexpr,
):
    """One Hadamard block along the axis x `TILE` positions of the other axis. x and out are 2-D views
    [axis, other] with their own strides. ROWS: the tile is [TILE, BLOCK] (the axis is the faster one in
    memory) and out = tile @ m; else [BLOCK, TILE] and out = m^T @ tile. NATIVE: the dot in x's dtype
    (fp32 accumulation), else IEEE fp32. BF16_RNE: out is bf16's int16 view, rounded by integer arithmetic
    (the same everywhere, the CPU interpreter included)."""
    k = tl.arange(0, BLOCK)
    pid = tl.program_id(0).to(tl.int64)  # one grid axis (a 2-D grid's second axis stops at 65535)
    tiles = tl.cdiv(n_other, TILE)
    ax = (pid // tiles) * BLOCK + k
    j = (pid % tiles) * TILE + tl.arange(0, TILE)
    if ROWS:
        mask = j[:, None] < n_other
        v = tl.load(x_ptr + j[:, None] * sx_o + ax[None, :] * sx_ax, mask=mask, other=0.0)
        m = tl.load(m_ptr + k[:, None] * BLOCK + k[None, :])  # m[k, i]
        out = tl.dot(v, m.to(v.dtype)) if NATIVE else tl.dot(v.to(tl.float32), m, input_precision="ieee")
        _store_rounded(out_ptr, j[:, None] * so_o + ax[None, :] * so_ax, out, mask, BF16_RNE)
    else:
        mask = j[None, :] < n_other
        v = tl.load(x_ptr + ax[:, None] * sx_ax + j[None, :] * sx_o, mask=mask, other=0.0)
        mt = tl.load(m_ptr + k[None, :] * BLOCK + k[:, None])  # mt[i, k] = m[k, i]
        out = tl.dot(mt.to(v.dtype), v) if NATIVE else tl.dot(mt, v.to(tl.float32), input_precision="ieee")
        _store_rounded(out_ptr, ax[:, None] * so_ax + j[None, :] * so_o, out, mask, BF16_RNE)


def rht_matrix(
    block: int, seed: int, word: torch.Tensor | None, device: torch.device, scale: float
) -> torch.Tensor:
    """hadamard.hadamard_matrix(block, seed, device_seed=word) on `device` in one launch (block a power of
    two, 2..256; `scale` the fp32 value of H / sqrt(block)'s entries): bit-identical to the torch form."""
    out = torch.empty((block, block), dtype=torch.float32, device=device)
    _rht_matrix_kernel[(1,)](
        out, out if word is None else word, _key_arg(seed), scale, BLOCK=block, MIX=word is not None,
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out


def _as_2d(t: torch.Tensor, axis: int) -> torch.Tensor | None:
    """t as a view [axis length, the other elements], or None where the other axes do not merge."""
    moved = t.movedim(axis, 0)
    if moved.dim() == 1:
        return moved.unsqueeze(1)
    try:
        return moved.view(moved.shape[0], -1)
    except RuntimeError:
        return None


def serves(x: torch.Tensor, block: int) -> bool:
    """Whether transform() takes this call: a float tensor of the kernel's dtypes, 16 <= block <= 128."""
    return x.dtype in _DTYPES and _MIN_BLOCK <= block <= _MAX_BLOCK and x.numel() > 0


def _native(dtype: torch.dtype, block: int) -> bool:
    """R's entries +-2^-k (block a power of 4) are exact in bf16 / fp16: the dot may run in x's dtype."""
    return dtype in (torch.bfloat16, torch.float16) and block.bit_length() % 2 == 1


def transform(
    x: torch.Tensor, m: torch.Tensor, axis: int, block: int, *, native: bool | None = None
) -> torch.Tensor | None:
    """hadamard._apply(x, m, axis, block) in one pass, the result contiguous (x on a Triton device, its axis
    length a multiple of block, m fp32 block x block on x's device); None where x or the result has no 2-D
    view [axis, the rest] (an inner axis of a 3-D tensor: the caller takes the torch form). `native`: force
    the dot's kind (tests; None: in x's dtype where R is exact in it, _native)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous: what the SR quantizers read
    xv, ov = _as_2d(x, axis), _as_2d(out, axis)
    if xv is None or ov is None:
        return None
    n_ax, n_other = xv.shape
    sx_ax, sx_o = xv.stride()
    so_ax, so_o = ov.stride()
    tile = max(16, min(_TILE_ELEMS // block, triton.next_power_of_2(n_other)))
    rows = abs(sx_ax) < abs(sx_o) or n_other == 1
    grid = (n_ax // block * triton.cdiv(n_other, tile),)
    bf16 = x.dtype == torch.bfloat16
    _rht_kernel[grid](
        xv, m.contiguous(), ov.view(torch.int16) if bf16 else ov, n_other, sx_ax, sx_o, so_ax, so_o,
        BLOCK=block, TILE=tile, ROWS=rows, NATIVE=_native(x.dtype, block) if native is None else native,
        BF16_RNE=bf16, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out
