"""The one table of number formats and the option vocabulary (scale rules, rounding, presets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megaquant.errors import ValueNameError

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMATS",
    "PRESETS",
    "ROUNDINGS",
    "SCALES",
    "Encoded",
    "ElementFormat",
    "Options",
    "element_format",
    "resolve_options",
]


@dataclass(frozen=True, kw_only=True)
class ElementFormat:
    """One element format: bit fields and the derived range (all powers as integer exponents)."""

    name: str
    """Registry key, e.g. ``"mxfp8_e4m3"``."""
    element: str
    """Element type name as in the OCP MX spec / HiFloat8 paper (``"E4M3"``, ``"HiF8"``)."""
    bits: int
    """Width of one element code."""
    exp_bits: int
    """Exponent field width (0 for HiF8, whose exponent width is variable)."""
    man_bits: int
    """Mantissa field width (the widest one for HiF8: 3)."""
    bias: int
    """Exponent bias (0 for HiF8: sign-magnitude exponent)."""
    emax: int
    """Exponent of the largest power of two representable (`emax_elem` in the MX spec)."""
    emin: int
    """Exponent of the smallest normal value."""
    max_normal: float
    """Largest finite magnitude."""
    min_subnormal: float
    """Smallest non-zero magnitude."""
    has_inf: bool
    has_nan: bool
    block_scaled: bool
    """True for the MX formats and NVFP4 (a scale per block), False for HiF8 (per element)."""
    block_scale: str = "e8m0"
    """Kind of block scale: "e8m0" (MX, power of two), "e4m3" (NVFP4: E4M3 block scale times an FP32
    tensor scale), "none" (HiF8)."""
    default_block_size: int = 32
    """Elements per block when the caller gives no block_size (MX 32, NVFP4 16)."""


FORMATS = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp4_e2m1", "hifp8", "nvfp4")

_REGISTRY: dict[str, ElementFormat] = {
    "mxfp8_e4m3": ElementFormat(
        name="mxfp8_e4m3", element="E4M3", bits=8, exp_bits=4, man_bits=3, bias=7, emax=8, emin=-6,
        max_normal=448.0, min_subnormal=2.0**-9, has_inf=False, has_nan=True, block_scaled=True,
    ),
    "mxfp8_e5m2": ElementFormat(
        name="mxfp8_e5m2", element="E5M2", bits=8, exp_bits=5, man_bits=2, bias=15, emax=15, emin=-14,
        max_normal=57344.0, min_subnormal=2.0**-16, has_inf=True, has_nan=True, block_scaled=True,
    ),
    "mxfp4_e2m1": ElementFormat(
        name="mxfp4_e2m1", element="E2M1", bits=4, exp_bits=2, man_bits=1, bias=1, emax=2, emin=0,
        max_normal=6.0, min_subnormal=0.5, has_inf=False, has_nan=False, block_scaled=True,
    ),
    "hifp8": ElementFormat(
        name="hifp8", element="HiF8", bits=8, exp_bits=0, man_bits=3, bias=0, emax=15, emin=-15,
        max_normal=32768.0, min_subnormal=2.0**-22, has_inf=True, has_nan=True, block_scaled=False,
        block_scale="none", default_block_size=1,
    ),
    "nvfp4": ElementFormat(
        name="nvfp4", element="E2M1", bits=4, exp_bits=2, man_bits=1, bias=1, emax=2, emin=0,
        max_normal=6.0, min_subnormal=0.5, has_inf=False, has_nan=False, block_scaled=True,
        block_scale="e4m3", default_block_size=16,
    ),
}  # fmt: skip

SCALES = ("floor", "rceil")
ROUNDINGS = ("even", "away", "stochastic")
PRESETS = ("spec", "fork")


def element_format(fmt: str) -> ElementFormat:
    """The registry entry for `fmt`; raises ValueNameError listing the known names."""
    try:
        return _REGISTRY[fmt]
    except KeyError:
        raise ValueNameError(f"unknown number format {fmt!r}; expected one of {', '.join(FORMATS)}") from None


@dataclass(frozen=True, kw_only=True)
class Options:
    """Fully resolved quantization options (after applying a preset)."""

    fmt: ElementFormat
    axis: int
    block_size: int
    scale: str
    rounding: str
    saturate: bool
    fork_clamp: bool
    """HiF8 fork preset: clamp non-zero |x| into [2^-22, 0.95*2^15] before rounding."""
    tensor_scale: bool
    """HiF8 only: scale by a power of two so the tensor amax lands in binade 3 before rounding."""
    seed: int | None = None
    """rounding="stochastic" only: the seed of the counter-based random stream (see formats/_random.py)."""
    block_2d: bool = False
    """Block-scaled formats: square block_size x block_size tiles over the last two axes instead of
    1-d blocks along `axis`."""


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueNameError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")


def resolve_options(
    fmt: str,
    *,
    axis: int,
    block_size: int | None,
    scale: str,
    rounding: str,
    saturate: bool,
    preset: str | None,
    tensor_scale: bool = False,
    seed: int | None = None,
    block_2d: bool = False,
) -> Options:
    """Validate the keywords of fake_quant/encode and apply `preset` (a preset wins over the keywords).

    preset "fork": MX -> FLOOR scale, ties away from zero, saturating; HiF8 -> clamp non-zero |x| to
    [2^-22, 0.95*2^15] then ties away (so overflow saturates to 32768 and tiny values become 2^-22).
    preset "spec" or None: the keywords as given. block_size None: the format's default (MX 32, NVFP4
    16). rounding="stochastic" needs an integer seed (a default seed would give every call the same
    noise); HiF8 keeps stochastic rounding and turns the ties-only choices into ties away.
    """
    spec = element_format(fmt)
    _check("scale rule", scale, SCALES)
    _check("rounding", rounding, ROUNDINGS)
    if preset is not None:
        _check("preset", preset, PRESETS)
    if block_size is None:
        block_size = spec.default_block_size
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueNameError(f"block_size must be a positive integer, got {block_size!r}")
    fork = preset == "fork"
    if fork:
        scale, saturate = "floor", True
        if rounding != "stochastic":
            rounding = "away"
    if spec.name == "hifp8" and rounding != "stochastic":
        rounding = "away"  # HiF8 defines only ties-away (TA) for round-to-nearest.
    if rounding == "stochastic":
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueNameError(
                f"rounding='stochastic' needs an integer seed= (got {seed!r}); advance it per step and "
                "per GEMM so runs are reproducible and calls do not share their noise"
            )
        seed &= (1 << 64) - 1
    else:
        seed = None
    if block_2d and not spec.block_scaled:
        raise ValueNameError(f"block_2d=True needs a block-scaled format (mx*, nvfp4); {fmt} has no blocks")
    if not saturate and not (spec.has_inf or spec.has_nan):
        raise ValueNameError(
            f"{fmt} has no Inf or NaN code, so saturate=False is not meaningful; pass saturate=True"
        )
    return Options(
        fmt=spec,
        axis=axis,
        block_size=block_size,
        scale=scale,
        rounding=rounding,
        saturate=saturate,
        fork_clamp=fork and spec.name == "hifp8",
        tensor_scale=tensor_scale,
        seed=seed,
        block_2d=block_2d,
    )


@dataclass(frozen=True, kw_only=True)
class Encoded:
    """Real bits of a quantized tensor; `decode` turns it back into values.

    codes: uint8. FP8/HiF8: one code per element, same shape as the input. MXFP4: two E2M1 codes per
    byte packed along `axis` (element 2i in the low nibble, 2i+1 in the high nibble; an odd length
    leaves the last high nibble 0), so `axis` has length ceil(n/2).
    scales: uint8 E8M0 bytes (2^(byte-127), 255 = NaN), the input shape with `axis` replaced by the
    number of blocks ceil(n/block_size); None for hifp8.
    tensor_scale_exp: hifp8 with tensor scaling only: 0-d int32 tensor s; codes encode x*2^s.
    nvfp4: scales are E4M3 codes (uint8, positive, 2^-6 .. 448) and tensor_scale the FP32 per-tensor
    scale (0-d fp32 tensor); a value is E2M1 * (tensor_scale * E4M3 block scale), both products in fp32.
    block_2d: the scales cover block_size x block_size tiles: the input shape with its last two axes
    replaced by their block counts.
    """

    codes: torch.Tensor
    scales: torch.Tensor | None
    shape: tuple[int, ...]
    axis: int
    """Non-negative axis the blocks (and the E2M1 packing) run along."""
    fmt: str
    block_size: int
    tensor_scale_exp: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None
    block_2d: bool = False
