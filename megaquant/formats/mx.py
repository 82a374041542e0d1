"""Spec-exact torch reference for OCP MX (E4M3, E5M2, E2M1 elements, E8M0 block scales).

Ground truth for the Triton kernels: every step is exact fp32 arithmetic (see docs/formats.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megaquant.formats._bits import binade, mantissa_field, pow2, round_to_pow2_step
from megaquant.formats.registry import ElementFormat, Encoded, Options

__all__ = [
    "NAN_BLOCK_CODE",
    "block_exponents",
    "decode_mx",
    "element_codes",
    "element_values",
    "encode_mx",
    "fake_quant_mx",
    "quantize_elements",
]

E8M0_NAN = 255
NAN_BLOCK_CODE = {"mxfp8_e4m3": 0x7F, "mxfp8_e5m2": 0x7F, "mxfp4_e2m1": 0x0}
"""Element code written for every element of a NaN-scale block (the scale byte 255 carries the NaN)."""


def _to_blocks(x: torch.Tensor, axis: int, block_size: int) -> tuple[torch.Tensor, int]:
    """fp32 view of `x` with `axis` moved last, zero-padded to whole blocks: (..., n_blocks, block_size)."""
    xt = x.to(torch.float32).movedim(axis, -1)
    n = xt.shape[-1]
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    if pad:
        xt = F.pad(xt, (0, pad))
    return xt.reshape(*xt.shape[:-1], n_blocks, block_size), n


def _from_blocks(blocks: torch.Tensor, n: int, axis: int) -> torch.Tensor:
    flat = blocks.flatten(-2)[..., :n]
    return flat.movedim(-1, axis)


def block_exponents(blocks: torch.Tensor, spec: ElementFormat, scale: str) -> torch.Tensor:
    """Shared E8M0 exponent e per block (int32, in [-127, 127]; 128 marks a NaN block).

    amax = max |v| over the block's finite lanes (padding lanes are 0). A block with any NaN or Inf
    lane is a NaN block (torchao / microxcaling behaviour). FLOOR: e = floor(log2 amax) - emax_elem.
    RCEIL: e = ceil(log2(amax / max_normal)), computed exactly from the bits of amax: with
    amax = m_a 2^E and max_normal = m_max 2^emax, e = E - emax + (1 if m_a > m_max else 0).
    Both are clamped below at -127 (so a zero block gets scale byte 0).
    """
    finite = torch.isfinite(blocks)
    amax = torch.where(finite, blocks.abs(), 0.0).amax(dim=-1)
    e = binade(amax) - spec.emax
    if scale == "rceil":
        max_mant = mantissa_field(torch.tensor(spec.max_normal, dtype=torch.float32)).item()
        e = e + (mantissa_field(amax) > max_mant).to(torch.int32)
    e = e.clamp(min=-127)
    e = torch.where(e > 127, 128, e)  # cannot happen for finite fp32 amax; kept for the spec rule
    return torch.where(finite.all(dim=-1), e, 128)


def quantize_elements(s: torch.Tensor, spec: ElementFormat, rounding: str, saturate: bool) -> torch.Tensor:
    """Round fp32 values (already divided by the block scale) to the element grid; fp32 result.

    The step in binade E is 2^(max(E, emin) - man_bits) (subnormals below 2^emin). Ties go to the
    even mantissa ("even") or away from zero ("away"); the sign of zero is kept. A result above
    max_normal becomes +-max_normal when saturating, else NaN (E4M3, no Inf) or +-Inf (E5M2).
    NaN stays NaN; +-Inf saturates to +-max_normal (or stays +-Inf / becomes NaN when not saturating).
    """
    e = binade(s).clamp(spec.emin, spec.emax + 1)
    q = round_to_pow2_step(s, e - spec.man_bits, rounding)
    over = q.abs() > spec.max_normal
    if saturate:
        fill = torch.copysign(torch.full_like(q, spec.max_normal), q)
    elif spec.has_inf:
        fill = torch.copysign(torch.full_like(q, float("inf")), q)
    else:
        fill = torch.copysign(torch.full_like(q, float("nan")), q)  # code sign|0x7F, as ml_dtypes
    return torch.where(over, fill, q)


def _quantize_blocks(x: torch.Tensor, opts: Options) -> tuple[torch.Tensor, torch.Tensor, int]:
    blocks, n = _to_blocks(x, opts.axis, opts.block_size)
    e = block_exponents(blocks, opts.fmt, opts.scale)
    scaled = blocks * pow2(-e.clamp(max=127)).unsqueeze(-1)
    q = quantize_elements(scaled, opts.fmt, opts.rounding, opts.saturate)
    return q, e, n


def fake_quant_mx(x: torch.Tensor, opts: Options) -> torch.Tensor:
    """Quantize-dequantize along `opts.axis`; same shape and dtype as `x`.

    Output = element * 2^e computed exactly in fp32 and then cast to x.dtype (the cast is exact except
    where the value exceeds the dtype's range: RCEIL can round a block max up past 65504 for fp16 or
    past the fp32 maximum, giving Inf). Every NaN produced is the canonical positive quiet NaN.
    """
    q, e, n = _quantize_blocks(x, opts)
    out = q * pow2(e.clamp(max=127)).unsqueeze(-1)
    out = torch.where((e == 128).unsqueeze(-1) | torch.isnan(out), float("nan"), out)
    return _from_blocks(out, n, opts.axis).to(x.dtype)


def element_codes(q: torch.Tensor, spec: ElementFormat) -> torch.Tensor:
    """Bit codes (uint8, value in the low `bits` bits) of fp32 values already on the element grid.

    NaN -> sign|all-ones (E4M3 0x7F/0xFF, E5M2 0x7F/0xFF); +-Inf -> sign|0x7C (E5M2 only).
    """
    bits = q.view(torch.int32)
    sign = (bits >> 31) & 1
    a = q.abs()
    e = binade(a)
    normal = e >= spec.emin
    exp_field = torch.where(normal, e + spec.bias, 0)
    man_normal = (a.view(torch.int32) >> (23 - spec.man_bits)) & ((1 << spec.man_bits) - 1)
    man_sub = (a * 2.0 ** (spec.man_bits - spec.emin)).to(torch.int32)
    man = torch.where(normal, man_normal, man_sub)
    mag = (exp_field << spec.man_bits) | man
    if spec.has_nan:
        mag = torch.where(torch.isnan(q), (1 << (spec.bits - 1)) - 1, mag)
    if spec.has_inf:
        mag = torch.where(torch.isinf(q), ((1 << spec.exp_bits) - 1) << spec.man_bits, mag)
    return ((sign << (spec.bits - 1)) | mag).to(torch.uint8)


def element_values(spec: ElementFormat) -> torch.Tensor:
    """fp32 value of every code 0 .. 2^bits-1 (a lookup table; NaN codes give NaN)."""
    codes = torch.arange(1 << spec.bits, dtype=torch.int32)
    sign = codes >> (spec.bits - 1)
    exp_field = (codes >> spec.man_bits) & ((1 << spec.exp_bits) - 1)
    man = (codes & ((1 << spec.man_bits) - 1)).to(torch.float32)
    normal = (1.0 + man / 2.0**spec.man_bits) * pow2(exp_field - spec.bias)
    sub = man * 2.0 ** (spec.emin - spec.man_bits)
    mag = torch.where(exp_field == 0, sub, normal)
    all_ones = exp_field == (1 << spec.exp_bits) - 1
    if spec.name == "mxfp8_e4m3":
        mag = torch.where(all_ones & (man == 7), float("nan"), mag)
    elif spec.name == "mxfp8_e5m2":
        mag = torch.where(all_ones, torch.where(man == 0, float("inf"), float("nan")), mag)
    return torch.where(sign == 1, -mag, mag)


def _pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes along the last axis, element 2i in the low nibble (odd tail: high nibble 0)."""
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_e2m1(packed: torch.Tensor, n: int) -> torch.Tensor:
    low = packed & 0xF
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :n]


def encode_mx(x: torch.Tensor, opts: Options) -> Encoded:
    """Element codes and E8M0 scale bytes, exactly the values fake_quant_mx produces (see Encoded)."""
    q, e, n = _quantize_blocks(x, opts)
    codes = element_codes(q, opts.fmt).to(torch.int32)
    codes = torch.where((e == 128).unsqueeze(-1), NAN_BLOCK_CODE[opts.fmt.name], codes).to(torch.uint8)
    codes = codes.flatten(-2)[..., :n]
    if opts.fmt.bits == 4:
        codes = _pack_e2m1(codes)
    axis = opts.axis % x.dim()
    scales = (e + 127).clamp(max=E8M0_NAN).to(torch.uint8)
    return Encoded(
        codes=codes.movedim(-1, axis).contiguous(),
        scales=scales.movedim(-1, axis).contiguous(),
        shape=tuple(x.shape),
        axis=axis,
        fmt=opts.fmt.name,
        block_size=opts.block_size,
    )


def decode_mx(enc: Encoded, spec: ElementFormat, dtype: torch.dtype) -> torch.Tensor:
    """Values of an MX Encoded: element value * 2^(scale byte - 127); scale byte 255 -> NaN block."""
    assert enc.scales is not None
    n = enc.shape[enc.axis]
    codes = enc.codes.movedim(enc.axis, -1)
    if spec.bits == 4:
        codes = _unpack_e2m1(codes, n)
    values = element_values(spec).to(codes.device)[codes.to(torch.int64)]
    scale_exp = enc.scales.movedim(enc.axis, -1).to(torch.int32) - 127
    scale_exp = scale_exp.repeat_interleave(enc.block_size, dim=-1)[..., :n]
    out = values * pow2(scale_exp.clamp(max=127))
    out = torch.where((scale_exp == 128) | torch.isnan(out), float("nan"), out)
    return out.movedim(-1, enc.axis).to(dtype)
