"""Number formats: MXFP8 (E4M3, E5M2), MXFP4 (E2M1) and HiFloat8 — fake-quant, encode and decode.

The torch reference here is the ground truth; CUDA tensors go to the Triton kernels when they cover
the request. Importing this package imports torch (`import megaquant` does not).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from megaquant.errors import ValueNameError
from megaquant.formats.hif8 import decode_hif8, encode_hif8, fake_quant_hif8
from megaquant.formats.mx import decode_mx, encode_mx, fake_quant_mx
from megaquant.formats.registry import (
    FORMATS,
    PRESETS,
    ROUNDINGS,
    SCALES,
    ElementFormat,
    Encoded,
    Options,
    element_format,
    resolve_options,
)

__all__ = [
    "BACKENDS",
    "FORMATS",
    "PRESETS",
    "ROUNDINGS",
    "SCALES",
    "ElementFormat",
    "Encoded",
    "decode",
    "element_format",
    "encode",
    "fake_quant",
    "quantizer",
]

BACKENDS = ("auto", "reference", "triton")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _checked(x: torch.Tensor, opts: Options) -> Options:
    fmt = opts.fmt.name
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueNameError(f"expected a floating-point tensor (bf16, fp16, fp32), got dtype {x.dtype}")
    if opts.fmt.block_scaled and x.dim() == 0:
        raise ValueNameError(f"{fmt} quantizes blocks along an axis; got a 0-d tensor (reshape it to 1-d)")
    if x.dim() and not -x.dim() <= opts.axis < x.dim():
        raise ValueNameError(f"axis {opts.axis} is out of range for a tensor of shape {tuple(x.shape)}")
    return opts


def _triton_module(x: torch.Tensor, fmt: str, backend: str, opts: dict[str, object]) -> ModuleType | None:
    """The Triton module when it should serve this call, else None (reference).

    `opts` are the contract keywords (axis, block_size, scale, rounding, saturate, preset, plus
    tensor_scale=True when asked); `_triton.supports(x, fmt, **opts)` decides, so the kernels only ever
    serve what they cover and everything else gets the reference.
    """
    if backend not in BACKENDS:
        raise ValueNameError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "reference" or (backend == "auto" and not x.is_cuda):
        return None
    try:
        _triton = importlib.import_module("megaquant.formats._triton")
    except ImportError as err:
        if backend == "triton":
            raise ValueNameError(f"backend='triton' asked for but the kernels cannot load: {err}") from err
        return None
    if _triton.supports(x, fmt, **opts):
        return _triton
    if backend == "triton":
        raise ValueNameError(
            f"the Triton kernels do not cover fmt={fmt!r} with {opts} on {x.device}/{x.dtype}; "
            "use backend='auto' to fall back to the reference"
        )
    return None


def fake_quant(
    x: torch.Tensor,
    fmt: str,
    *,
    axis: int = -1,
    block_size: int = 32,
    scale: str = "floor",
    rounding: str = "even",
    saturate: bool = True,
    preset: str | None = None,
    tensor_scale: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Quantize then dequantize `x` in format `fmt`; same shape and dtype as `x`.

    MX formats: blocks of `block_size` consecutive elements along `axis` (a ragged last block is just
    shorter) share an E8M0 scale chosen by `scale` ("floor" = OCP spec, "rceil" = round the scale up so
    the block max never saturates); elements round to nearest with ties to `rounding` ("even" or "away").
    HiF8: per element, ties away, optional power-of-two `tensor_scale`; axis/block_size/scale ignored.
    `preset="fork"` reproduces the fork (MX: FLOOR + ties-away; HiF8: clamp to [2^-22, 0.95*2^15]).
    `backend`: "auto" (Triton on CUDA when it covers the call), "reference" or "triton".
    The result carries no autograd history (megaquant.ops gives straight-through gradients).
    Exact semantics: docs/formats.md.
    """
    kw: dict[str, object] = dict(
        axis=axis, block_size=block_size, scale=scale, rounding=rounding, saturate=saturate, preset=preset,
    )  # fmt: skip
    if tensor_scale:  # an extension keyword: only passed to the kernels when used
        kw["tensor_scale"] = True
    opts = _checked(
        x,
        resolve_options(
            fmt, axis=axis, block_size=block_size, scale=scale, rounding=rounding, saturate=saturate,
            preset=preset, tensor_scale=tensor_scale,
        ),
    )  # fmt: skip
    kernels = _triton_module(x, fmt, backend, kw)
    with torch.no_grad():
        if kernels is not None:
            return kernels.fake_quant(x, fmt, **kw)
        if opts.fmt.block_scaled:
            return fake_quant_mx(x, opts)
        return fake_quant_hif8(x, opts)


def _triton_gap(x: torch.Tensor, fmt: str, kw: dict[str, object]) -> tuple[ModuleType | None, str | None]:
    """(the Triton module, None) when it serves fake_quant(x, fmt, **kw), else (None, why not)."""
    if not x.is_cuda:
        return None, f"not a CUDA tensor ({x.device})"
    try:
        _triton = importlib.import_module("megaquant.formats._triton")
    except ImportError as err:
        return None, f"the Triton kernels cannot load: {err}"
    if _triton.supports(x, fmt, **kw):
        return _triton, None
    return None, f"the Triton kernels do not cover fmt={fmt!r} with {kw} on {x.dtype}"


def _reference_fake_quant(opts: Options, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return fake_quant_mx(x, opts) if opts.fmt.block_scaled else fake_quant_hif8(x, opts)


def quantizer(
    x: torch.Tensor, fmt: str, **kw: object
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str, str | None]:
    """fake_quant(·, fmt, **kw) resolved once for tensors like `x`: (function, path, reason).

    The function equals fake_quant(y, fmt, **kw) bit for bit for every non-empty y with x's device type,
    dtype and number of dimensions, without re-resolving the keywords per call (megaquant.ops keeps one
    per option set: it is the short launch path). path is "triton" or "reference"; reason says why the
    kernels do not serve the call (None for "triton"). Keywords as fake_quant's, backend excluded.
    """
    opts = _checked(x, resolve_options(fmt, **{**_KW_DEFAULTS, **kw}))  # type: ignore[arg-type]
    kernels, reason = _triton_gap(x, fmt, {k: v for k, v in kw.items() if k != "tensor_scale" or v})
    if kernels is not None:
        return kernels.fake_quant_fn(opts), "triton", None
    return functools.partial(_reference_fake_quant, opts), "reference", reason


_KW_DEFAULTS: dict[str, object] = dict(
    axis=-1, block_size=32, scale="floor", rounding="even", saturate=True, preset=None, tensor_scale=False
)


def encode(
    x: torch.Tensor,
    fmt: str,
    *,
    axis: int = -1,
    block_size: int = 32,
    scale: str = "floor",
    rounding: str = "even",
    saturate: bool = True,
    preset: str | None = None,
    tensor_scale: bool = False,
    backend: str = "auto",
) -> Encoded:
    """The real bits of `fake_quant(x, fmt, ...)` with the same keywords: decode(encode(x)) equals it."""
    kw: dict[str, object] = dict(
        axis=axis, block_size=block_size, scale=scale, rounding=rounding, saturate=saturate, preset=preset,
    )  # fmt: skip
    if tensor_scale:  # an extension keyword: only passed to the kernels when used
        kw["tensor_scale"] = True
    opts = _checked(
        x,
        resolve_options(
            fmt, axis=axis, block_size=block_size, scale=scale, rounding=rounding, saturate=saturate,
            preset=preset, tensor_scale=tensor_scale,
        ),
    )  # fmt: skip
    kernels = _triton_module(x, fmt, backend, kw)
    with torch.no_grad():
        if kernels is not None:
            return kernels.encode(x, fmt, **kw)
        if opts.fmt.block_scaled:
            return encode_mx(x, opts)
        return encode_hif8(x, opts)


def decode(enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of `enc` as `dtype` (computed exactly in fp32, then cast)."""
    spec = element_format(enc.fmt)
    if spec.block_scaled:
        return decode_mx(enc, spec, dtype)
    return decode_hif8(enc, dtype)
