"""How one GEMM operand is quantized: the recipe's options over one layout-preserving fake-quant.

`quantize` / `quantize_op`: stochastic rounding in backward GEMMs, 2-D NVFP4 weight tiles, HiF8 tensor
scaling (current or delayed), the shared gradient copies of a linear layer's backward
(`gradient_both_axes`, megaquant.ops.shared); underneath, `_quant_path`: the short launch path, the
per-step weight cache, the path counters. `hadamard_pair`: a backward GEMM's random Hadamard transform.
megaquant.ops.gemm pairs the operands into GEMMs; megaquant.ops.attention quantizes its own."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from megaquant.errors import ValueNameError
from megaquant.formats import fake_quant, finite_amax, quantizer, quantizer_amax, quantizer_both_axes
from megaquant.formats._bits import binade, pow2  # exact power-of-two scale of HiF8 tensor scaling
from megaquant.ops import counters, shared, state, weights
from megaquant.ops.config import QuantConfig

__all__ = ["gradient_both_axes", "hadamard_pair", "quantize", "quantize_op", "quantized"]

_HIF8_SCALE_TARGET = 3
"""Tensor scaling moves the amax into binade 3 (the top of HiF8's 3-mantissa-bit region), as fake_quant's
tensor_scale=True does."""
_HADAMARD_MODULES = ("megaquant.formats.rht", "megaquant.formats.hadamard")


def quantize(
    t: torch.Tensor, fmt: str, axis: int, cfg: QuantConfig, operand: str = "activation", role: str = ""
) -> torch.Tensor:
    """fake_quant `t` along `axis` with the recipe's options for this operand (see `quantize_op`)."""
    return quantize_op(t, fmt, axis, cfg, operand, role)[0]


def quantized(t: torch.Tensor, cfg: QuantConfig, axis: int, role: str) -> torch.Tensor:
    """`t` in cfg's format along `axis` (an attention operand), or `t` itself when cfg quantizes nothing."""
    return t if cfg.fmt is None else quantize(t, cfg.fmt, axis, cfg, role=role)


def quantize_op(
    t: torch.Tensor, fmt: str, axis: int, cfg: QuantConfig, operand: str, role: str
) -> tuple[torch.Tensor, str]:
    """fake_quant `t` along `axis` with the recipe's options for this operand ("activation", "weight" or
    "gradient"), and the path that served it: stochastic rounding in backward GEMMs (a per-draw seed and the
    step's device word from megaquant.ops.state: the same host arguments every step; optional pre-scale),
    16x16 NVFP4 weight tiles, HiF8 per-tensor scaling (current: fake_quant's tensor_scale, on the Triton
    kernels; delayed: from the amax history). Underneath, `_quant_path`."""
    extra: dict[str, Any] = {}
    if cfg.grad and (
        cfg.stochastic == "backward" or (cfg.stochastic == "gradients" and operand == "gradient")
    ):
        extra = {
            "rounding": "stochastic",
            "seed": state.draw_seed(),
            "device_seed": state.step_word(t.device),
        }
        if cfg.sr_prescale != 1.0:  # fake_quant quantizes p*t and divides back (MX on CUDA: in the kernel)
            extra["prescale"] = cfg.sr_prescale
    return _quant_scaled(t, fmt, axis, cfg, operand, role, extra)


def _quant_scaled(
    t: torch.Tensor, fmt: str, axis: int, cfg: QuantConfig, operand: str, role: str, extra: dict[str, Any]
) -> tuple[torch.Tensor, str]:
    if cfg.weight_block_2d and operand == "weight" and t.dim() == 2:
        # 16x16 tiles over the matrix as it is (the same tiles for W and W.T); a parameter's copy comes from
        # the weight cache like any other (one entry per layout: the GEMM reads exactly what it would)
        tiles = {**extra, "block_2d": True}
        cacheable = weights.enabled() and "seed" not in tiles
        key: tuple[object, ...] = ("tiles2d", fmt, axis, cfg, *sorted(tiles.items())) if cacheable else ()
        cached = weights.lookup(t, key) if cacheable else None
        if cached is not None:
            counters.count_operand(role, "cache")
            return cached
        q, path = _fake_quant(t, fmt, axis, cfg, role, tiles)
        if cacheable:
            weights.store(t, key, q, path)
        return q, path
    if fmt != "hifp8":
        if operand == "gradient" and _shares_blocks(cfg) and _rows_blocked(t, axis):  # (no SR: no extra)
            hit = shared.take(t, _rows_key(fmt, cfg))  # wgrad's dy2.t(): dgrad's read made this copy
            if hit is not None:
                counters.count_operand(role, "shared")
                return hit
        return _quant_path(t, fmt, axis, cfg, role, extra)
    if cfg.tensor_scaling in ("none", "current"):  # current: amax + scale on the device (Triton)
        extra = {**extra, "tensor_scale": True} if cfg.tensor_scaling == "current" else extra
        if (
            operand == "gradient"
            and "seed" not in extra
            and cfg.rounding != "stochastic"
            and shared.enabled()
        ):
            return _shared_gradient(t, fmt, axis, cfg, role, extra)
        return _quant_path(t, fmt, axis, cfg, role, extra)
    # delayed: the scale from the operand slot's amax history (megaquant.ops.state), which records t's amax
    key = (cfg.role, cfg.gemm, cfg.grad, operand, axis % max(t.dim(), 1), t.dtype, tuple(t.shape))
    with torch.no_grad():
        amax = state.history(key, cfg.amax_history, finite_amax(t))
    if "seed" not in extra and t.numel():
        # one amax pass and one quantize pass reading the history's amax on the device, as current
        # scaling's two: fake_quant(t, "hifp8", tensor_scale=True, amax=<the history's>)
        return _quant_given_amax(t, fmt, cfg, role, amax)
    # stochastic rounding (no tensor-scaled kernel draws): t * 2^s, HiF8, * 2^-s, both scalings exact in
    # fp32 and bf16 (the same exponent range): the formula tests/test_triton.py holds the path above to
    scale = _hif8_scale(amax)
    work = t if t.dtype in (torch.float32, torch.bfloat16) else t.float()
    q, path = _quant_path(work * scale.to(work.dtype), fmt, axis, cfg, role, extra)
    return (q * (1.0 / scale).to(work.dtype)).to(t.dtype), path


_AMAX_QUANTIZERS: dict[tuple[object, ...], tuple[QuantConfig, Any]] = {}


def _quant_given_amax(
    t: torch.Tensor, fmt: str, cfg: QuantConfig, role: str, amax: torch.Tensor
) -> tuple[torch.Tensor, str]:
    """fake_quant(t, fmt, tensor_scale=True, amax=amax) through formats.quantizer_amax, resolved once per
    option set and kind of tensor (the amax changes every call, so it is an argument, not a key)."""
    key = (fmt, id(cfg), t.dim(), t.dtype, t.is_cuda)
    found = _AMAX_QUANTIZERS.get(key)
    if found is None or found[0] is not cfg:
        made = quantizer_amax(t, fmt, **_fq_keywords(cfg), tensor_scale=True)
        found = _remember(_AMAX_QUANTIZERS, key, cfg, made, 1024)
    fn, path, reason = found[1]
    _count(role, path, reason, t, fmt)
    return fn(t, amax), path


def _shared_gradient(
    t: torch.Tensor, fmt: str, axis: int, cfg: QuantConfig, role: str, extra: dict[str, Any]
) -> tuple[torch.Tensor, str]:
    """A HiF8 gradient operand through megaquant.ops.shared: wgrad's dy.t() takes dgrad's q(dy) (elementwise,
    one amax over the same elements: the same bits), anything else is quantized and offered."""
    key = (fmt, cfg.block_size, cfg.scale, cfg.rounding, cfg.preset, *sorted(extra.items()))
    hit = shared.take(t, key)
    if hit is not None:
        counters.count_operand(role, "shared")
        return hit
    q, path = _quant_path(t, fmt, axis, cfg, role, extra)
    shared.offer(t, key, q, path)
    return q, path


def _shares_blocks(cfg: QuantConfig) -> bool:
    """Whether a block-scaled gradient's two blockings can come from one read (megaquant.ops.shared):
    round-to-nearest gradients without a Hadamard transform (else each GEMM's operand differs)."""
    plain = cfg.stochastic == "none" and cfg.rounding != "stochastic" and cfg.hadamard == "none"
    return plain and shared.enabled()


def _rows_key(fmt: str, cfg: QuantConfig) -> tuple[object, ...]:
    return ("rows", fmt, cfg.block_size, cfg.scale, cfg.rounding, cfg.preset)


def _rows_blocked(t: torch.Tensor, axis: int) -> bool:
    """`t` is a dense matrix blocked along the leading axis of its memory (the tokens of a gradient's 2-D
    view): wgrad's dy2.t() along its last axis, or dy2 along its first."""
    if t.dim() != 2:
        return False
    if t.is_contiguous():
        return axis % 2 == 0
    return axis % 2 == 1 and t.t().is_contiguous()


_BOTH: dict[tuple[object, ...], tuple[QuantConfig, Any]] = {}


def gradient_both_axes(
    dy: torch.Tensor, fmt: str, cfg: QuantConfig, role: str
) -> tuple[torch.Tensor, str] | None:
    """dgrad's incoming gradient dy (contiguous, blocked along its features) quantized together with its
    token-axis blocking, which is offered to the wgrad GEMM that follows (one read of dy instead of two:
    formats.quantizer_both_axes); None where no single-read path serves it (the caller quantizes as usual).
    The same bits as quantizing each use on its own (tests/test_shared_grads.py)."""
    if dy.dim() < 2 or not dy.is_contiguous() or not dy.numel() or not _shares_blocks(cfg):
        return None
    key = (fmt, id(cfg), dy.dim(), dy.dtype, dy.is_cuda)
    found = _BOTH.get(key)
    if found is None or found[0] is not cfg:
        found = _remember(_BOTH, key, cfg, quantizer_both_axes(dy, fmt, **_fq_keywords(cfg)), 1024)
    if found[1] is None:
        return None
    fn, path, reason = found[1]
    _count(role, path, reason, dy, fmt)
    last, by_rows = fn(dy)
    shared.offer(dy, _rows_key(fmt, cfg), by_rows, path)
    return last, path


def _hif8_scale(amax: torch.Tensor) -> torch.Tensor:
    """2^s (fp32, 0-d, on amax's device) moving `amax` (>= 0, finite) into binade 3; 1 for amax 0."""
    with torch.no_grad():
        s = (_HIF8_SCALE_TARGET - binade(amax)).clamp(-127, 127)
        return pow2(torch.where(amax > 0, s, 0))


def _hadamard_module() -> ModuleType:
    for name in _HADAMARD_MODULES:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
    raise ValueNameError(
        "this recipe applies random Hadamard transforms, but megaquant.formats has no random_hadamard "
        f"(looked for {', '.join(_HADAMARD_MODULES)}); choose a recipe without RHT or update megaquant"
    )


def hadamard_pair(a: torch.Tensor, b: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands of a backward GEMM through one random Hadamard transform along the reduction axis (the
    same random signs), when the recipe asks for it; (a H)(H^T b) = a b, so only the quantization changes.
    A reduction length that is not a multiple of the Hadamard block (an MoE expert's wgrad over its routed
    tokens) is zero-padded to one first, in both operands: the padded products are zero."""
    if not cfg.grad or cfg.hadamard == "none":
        return a, b
    if cfg.hadamard == "wgrad" and cfg.gemm != "wgrad":
        if cfg.gemm is None:
            raise ValueNameError(
                f"recipe {cfg.recipe!r} transforms wgrad GEMMs only, and this gradient GEMM (grad=True) does "
                "not say which it is; the hook must pass gemm='dgrad' or gemm='wgrad' (re-run "
                "`megaquant instrument` on the tree)"
            )
        return a, b
    block = cfg.hadamard_block
    pad = -a.shape[-1] % block
    if pad:  # e.g. an MoE expert's wgrad, reduced over its routed tokens: zeros add nothing to the product
        a, b = torch.nn.functional.pad(a, (0, pad)), torch.nn.functional.pad(b, (0, 0, 0, pad))
    rht = _hadamard_module().random_hadamard
    if cfg.hadamard_signs == "fixed":
        seed = state.fixed_seed()
        return rht(a, axis=-1, block=block, seed=seed), rht(b, axis=-2, block=block, seed=seed)
    # per GEMM and step: a per-draw seed (the same every step) mixed with the step word on the device
    seed, word = state.draw_seed(), state.step_word(a.device)
    return (
        rht(a, axis=-1, block=block, seed=seed, device_seed=word),
        rht(b, axis=-2, block=block, seed=seed, device_seed=word),
    )


_Quantizer = tuple[Callable[[torch.Tensor], torch.Tensor], str, "str | None"]
_QUANTIZERS: dict[tuple[object, ...], tuple[QuantConfig, tuple[_Quantizer, bool]]] = {}


def _quantizer(
    x: torch.Tensor, fmt: str, axis: int, cfg: QuantConfig, extra: dict[str, Any]
) -> tuple[_Quantizer, bool]:
    """formats.quantizer for this option set and kind of tensor, resolved once (the short launch path),
    and whether its function keeps the layout (quantizes a contiguous tensor or a transposed contiguous
    matrix as it is, result in the same layout: formats._triton.fake_quant_fn).
    Keyed by the config object's identity (quant_config caches them; the entry keeps it alive, so the id
    is not reused while it is in the table) to skip hashing a dataclass per call. A stochastic-rounding
    draw's seed and step word (megaquant.ops.state) repeat every step, so those are kept too, one per draw
    (the step word by identity: the entry keeps it alive)."""
    items = sorted((k, id(v) if k == "device_seed" else v) for k, v in extra.items()) if extra else ()
    key = (fmt, id(cfg), axis, x.dim(), x.dtype, x.is_cuda, *items)
    found = _QUANTIZERS.get(key)
    if found is None or found[0] is not cfg:  # the hit path stays two lookups: it runs per operand
        q = quantizer(x, fmt, axis=axis, **{**_fq_keywords(cfg), **extra})
        found = _remember(_QUANTIZERS, key, cfg, (q, bool(getattr(q[0], "keeps_layout", False))), 4096)
    return found[1]


def _remember(
    table: dict[tuple[object, ...], Any], key: tuple[object, ...], cfg: QuantConfig, value: Any, bound: int
) -> Any:
    """Store (cfg, value) under a key holding id(cfg): the entry keeps its config alive, so the id is not
    reused while it is in the table (a lookup also checks `entry[0] is cfg`); the table starts over past
    `bound` entries (configs built per call elsewhere)."""
    if len(table) > bound:
        table.clear()
    entry = table[key] = (cfg, value)
    return entry


def _count(role: str, path: str, reason: str | None, x: torch.Tensor, fmt: str) -> None:
    """Count an operand's path; log a CUDA fallback to the reference once per shape."""
    counters.count_operand(role, path)
    if reason is not None and x.is_cuda:
        counters.note_fallback(role, tuple(x.shape), x.dtype, fmt, reason)


def _fq_keywords(cfg: QuantConfig) -> dict[str, Any]:
    """fake_quant's keywords from the config; tensor scaling and rounding overrides come as `extra`."""
    return dict(block_size=cfg.block_size, scale=cfg.scale, rounding=cfg.rounding, preset=cfg.preset)


def _fake_quant(
    x: torch.Tensor, fmt: str, axis: int, cfg: QuantConfig, role: str, extra: dict[str, Any]
) -> tuple[torch.Tensor, str]:
    """fake_quant(x, fmt, axis=axis, ...cfg, ...extra) and the path that served it; counts the operand, and
    logs a CUDA fallback to the reference once per shape."""
    if x.numel() == 0:  # nothing to quantize (an MoE expert that got no tokens): no kernel, no fallback
        counters.count_operand(role, "empty")
        return fake_quant(x, fmt, axis=axis, **{**_fq_keywords(cfg), **extra}), "empty"
    (fn, path, reason), _ = _quantizer(x, fmt, axis, cfg, extra)
    _count(role, path, reason, x, fmt)
    return fn(x), path


def _quant_path(
    t: torch.Tensor, fmt: str, axis: int, cfg: QuantConfig, role: str, extra: dict[str, Any]
) -> tuple[torch.Tensor, str]:
    """fake_quant `t` along `axis` in one pass over its storage, without a layout copy; and its path.
    A strided view (weight.t(), query.transpose(0, 1), key.transpose(0, 1).transpose(1, 2)) is quantized
    in its memory order: permute to the dense base tensor, view that as (rows, n) with the blocks along
    the last axis or (batch, n, inner) with the blocks along axis -2 (the two layouts the kernels take),
    quantize, and return the same view of the result. The blocks cover the same elements as in `t`, so the
    values equal fake_quant(t, fmt, axis=axis); the GEMM then reads the result as the strided operand it
    would have read anyway. A parameter may come from the weight cache (megaquant.ops.weights).
    """
    cacheable = weights.enabled() and "seed" not in extra  # a stochastic rounding is drawn anew every call
    op_key: tuple[object, ...] = ()
    flip = False  # cache t's transpose: an elementwise format's copy of W serves W.t() as its transpose
    if cacheable:
        if fmt == "hifp8" and cfg.rounding != "stochastic" and t.dim() == 2:
            # elementwise (tensor scaling included: one amax over the same elements), so q(W.t()) is
            # q(W).t() bit for bit, whatever the axis or block options: the forward's W.t() and dgrad's W
            # share one entry (half the cache's memory for HiF8)
            op_key = ("elementwise", fmt, cfg.rounding, cfg.preset, *sorted(extra.items()))
            flip = not t.is_contiguous() and t.t().is_contiguous()
        else:
            op_key = (fmt, axis, cfg, *sorted(extra.items()))
        cached = weights.lookup(t.t() if flip else t, op_key)
        if cached is not None:
            counters.count_operand(role, "cache")
            return (cached[0].t(), cached[1]) if flip else cached
    if t.dim() >= 2 and t.numel():
        (fn, path, reason), keeps = _quantizer(t, fmt, axis, cfg, extra)
        if keeps and (t.is_contiguous() or (t.dim() == 2 and t.stride() == (1, t.shape[0]))):
            # the kernels take this layout as it is: no views, the result in t's layout
            counters.count_operand(role, path)
            q = fn(t)
            if cacheable:
                weights.store(t.t() if flip else t, op_key, q.t() if flip else q, path)
            return q, path
    if t.dim() < 2:
        q, path = _fake_quant(t, fmt, axis, cfg, role, extra)
    elif t.dim() == 2 and t.is_contiguous():  # the linear layers' operands: the general case, shortened
        if axis % 2:
            q, path = _fake_quant(t, fmt, -1, cfg, role, extra)
        else:
            rows, cols = t.shape
            q, path = _fake_quant(t.view(1, rows, cols), fmt, -2, cfg, role, extra)
            q = q.view(rows, cols)
    elif t.dim() == 2 and t.t().is_contiguous():  # weight.t(), grad_output.t()
        tt = t.t()
        if axis % 2:
            rows, cols = tt.shape
            q, path = _fake_quant(tt.view(1, rows, cols), fmt, -2, cfg, role, extra)
            q = q.view(rows, cols).t()
        else:
            q, path = _fake_quant(tt, fmt, -1, cfg, role, extra)
            q = q.t()
    else:
        ax = axis % t.dim()
        perm = sorted(range(t.dim()), key=lambda d: (-t.stride()[d], d))
        base = t.permute(perm)
        if not base.is_contiguous():  # overlapping or gapped storage: one copy is unavoidable
            base = base.contiguous()
        a = perm.index(ax)
        shape = base.shape
        lead, n, inner = math.prod(shape[:a]), shape[a], math.prod(shape[a + 1 :])
        if inner == 1:
            q, path = _fake_quant(base.reshape(lead, n), fmt, -1, cfg, role, extra)
        else:
            q, path = _fake_quant(base.reshape(lead, n, inner), fmt, -2, cfg, role, extra)
        inverse = [perm.index(d) for d in range(t.dim())]
        q = q.reshape(shape).permute(inverse)
    if cacheable:
        weights.store(t.t() if flip else t, op_key, q.t() if flip else q, path)
    return q, path
