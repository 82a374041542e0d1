"""Number formats: MXFP8 (E4M3, E5M2), MXFP4 (E2M1), NVFP4 and HiFloat8 — fake-quant, encode and decode,
plus the random Hadamard transform (formats.hadamard) that training recipes apply before quantizing.

The torch reference here is the ground truth; CUDA tensors go to the Triton kernels when they cover
the request. Importing this package imports torch (`import megaquant` does not).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from megaquant.errors import ValueNameError
from megaquant.formats.hadamard import hadamard_matrix, inverse_random_hadamard, random_hadamard
from megaquant.formats.hif8 import decode_hif8, encode_hif8, fake_quant_hif8
from megaquant.formats.hif8 import finite_amax as hif8_finite_amax
from megaquant.formats.mx import decode_mx, encode_mx, fake_quant_mx
from megaquant.formats.nvfp4 import decode_nvfp4, encode_nvfp4, fake_quant_nvfp4
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
    "finite_amax",
    "hadamard_matrix",
    "inverse_random_hadamard",
    "random_hadamard",
    "quantizer",
    "quantizer_amax",
    "quantizer_both_axes",
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


_KERNEL_MODULES = ("megaquant.formats._triton", "megaquant.formats._triton_nvfp4")
"""Kernel modules in the order asked; the first whose supports() accepts a call serves it."""


def _triton_module(x: torch.Tensor, fmt: str, backend: str, opts: dict[str, object]) -> ModuleType | None:
    """The Triton module when it should serve this call, else None (reference).

    `opts` are the contract keywords (axis, block_size, scale, rounding, saturate, preset, plus the
    extension keywords tensor_scale, seed, device_seed, block_2d, amax only when used); each module's
    `supports(x, fmt, **opts)` decides, so the kernels only ever serve what they cover and everything
    else gets the reference.
    """
    if backend not in BACKENDS:
        raise ValueNameError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "reference" or (backend == "auto" and not x.is_cuda):
        return None
    errors = []
    for name in _KERNEL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            errors.append(f"{name}: {err}")
            continue
        if module.supports(x, fmt, **opts):
            return module
    if backend == "triton":
        why = f" (cannot load: {'; '.join(errors)})" if errors else ""
        raise ValueNameError(
            f"the Triton kernels do not cover fmt={fmt!r} with {opts} on {x.device}/{x.dtype}{why}; "
            "use backend='auto' to fall back to the reference"
        )
    return None


def _prepare(
    x: torch.Tensor,
    fmt: str,
    backend: str,
    amax: torch.Tensor | float | None,
    device_seed: torch.Tensor | None,
    prescale: float = 1.0,
    **keywords: Any,
) -> tuple[Options, ModuleType | None, dict[str, object]]:
    """The one place fake_quant and encode check their keywords: resolved options, the kernel module
    that serves the call (None: reference) and the keywords to hand it."""
    opts = _checked(x, resolve_options(fmt, **keywords))
    prescale = _checked_prescale(prescale)
    kw: dict[str, object] = dict(
        axis=opts.axis, block_size=opts.block_size, scale=keywords["scale"], rounding=keywords["rounding"],
        saturate=keywords["saturate"], preset=keywords["preset"],
    )  # fmt: skip
    # extension keywords: only passed to the kernels when used, so older kernels refuse what they lack
    if opts.tensor_scale:
        kw["tensor_scale"] = True
    if opts.seed is not None:
        kw["seed"] = keywords["seed"]
    if device_seed is not None:
        _check_device_seed(x, opts, device_seed)
        kw["device_seed"] = device_seed
    if opts.block_2d:
        kw["block_2d"] = True
    if amax is not None:
        if opts.fmt.name != "nvfp4" and not (opts.fmt.name == "hifp8" and opts.tensor_scale):
            raise ValueNameError(f"amax= sets a tensor scale: it needs fmt='nvfp4' (or hifp8 with "
                                 f"tensor_scale=True), not {fmt!r}")  # fmt: skip
        kw["amax"] = amax
    if prescale != 1.0:
        kw["prescale"] = prescale
    return opts, _triton_module(x, fmt, backend, kw), kw


def _checked_prescale(prescale: object) -> float:
    if isinstance(prescale, bool) or not isinstance(prescale, (int, float)) or not 0 < prescale < math.inf:
        raise ValueNameError(f"prescale= must be a positive finite number (e.g. 0.75), got {prescale!r}")
    return float(prescale)


def _check_device_seed(x: torch.Tensor, opts: Options, word: torch.Tensor) -> None:
    if opts.seed is None:
        raise ValueNameError("device_seed= mixes a device word into a stochastic-rounding seed: it needs "
                             "rounding='stochastic' and seed=")  # fmt: skip
    if not isinstance(word, torch.Tensor) or word.dim() != 0 or word.dtype not in (torch.int64, torch.int32):
        raise ValueNameError(f"device_seed= must be a 0-d int64 (or int32) tensor, got {word!r}")  # fmt: skip
    if word.device != x.device:
        raise ValueNameError(f"device_seed= is on {word.device}, the tensor on {x.device}: put it on the "
                             "same device (the kernels read it there)")  # fmt: skip


def fake_quant(
    x: torch.Tensor,
    fmt: str,
    *,
    axis: int = -1,
    block_size: int | None = None,
    scale: str = "floor",
    rounding: str = "even",
    saturate: bool = True,
    preset: str | None = None,
    tensor_scale: bool = False,
    seed: int | None = None,
    block_2d: bool = False,
    amax: torch.Tensor | float | None = None,
    device_seed: torch.Tensor | None = None,
    prescale: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Quantize then dequantize `x` in format `fmt`; same shape and dtype as `x`.

    MX formats: blocks of `block_size` (default 32) consecutive elements along `axis` (a ragged last
    block is just shorter) share an E8M0 scale chosen by `scale` ("floor" = OCP spec, "rceil" = round the
    scale up so the block max never saturates); elements round to nearest with ties to `rounding`
    ("even" or "away"), or `rounding="stochastic"` with an integer `seed` (and optionally `device_seed`, a
    0-d int64 tensor on x's device mixed into the seed on the device: formats._random).
    NVFP4: blocks of 16 along `axis` with E4M3 block scales under an FP32 tensor scale amax/2688 (amax =
    max |x|, or the `amax` given); `scale` is ignored; bit-exact with torchao's two-level NVFP4.
    `block_2d=True` (MX, NVFP4): block_size x block_size tiles over the last two axes instead.
    HiF8: per element, ties away (or stochastic), optional power-of-two `tensor_scale`; axis/block_size/
    scale ignored. `preset="fork"` reproduces the fork (MX: FLOOR + ties-away; HiF8: clamp to
    [2^-22, 0.95*2^15]). `backend`: "auto" (Triton on CUDA when it covers the call), "reference" or
    "triton". `prescale` p != 1: the result is (fake_quant(p * x in fp32) / p in fp32) cast to x.dtype,
    e.g. Tseng et al.'s 3/4 before stochastic rounding, which keeps the scaled block maximum from
    rounding up past the format's largest value (in one kernel pass for MX stochastic rounding).
    The result carries no autograd history (megaquant.ops gives straight-through gradients).
    Exact semantics: docs/formats.md.
    """
    opts, kernels, kw = _prepare(
        x, fmt, backend, amax, device_seed, prescale, axis=axis, block_size=block_size, scale=scale,
        rounding=rounding, saturate=saturate, preset=preset, tensor_scale=tensor_scale, seed=seed,
        block_2d=block_2d,
    )  # fmt: skip
    if kernels is not None:
        return _kernel_fake_quant(kernels, fmt, kw, x)
    return _reference_fake_quant(opts, amax, device_seed, x, float(prescale))  # _prepare checked it


def _reference_fake_quant(
    opts: Options,
    amax: torch.Tensor | float | None,
    device_seed: torch.Tensor | None,
    x: torch.Tensor,
    prescale: float = 1.0,
) -> torch.Tensor:
    if prescale != 1.0:  # p * x is exact in fp32 for bf16 / fp16 x with p = 3/4; the division rounds once
        with torch.no_grad():
            q = _reference_fake_quant(opts, amax, device_seed, x.float() * prescale)
            # divided by a tensor: torch's CUDA division by a Python number multiplies by its reciprocal,
            # which does not always round as the IEEE division (MXFP8 values in fp32, p = 0.6, on an H200)
            return (q / torch.full((), prescale, dtype=torch.float32, device=q.device)).to(x.dtype)
    with torch.no_grad():
        if opts.fmt.block_scale == "e4m3":
            return fake_quant_nvfp4(x, opts, amax, device_seed)
        if opts.fmt.block_scaled:
            return fake_quant_mx(x, opts, device_seed)
        return fake_quant_hif8(x, opts, amax, device_seed)


def _no_kernel_reason(x: torch.Tensor, fmt: str, kw: dict[str, object]) -> str:
    """Why the reference, not a kernel, serves a quantizer's calls (its `reason`)."""
    if not x.is_cuda:
        return f"not a CUDA tensor ({x.device})"
    return f"the Triton kernels do not cover fmt={fmt!r} with {kw} on {x.dtype}"


def quantizer(
    x: torch.Tensor, fmt: str, **keywords: Any
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str, str | None]:
    """fake_quant(·, fmt, **keywords) resolved once for tensors like `x`: (function, path, reason).

    The function equals fake_quant(y, fmt, **keywords) bit for bit for every non-empty y with x's device
    type, dtype and number of dimensions, without re-resolving the keywords per call (megaquant.ops keeps
    one per option set: it is the short launch path). path is "triton" or "reference"; reason says why the
    kernels do not serve the call (None for "triton"). Keywords as fake_quant's, backend excluded.
    """
    given = {**_KW_DEFAULTS, **keywords}
    amax = given.pop("amax", None)
    device_seed = given.pop("device_seed", None)
    prescale = given.pop("prescale", 1.0)
    opts, kernels, kw = _prepare(x, fmt, "auto", amax, device_seed, prescale, **given)
    if kernels is None:
        reason = _no_kernel_reason(x, fmt, kw)
        fn = functools.partial(_reference_fake_quant, opts, amax, device_seed, prescale=float(prescale))
        return fn, "reference", reason
    bound = getattr(kernels, "fake_quant_fn", None)
    if bound is not None and not {"seed", "block_2d", "amax", "prescale"} & set(kw):
        return bound(opts), "triton", None
    return functools.partial(_kernel_fake_quant, kernels, fmt, kw), "triton", None


def quantizer_amax(
    x: torch.Tensor, fmt: str, **keywords: Any
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str, str | None]:
    """fake_quant(·, fmt, amax=·, **keywords) resolved once for tensors like `x`, with the tensor amax
    given per call (delayed scaling: an amax from a history): (function of (y, amax), path, reason), as
    quantizer's. `amax` is a one-element tensor on y's device; keywords as fake_quant's (HiF8 needs
    tensor_scale=True, NVFP4 takes its amax as is), amax and backend excluded. Bit for bit
    fake_quant(y, fmt, amax=amax, **keywords)."""
    given = {**_KW_DEFAULTS, **keywords}
    device_seed = given.pop("device_seed", None)
    prescale = given.pop("prescale", 1.0)
    probe = torch.zeros((), dtype=torch.float32, device=x.device)  # what the kernels are asked to take
    opts, kernels, kw = _prepare(x, fmt, "auto", probe, device_seed, prescale, **given)
    if kernels is None:
        reason = _no_kernel_reason(x, fmt, kw)

        def reference(y: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
            return _reference_fake_quant(opts, amax, device_seed, y, float(prescale))

        return reference, "reference", reason
    bound = getattr(kernels, "fake_quant_amax_fn", None)
    if bound is not None and opts.tensor_scale and not {"seed", "block_2d", "prescale"} & set(kw):
        return bound(opts), "triton", None

    def kernel(y: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        return _kernel_fake_quant(kernels, fmt, {**kw, "amax": amax}, y)

    return kernel, "triton", None


def finite_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the finite elements of `x` as a 0-d fp32 tensor on x's device (0 when there is none):
    the amax HiF8 tensor scaling computes its scale from, e.g. to record in a delayed-scaling history. One
    Triton pass on CUDA (no host synchronisation), torch elsewhere; the same value either way."""
    if x.is_cuda and x.numel() and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        try:
            from megaquant.formats import _triton
        except ImportError:
            pass
        else:
            return _triton.finite_amax(x)
    with torch.no_grad():
        return hif8_finite_amax(x.detach().to(torch.float32))


def quantizer_both_axes(
    x: torch.Tensor, fmt: str, **keywords: Any
) -> tuple[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], str, str | None] | None:
    """A block-scaled fake_quant along both axes of the 2-D view, resolved once for tensors like `x`:
    (function, path, reason) as quantizer's, or None where no single-read kernel serves it (not an MX
    format: HiF8, NVFP4; MX blocks longer than 64; or a seed, a device seed, 2-D tiles, tensor scaling or
    an amax is given): those callers quantize each use on its own.

    For y with x's kind (contiguous, >= 2 dims) viewed as (rows, n), the function returns
    (fake_quant(y, fmt, axis=-1, ...), fake_quant(y.reshape(rows, n), fmt, axis=0, ...).view(y.shape))
    bit for bit, both contiguous: one read of y. On the reference path (CPU, or options the kernels do
    not cover) it is those two calls. Keywords as fake_quant's; `axis` is ignored."""
    given = {**_KW_DEFAULTS, **keywords, "axis": -1}
    per_call = any(given.get(k) is not None for k in ("seed", "device_seed", "amax", "prescale"))
    if x.dim() < 2 or per_call or given["block_2d"] or given["tensor_scale"]:
        return None
    opts, kernels, kw = _prepare(x, fmt, "auto", None, None, **given)
    if not opts.fmt.block_scaled or opts.fmt.block_scale == "e4m3":
        return None  # HiF8 is elementwise (one copy serves both: megaquant.ops.shared); NVFP4: no kernel
    if kernels is None:
        reason = f"not a CUDA tensor ({x.device})" if not x.is_cuda else f"not covered: {fmt!r} with {kw}"
        return functools.partial(_reference_both_axes, opts), "reference", reason
    make = getattr(kernels, "fake_quant_dual_fn", None)
    dual = make(opts) if make is not None else None
    return (dual, "triton", None) if dual is not None else None


def _reference_both_axes(opts: Options, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    rows = x.reshape(-1, x.shape[-1])
    last = _reference_fake_quant(dataclasses.replace(opts, axis=-1), None, None, x).contiguous()
    by_rows = _reference_fake_quant(dataclasses.replace(opts, axis=0), None, None, rows).contiguous()
    return last, by_rows.view(x.shape)


def _kernel_fake_quant(kernels: ModuleType, fmt: str, kw: dict[str, object], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = kernels.fake_quant(x, fmt, **kw)
        return out


_KW_DEFAULTS: dict[str, object] = dict(
    axis=-1, block_size=None, scale="floor", rounding="even", saturate=True, preset=None,
    tensor_scale=False, seed=None, block_2d=False,
)  # fmt: skip


def encode(
    x: torch.Tensor,
    fmt: str,
    *,
    axis: int = -1,
    block_size: int | None = None,
    scale: str = "floor",
    rounding: str = "even",
    saturate: bool = True,
    preset: str | None = None,
    tensor_scale: bool = False,
    seed: int | None = None,
    block_2d: bool = False,
    amax: torch.Tensor | float | None = None,
    device_seed: torch.Tensor | None = None,
    backend: str = "auto",
) -> Encoded:
    """The real bits of `fake_quant(x, fmt, ...)` with the same keywords: decode(encode(x)) equals it."""
    opts, kernels, kw = _prepare(
        x, fmt, backend, amax, device_seed, axis=axis, block_size=block_size, scale=scale,
        rounding=rounding, saturate=saturate, preset=preset, tensor_scale=tensor_scale, seed=seed,
        block_2d=block_2d,
    )  # fmt: skip
    with torch.no_grad():
        if kernels is not None:
            return kernels.encode(x, fmt, **kw)
        if opts.fmt.block_scale == "e4m3":
            return encode_nvfp4(x, opts, amax, device_seed)
        if opts.fmt.block_scaled:
            return encode_mx(x, opts, device_seed)
        return encode_hif8(x, opts, amax, device_seed)


def decode(enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of `enc` as `dtype` (computed exactly in fp32, then cast; NVFP4 as torchao's dequantize)."""
    spec = element_format(enc.fmt)
    if spec.block_scale == "e4m3":
        return decode_nvfp4(enc, dtype)
    if spec.block_scaled:
        return decode_mx(enc, spec, dtype)
    return decode_hif8(enc, dtype)
