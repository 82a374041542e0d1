"""Triton kernels for MX (E4M3, E5M2, E2M1) and HiF8 fake-quant and encode, one pass over memory.

Bit-exact with the torch reference (megaquant.formats.mx / .hif8; NaN sign and payload aside); `supports()`
says which calls they serve.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from megaquant.errors import MegaquantError
from megaquant.formats._launch import Launcher
from megaquant.formats.registry import ElementFormat, Encoded, Options, resolve_options

__all__ = [
    "encode",
    "fake_quant",
    "fake_quant_amax_fn",
    "fake_quant_dual_fn",
    "fake_quant_fn",
    "fake_quant_resolved",
    "finite_amax",
    "supports",
]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ELEMS_PER_PROGRAM = 2048
"""Elements one program handles (whole blocks); with 4 warps 16 per thread, the fastest in run 1 (H200)."""
_NUM_WARPS = 4
_NAN_BLOCK_CODE = {"mxfp8_e4m3": 0x7F, "mxfp8_e5m2": 0x7F, "mxfp4_e2m1": 0x0}
_HIF8_MB_TABLE = sum(m << (2 * e) for e, m in enumerate([3] * 4 + [2] * 4 + [1] * 8))
"""HiF8 mantissa width per |exponent| 0..15, 2 bits each (bit 31 is 0: |e| >= 16 has none)."""


def _f32_bits(v: float) -> int:
    bits: int = struct.unpack("<i", struct.pack("<f", v))[0]
    return bits


# ---------------------------------------------------------------------------------------------------------
# exact fp32 helpers (integer bit manipulation, no libdevice, no fused multiply-add patterns)


@triton.jit
def _binade(x):
    """floor(log2 |x|) from the exponent field: zero/subnormal -> -127, Inf/NaN -> 128."""
    return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _pow2(k):
    """2^k as fp32 for an int32 k in [-149, 127], exact (subnormal for k < -126)."""
    normal = (tl.maximum(k + 127, 0) << 23).to(tl.float32, bitcast=True)
    sub = ((k * 0 + 1) << tl.minimum(tl.maximum(k + 149, 0), 31)).to(tl.float32, bitcast=True)
    return tl.where(k >= -126, normal, sub)


@triton.jit
def _with_sign_of(mag, ref):
    """`mag` (sign bit clear) with the sign bit of `ref` (copysign, -0.0 and NaN included)."""
    sign = (ref.to(tl.int32, bitcast=True) >> 31) << 31
    return (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _round_mag(a, k_biased, AWAY: tl.constexpr):
    """Round a magnitude a >= 0 to a multiple of 2^k (k = k_biased - 127, a < 2^(k+22)).

    a + 2^(k+23) lands in a binade whose ulp is 2^k, so the fp32 add rounds to nearest-even at step 2^k
    and subtracting 2^(k+23) back is exact. Ties away: a tie that went down (a - r == 2^(k-1)) goes up.
    """
    c = ((k_biased + 23) << 23).to(tl.float32, bitcast=True)
    r = (a + c) - c
    if AWAY:
        half = ((k_biased - 1) << 23).to(tl.float32, bitcast=True)
        r = tl.where(a - r == half, r + (half + half), r)
    return r


# ---------------------------------------------------------------------------------------------------------
# MX: blocks along axis 1 of the tile


@triton.jit
def _mx_quant(
    x,
    EMAX: tl.constexpr,
    EMIN: tl.constexpr,
    MAN: tl.constexpr,
    MAXN: tl.constexpr,
    MAX_MANT: tl.constexpr,
    FILL_BITS: tl.constexpr,
    SATURATE: tl.constexpr,
    RCEIL: tl.constexpr,
    AWAY: tl.constexpr,
):
    """(r, sign, e): element magnitudes on the grid (fp32, before the block scale, saturated or filled),
    the sign bits of x (int32) and the block exponent (int32, reduced over axis 1; 128 = NaN block).

    The same function as mx.block_exponents + quantize_elements with fewer instructions per element:
    amax as an integer max of |x|'s bits (Inf/NaN sort above every finite value), and rounding by
    magic-constant addition at the step 2^(max(binade, EMIN) - MAN). Within a finite block the scaled
    values stay below 2^(EMAX+1), so the reference's upper clamp of the binade never acts.
    """
    xbits = x.to(tl.int32, bitcast=True)
    abits = xbits & 0x7FFFFFFF
    amax_bits = tl.max(abits, axis=1)
    e = (amax_bits >> 23) - 127 - EMAX
    if RCEIL:
        e = e + ((amax_bits & 0x7FFFFF) > MAX_MANT).to(tl.int32)
    e = tl.maximum(e, -127)
    e = tl.where(amax_bits < 0x7F800000, e, 128)
    scaled = x * tl.expand_dims(_pow2(-tl.minimum(e, 127)), 1)
    a = tl.abs(scaled)
    k_biased = tl.maximum(a.to(tl.int32, bitcast=True) >> 23, EMIN + 127) - MAN
    r = _round_mag(a, k_biased, AWAY)
    if SATURATE:
        r = tl.minimum(r, MAXN)
    else:
        r = tl.where(r > MAXN, tl.full(r.shape, FILL_BITS, tl.int32).to(tl.float32, bitcast=True), r)
    return r, xbits & -2147483648, e


@triton.jit
def _signed(r, sign):
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _mx_dequant(r, sign, e):
    """sign * r * 2^e in fp32 (exact); NaN blocks become NaN."""
    nan = tl.full(e.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    scale = tl.where(e == 128, nan, _pow2(tl.minimum(e, 127)))
    return _signed(r * tl.expand_dims(scale, 1), sign)


@triton.jit
def _mx_codes(
    q,
    e,
    EMIN: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    BITS: tl.constexpr,
    EXP_BITS: tl.constexpr,
    HAS_INF: tl.constexpr,
    HAS_NAN: tl.constexpr,
    NAN_BLOCK_CODE: tl.constexpr,
    SUB_SCALE: tl.constexpr,
):
    """Element codes (int32, value in the low BITS bits) as mx.element_codes, NaN blocks overwritten."""
    sign = (q.to(tl.int32, bitcast=True) >> 31) & 1
    a = tl.abs(q)
    abits = a.to(tl.int32, bitcast=True)
    eb = ((abits >> 23) & 0xFF) - 127
    normal = eb >= EMIN
    exp_field = tl.where(normal, eb + BIAS, 0)
    man_normal = (abits >> (23 - MAN)) & ((1 << MAN) - 1)
    man_sub = (a * SUB_SCALE).to(tl.int32)
    mag = (exp_field << MAN) | tl.where(normal, man_normal, man_sub)
    if HAS_NAN:
        mag = tl.where(a != a, (1 << (BITS - 1)) - 1, mag)
    if HAS_INF:
        mag = tl.where(abits == 0x7F800000, ((1 << EXP_BITS) - 1) << MAN, mag)
    codes = (sign << (BITS - 1)) | mag
    return tl.where(tl.expand_dims(e, 1) == 128, NAN_BLOCK_CODE, codes)


@triton.jit
def _mx_lastaxis_kernel(
    x_ptr,
    out_ptr,
    codes_ptr,
    scales_ptr,
    total_blocks,
    n,
    n_blocks,
    n_packed,
    BS: tl.constexpr,
    G: tl.constexpr,
    ENCODE: tl.constexpr,
    EMAX: tl.constexpr,
    EMIN: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    BITS: tl.constexpr,
    EXP_BITS: tl.constexpr,
    MAXN: tl.constexpr,
    MAX_MANT: tl.constexpr,
    FILL_BITS: tl.constexpr,
    HAS_INF: tl.constexpr,
    HAS_NAN: tl.constexpr,
    NAN_BLOCK_CODE: tl.constexpr,
    SUB_SCALE: tl.constexpr,
    SATURATE: tl.constexpr,
    RCEIL: tl.constexpr,
    AWAY: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """x viewed as (rows, n), blocks of BS along n (the last one may be short); G blocks per program."""
    blk = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    row = blk // n_blocks
    col0 = (blk % n_blocks) * BS
    j = tl.arange(0, BS)
    col = col0[:, None] + j[None, :]
    mask = (blk < total_blocks)[:, None] & (col < n)
    offs = row[:, None] * n + col
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r, sign, e = _mx_quant(x, EMAX, EMIN, MAN, MAXN, MAX_MANT, FILL_BITS, SATURATE, RCEIL, AWAY)
    if ENCODE:
        codes = _mx_codes(
            _signed(r, sign), e, EMIN, MAN, BIAS, BITS, EXP_BITS, HAS_INF, HAS_NAN, NAN_BLOCK_CODE, SUB_SCALE
        )
        tl.store(scales_ptr + blk, tl.minimum(e + 127, 255).to(tl.uint8), mask=blk < total_blocks)
        if BITS == 4:
            lo, hi = tl.split(tl.reshape(codes, (G, BS // 2, 2)))
            pcol = col0[:, None] // 2 + tl.arange(0, BS // 2)[None, :]
            pmask = (blk < total_blocks)[:, None] & (pcol < n_packed)
            tl.store(codes_ptr + row[:, None] * n_packed + pcol, (lo | (hi << 4)).to(tl.uint8), mask=pmask)
        else:
            tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=mask)
    else:
        _store_values(out_ptr, offs, _mx_dequant(r, sign, e), mask, BF16_BITS)


@triton.jit
def _mx_inner_kernel(
    x_ptr,
    out_ptr,
    codes_ptr,
    scales_ptr,
    n,
    inner,
    n_blocks,
    n_packed,
    BS: tl.constexpr,
    BK: tl.constexpr,
    ENCODE: tl.constexpr,
    EMAX: tl.constexpr,
    EMIN: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    BITS: tl.constexpr,
    EXP_BITS: tl.constexpr,
    MAXN: tl.constexpr,
    MAX_MANT: tl.constexpr,
    FILL_BITS: tl.constexpr,
    HAS_INF: tl.constexpr,
    HAS_NAN: tl.constexpr,
    NAN_BLOCK_CODE: tl.constexpr,
    SUB_SCALE: tl.constexpr,
    SATURATE: tl.constexpr,
    RCEIL: tl.constexpr,
    AWAY: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """x viewed as (lead, n, inner), blocks of BS along n (axis -2); one block x BK columns per program.

    Program (lead*n_blocks + block, column tile): a (BS, BK) tile whose rows are contiguous in memory,
    reduced over its rows (axis 0, expanded to a leading axis of size 1 for the shared block helpers).
    """
    pid = tl.program_id(0).to(tl.int64)
    lead = pid // n_blocks
    b = pid % n_blocks
    i = b * BS + tl.arange(0, BS)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    kmask = k < inner
    mask = (i < n)[:, None] & kmask[None, :]
    base = lead * n * inner
    offs = base + i[:, None] * inner + k[None, :]
    x = tl.expand_dims(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0)  # (1, BS, BK)
    r, sign, e = _mx_quant(x, EMAX, EMIN, MAN, MAXN, MAX_MANT, FILL_BITS, SATURATE, RCEIL, AWAY)  # e: (1, BK)
    if ENCODE:
        codes = _mx_codes(
            _signed(r, sign), e, EMIN, MAN, BIAS, BITS, EXP_BITS, HAS_INF, HAS_NAN, NAN_BLOCK_CODE, SUB_SCALE
        )
        codes = tl.reshape(codes, (BS, BK))
        scale_offs = (lead * n_blocks + b) * inner + k
        tl.store(
            scales_ptr + scale_offs, tl.reshape(tl.minimum(e + 127, 255), (BK,)).to(tl.uint8), mask=kmask
        )
        if BITS == 4:
            pairs = tl.permute(tl.reshape(codes, (BS // 2, 2, BK)), (0, 2, 1))
            lo, hi = tl.split(pairs)
            prow = b * (BS // 2) + tl.arange(0, BS // 2)
            poffs = lead * n_packed * inner + prow[:, None] * inner + k[None, :]
            pmask = (prow < n_packed)[:, None] & kmask[None, :]
            tl.store(codes_ptr + poffs, (lo | (hi << 4)).to(tl.uint8), mask=pmask)
        else:
            tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=mask)
    else:
        _store_values(out_ptr, offs, tl.reshape(_mx_dequant(r, sign, e), (BS, BK)), mask, BF16_BITS)


@triton.jit
def _mx_dual_kernel(
    x_ptr,
    last_ptr,
    rows_ptr,
    rows,
    n,
    BS: tl.constexpr,
    BK: tl.constexpr,
    EMAX: tl.constexpr,
    EMIN: tl.constexpr,
    MAN: tl.constexpr,
    MAXN: tl.constexpr,
    MAX_MANT: tl.constexpr,
    FILL_BITS: tl.constexpr,
    SATURATE: tl.constexpr,
    RCEIL: tl.constexpr,
    AWAY: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """x viewed as (rows, n), one (BS, BK) tile per program read once and fake-quantized twice: blocks of BS
    along n into last_ptr (the blocks of _mx_lastaxis_kernel: BK is a multiple of BS, so a tile holds whole
    blocks) and blocks of BS along the rows into rows_ptr (the blocks of _mx_inner_kernel with lead 1).
    The same block helpers on the same elements: each output equals its one-axis kernel's bit for bit."""
    pid = tl.program_id(0).to(tl.int64)
    tiles = tl.cdiv(n, BK)  # neighbouring programs take neighbouring tiles of the same rows
    i = (pid // tiles) * BS + tl.arange(0, BS)
    k = (pid % tiles) * BK + tl.arange(0, BK)
    mask = (i < rows)[:, None] & (k < n)[None, :]
    offs = i[:, None] * n + k[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # (1, BS, BK): blocks down the rows
    r, sign, e = _mx_quant(
        tl.expand_dims(x, 0), EMAX, EMIN, MAN, MAXN, MAX_MANT, FILL_BITS, SATURATE, RCEIL, AWAY
    )
    _store_values(rows_ptr, offs, tl.reshape(_mx_dequant(r, sign, e), (BS, BK)), mask, BF16_BITS)
    # (BK, BS): each row's BK elements as BK // BS blocks
    r, sign, e = _mx_quant(
        tl.reshape(x, (BK, BS)), EMAX, EMIN, MAN, MAXN, MAX_MANT, FILL_BITS, SATURATE, RCEIL, AWAY
    )
    _store_values(last_ptr, offs, tl.reshape(_mx_dequant(r, sign, e), (BS, BK)), mask, BF16_BITS)


# ---------------------------------------------------------------------------------------------------------
# HiF8: per element


@triton.jit
def _hif8_quant(x, SATURATE: tl.constexpr, FORK: tl.constexpr, MB_TABLE: tl.constexpr):
    """Round fp32 to the HiF8 grid exactly as hif8.quantize_hif8 (ties away, +0 for zero, NaN kept).

    Written for the FP32 pipe, which issues twice as fast as the integer one on Hopper: the step of x's
    binade e is 2^k, k = max(e - mb(|e|), -22) (mb from MB_TABLE, 2 bits per |e| = 0..15, bit 31 = 0 for
    |e| >= 16; the floor -22 is the grid {0, 2^-22} below the denormals); a + 2^(k+23) - 2^(k+23) rounds
    |x| to nearest-even at that step and a tie that went down is moved up (ties away). |x| is first capped
    at 2^16 (anything above rounds past 32768 anyway, Inf included); NaN passes every step as NaN.
    Adding +0.0 last turns -0 into +0 (HiF8 has one zero) and leaves everything else unchanged.
    """
    a = tl.minimum(tl.abs(x), 65536.0, propagate_nan=tl.PropagateNan.ALL)
    if FORK:
        clamped = tl.minimum(tl.maximum(a, 2.384185791015625e-07), 31129.599609375)
        a = tl.where((a == 0) | (a != a), a, clamped)
    eb = a.to(tl.uint32, bitcast=True) >> 23
    ae = tl.abs(eb.to(tl.int32) - 127)
    man_bits = (MB_TABLE >> tl.minimum(ae + ae, 31)) & 3
    c_bits = tl.maximum(((eb.to(tl.int32) - man_bits) << 23) + (23 << 23), 0x40000000)  # 2^(k+23), k >= -22
    c = c_bits.to(tl.float32, bitcast=True)
    r = (a + c) - c
    half = (c_bits - (24 << 23)).to(tl.float32, bitcast=True)
    r = tl.where(a - r == half, r + (half + half), r)
    if SATURATE:
        r = tl.minimum(r, 32768.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        r = tl.where(r > 32768.0, tl.full(r.shape, 0x7F800000, tl.int32).to(tl.float32, bitcast=True), r)
    return _with_sign_of(r, x) + 0.0


@triton.jit
def _store_values(ptr, offs, v, mask, BF16_BITS: tl.constexpr):
    """Store fp32 values that the output dtype represents exactly. bf16: the top 16 bits (an exact value
    needs no rounding, so truncation equals the cast and skips a conversion instruction per element)."""
    if BF16_BITS:
        tl.store(ptr + offs, (v.to(tl.int32, bitcast=True) >> 16).to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hif8_codes(q):
    """HiF8 codes (int32) of fp32 values on the grid, as hif8.hif8_codes."""
    bits = q.to(tl.int32, bitcast=True)
    sign = ((bits >> 31) & 1) << 7
    a = tl.abs(q)
    abits = a.to(tl.int32, bitcast=True)
    e = ((abits >> 23) & 0xFF) - 127
    m = tl.abs(e)
    s_e = (e < 0).to(tl.int32)
    frac = abits & 0x7FFFFF
    man3 = frac >> 20
    c_e0 = 0b0001000 | man3
    c_e1 = 0b0010000 | (s_e << 3) | man3
    c_e23 = 0b0100000 | (s_e << 4) | ((m - 2) << 3) | man3
    c_e47 = 0b1000000 | (s_e << 4) | ((m - 4) << 2) | (frac >> 21)
    c_e815 = 0b1100000 | (s_e << 4) | ((m - 8) << 1) | (frac >> 22)
    mag = tl.where(
        m <= 1,
        tl.where(m == 0, c_e0, c_e1),
        tl.where(m <= 3, c_e23, tl.where(m <= 7, c_e47, c_e815)),
    )
    mag = tl.where(e < -15, e + 23, mag)
    code = sign | mag
    code = tl.where(a == 0, 0, code)
    code = tl.where(abits == 0x7F800000, sign | 0x6F, code)
    return tl.where(a != a, 0x80, code)


@triton.jit
def _hif8_kernel(x_ptr, out_ptr, numel, BLOCK: tl.constexpr, ENCODE: tl.constexpr, SATURATE: tl.constexpr,
                 FORK: tl.constexpr, MB_TABLE: tl.constexpr, BF16_BITS: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = _hif8_quant(x, SATURATE, FORK, MB_TABLE)
    if ENCODE:
        tl.store(out_ptr + offs, _hif8_codes(q).to(tl.uint8), mask=mask)
    else:
        _store_values(out_ptr, offs, q, mask, BF16_BITS)


# ---------------------------------------------------------------------------------------------------------
# HiF8 with a per-tensor power-of-two scale: one amax pass, one quantize pass (no host synchronisation)


@triton.jit
def _amax_bits_kernel(
    x_ptr, amax_ptr, numel, BLOCK: tl.constexpr, FINITE: tl.constexpr, PARTS: tl.constexpr = False
):
    """The max over x of the fp32 bits of |x|: the bits of a non-negative float order like its value.
    FINITE: Inf and NaN do not count (0 for none; HiF8's tensor scale, hif8._tensor_scale_exp); else NaN
    ranks above Inf above every finite value (NVFP4's tensor amax). Each program strides over the blocks
    (grid-stride loop) and writes its own maximum: PARTS, to amax_ptr[program] (no zeroed buffer, no
    atomics; the consumer reduces the parts: HiF8's quantize pass), else by one integer atomic max into
    amax_ptr[0] (int32, zeroed; grid `amax_grid`: atomics on one address serialise, one per block would be
    thousands per tensor)."""
    pid = tl.program_id(0).to(tl.int64)
    stride = tl.num_programs(0).to(tl.int64) * BLOCK
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(pid * BLOCK, numel, stride):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
        abits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        if FINITE:
            abits = tl.where(abits < 0x7F800000, abits, 0)
        acc = tl.maximum(acc, abits)
    if PARTS:
        tl.store(amax_ptr + pid, tl.max(acc, axis=0))
    else:
        tl.atomic_max(amax_ptr, tl.max(acc, axis=0))


@triton.jit
def _hif8_scaled_kernel(x_ptr, out_ptr, amax_ptr, s_ptr, numel, nparts, BLOCK: tl.constexpr,
                        NPARTS: tl.constexpr, ENCODE: tl.constexpr, SATURATE: tl.constexpr,
                        FORK: tl.constexpr, MB_TABLE: tl.constexpr):  # fmt: skip
    """hif8 fake-quant/encode with tensor scaling, as hif8._quantize + fake_quant_hif8: amax = the max of
    the amax pass's `nparts` partial maxima (amax_ptr[0:nparts], int32 bits), or a given amax (its fp32
    bits, nparts 1: |amax|, a non-finite one counting as 0, as hif8._tensor_scale_exp), s = clamp(3 -
    floor(log2 amax), -127, 127) (0 for amax 0), x * 2^s rounded to the grid, times 2^-s in fp32, then cast
    to the output dtype with round-to-nearest-even (not truncated: x 2^-s can be inexact in bf16)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    parts = tl.arange(0, NPARTS)
    abits = tl.load(amax_ptr + parts, mask=parts < nparts, other=0) & 0x7FFFFFFF
    abits = tl.where(abits < 0x7F800000, abits, 0)  # (the partial maxima are finite and >= 0 already)
    amax_bits = tl.max(abits, axis=0)
    s = tl.minimum(tl.maximum(3 - ((amax_bits >> 23) - 127), -127), 127)
    s = tl.where(amax_bits > 0, s, 0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = _hif8_quant(x * _pow2(s), SATURATE, FORK, MB_TABLE)
    if ENCODE:
        tl.store(out_ptr + offs, _hif8_codes(q).to(tl.uint8), mask=mask)
        if pid == 0:
            tl.store(s_ptr, s)
    else:
        tl.store(out_ptr + offs, (q * _pow2(-s)).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Python side


def _options(x: torch.Tensor, fmt: str, **opts: object) -> Options | None:
    """Resolved options when the kernels cover this call, else None."""
    if not x.is_cuda or x.dtype not in _DTYPES or x.numel() == 0 or set(opts) - _KEYWORDS:
        return None
    key = tuple(opts.get(k, d) for k, d in _DEFAULTS)
    try:
        resolved = _resolve(fmt, *key, opts.get("tensor_scale", False))
    except TypeError:  # an unhashable keyword value: not ours to interpret
        return None
    in_range = x.dim() > 0 and -x.dim() <= (resolved.axis if resolved else 0) < x.dim()
    if resolved is not None and resolved.fmt.block_scaled and not in_range:
        return None
    if resolved is not None and "amax" in opts and not _given_amax_ok(x, resolved, opts["amax"]):
        return None
    return resolved


def _given_amax_ok(x: torch.Tensor, opts: Options, amax: object) -> bool:
    """A given amax the HiF8 tensor-scaled kernel reads on the device: one floating-point element on x's
    device (delayed scaling's amax from a history); anything else is the reference's to interpret."""
    return (
        opts.tensor_scale
        and not opts.fmt.block_scaled
        and isinstance(amax, torch.Tensor)
        and amax.numel() == 1
        and amax.device == x.device
        and amax.dtype in _DTYPES
    )


_DEFAULTS = (("axis", -1), ("block_size", 32), ("scale", "floor"), ("rounding", "even"), ("saturate", True),
             ("preset", None))  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _resolve(
    fmt: str,
    axis: int,
    block_size: int,
    scale: str,
    rounding: str,
    saturate: bool,
    preset: str | None,
    tensor_scale: object = False,
) -> Options | None:
    """resolve_options, cached (a call costs microseconds of Python per launch otherwise)."""
    if not all(isinstance(v, int) for v in (axis, block_size)) or not isinstance(tensor_scale, bool):
        return None
    try:
        resolved = resolve_options(
            fmt, axis=axis, block_size=block_size, scale=scale, rounding=rounding, saturate=saturate,
            preset=preset, tensor_scale=tensor_scale,
        )  # fmt: skip
    except MegaquantError:
        return None
    if resolved.fmt.block_scale == "e4m3":
        return None  # NVFP4 has its own kernels (_triton_nvfp4)
    bs = resolved.block_size
    if resolved.fmt.block_scaled and (bs < 2 or bs > 256 or bs & (bs - 1)):
        return None  # power-of-two blocks from 2 to 256 elements
    return resolved


_KEYWORDS = frozenset(
    ("axis", "block_size", "scale", "rounding", "saturate", "preset", "tensor_scale", "amax")
)


def supports(x: torch.Tensor, fmt: str, **opts: object) -> bool:
    """True when the kernels serve fake_quant/encode(x, fmt, **opts) (same keywords as the contract):
    a CUDA bf16/fp16/fp32 tensor, any format, both scale rules and roundings, saturating or not, the fork
    preset, MX blocks of a power of two (2..256) along any axis, HiF8 tensor_scale (MX ignores it) with
    the amax computed or given (a one-element tensor on x's device). Not covered: float64."""
    return _options(x, fmt, **opts) is not None


@functools.lru_cache(maxsize=1024)
def _format_constants(spec: ElementFormat, opts: Options) -> dict[str, object]:
    if opts.saturate:
        fill = _f32_bits(spec.max_normal)
    elif spec.has_inf:
        fill = 0x7F800000
    else:
        fill = 0x7FC00000
    return dict(
        EMAX=spec.emax, EMIN=spec.emin, MAN=spec.man_bits, BIAS=spec.bias, BITS=spec.bits,
        EXP_BITS=spec.exp_bits, MAXN=spec.max_normal, MAX_MANT=_f32_bits(spec.max_normal) & 0x7FFFFF,
        FILL_BITS=fill, HAS_INF=spec.has_inf, HAS_NAN=spec.has_nan, NAN_BLOCK_CODE=_NAN_BLOCK_CODE[spec.name],
        SUB_SCALE=2.0 ** (spec.man_bits - spec.emin),
        SATURATE=opts.saturate, RCEIL=opts.scale == "rceil", AWAY=opts.rounding == "away",
    )  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _mx_launcher(opts: Options, encode: bool, bf16_bits: bool, bk: int) -> Launcher:
    """The Launcher of one MX variant: the last-axis kernel (bk 0) or the inner-axis kernel with BK = bk.
    Arguments: (x, out, codes, scales), (total_blocks or n, n or inner, n_blocks, n_packed)."""
    bs = opts.block_size
    consts = {**_format_constants(opts.fmt, opts), "BS": bs, "ENCODE": encode, "BF16_BITS": bf16_bits}
    views = (None, torch.int16) if bf16_bits else ()
    if bk:
        return Launcher(_mx_inner_kernel, 4, 4, views, BK=bk, num_warps=_NUM_WARPS, **consts)
    g = max(1, _ELEMS_PER_PROGRAM // bs)
    return Launcher(_mx_lastaxis_kernel, 4, 4, views, G=g, num_warps=_NUM_WARPS, **consts)


def _inner_bk(inner: int, bs: int) -> int:
    """BK of the inner-axis kernel: the columns one program takes (a power of two, <= 2048 / bs)."""
    return max(1, min(1 << (inner - 1).bit_length(), _ELEMS_PER_PROGRAM // bs))


def _mx_grid(
    opts: Options, lead: int, n: int, inner: int
) -> tuple[tuple[int, int, int], int, tuple[int, ...]]:
    """(grid, bk, ints) of an MX launch on x viewed as (lead, n, inner) with blocks along n."""
    bs = opts.block_size
    n_blocks = -(-n // bs)
    n_codes = -(-n // 2) if opts.fmt.bits == 4 else n
    if inner == 1:
        total = lead * n_blocks
        g = max(1, _ELEMS_PER_PROGRAM // bs)
        return (-(-total // g), 1, 1), 0, (total, n, n_blocks, n_codes)
    bk = _inner_bk(inner, bs)
    return (lead * n_blocks, -(-inner // bk), 1), bk, (n, inner, n_blocks, n_codes)


def _mx(x: torch.Tensor, opts: Options, encode: bool) -> torch.Tensor | Encoded:
    spec = opts.fmt
    ax = opts.axis % x.dim()
    x = x.contiguous()  # a no-op for the layouts megaquant.ops passes
    shape = tuple(x.shape)
    lead, n, inner = math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1 :])
    bs = opts.block_size
    n_blocks = -(-n // bs)
    n_codes = -(-n // 2) if spec.bits == 4 else n
    out = codes = scales = x  # placeholders for the pointers a mode does not use
    bf16_bits = not encode and x.dtype == torch.bfloat16
    if encode:
        codes = torch.empty((*shape[:ax], n_codes, *shape[ax + 1 :]), dtype=torch.uint8, device=x.device)
        scales = torch.empty((*shape[:ax], n_blocks, *shape[ax + 1 :]), dtype=torch.uint8, device=x.device)
    else:
        out = torch.empty_like(x)
    grid, bk, ints = _mx_grid(opts, lead, n, inner)
    _mx_launcher(opts, encode, bf16_bits, bk)(grid, (x, out, codes, scales), ints)
    if not encode:
        return out
    return Encoded(codes=codes, scales=scales, shape=shape, axis=ax, fmt=spec.name, block_size=bs)


@functools.lru_cache(maxsize=256)
def _hif8_launcher(opts: Options, encode: bool, bf16_bits: bool) -> Launcher:
    """(x, out), (numel,)."""
    views = (None, torch.int16) if bf16_bits else ()
    return Launcher(
        _hif8_kernel, 2, 1, views, BLOCK=_ELEMS_PER_PROGRAM, ENCODE=encode, SATURATE=opts.saturate,
        FORK=opts.fork_clamp, MB_TABLE=_HIF8_MB_TABLE, BF16_BITS=bf16_bits, num_warps=_NUM_WARPS,
    )  # fmt: skip


def _hif8(x: torch.Tensor, opts: Options, encode: bool) -> torch.Tensor | Encoded:
    xc = x.contiguous()
    out = torch.empty(xc.shape, dtype=torch.uint8 if encode else x.dtype, device=x.device)
    bf16_bits = not encode and x.dtype == torch.bfloat16
    numel = xc.numel()
    _hif8_launcher(opts, encode, bf16_bits)((-(-numel // _ELEMS_PER_PROGRAM), 1, 1), (xc, out), (numel,))
    return out if not encode else _hif8_encoded(x, opts, out, None)


def _hif8_encoded(x: torch.Tensor, opts: Options, codes: torch.Tensor, s: torch.Tensor | None) -> Encoded:
    axis = opts.axis % max(x.dim(), 1)
    return Encoded(codes=codes, scales=None, shape=tuple(x.shape), axis=axis, fmt="hifp8", block_size=1,
                   tensor_scale_exp=s)  # fmt: skip


AMAX_PROGRAMS = 1024
"""At most this many programs (atomics) per amax pass: ~8 per SM of an H100/H200, enough to keep the
memory system busy while the loop reads the rest."""
_HIF8_AMAX_BLOCK = 8192
"""Elements per program and loop iteration of HiF8's amax pass: with at most `_HIF8_AMAX_PARTS` programs,
256 x 8192 bf16 = 4 MB in flight per sweep, as 1024 x 2048 would be."""
_HIF8_AMAX_PARTS = 256
"""At most this many partial maxima (programs) per HiF8 amax pass; every quantize program reads them all
(1 KB, from L2)."""
_AMAX_LAUNCHER = Launcher(
    _amax_bits_kernel, 2, 1, BLOCK=_HIF8_AMAX_BLOCK, FINITE=True, PARTS=True, num_warps=8
)
"""(x, parts), (numel,); grid `hif8_amax_grid(numel)`: one partial maximum per program into parts."""


def amax_grid(numel: int, block: int = _ELEMS_PER_PROGRAM) -> tuple[int, int, int]:
    return (max(1, min(-(-numel // block), AMAX_PROGRAMS)), 1, 1)


def hif8_amax_grid(numel: int) -> tuple[int, int, int]:
    """The HiF8 amax pass's grid: its size is the number of partial maxima the quantize pass reduces."""
    return (max(1, min(-(-numel // _HIF8_AMAX_BLOCK), _HIF8_AMAX_PARTS, AMAX_PROGRAMS)), 1, 1)


def _hif8_amax_parts(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The amax pass: (a buffer of partial maxima, how many), no zeroing launch (each program writes its
    own slot), no host synchronisation."""
    numel = x.numel()
    grid = hif8_amax_grid(numel)
    parts = torch.empty(_HIF8_AMAX_PARTS, dtype=torch.int32, device=x.device)
    _AMAX_LAUNCHER(grid, (x, parts), (numel,))
    return parts, grid[0]


@functools.lru_cache(maxsize=256)
def _hif8_scaled_launcher(opts: Options, encode: bool) -> Launcher:
    """(x, out, parts, s), (numel, nparts)."""
    return Launcher(
        _hif8_scaled_kernel, 4, 2, BLOCK=_ELEMS_PER_PROGRAM, NPARTS=_HIF8_AMAX_PARTS, ENCODE=encode,
        SATURATE=opts.saturate, FORK=opts.fork_clamp, MB_TABLE=_HIF8_MB_TABLE, num_warps=_NUM_WARPS,
    )  # fmt: skip


def _hif8_parts(x: torch.Tensor, amax: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """What the quantize pass reduces: the amax pass's partial maxima over x, or a given amax as its one
    "partial maximum" (its fp32 bits, a view when it is fp32 already; the kernel takes |amax| and counts a
    non-finite one as 0)."""
    if amax is None:
        return _hif8_amax_parts(x)
    return amax.detach().to(torch.float32).reshape(1).view(torch.int32), 1


def _hif8_scaled(
    x: torch.Tensor, opts: Options, encode: bool, amax: torch.Tensor | None = None
) -> torch.Tensor | Encoded:
    """HiF8 with tensor scaling: the amax pass (none when the amax is given), then the quantize pass (no
    host synchronisation)."""
    xc = x.contiguous()
    numel = xc.numel()
    parts, nparts = _hif8_parts(xc, amax)
    out = torch.empty(xc.shape, dtype=torch.uint8 if encode else x.dtype, device=x.device)
    s = torch.empty((), dtype=torch.int32, device=x.device) if encode else parts
    grid = (-(-numel // _ELEMS_PER_PROGRAM), 1, 1)
    _hif8_scaled_launcher(opts, encode)(grid, (xc, out, parts, s), (numel, nparts))
    return out if not encode else _hif8_encoded(x, opts, out, s)


def _memory_layout(x: torch.Tensor, axis: int) -> tuple[int, int, int] | None:
    """(lead, n, inner) of x's memory when it is contiguous or a transposed contiguous matrix, blocks
    along `axis` of x (n elements, `inner` apart); None for any other layout."""
    shape = x.shape
    if x.is_contiguous():
        ax = axis % len(shape)
        return math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1 :])
    if len(shape) == 2 and x.stride() == (1, shape[0]):  # weight.t(), grad_output.t(): (cols, rows) in memory
        rows, cols = shape
        return (1, cols, rows) if axis % 2 else (cols, rows, 1)
    return None


def fake_quant_fn(opts: Options) -> Callable[[torch.Tensor], torch.Tensor]:
    """fake_quant for one resolved option set as a function of the tensor: the same kernels with the same
    arguments as fake_quant_resolved (so the same compiled variants and bits), with the launchers bound
    once and no view made. For callers that checked supports() per kind of tensor (megaquant.ops keeps one
    per option set).

    Beyond fake_quant: a transposed contiguous matrix (weight.t(), and any dense layout for HiF8) is
    quantized in its memory order, without a copy, and the result has the input's layout (strides), as
    megaquant.ops' layout-preserving path makes it; the function's `keeps_layout` attribute says so.
    The values equal fake_quant's (the same blocks of the same elements)."""
    if not opts.fmt.block_scaled:
        return _hif8_fn(opts)
    entries: dict[tuple[torch.dtype, int], Launcher] = {}

    def mx(x: torch.Tensor) -> torch.Tensor:
        layout = _memory_layout(x, opts.axis)
        if layout is None:
            x = x.contiguous()
            layout = _memory_layout(x, opts.axis)
            assert layout is not None
        grid, bk, ints = _mx_grid(opts, *layout)
        launcher = entries.get((x.dtype, bk))
        if launcher is None:
            launcher = entries[x.dtype, bk] = _mx_launcher(opts, False, x.dtype == torch.bfloat16, bk)
        out = torch.empty_like(x)
        launcher(grid, (x, out, x, x), ints)
        return out

    mx.keeps_layout = True  # type: ignore[attr-defined]
    return mx


_DUAL_CONSTS = ("EMAX", "EMIN", "MAN", "MAXN", "MAX_MANT", "FILL_BITS", "SATURATE", "RCEIL", "AWAY")


@functools.lru_cache(maxsize=256)
def _mx_dual_launcher(opts: Options, bf16_bits: bool, bk: int, num_warps: int) -> Launcher:
    """(x, last, rows), (rows, n)."""
    consts = _format_constants(opts.fmt, opts)
    views = (None, torch.int16, torch.int16) if bf16_bits else ()
    return Launcher(
        _mx_dual_kernel, 3, 2, views, BS=opts.block_size, BK=bk, BF16_BITS=bf16_bits, num_warps=num_warps,
        **{k: consts[k] for k in _DUAL_CONSTS},
    )  # fmt: skip


def fake_quant_dual_fn(
    opts: Options, tile_elems: int = _ELEMS_PER_PROGRAM, num_warps: int = _NUM_WARPS
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """Both blockings of one MX fake-quant from a single read, as a function of the tensor: for a
    contiguous x of >= 2 dims viewed as (rows, n) (the leading dims flattened), (fake_quant(x, axis=-1),
    fake_quant(x.reshape(rows, n), axis=0).view(x.shape)) with opts' other options, both contiguous in x's
    shape. A linear layer's incoming gradient is blocked both ways: along its features for dgrad, along
    the tokens for wgrad (megaquant.ops.operands offers the second to wgrad through megaquant.ops.shared).
    Needs a block-scaled format and a tensor supports() accepts; opts.axis is not used. None for blocks
    longer than 64 (a tile is BS x >= BS elements: too large for one program's registers)."""
    if not opts.fmt.block_scaled:
        raise MegaquantError(f"fake_quant_dual_fn needs a block-scaled format, not {opts.fmt.name}")
    bs = opts.block_size
    if bs > 64:
        return None
    bk_max = max(bs, tile_elems // bs)  # tile_elems, num_warps: a launch configuration to sweep
    entries: dict[tuple[torch.dtype, int], Launcher] = {}

    def dual(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not x.is_contiguous():
            x = x.contiguous()
        n = x.shape[-1]
        rows = x.numel() // n
        bk = max(bs, min(bk_max, 1 << (n - 1).bit_length()))
        launcher = entries.get((x.dtype, bk))
        if launcher is None:
            bf16 = x.dtype == torch.bfloat16
            launcher = entries[x.dtype, bk] = _mx_dual_launcher(opts, bf16, bk, num_warps)
        last, by_rows = torch.empty_like(x), torch.empty_like(x)
        launcher((-(-rows // bs) * -(-n // bk), 1, 1), (x, last, by_rows), (rows, n))
        return last, by_rows

    return dual


def _dense(x: torch.Tensor) -> bool:
    """Contiguous, or a transposed contiguous matrix: memory order is dense, and empty_like keeps it."""
    if x.is_contiguous():
        return True
    shape = x.shape
    return len(shape) == 2 and x.stride() == (1, shape[0])


def _hif8_fn(opts: Options) -> Callable[[torch.Tensor], torch.Tensor]:
    """fake_quant_fn for HiF8 (elementwise: any dense layout is quantized in its memory order)."""
    if opts.tensor_scale:
        return _hif8_scaled_fn(opts)
    entries: dict[torch.dtype, Launcher] = {}

    def hif8(x: torch.Tensor) -> torch.Tensor:
        if not _dense(x):
            x = x.contiguous()
        launcher = entries.get(x.dtype)
        if launcher is None:
            launcher = entries[x.dtype] = _hif8_launcher(opts, False, x.dtype == torch.bfloat16)
        out = torch.empty_like(x)
        numel = x.numel()
        launcher((-(-numel // _ELEMS_PER_PROGRAM), 1, 1), (x, out), (numel,))
        return out

    hif8.keeps_layout = True  # type: ignore[attr-defined]
    return hif8


def fake_quant_amax_fn(opts: Options) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """HiF8 tensor-scaled fake_quant with the amax given per call, as a function of (tensor, amax): one
    quantize pass (no amax pass), the same kernel and compiled variant as fake_quant(x, "hifp8",
    tensor_scale=True, amax=amax). Delayed scaling's path: the amax is a history's (megaquant.ops), a
    one-element tensor on x's device. Any dense layout is quantized in its memory order (`keeps_layout`)."""
    if opts.fmt.block_scaled or not opts.tensor_scale:
        raise MegaquantError("fake_quant_amax_fn needs hifp8 with tensor_scale=True")
    return _hif8_scaled_fn(opts)


def _hif8_scaled_fn(opts: Options) -> Callable[..., torch.Tensor]:
    """HiF8 tensor-scaled fake_quant of (x, amax=None) for fake_quant_fn (the amax pass, then the quantize
    pass reducing its partial maxima on the device) and fake_quant_amax_fn (the quantize pass alone, with
    the amax given); no host synchronisation, any dense layout in its memory order."""
    launcher = _hif8_scaled_launcher(opts, False)

    def hif8_scaled(x: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
        if not _dense(x):
            x = x.contiguous()
        out = torch.empty_like(x)
        parts, nparts = _hif8_parts(x, amax)
        launcher((-(-x.numel() // _ELEMS_PER_PROGRAM), 1, 1), (x, out, parts, parts), (x.numel(), nparts))
        return out

    hif8_scaled.keeps_layout = True  # type: ignore[attr-defined]
    return hif8_scaled


def finite_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over x's finite elements as a 0-d fp32 tensor (0 when there is none), from the HiF8 amax
    pass (one read of a dense x in its memory order, no host synchronisation): what tensor scaling's scale
    is computed from, for delayed scaling's history (megaquant.ops.state.history)."""
    if not _dense(x):
        x = x.contiguous()
    parts, nparts = _hif8_amax_parts(x)
    return parts[:nparts].amax().view(torch.float32)


def _run(x: torch.Tensor, opts: Options, encode: bool, amax: object = None) -> torch.Tensor | Encoded:
    """`amax`: a given tensor amax (HiF8 tensor scaling; _options checked it) or None."""
    if opts.fmt.block_scaled:
        return _mx(x, opts, encode)
    if not opts.tensor_scale:
        return _hif8(x, opts, encode)
    return _hif8_scaled(x, opts, encode, amax if isinstance(amax, torch.Tensor) else None)


def fake_quant_resolved(x: torch.Tensor, opts: Options) -> torch.Tensor:
    """fake_quant with options already resolved and checked by supports() for this kind of tensor (CUDA,
    dtype, non-empty, axis in range): the launch path without re-validating (megaquant.ops caches the
    check per option set). Bit-identical to fake_quant."""
    out = _run(x, opts, False)
    assert isinstance(out, torch.Tensor)
    return out


def _resolved(x: torch.Tensor, fmt: str, opts: dict[str, object]) -> Options:
    resolved = _options(x, fmt, **opts)
    if resolved is None:
        raise MegaquantError(
            f"the Triton kernels do not cover fmt={fmt!r} with {opts} on {x.device}/{x.dtype}; "
            "call megaquant.formats.fake_quant/encode, which falls back to the torch reference"
        )
    return resolved


def fake_quant(x: torch.Tensor, fmt: str, **opts: object) -> torch.Tensor:
    """Kernel fake-quant with the contract's keywords; bit-identical to the reference. Needs supports()."""
    out = _run(x, _resolved(x, fmt, opts), False, opts.get("amax"))
    assert isinstance(out, torch.Tensor)
    return out


def encode(x: torch.Tensor, fmt: str, **opts: object) -> Encoded:
    """Kernel encode with the contract's keywords; bit-identical to the reference. Needs supports()."""
    enc = _run(x, _resolved(x, fmt, opts), True, opts.get("amax"))
    assert isinstance(enc, Encoded)
    return enc
