"""Triton kernels for NVFP4 fake-quant and encode (round-to-nearest or stochastic), stochastic rounding
of MX and HiF8, and 2-D tiles; bit-exact with the torch reference (megaquant.formats.nvfp4 / .mx / .hif8).

NVFP4 takes two passes over x: the tensor amax (an integer max of |x|'s bits, one atomic per program),
then the quantize pass, which derives the tensor scale from the amax in every program. Stochastic
rounding draws its uniforms from the same counter-based hash as formats._random, so a seed gives the
reference's results. `supports()` says which calls these kernels serve; megaquant.formats asks
formats._triton first.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from megaquant.errors import MegaquantError
from megaquant.formats._random import M1, M2, seed_key
from megaquant.formats._triton import (
    _HIF8_MB_TABLE,
    _amax_bits_kernel,
    _format_constants,
    _hif8_codes,
    _mx_codes,
    _mx_quant,
    _pow2,
    _round_mag,
    _signed,
    _store_values,
    _with_sign_of,
    amax_grid,
)
from megaquant.formats.registry import ElementFormat, Encoded, Options, resolve_options

__all__ = ["encode", "fake_quant", "supports", "tensor_amax"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ELEMS_PER_PROGRAM = 2048
_NUM_WARPS = 4
_AMAX_BLOCK = 4096
_KEYWORDS = frozenset(
    (
        "axis",
        "block_size",
        "scale",
        "rounding",
        "saturate",
        "preset",
        "seed",
        "amax",
        "block_2d",
        "device_seed",
        "prescale",
    )
)
_E2M1 = dict(EMIN=0, MAN=1, BIAS=1, BITS=4, EXP_BITS=2, SUB_SCALE=2.0)
# The hash multipliers as constexpr globals: a compiled @triton.jit function may read a module global only
# when it is a tl.constexpr (Triton 3.6 refuses a plain int: "Cannot access global variable M1"; the CPU
# interpreter reads either, so only benchmarks/triton_aot_check.py catches it without a GPU).
_M1 = tl.constexpr(M1)
_M2 = tl.constexpr(M2)


# ---------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _hash32(x):
    """formats._random.hash32 in uint32 arithmetic (products wrap mod 2^32)."""
    x = x ^ (x >> 16)
    x = x * _M1
    x = x ^ (x >> 15)
    x = x * _M2
    return x ^ (x >> 15)


@triton.jit
def _stream_key(key, word_ptr, MIX: tl.constexpr):
    """The stream key: the seed's key argument, or with MIX formats._random.mixed_key of it and the device
    word at word_ptr (one scalar load and hash per program; the same value in every program)."""
    if MIX:
        return _hash32((tl.load(word_ptr) & 0xFFFFFFFF).to(tl.uint32) ^ key.to(tl.uint32, bitcast=True))
    return key.to(tl.uint32, bitcast=True)


@triton.jit
def _uniform24(offs, key, WIDE: tl.constexpr):
    """formats._random.uniform24 for int64 element indices `offs`: multiples of 2^-24 in [0, 1)."""
    h = _hash32((offs & 0xFFFFFFFF).to(tl.uint32) ^ key)  # int32 key: promoted to uint32, same bits
    if WIDE:
        high = (offs >> 32).to(tl.uint32)
        h = tl.where(high != 0, _hash32(h ^ high), h)
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _round_sr(a, k_biased, u):
    """Stochastic rounding of a magnitude a >= 0 to a multiple of 2^k (k = k_biased - 127): y = a 2^-k
    (exact), floor(y) + 1 when u < y - floor(y) (exact), as _bits.round_to_pow2_step."""
    y = a * _pow2(127 - k_biased)
    f = tl.floor(y)
    return (f + (u < y - f).to(tl.float32)) * _pow2(k_biased - 127)


@triton.jit
def _nv_tile(x, offs, amax, SR: tl.constexpr, key, WIDE: tl.constexpr):
    """NVFP4 of a tile whose blocks run along axis 1: (q, e4m3, ts) with q the signed E2M1 values (fp32,
    before scaling), e4m3 the block scales (reduced over axis 1) and ts the tensor scale, each step the
    reference's fp32 operation (IEEE divisions via div_rn; clamps that keep NaN)."""
    nan_all: tl.constexpr = tl.PropagateNan.ALL
    ts = tl.where(amax == 0, 1.0, tl.math.div_rn(amax, 2688.0))
    abits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    bamax = tl.max(abits, axis=1).to(tl.float32, bitcast=True)  # NaN bits sort above every value
    sbs = tl.math.div_rn(tl.math.div_rn(bamax, 6.0), ts)
    sbs = tl.minimum(tl.maximum(sbs, 0.015625, propagate_nan=nan_all), 448.0, propagate_nan=nan_all)
    e4m3 = _round_mag(sbs, (sbs.to(tl.int32, bitcast=True) >> 23) - 3, False)  # E4M3 RNE, normal range
    r = tl.math.div_rn(tl.math.div_rn(1.0, ts), e4m3)
    s = x * tl.expand_dims(r, 1)
    s = tl.minimum(tl.maximum(s, -6.0, propagate_nan=nan_all), 6.0, propagate_nan=nan_all)
    a = tl.abs(s)
    k_biased = tl.maximum(a.to(tl.int32, bitcast=True) >> 23, 127) - 1
    if SR:  # noqa: SIM108  (a constexpr branch: only one side is compiled)
        q = _round_sr(a, k_biased, _uniform24(offs, key, WIDE))
    else:
        q = _round_mag(a, k_biased, False)
    sign = s.to(tl.int32, bitcast=True) & -2147483648
    return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True), e4m3, ts


@triton.jit
def _mx_sr_tile(
    x,
    offs,
    EMAX: tl.constexpr,
    EMIN: tl.constexpr,
    MAN: tl.constexpr,
    MAXN: tl.constexpr,
    MAX_MANT: tl.constexpr,
    FILL_BITS: tl.constexpr,
    SATURATE: tl.constexpr,
    RCEIL: tl.constexpr,
    key,
    WIDE: tl.constexpr,
):
    """MX with stochastic element rounding: (q signed fp32 element values, e block exponents, 128 = NaN
    block). The scale rule is _triton._mx_quant's (called for e only; its rounded values are unused and
    compiled away)."""
    _, _, e = _mx_quant(x, EMAX, EMIN, MAN, MAXN, MAX_MANT, FILL_BITS, SATURATE, RCEIL, False)
    a = tl.abs(x * tl.expand_dims(_pow2(-tl.minimum(e, 127)), 1))
    k_biased = tl.maximum(a.to(tl.int32, bitcast=True) >> 23, EMIN + 127) - MAN
    r = _round_sr(a, k_biased, _uniform24(offs, key, WIDE))
    if SATURATE:
        r = tl.minimum(r, MAXN)
    else:
        r = tl.where(r > MAXN, tl.full(r.shape, FILL_BITS, tl.int32).to(tl.float32, bitcast=True), r)
    return (r.to(tl.int32, bitcast=True) | (x.to(tl.int32, bitcast=True) & -2147483648)).to(
        tl.float32, bitcast=True
    ), e


@triton.jit
def _dequant(q, e, e4m3, ts, NV: tl.constexpr):
    """Values in fp32: NVFP4 q * (ts * e4m3); MX q * 2^e with NaN blocks NaN."""
    if NV:
        return q * tl.expand_dims(ts * e4m3, 1)
    nan = tl.full(e.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    return q * tl.expand_dims(tl.where(e == 128, nan, _pow2(tl.minimum(e, 127))), 1)


@triton.jit
def _store_rounded(ptr, offs, v, mask, BF16_RNE: tl.constexpr):
    """Store fp32 values rounded to the output dtype, nearest-even (as torch's .to). bf16 by integer
    arithmetic on the bits (ptr is the int16 view), so the rounding is the same everywhere, the Triton
    interpreter included; NaN stays NaN."""
    if BF16_RNE:
        bits = v.to(tl.int32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(ptr + offs, tl.where(v != v, 0x7FC0, r).to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_codes(e, e4m3, NV: tl.constexpr):
    """Scale bytes: NVFP4 the E4M3 code (normal values 2^-6..448, NaN 0x7F); MX the E8M0 byte."""
    if NV:
        bits = e4m3.to(tl.int32, bitcast=True)
        code = ((((bits >> 23) & 0xFF) - 120) << 3) | ((bits >> 20) & 7)
        return tl.where(e4m3 != e4m3, 0x7F, code)
    return tl.minimum(e + 127, 255)


@triton.jit
def _quant(
    x, offs, amax_ptr, NV: tl.constexpr, SR: tl.constexpr, key, WIDE: tl.constexpr,
    EMAX: tl.constexpr, EMIN: tl.constexpr, MAN: tl.constexpr, MAXN: tl.constexpr, MAX_MANT: tl.constexpr,
    FILL_BITS: tl.constexpr, SATURATE: tl.constexpr, RCEIL: tl.constexpr, AWAY: tl.constexpr,
):  # fmt: skip
    """(q, e, e4m3, ts) for NVFP4, MX stochastic or MX nearest (_triton._mx_quant, used by the 2-D tiles);
    the ones a format does not have are placeholders."""
    if NV:
        q, e4m3, ts = _nv_tile(x, offs, tl.load(amax_ptr), SR, key, WIDE)
        e = e4m3.to(tl.int32, bitcast=True) * 0
    else:
        if SR:
            q, e = _mx_sr_tile(
                x, offs, EMAX, EMIN, MAN, MAXN, MAX_MANT, FILL_BITS, SATURATE, RCEIL, key, WIDE
            )
        else:
            r, sign, e = _mx_quant(x, EMAX, EMIN, MAN, MAXN, MAX_MANT, FILL_BITS, SATURATE, RCEIL, AWAY)
            q = _signed(r, sign)
        e4m3 = e.to(tl.float32)
        ts = 1.0
    return q, e, e4m3, ts


# ---------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _undo_prescale(v, prescale, unscale, PRE: tl.constexpr):
    """v / prescale in fp32, correctly rounded: the IEEE division (PRE 1) or, where _unscale proved it
    rounds the same, a multiply by fl(1 / prescale) (PRE 2; the division is a multi-instruction sequence,
    and these kernels are compute-bound with their per-element hash)."""
    if PRE == 2:
        return v * unscale
    return tl.math.div_rn(v, prescale)


def _unscale(spec: ElementFormat, dtype: torch.dtype, prescale: float) -> int:
    """How the kernels take `prescale` back out of a dequantized value q (the PRE constexpr): 0 no
    pre-scale, 2 multiply by fl(1/p), 1 divide. 2 only for MXFP4 with p = 3/4 and a bf16 / fp16 result:
    there every q is 0 or m 2^e with m in {1, 1.5} (an E2M1 value times an E8M0 scale), so the exact q / p
    is 2^e 4/3 (fl(4/3) 2^e either way: its fraction 1/3 or 2/3 never near a rounding tie) or 2^(e+1)
    (1.5 fl(4/3) = 2 + 2^-24 rounds to 2), and overflow is inf either way. Where q / p is an fp32
    subnormal (|q| < 2^-126 4/3) the two fp32 results can differ by one subnormal step, which the final
    rounding to bf16 or fp16 cannot see (the exact value sits 1/6 of a bf16 step from any tie; fp16 results
    never come from fp32 subnormals); an fp32 result keeps the division."""
    if prescale == 1.0:
        return 0
    e2m1 = spec.bits == 4 and spec.block_scale == "e8m0"
    return 2 if e2m1 and prescale == 0.75 and dtype in (torch.bfloat16, torch.float16) else 1


@triton.jit(do_not_specialize=["key"])
def _lastaxis_kernel(
    x_ptr, out_ptr, codes_ptr, scales_ptr, amax_ptr, word_ptr, total_blocks, n, n_blocks, n_packed,
    BS: tl.constexpr, G: tl.constexpr, ENCODE: tl.constexpr, NV: tl.constexpr, SR: tl.constexpr,
    key, MIX: tl.constexpr, WIDE: tl.constexpr, EMAX: tl.constexpr, EMIN: tl.constexpr, MAN: tl.constexpr,
    BIAS: tl.constexpr, BITS: tl.constexpr, EXP_BITS: tl.constexpr, MAXN: tl.constexpr,
    MAX_MANT: tl.constexpr, FILL_BITS: tl.constexpr, HAS_INF: tl.constexpr, HAS_NAN: tl.constexpr,
    NAN_BLOCK_CODE: tl.constexpr, SUB_SCALE: tl.constexpr, SATURATE: tl.constexpr, RCEIL: tl.constexpr,
    AWAY: tl.constexpr, BF16_BITS: tl.constexpr, prescale, unscale, PRE: tl.constexpr,
):  # fmt: skip
    """x viewed as (rows, n), blocks of BS along n (the last one may be short); G blocks per program.
    PRE: fake-quantize prescale * x (fp32) and take it back, rounding to x's dtype: 1 divides by prescale
    (IEEE), 2 multiplies by `unscale` = fl(1 / prescale) where that rounds as the division (_unscale)."""
    if SR:
        key = _stream_key(key, word_ptr, MIX)
    blk = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    row = blk // n_blocks
    col0 = (blk % n_blocks) * BS
    col = col0[:, None] + tl.arange(0, BS)[None, :]
    mask = (blk < total_blocks)[:, None] & (col < n)
    offs = row[:, None] * n + col
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PRE:
        x = x * prescale
    q, e, e4m3, ts = _quant(
        x,
        offs,
        amax_ptr,
        NV,
        SR,
        key,
        WIDE,
        EMAX,
        EMIN,
        MAN,
        MAXN,
        MAX_MANT,
        FILL_BITS,
        SATURATE,
        RCEIL,
        AWAY,
    )
    if ENCODE:
        codes = _mx_codes(q, e, EMIN, MAN, BIAS, BITS, EXP_BITS, HAS_INF, HAS_NAN, NAN_BLOCK_CODE, SUB_SCALE)
        tl.store(scales_ptr + blk, _scale_codes(e, e4m3, NV).to(tl.uint8), mask=blk < total_blocks)
        if BITS == 4:
            # padding lanes (col >= n) code 0: the odd tail's high nibble is 0 (mx.pack_e2m1), even when
            # the block's NaN scale or an infinite 1/ts made the padding's zeros NaN
            codes = tl.where(mask, codes, 0)
            lo, hi = tl.split(tl.reshape(codes, (G, BS // 2, 2)))
            pcol = col0[:, None] // 2 + tl.arange(0, BS // 2)[None, :]
            pmask = (blk < total_blocks)[:, None] & (pcol < n_packed)
            tl.store(codes_ptr + row[:, None] * n_packed + pcol, (lo | (hi << 4)).to(tl.uint8), mask=pmask)
        else:
            tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=mask)
    elif PRE:
        _store_rounded(
            out_ptr,
            offs,
            _undo_prescale(_dequant(q, e, e4m3, ts, NV), prescale, unscale, PRE),
            mask,
            BF16_BITS,
        )
    elif NV:
        _store_rounded(out_ptr, offs, _dequant(q, e, e4m3, ts, NV), mask, BF16_BITS)
    else:
        _store_values(out_ptr, offs, _dequant(q, e, e4m3, ts, NV), mask, BF16_BITS)


@triton.jit(do_not_specialize=["key"])
def _inner_kernel(
    x_ptr, out_ptr, codes_ptr, scales_ptr, amax_ptr, word_ptr, n, inner, n_blocks, n_packed,
    BS: tl.constexpr, BK: tl.constexpr, ENCODE: tl.constexpr, NV: tl.constexpr, SR: tl.constexpr,
    key, MIX: tl.constexpr, WIDE: tl.constexpr, EMAX: tl.constexpr, EMIN: tl.constexpr, MAN: tl.constexpr,
    BIAS: tl.constexpr, BITS: tl.constexpr, EXP_BITS: tl.constexpr, MAXN: tl.constexpr,
    MAX_MANT: tl.constexpr, FILL_BITS: tl.constexpr, HAS_INF: tl.constexpr, HAS_NAN: tl.constexpr,
    NAN_BLOCK_CODE: tl.constexpr, SUB_SCALE: tl.constexpr, SATURATE: tl.constexpr, RCEIL: tl.constexpr,
    AWAY: tl.constexpr, BF16_BITS: tl.constexpr, prescale, unscale, PRE: tl.constexpr,
):  # fmt: skip
    """x viewed as (lead, n, inner), blocks of BS along n; one block x BK columns per program, as a
    (1, BS, BK) tile reduced over axis 1 (the layout of _triton._mx_inner_kernel). PRE: as
    _lastaxis_kernel's."""
    if SR:
        key = _stream_key(key, word_ptr, MIX)
    pid = tl.program_id(0).to(tl.int64)
    lead = pid // n_blocks
    b = pid % n_blocks
    i = b * BS + tl.arange(0, BS)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    kmask = k < inner
    mask = (i < n)[:, None] & kmask[None, :]
    offs = lead * n * inner + i[:, None] * inner + k[None, :]
    x = tl.expand_dims(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0)
    if PRE:
        x = x * prescale
    q, e, e4m3, ts = _quant(
        x, tl.expand_dims(offs, 0), amax_ptr, NV, SR, key, WIDE, EMAX, EMIN, MAN, MAXN, MAX_MANT, FILL_BITS,
        SATURATE, RCEIL, AWAY,
    )  # fmt: skip
    if ENCODE:
        codes = _mx_codes(q, e, EMIN, MAN, BIAS, BITS, EXP_BITS, HAS_INF, HAS_NAN, NAN_BLOCK_CODE, SUB_SCALE)
        codes = tl.where(mask, tl.reshape(codes, (BS, BK)), 0)  # padding lanes 0, as in _lastaxis_kernel
        scale_offs = (lead * n_blocks + b) * inner + k
        tl.store(
            scales_ptr + scale_offs, tl.reshape(_scale_codes(e, e4m3, NV), (BK,)).to(tl.uint8), mask=kmask
        )
        if BITS == 4:
            lo, hi = tl.split(tl.permute(tl.reshape(codes, (BS // 2, 2, BK)), (0, 2, 1)))
            prow = b * (BS // 2) + tl.arange(0, BS // 2)
            poffs = lead * n_packed * inner + prow[:, None] * inner + k[None, :]
            pmask = (prow < n_packed)[:, None] & kmask[None, :]
            tl.store(codes_ptr + poffs, (lo | (hi << 4)).to(tl.uint8), mask=pmask)
        else:
            tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=mask)
    elif PRE:
        v = _undo_prescale(tl.reshape(_dequant(q, e, e4m3, ts, NV), (BS, BK)), prescale, unscale, PRE)
        _store_rounded(out_ptr, offs, v, mask, BF16_BITS)
    elif NV:
        _store_rounded(out_ptr, offs, tl.reshape(_dequant(q, e, e4m3, ts, NV), (BS, BK)), mask, BF16_BITS)
    else:
        _store_values(out_ptr, offs, tl.reshape(_dequant(q, e, e4m3, ts, NV), (BS, BK)), mask, BF16_BITS)


@triton.jit(do_not_specialize=["key"])
def _tiles_kernel(
    x_ptr, out_ptr, amax_ptr, word_ptr, m, k, n_mb,
    BS: tl.constexpr, T: tl.constexpr, NV: tl.constexpr, SR: tl.constexpr, key, MIX: tl.constexpr,
    WIDE: tl.constexpr, EMAX: tl.constexpr, EMIN: tl.constexpr, MAN: tl.constexpr, MAXN: tl.constexpr,
    MAX_MANT: tl.constexpr, FILL_BITS: tl.constexpr, SATURATE: tl.constexpr, RCEIL: tl.constexpr,
    AWAY: tl.constexpr, BF16_BITS: tl.constexpr,
):  # fmt: skip
    """block_2d fake-quant: x viewed as (lead, m, k), BS x BS tiles over the last two axes, T tiles along k
    per program. The (BS, T*BS) tile of rows is permuted to (T, BS*BS), so each tile is one block of BS*BS
    lanes (its amax is the tile's) and every lane keeps its element's address and index."""
    if SR:
        key = _stream_key(key, word_ptr, MIX)
    pid = tl.program_id(0).to(tl.int64)
    lead = pid // n_mb
    i = (pid % n_mb) * BS + tl.arange(0, BS)
    j = tl.program_id(1).to(tl.int64) * (T * BS) + tl.arange(0, T * BS)
    ii = i[:, None] + j[None, :] * 0
    jj = j[None, :] + i[:, None] * 0
    ii = tl.reshape(tl.permute(tl.reshape(ii, (BS, T, BS)), (1, 0, 2)), (T, BS * BS))
    jj = tl.reshape(tl.permute(tl.reshape(jj, (BS, T, BS)), (1, 0, 2)), (T, BS * BS))
    mask = (ii < m) & (jj < k)
    offs = lead * m * k + ii * k + jj
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q, e, e4m3, ts = _quant(
        x,
        offs,
        amax_ptr,
        NV,
        SR,
        key,
        WIDE,
        EMAX,
        EMIN,
        MAN,
        MAXN,
        MAX_MANT,
        FILL_BITS,
        SATURATE,
        RCEIL,
        AWAY,
    )
    if NV:
        _store_rounded(out_ptr, offs, _dequant(q, e, e4m3, ts, NV), mask, BF16_BITS)
    else:
        _store_values(out_ptr, offs, _dequant(q, e, e4m3, ts, NV), mask, BF16_BITS)


@triton.jit(do_not_specialize=["key"])
def _hif8_sr_kernel(
    x_ptr, out_ptr, word_ptr, numel, BLOCK: tl.constexpr, ENCODE: tl.constexpr, SATURATE: tl.constexpr,
    FORK: tl.constexpr, MB_TABLE: tl.constexpr, BF16_BITS: tl.constexpr, key, MIX: tl.constexpr,
    WIDE: tl.constexpr,
):  # fmt: skip
    """HiF8 with stochastic rounding, per element, as hif8.quantize_hif8 with uniforms: the step of x's
    binade e is 2^k, k = max(e - mb(|e|), -22) (mb from MB_TABLE as in _triton._hif8_quant; |x| capped at
    2^16, whose step 2^16 overflows either way); +0 for zero, NaN kept."""
    key = _stream_key(key, word_ptr, MIX)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.minimum(tl.abs(x), 65536.0, propagate_nan=tl.PropagateNan.ALL)
    if FORK:
        clamped = tl.minimum(tl.maximum(a, 2.384185791015625e-07), 31129.599609375)
        a = tl.where((a == 0) | (a != a), a, clamped)
    eb = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    ae = tl.abs(eb - 127)
    man_bits = (MB_TABLE >> tl.minimum(ae + ae, 31)) & 3
    r = _round_sr(a, tl.maximum(eb - man_bits, 127 - 22), _uniform24(offs, key, WIDE))
    if SATURATE:
        r = tl.minimum(r, 32768.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        r = tl.where(r > 32768.0, tl.full(r.shape, 0x7F800000, tl.int32).to(tl.float32, bitcast=True), r)
    q = _with_sign_of(r, x) + 0.0
    if ENCODE:
        tl.store(out_ptr + offs, _hif8_codes(q).to(tl.uint8), mask=mask)
    else:
        _store_values(out_ptr, offs, q, mask, BF16_BITS)


# ---------------------------------------------------------------------------------------------------------
# Python side


@functools.lru_cache(maxsize=1024)
def _resolve(
    fmt: str, axis: int, block_size: int, scale: str, rounding: str, saturate: bool, preset: str | None,
    seed: int | None, block_2d: bool,
) -> Options | None:  # fmt: skip
    try:
        opts = resolve_options(
            fmt, axis=axis, block_size=block_size, scale=scale, rounding=rounding, saturate=saturate,
            preset=preset, seed=seed, block_2d=block_2d,
        )  # fmt: skip
    except (MegaquantError, TypeError):
        return None
    if not opts.fmt.block_scaled:
        return opts if opts.rounding == "stochastic" and not opts.tensor_scale else None  # HiF8
    if opts.fmt.block_scale == "e8m0" and opts.rounding != "stochastic" and not opts.block_2d:
        return None  # MX round-to-nearest in 1-d blocks: formats._triton serves it
    if opts.rounding == "away" and opts.fmt.block_scale == "e4m3":
        return None
    bs = opts.block_size
    if bs < 2 or bs > (64 if opts.block_2d else 256) or bs & (bs - 1):
        return None
    return opts


def _key_arg(seed: int) -> int:
    """seed_key(seed) as a signed 32-bit kernel argument (the kernels read its bits as uint32). A runtime
    argument, not a constexpr: a new seed every step must not compile a new kernel."""
    k = seed_key(seed)
    return k - (1 << 32) if k >= 1 << 31 else k


def _hif8_sr(x: torch.Tensor, opts: Options, encode: bool, word: object = None) -> torch.Tensor | Encoded:
    assert opts.seed is not None
    xc = x.contiguous()
    out = torch.empty(xc.shape, dtype=torch.uint8 if encode else x.dtype, device=x.device)
    bf16_bits = not encode and x.dtype == torch.bfloat16
    _hif8_sr_kernel[(triton.cdiv(xc.numel(), _ELEMS_PER_PROGRAM),)](
        xc, out.view(torch.int16) if bf16_bits else out, xc if word is None else word, xc.numel(),
        BLOCK=_ELEMS_PER_PROGRAM, ENCODE=encode, SATURATE=opts.saturate, FORK=opts.fork_clamp,
        MB_TABLE=_HIF8_MB_TABLE, BF16_BITS=bf16_bits, key=_key_arg(opts.seed), MIX=word is not None,
        WIDE=xc.numel() >= 1 << 32, num_warps=_NUM_WARPS,
    )  # fmt: skip
    if not encode:
        return out
    return Encoded(codes=out, scales=None, shape=tuple(x.shape), axis=opts.axis % x.dim(), fmt="hifp8",
                   block_size=1)  # fmt: skip


def _options(x: torch.Tensor, fmt: str, **opts: object) -> Options | None:
    if not x.is_cuda or x.dtype not in _DTYPES or x.numel() == 0 or x.dim() == 0 or set(opts) - _KEYWORDS:
        return None
    key = [opts.get(k, d) for k, d in (("axis", -1), ("block_size", None), ("scale", "floor"),
                                       ("rounding", "even"), ("saturate", True), ("preset", None),
                                       ("seed", None), ("block_2d", False))]  # fmt: skip
    if not isinstance(key[0], int) or not (key[1] is None or isinstance(key[1], int)):
        return None
    try:
        resolved = _resolve(fmt, *key)
    except TypeError:
        return None
    if resolved is None or not -x.dim() <= resolved.axis < x.dim():
        return None
    if resolved.block_2d and (x.dim() < 2 or resolved.axis % x.dim() < x.dim() - 2):
        return None  # the reference raises the error
    if "amax" in opts and resolved.fmt.block_scale != "e4m3":
        return None
    if "prescale" in opts and not (
        resolved.fmt.block_scale == "e8m0" and resolved.rounding == "stochastic" and not resolved.block_2d
    ):
        return None  # the pre-scale is in the MX stochastic 1-d kernels only; the reference serves the rest
    return resolved


def supports(x: torch.Tensor, fmt: str, **opts: object) -> bool:
    """True when these kernels serve fake_quant/encode(x, fmt, **opts): a CUDA bf16/fp16/fp32 tensor,
    nvfp4 (round-to-nearest-even or stochastic, tensor amax computed or given) or an MX format with
    rounding="stochastic", power-of-two blocks (2..256) along any axis; block_2d tiles (2..64) for nvfp4
    and every MX rounding (fake_quant in the kernel; encode of tiles falls back to the reference); HiF8
    with rounding="stochastic" (without tensor_scale); fake_quant's `prescale` with MX stochastic
    rounding in 1-d blocks."""
    return _options(x, fmt, **opts) is not None


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-d fp32 tensor in one pass (NaN if x has a NaN), without a host sync."""
    xc = x.contiguous()
    out = torch.zeros(1, dtype=torch.int32, device=x.device)
    grid = amax_grid(xc.numel(), _AMAX_BLOCK)
    _amax_bits_kernel[grid](xc, out, xc.numel(), BLOCK=_AMAX_BLOCK, FINITE=False, PARTS=False, num_warps=8)
    return out.view(torch.float32).reshape(())


def _run(
    x: torch.Tensor, opts: Options, encode: bool, amax: object, word: object = None, prescale: float = 1.0
) -> torch.Tensor | Encoded:
    """`word`: the device_seed tensor (mixed into the key in the kernels, from its pointer) or None.
    `prescale` != 1 (MX stochastic fake_quant in 1-d blocks only, _options): quantize prescale * x."""
    spec = opts.fmt
    if not spec.block_scaled:
        return _hif8_sr(x, opts, encode, word)
    nv = spec.block_scale == "e4m3"
    ax = opts.axis % x.dim()
    x = x.contiguous()
    shape = tuple(x.shape)
    lead, n, inner = math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1 :])
    bs = opts.block_size
    n_blocks = -(-n // bs)
    n_codes = -(-n // 2) if spec.bits == 4 else n
    if nv:
        if amax is None:
            amax_t = tensor_amax(x)
        else:
            amax_t = torch.as_tensor(amax, device=x.device).to(torch.float32).reshape(())
        consts: dict[str, object] = dict(
            EMAX=2, MAXN=6.0, MAX_MANT=0, FILL_BITS=0, HAS_INF=False, HAS_NAN=False, NAN_BLOCK_CODE=0,
            SATURATE=True, RCEIL=False, AWAY=False, **_E2M1,
        )  # fmt: skip
    else:
        amax_t = x
        consts = dict(_format_constants(spec, opts))
    sr = opts.rounding == "stochastic"
    key = _key_arg(opts.seed) if sr and opts.seed is not None else 0
    out = codes = scales = x
    bf16_bits = not encode and x.dtype == torch.bfloat16  # MX: exact values, truncate; NVFP4, PRE: round
    pre = dict(prescale=float(prescale), unscale=1.0 / float(prescale), PRE=_unscale(spec, x.dtype, prescale))
    if encode:
        codes = torch.empty((*shape[:ax], n_codes, *shape[ax + 1 :]), dtype=torch.uint8, device=x.device)
        scales = torch.empty((*shape[:ax], n_blocks, *shape[ax + 1 :]), dtype=torch.uint8, device=x.device)
    else:
        out = torch.empty_like(x)
    out_arg = out.view(torch.int16) if bf16_bits else out
    word_arg = x if word is None else word  # a placeholder pointer when there is no word (MIX off)
    common = dict(
        ENCODE=encode, NV=nv, SR=sr, key=key, MIX=sr and word is not None, WIDE=x.numel() >= 1 << 32,
        BF16_BITS=bf16_bits, num_warps=_NUM_WARPS, **consts,
    )  # fmt: skip
    if opts.block_2d:
        assert not encode
        m, k = shape[-2], shape[-1]
        n_mb = -(-m // bs)
        t = max(1, min(_ELEMS_PER_PROGRAM // (bs * bs), triton.next_power_of_2(-(-k // bs))))
        for name in (
            "ENCODE",
            "HAS_INF",
            "HAS_NAN",
            "NAN_BLOCK_CODE",
            "SUB_SCALE",
            "BIAS",
            "BITS",
            "EXP_BITS",
        ):
            common.pop(name)
        grid2 = (math.prod(shape[:-2]) * n_mb, triton.cdiv(k, t * bs))
        _tiles_kernel[grid2](x, out_arg, amax_t, word_arg, m, k, n_mb, BS=bs, T=t, **common)
    elif inner == 1:
        total = lead * n_blocks
        g = max(1, _ELEMS_PER_PROGRAM // bs)
        _lastaxis_kernel[(triton.cdiv(total, g),)](
            x, out_arg, codes, scales, amax_t, word_arg, total, n, n_blocks, n_codes, BS=bs, G=g, **pre,
            **common,
        )  # fmt: skip
    else:
        bk = max(1, min(triton.next_power_of_2(inner), _ELEMS_PER_PROGRAM // bs))
        grid = (lead * n_blocks, triton.cdiv(inner, bk))
        _inner_kernel[grid](
            x,
            out_arg,
            codes,
            scales,
            amax_t,
            word_arg,
            n,
            inner,
            n_blocks,
            n_codes,
            BS=bs,
            BK=bk,
            **pre,
            **common,
        )
    if not encode:
        return out
    tensor_scale = None
    if nv:
        ratio = amax_t / torch.full((), 2688.0, device=x.device)  # exact division (no reciprocal)
        tensor_scale = torch.where(amax_t == 0, torch.ones_like(ratio), ratio)
    return Encoded(
        codes=codes, scales=scales, shape=shape, axis=ax, fmt=spec.name, block_size=bs,
        tensor_scale=tensor_scale,
    )  # fmt: skip


def _resolved(x: torch.Tensor, fmt: str, opts: dict[str, object]) -> Options:
    resolved = _options(x, fmt, **opts)
    if resolved is None:
        raise MegaquantError(
            f"the NVFP4/stochastic-rounding kernels do not cover fmt={fmt!r} with {opts} on "
            f"{x.device}/{x.dtype}; call megaquant.formats.fake_quant/encode (it falls back to the reference)"
        )
    return resolved


def fake_quant(x: torch.Tensor, fmt: str, **opts: object) -> torch.Tensor:
    """Kernel fake-quant with the contract's keywords; bit-identical to the reference. Needs supports()."""
    prescale = opts.get("prescale", 1.0)
    assert isinstance(prescale, float)
    out = _run(x, _resolved(x, fmt, opts), False, opts.get("amax"), opts.get("device_seed"), prescale)
    assert isinstance(out, torch.Tensor)
    return out


def encode(x: torch.Tensor, fmt: str, **opts: object) -> Encoded:
    """Kernel encode with the contract's keywords; bit-identical to the reference. Needs supports().
    block_2d tiles are encoded by the reference (the kernels fake-quantize them)."""
    resolved = _resolved(x, fmt, opts)
    if "prescale" in opts:
        raise MegaquantError("prescale= is a fake_quant keyword: encode has no way to divide it back out")
    if resolved.block_2d:
        from megaquant.formats import encode as reference_encode

        return reference_encode(x, fmt, backend="reference", **opts)  # type: ignore[arg-type]
    enc = _run(x, resolved, True, opts.get("amax"), opts.get("device_seed"))
    assert isinstance(enc, Encoded)
    return enc
