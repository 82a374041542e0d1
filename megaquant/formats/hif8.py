"""Spec-exact torch reference for HiFloat8 (Luo et al. 2024): tapered precision, ties away from zero."""

from __future__ import annotations

import torch

from megaquant.formats._bits import binade, pow2, round_to_pow2_step
from megaquant.formats._random import uniform24
from megaquant.formats.registry import Encoded, Options

__all__ = [
    "INF_CODE",
    "NAN_CODE",
    "decode_hif8",
    "encode_hif8",
    "fake_quant_hif8",
    "hif8_codes",
    "hif8_values",
    "quantize_hif8",
]

NAN_CODE = 0x80
INF_CODE = 0x6F
MAX_FINITE = 32768.0
FORK_CLAMP_MIN = 2.0**-22
FORK_CLAMP_MAX = 0.95 * 2.0**15
TENSOR_SCALE_TARGET = 3
"""With tensor scaling the amax is moved into binade 3, the top of the 3-mantissa-bit region."""


def _step_exponent(e: torch.Tensor) -> torch.Tensor:
    """Grid step exponent for binade e: e - mantissa bits (3 for |e|<=3, 2 for <=7, 1 for <=15, 0 for
    the denormal binades -22..-16); below 2^-22 the grid is {0, 2^-22}, so the step is 2^-22."""
    a = e.abs()
    man_bits = torch.where(a <= 3, 3, torch.where(a <= 7, 2, torch.where(a <= 15, 1, 0)))
    return torch.where(e < -22, -22, e - man_bits)


def finite_amax(x32: torch.Tensor) -> torch.Tensor:
    """max |x| over the finite elements of an fp32 tensor, 0-d fp32 (0 for none or an empty tensor)."""
    if not x32.numel():
        return x32.new_zeros((), dtype=torch.float32)
    return torch.where(torch.isfinite(x32), x32.abs(), 0.0).amax()


def _tensor_scale_exp(x32: torch.Tensor, amax: torch.Tensor | float | None = None) -> torch.Tensor:
    """s with amax * 2^s in [2^3, 2^4): s = 3 - floor(log2 amax) over finite |x| (or the `amax` given,
    e.g. from an amax history), clamped to [-127, 127]; 0 for a tensor with no finite non-zero value."""
    if amax is not None:
        given = torch.as_tensor(amax, device=x32.device).to(torch.float32).reshape(())
        a = torch.where(torch.isfinite(given), given.abs(), 0.0)
    else:
        a = finite_amax(x32)
    s = (TENSOR_SCALE_TARGET - binade(a)).clamp(-127, 127)
    return torch.where(a > 0, s, 0).to(torch.int32)


def quantize_hif8(
    x32: torch.Tensor, *, saturate: bool, fork_clamp: bool, u: torch.Tensor | None = None
) -> torch.Tensor:
    """Round fp32 values to the HiF8 grid (fp32 result, exact).

    Ties go away from zero within the value's own binade (equal to nearest-value rounding since the step
    never shrinks as |x| grows). A result above 32768 (|x| >= 40960, or +-Inf) becomes +-32768 when
    saturating, else +-Inf. Results equal to zero are +0 (HiF8 has a single zero); NaN stays NaN.
    fork_clamp: first clamp non-zero |x| into [2^-22, 0.95*2^15] (the fork's behaviour; Inf -> 32768).
    u (uniforms, formats._random.uniform24): stochastic rounding between the two grid neighbours in the
    value's binade instead (the upper one may be the next binade's first value, itself on the grid).
    """
    if fork_clamp:
        a = x32.abs()
        clamped = torch.copysign(a.clamp(FORK_CLAMP_MIN, FORK_CLAMP_MAX), x32)
        x32 = torch.where(a == 0, x32, clamped)
    e = binade(x32).clamp(-23, 16)
    q = round_to_pow2_step(x32, _step_exponent(e), "away" if u is None else "stochastic", u)
    fill = MAX_FINITE if saturate else float("inf")
    q = torch.where(q.abs() > MAX_FINITE, torch.copysign(torch.full_like(q, fill), q), q)
    return torch.where(q == 0, 0.0, q)


def _quantize(
    x: torch.Tensor,
    opts: Options,
    amax: torch.Tensor | float | None = None,
    device_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    x32 = x.to(torch.float32)
    s = _tensor_scale_exp(x32, amax) if opts.tensor_scale else None
    if s is not None:
        x32 = x32 * pow2(s)
    u = None
    if opts.rounding == "stochastic":
        assert opts.seed is not None
        index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).reshape(x.shape)
        u = uniform24(index, opts.seed, device_seed)
    return quantize_hif8(x32, saturate=opts.saturate, fork_clamp=opts.fork_clamp, u=u), s


def fake_quant_hif8(
    x: torch.Tensor,
    opts: Options,
    amax: torch.Tensor | float | None = None,
    device_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize per element; same shape and dtype as `x`. With tensor scaling the rounded
    value is multiplied back by 2^-s in fp32 before the cast to x.dtype. NaN outputs are canonical."""
    q, s = _quantize(x, opts, amax, device_seed)
    if s is not None:
        q = q * pow2(-s)
    return torch.where(torch.isnan(q), float("nan"), q).to(x.dtype)


def hif8_codes(q: torch.Tensor) -> torch.Tensor:
    """Codes (uint8) of fp32 values on the HiF8 grid. Layout after the sign bit: dot prefix
    (0000 denormal, 0001 E=0, 001 |E|=1, 01 |E|=2..3, 10 |E|=4..7, 11 |E|=8..15), exponent sign,
    exponent magnitude without its leading 1, mantissa. 0 -> 0x00, NaN -> 0x80, +-Inf -> 0x6F/0xEF."""
    sign = ((q.view(torch.int32) >> 31) & 1) << 7
    a = q.abs()
    e = binade(a)
    m = e.abs()
    s_e = (e < 0).to(torch.int32)
    frac = a.view(torch.int32) & 0x7FFFFF
    man3 = frac >> 20
    man2 = frac >> 21
    man1 = frac >> 22
    c_e0 = 0b0001000 | man3
    c_e1 = 0b0010000 | (s_e << 3) | man3
    c_e23 = 0b0100000 | (s_e << 4) | ((m - 2) << 3) | man3
    c_e47 = 0b1000000 | (s_e << 4) | ((m - 4) << 2) | man2
    c_e815 = 0b1100000 | (s_e << 4) | ((m - 8) << 1) | man1
    c_den = e + 23
    mag = torch.where(
        e < -15,
        c_den,
        torch.where(
            m == 0,
            c_e0,
            torch.where(m == 1, c_e1, torch.where(m <= 3, c_e23, torch.where(m <= 7, c_e47, c_e815))),
        ),
    )
    code = sign | mag
    code = torch.where(a == 0, 0, code)
    code = torch.where(torch.isinf(q), sign | INF_CODE, code)
    code = torch.where(torch.isnan(q), NAN_CODE, code)
    return code.to(torch.uint8)


def hif8_values() -> torch.Tensor:
    """fp32 value of each of the 256 codes (lookup table), derived from the field layout."""
    codes = torch.arange(256, dtype=torch.int32)
    sign = codes >> 7
    c = codes & 0x7F
    s_e = torch.where(c >= 0b0100000, (c >> 4) & 1, (c >> 3) & 1)
    mag_e = torch.where(
        c >= 0b1100000,
        8 + ((c >> 1) & 7),
        torch.where(c >= 0b1000000, 4 + ((c >> 2) & 3), torch.where(c >= 0b0100000, 2 + ((c >> 3) & 1), 1)),
    )
    man_bits = torch.where(c >= 0b1100000, 1, torch.where(c >= 0b1000000, 2, 3))
    man = c & ((torch.ones_like(c) << man_bits) - 1)
    e = torch.where(s_e == 1, -mag_e, mag_e)
    e = torch.where(c < 0b0010000, 0, e)  # dot 0001 (and 0000, handled below)
    normal = (1.0 + man.to(torch.float32) * pow2(-man_bits)) * pow2(e)
    denormal = torch.where(c == 0, 0.0, pow2(c - 23))
    mag = torch.where(c < 0b0001000, denormal, normal)
    mag = torch.where(c == INF_CODE, float("inf"), mag)
    values = torch.where(sign == 1, -mag, mag)
    return torch.where(codes == NAN_CODE, float("nan"), values)


def encode_hif8(
    x: torch.Tensor,
    opts: Options,
    amax: torch.Tensor | float | None = None,
    device_seed: torch.Tensor | None = None,
) -> Encoded:
    """One HiF8 code per element (same shape as x); tensor_scale_exp holds s when tensor scaling."""
    q, s = _quantize(x, opts, amax, device_seed)
    return Encoded(
        codes=hif8_codes(q).contiguous(),
        scales=None,
        shape=tuple(x.shape),
        axis=opts.axis % max(x.dim(), 1),
        fmt="hifp8",
        block_size=1,
        tensor_scale_exp=s,
    )


def decode_hif8(enc: Encoded, dtype: torch.dtype) -> torch.Tensor:
    """Values of a HiF8 Encoded (times 2^-s when it carries a tensor scale)."""
    out = hif8_values().to(enc.codes.device)[enc.codes.to(torch.int64)]
    if enc.tensor_scale_exp is not None:
        out = out * pow2(-enc.tensor_scale_exp)
    return torch.where(torch.isnan(out), float("nan"), out).to(dtype)
