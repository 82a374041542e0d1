"""Exact fp32 helpers built on integer bit manipulation: binade of a value, powers of two, rounding."""

from __future__ import annotations

import torch

__all__ = ["binade", "mantissa_field", "pow2", "round_to_pow2_step"]


def binade(x: torch.Tensor) -> torch.Tensor:
    """floor(log2 |x|) of an fp32 tensor as int32, read from the exponent field.

    Zero and fp32 subnormals give -127, Inf/NaN give 128: callers clamp to the range they need.
    """
    return ((x.view(torch.int32) >> 23) & 0xFF) - 127


def mantissa_field(x: torch.Tensor) -> torch.Tensor:
    """The 23 stored mantissa bits of an fp32 tensor as int32."""
    return x.view(torch.int32) & 0x7FFFFF


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for an integer tensor e in [-149, 127], exact (subnormal results for e < -126)."""
    e = e.to(torch.int32)
    normal = ((e + 127).clamp(min=0) << 23).view(torch.float32)
    sub = (torch.ones_like(e) << (e + 149).clamp(0, 31)).view(torch.float32)
    return torch.where(e >= -126, normal, sub)


def round_to_pow2_step(
    x: torch.Tensor, step_exp: torch.Tensor, rounding: str, u: torch.Tensor | None = None
) -> torch.Tensor:
    """Round fp32 `x` to a multiple of 2^step_exp: nearest with ties to the even multiple ("even") or
    away from zero ("away"), or stochastically ("stochastic", needs `u`).

    Exact: x * 2^-step_exp and the product back are power-of-two scalings (callers keep step_exp in
    [-126, 126]), torch.round is round-half-to-even, and |y| + 0.5 is exact for |y| < 2^22 (larger |y|
    only occur for values that overflow the format anyway). The sign of zero is kept.
    Stochastic: with a = |y|, f = floor(a) and frac = a - f (both exact), the magnitude is f + 1 when
    u < frac, else f; u holds multiples of 2^-24 in [0, 1) (formats._random.uniform24), so P(up) = frac
    exactly whenever frac is a multiple of 2^-24, the result is always one of the two neighbours, and a
    value on the grid (frac = 0) never moves.
    """
    y = x * pow2(-step_exp)
    if rounding == "stochastic":
        assert u is not None, "stochastic rounding needs the uniform values u"
        a = y.abs()
        f = torch.floor(a)
        r = torch.copysign(f + (u < a - f).to(a.dtype), y)
    elif rounding == "even":
        r = torch.round(y)
    else:
        r = torch.copysign(torch.floor(y.abs() + 0.5), y)
    return r * pow2(step_exp)
