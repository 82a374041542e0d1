"""Spec-exact torch reference for OCP MX (E4M3, E5M2, E2M1 elements, E8M0 block scales).

Ground truth for the Triton kernels: every step is exact fp32 arithmetic (see docs/formats.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megaquant.errors import ValueNameError
from megaquant.formats._bits import binade, mantissa_field, pow2, round_to_pow2_step
from megaquant.formats._random import uniform24
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


def _from_blocks(blocks: torch.Tensor, n: int, axis: int) -> torch.Tensor:
    flat = blocks.flatten(-2)[..., :n]
    return flat.movedim(-1, axis)


def to_tiles(t: torch.Tensor, bs: int) -> torch.Tensor:
    """(..., M, K) -> (..., ceil(M/bs), ceil(K/bs), bs*bs): square tiles over the last two axes, padded
    with zeros (any dtype; the padding lanes change no amax)."""
    m, k = t.shape[-2], t.shape[-1]
    mb, kb = -(-m // bs), -(-k // bs)
    if mb * bs - m or kb * bs - k:
        t = F.pad(t, (0, kb * bs - k, 0, mb * bs - m))
    t = t.reshape(*t.shape[:-2], mb, bs, kb, bs).transpose(-3, -2)
    return t.reshape(*t.shape[:-2], bs * bs)


def from_tiles(tiles: torch.Tensor, m: int, k: int, bs: int) -> torch.Tensor:
    """Inverse of to_tiles: (..., Mb, Kb, bs*bs) -> (..., M, K)."""
    mb, kb = tiles.shape[-3], tiles.shape[-2]
    t = tiles.reshape(*tiles.shape[:-1], bs, bs).transpose(-3, -2)
    return t.reshape(*t.shape[:-4], mb * bs, kb * bs)[..., :m, :k]


def blockify(t: torch.Tensor, opts: Options) -> torch.Tensor:
    """`t` (any dtype) as (..., n_blocks, lanes): 1-d blocks along opts.axis, or block_2d tiles."""
    if opts.block_2d:
        return to_tiles(t, opts.block_size)
    tt = t.movedim(opts.axis, -1)
    n = tt.shape[-1]
    n_blocks = -(-n // opts.block_size)
    if n_blocks * opts.block_size - n:
        tt = F.pad(tt, (0, n_blocks * opts.block_size - n))
    return tt.reshape(*tt.shape[:-1], n_blocks, opts.block_size)


def unblockify(blocks: torch.Tensor, shape: tuple[int, ...], opts: Options) -> torch.Tensor:
    """Inverse of blockify for a tensor of the input's `shape`."""
    if opts.block_2d:
        return from_tiles(blocks, shape[-2], shape[-1], opts.block_size)
    return _from_blocks(blocks, shape[opts.axis], opts.axis)


def block_uniforms(
    x: torch.Tensor, opts: Options, device_seed: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Stochastic rounding: one uniform per lane of blockify(x) from the element's row-major index in x
    (padding lanes get index 0; they are zeros and never round up), keyed by the seed and the optional
    device word (formats._random). None for round-to-nearest."""
    if opts.rounding != "stochastic":
        return None
    assert opts.seed is not None
    index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).reshape(x.shape)
    return uniform24(blockify(index, opts), opts.seed, device_seed)


def check_block_2d(x: torch.Tensor, opts: Options) -> None:
    """block_2d tiles the last two axes: the axis must be one of them."""
    if opts.block_2d and (x.dim() < 2 or opts.axis % x.dim() < x.dim() - 2):
        raise ValueNameError(
            f"block_2d=True tiles the last two axes; got a tensor of shape {tuple(x.shape)} with "
            f"axis={opts.axis} (pass axis=-1 or -2 on a tensor of 2 or more dimensions)"
        )


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


def quantize_elements(
    s: torch.Tensor, spec: ElementFormat, rounding: str, saturate: bool, u: torch.Tensor | None = None
) -> torch.Tensor:
    """Round fp32 values (already divided by the block scale) to the element grid; fp32 result.

    The step in binade E is 2^(max(E, emin) - man_bits) (subnormals below 2^emin). Ties go to the
    even mantissa ("even") or away from zero ("away"), or the rounding is stochastic between the two
    neighbours ("stochastic", uniforms `u`); the sign of zero is kept. A result above
    max_normal becomes +-max_normal when saturating, else NaN (E4M3, no Inf) or +-Inf (E5M2).
    NaN stays NaN; +-Inf saturates to +-max_normal (or stays +-Inf / becomes NaN when not saturating).
    """
    e = binade(s).clamp(spec.emin, spec.emax + 1)
    q = round_to_pow2_step(s, e - spec.man_bits, rounding, u)
    over = q.abs() > spec.max_normal
    if saturate:
        fill = torch.copysign(torch.full_like(q, spec.max_normal), q)
    elif spec.has_inf:
        fill = torch.copysign(torch.full_like(q, float("inf")), q)
    else:
        fill = torch.copysign(torch.full_like(q, float("nan")), q)  # code sign|0x7F, as ml_dtypes
    return torch.where(over, fill, q)


def _quantize_blocks(
    x: torch.Tensor, opts: Options, device_seed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    check_block_2d(x, opts)
    blocks = blockify(x.to(torch.float32), opts)
    e = block_exponents(blocks, opts.fmt, opts.scale)
    scaled = blocks * pow2(-e.clamp(max=127)).unsqueeze(-1)
    q = quantize_elements(
        scaled, opts.fmt, opts.rounding, opts.saturate, block_uniforms(x, opts, device_seed)
    )
    return q, e


def fake_quant_mx(x: torch.Tensor, opts: Options, device_seed: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize along `opts.axis`; same shape and dtype as `x`.

    Output = element * 2^e computed exactly in fp32 and then cast to x.dtype (the cast is exact except
    where the value exceeds the dtype's range: RCEIL can round a block max up past 65504 for fp16 or
    past the fp32 maximum, giving Inf). Every NaN produced is the canonical positive quiet NaN.
    """
    q, e = _quantize_blocks(x, opts, device_seed)
    out = q * pow2(e.clamp(max=127)).unsqueeze(-1)
    out = torch.where((e == 128).unsqueeze(-1) | torch.isnan(out), float("nan"), out)
    return unblockify(out, tuple(x.shape), opts).to(x.dtype)


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


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes along the last axis, element 2i in the low nibble (odd tail: high nibble 0)."""
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor, n: int) -> torch.Tensor:
    low = packed & 0xF
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :n]


def codes_along_axis(codes_blocks: torch.Tensor, x: torch.Tensor, opts: Options, bits: int) -> torch.Tensor:
    """Element codes in blocked form -> the input's layout, E2M1 packed along the axis (see Encoded)."""
    axis = opts.axis % x.dim()
    codes = unblockify(codes_blocks, tuple(x.shape), opts)
    if bits == 4:
        codes = pack_e2m1(codes.movedim(axis, -1)).movedim(-1, axis)
    return codes.contiguous()


def scales_layout(scales_blocks: torch.Tensor, x: torch.Tensor, opts: Options) -> torch.Tensor:
    """Per-block scale bytes (..., n_blocks) -> the layout of Encoded.scales."""
    if opts.block_2d:
        return scales_blocks.contiguous()
    return scales_blocks.movedim(-1, opts.axis % x.dim()).contiguous()


def expand_scales(scales: torch.Tensor, enc: Encoded) -> torch.Tensor:
    """Encoded.scales (any dtype) repeated to one value per element, in the input's layout."""
    bs = enc.block_size
    if enc.block_2d:
        m, k = enc.shape[-2], enc.shape[-1]
        return scales.repeat_interleave(bs, dim=-2).repeat_interleave(bs, dim=-1)[..., :m, :k]
    n = enc.shape[enc.axis]
    return scales.repeat_interleave(bs, dim=enc.axis).narrow(enc.axis, 0, n)


def element_values_of(enc: Encoded, spec: ElementFormat) -> torch.Tensor:
    """fp32 element values of an Encoded's codes in the input's layout (E2M1 unpacked)."""
    codes = enc.codes
    if spec.bits == 4:
        codes = unpack_e2m1(codes.movedim(enc.axis, -1), enc.shape[enc.axis]).movedim(-1, enc.axis)
    return element_values(spec).to(codes.device)[codes.to(torch.int64)]


def encode_mx(x: torch.Tensor, opts: Options, device_seed: torch.Tensor | None = None) -> Encoded:
    """Element codes and E8M0 scale bytes, exactly the values fake_quant_mx produces (see Encoded)."""
    q, e = _quantize_blocks(x, opts, device_seed)
    codes = element_codes(q, opts.fmt).to(torch.int32)
    codes = torch.where((e == 128).unsqueeze(-1), NAN_BLOCK_CODE[opts.fmt.name], codes).to(torch.uint8)
    scales = (e + 127).clamp(max=E8M0_NAN).to(torch.uint8)
    return Encoded(
        codes=codes_along_axis(codes, x, opts, opts.fmt.bits),
        scales=scales_layout(scales, x, opts),
        shape=tuple(x.shape),
        axis=opts.axis % x.dim(),
        fmt=opts.fmt.name,
        block_size=opts.block_size,
        block_2d=opts.block_2d,
    )


def decode_mx(enc: Encoded, spec: ElementFormat, dtype: torch.dtype) -> torch.Tensor:
    """Values of an MX Encoded: element value * 2^(scale byte - 127); scale byte 255 -> NaN block."""
    assert enc.scales is not None
    values = element_values_of(enc, spec)
    scale_exp = expand_scales(enc.scales.to(torch.int32) - 127, enc)
    out = values * pow2(scale_exp.clamp(max=127))
    out = torch.where((scale_exp == 128) | torch.isnan(out), float("nan"), out)
    return out.to(dtype)
