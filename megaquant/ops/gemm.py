"""Quantized GEMMs the hook sites call: operands fake-quantized, one plain GEMM, straight-through backward."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from megaquant.errors import ValueNameError
from megaquant.formats import fake_quant
from megaquant.formats._bits import binade, pow2  # exact power-of-two scale of HiF8 tensor scaling
from megaquant.ops import state
from megaquant.ops.config import _PLAIN, QuantConfig, quant_config

__all__ = ["quant_baddbmm", "quant_bmm", "quant_linear", "quant_matmul"]

_HIF8_SCALE_TARGET = 3
"""Tensor scaling moves the amax into binade 3 (the top of HiF8's 3-mantissa-bit region), as fake_quant's
tensor_scale=True does."""
_HADAMARD_MODULES = ("megaquant.formats.rht", "megaquant.formats.hadamard")


def _quant(
    t: torch.Tensor, fmt: str, axis: int, cfg: QuantConfig, operand: str = "activation"
) -> torch.Tensor:
    """fake_quant `t` along `axis` with the recipe's options for this operand ("activation", "weight" or
    "gradient"): stochastic rounding in backward GEMMs (seed from megaquant.ops.state, optional pre-scale),
    16x16 NVFP4 weight tiles, HiF8 per-tensor scaling (current or delayed). Otherwise, and underneath,
    `_quant_layout`."""
    kw: dict[str, Any] = dict(
        block_size=cfg.block_size, scale=cfg.scale, rounding=cfg.rounding, preset=cfg.preset
    )
    if cfg.grad and (
        cfg.stochastic == "backward" or (cfg.stochastic == "gradients" and operand == "gradient")
    ):
        kw.update(rounding="stochastic", seed=state.draw_seed())
        if cfg.sr_prescale != 1.0:  # quantize p*t (exact in fp32), divide back in fp32
            p = cfg.sr_prescale
            return (_quant_scaled(t.float() * p, fmt, axis, cfg, operand, kw) / p).to(t.dtype)
    return _quant_scaled(t, fmt, axis, cfg, operand, kw)


def _quant_scaled(
    t: torch.Tensor, fmt: str, axis: int, cfg: QuantConfig, operand: str, kw: dict[str, Any]
) -> torch.Tensor:
    if cfg.weight_block_2d and operand == "weight" and t.dim() == 2:
        return fake_quant(t, fmt, axis=axis, **{**kw, "block_2d": True})
    if fmt != "hifp8" or cfg.tensor_scaling == "none":
        return _quant_layout(t, fmt, axis, kw)
    # t * 2^s, HiF8, * 2^-s: both scalings exact in fp32 and bf16 (the same exponent range), so the result
    # equals fake_quant(t, "hifp8", tensor_scale=True) when the amax is the current one (tested)
    key = (cfg.role, cfg.gemm, cfg.grad, operand, axis % max(t.dim(), 1), t.dtype, tuple(t.shape))
    scale = _hif8_scale(t, cfg, key)
    work = t if t.dtype in (torch.float32, torch.bfloat16) else t.float()
    return (_quant_layout(work * scale.to(work.dtype), fmt, axis, kw) * (1.0 / scale).to(work.dtype)).to(
        t.dtype
    )


def _hif8_scale(t: torch.Tensor, cfg: QuantConfig, key: tuple[object, ...]) -> torch.Tensor:
    """2^s (fp32, 0-d, on t's device) moving the amax over finite |t| into binade 3; 1 for an all-zero
    tensor. Delayed scaling takes the amax from the operand slot's history (megaquant.ops.state)."""
    with torch.no_grad():
        a = t.detach().abs()
        amax = (
            torch.where(torch.isfinite(a), a, 0).amax().float()
            if t.numel()
            else a.new_zeros((), dtype=torch.float32)
        )
        if cfg.tensor_scaling == "delayed":
            amax = state.history(key, cfg.amax_history, amax)
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


def _hadamard_pair(a: torch.Tensor, b: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands of a backward GEMM through one random Hadamard transform along the reduction axis (the
    same random signs), when the recipe asks for it; (a H)(H^T b) = a b, so only the quantization changes."""
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
    block, k = cfg.hadamard_block, a.shape[-1]
    if k % block:
        raise ValueNameError(
            f"recipe {cfg.recipe!r}: the reduction length {k} of this {cfg.gemm or 'gradient'} GEMM is not a "
            f"multiple of the Hadamard block {block}"
        )
    rht = _hadamard_module().random_hadamard
    seed = state.draw_seed()
    return rht(a, axis=-1, block=block, seed=seed), rht(b, axis=-2, block=block, seed=seed)


def _quant_layout(t: torch.Tensor, fmt: str, axis: int, kw: dict[str, Any]) -> torch.Tensor:
    """fake_quant `t` along `axis` in one pass over its storage, without a layout copy.

    A strided view (weight.t(), query.transpose(0, 1), key.transpose(0, 1).transpose(1, 2)) is quantized
    in its memory order: permute to the dense base tensor, view that as (rows, n) with the blocks along
    the last axis or (batch, n, inner) with the blocks along axis -2 (the two layouts the kernels take),
    quantize, and return the same view of the result. The blocks cover the same elements as in `t`, so the
    values equal fake_quant(t, fmt, axis=axis); the GEMM then reads the result as the strided operand it
    would have read anyway.
    """
    if t.dim() < 2:
        return fake_quant(t, fmt, axis=axis, **kw)
    ax = axis % t.dim()
    perm = sorted(range(t.dim()), key=lambda d: (-t.stride()[d], d))
    base = t.permute(perm)
    if not base.is_contiguous():  # overlapping or gapped storage: one copy is unavoidable
        base = base.contiguous()
    a = perm.index(ax)
    shape = base.shape
    lead, n, inner = math.prod(shape[:a]), shape[a], math.prod(shape[a + 1 :])
    if inner == 1:
        q = fake_quant(base.reshape(lead, n), fmt, axis=-1, **kw)
    else:
        q = fake_quant(base.reshape(lead, n, inner), fmt, axis=-2, **kw)
    inverse = [perm.index(d) for d in range(t.dim())]
    return q.reshape(shape).permute(inverse)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to `shape`."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


@functools.lru_cache(maxsize=256)
def _backward_config(cfg: QuantConfig, gemm: str) -> QuantConfig:
    return dataclasses.replace(cfg, gemm=gemm, grad=True)


def _mm(
    a: torch.Tensor, b: torch.Tensor, cfg: QuantConfig, gemm: str, operands: tuple[str, str]
) -> torch.Tensor:
    """a @ b for a backward GEMM (`gemm` dgrad or wgrad; `operands` says which of a, b is the gradient):
    plain (straight-through), or with both operands in the gradient format and the recipe's options."""
    if not cfg.quantize_grads or cfg.grad_fmt is None:
        return torch.matmul(a, b)
    bcfg = _backward_config(cfg, gemm)
    a, b = _hadamard_pair(a, b, bcfg)
    return torch.matmul(
        _quant(a, cfg.grad_fmt, -1, bcfg, operands[0]), _quant(b, cfg.grad_fmt, -2, bcfg, operands[1])
    )


def _operands(cfg: QuantConfig) -> tuple[str, str]:
    """What the two operands of a quant_matmul/bmm call are: a gradient GEMM's first operand is the
    incoming gradient; the second is the weight in fprop and dgrad (the hooks say gemm=...)."""
    second = "weight" if cfg.gemm in ("fprop", "dgrad") else "activation"
    return ("gradient" if cfg.grad else "activation", second)


class _QuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
        assert cfg.fmt is not None
        ctx.save_for_backward(a, b)  # the unquantized inputs: the same memory a plain matmul keeps
        ctx.cfg = cfg
        kinds = _operands(cfg)
        qa, qb = _hadamard_pair(a, b, cfg)
        return torch.matmul(_quant(qa, cfg.fmt, -1, cfg, kinds[0]), _quant(qb, cfg.fmt, -2, cfg, kinds[1]))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        a, b = ctx.saved_tensors
        cfg: QuantConfig = ctx.cfg
        grad_a = grad_b = None
        kinds = _operands(cfg)
        if ctx.needs_input_grad[0]:
            grad_a = _sum_to(_mm(g, b.mT, cfg, "dgrad", ("gradient", kinds[1])), a.shape)
        if ctx.needs_input_grad[1]:
            if b.dim() == 2:  # fold the batch into the reduction: one GEMM, like torch.matmul's backward
                a2, g2 = a.reshape(-1, a.shape[-1]).mT, g.reshape(-1, g.shape[-1])
                grad_b = _mm(a2, g2, cfg, "wgrad", (kinds[0], "gradient"))
            else:
                grad_b = _sum_to(_mm(a.mT, g, cfg, "wgrad", (kinds[0], "gradient")), b.shape)
        return grad_a, grad_b, None


class _QuantBaddbmm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        inp: torch.Tensor,
        b1: torch.Tensor,
        b2: torch.Tensor,
        beta: float,
        alpha: float,
        cfg: QuantConfig,
    ) -> torch.Tensor:
        assert cfg.fmt is not None
        ctx.save_for_backward(b1, b2)
        ctx.cfg, ctx.beta, ctx.alpha, ctx.inp_shape = cfg, beta, alpha, inp.shape
        q1, q2 = _quant(b1, cfg.fmt, -1, cfg), _quant(b2, cfg.fmt, -2, cfg)  # attention: activations
        return torch.baddbmm(inp, q1, q2, beta=beta, alpha=alpha)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        b1, b2 = ctx.saved_tensors
        cfg: QuantConfig = ctx.cfg
        grads: list[torch.Tensor | None] = [None, None, None]
        if ctx.needs_input_grad[0]:
            grads[0] = _sum_to(g if ctx.beta == 1 else g * ctx.beta, ctx.inp_shape)
        if ctx.needs_input_grad[1]:
            grads[1] = _mm(g, b2.mT, cfg, "dgrad", ("gradient", "activation"))
            grads[1] = grads[1] if ctx.alpha == 1 else grads[1] * ctx.alpha
        if ctx.needs_input_grad[2]:
            grads[2] = _mm(b1.mT, g, cfg, "wgrad", ("activation", "gradient"))
            grads[2] = grads[2] if ctx.alpha == 1 else grads[2] * ctx.alpha
        return (*grads, None, None, None)


class _QuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: QuantConfig
    ) -> torch.Tensor:
        assert cfg.fmt is not None
        ctx.save_for_backward(x, weight)
        ctx.cfg, ctx.has_bias = cfg, bias is not None
        return F.linear(_quant(x, cfg.fmt, -1, cfg), _quant(weight, cfg.fmt, -1, cfg, "weight"), bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        cfg: QuantConfig = ctx.cfg
        grad_x = grad_w = grad_bias = None
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = _mm(g, weight, cfg, "dgrad", ("gradient", "weight"))
        if ctx.needs_input_grad[1]:
            grad_w = _mm(g2.mT, x.reshape(-1, x.shape[-1]), cfg, "wgrad", ("gradient", "activation"))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        return grad_x, grad_w, grad_bias, None


def quant_matmul(a: torch.Tensor, b: torch.Tensor, value: str, **kw: Any) -> torch.Tensor:
    """a @ b with a quantized along its last axis and b along its second-to-last (the reduction axis).

    Keywords: recipe, grad, gemm, preset, role, quantize_grads, block_size, scale, rounding, tensor_scale
    (see quant_config). The GEMM runs in the operands' dtype on the dequantized values (bf16 in training,
    fp32 accumulation on GPUs). Backward is straight-through: plain matmuls on the unquantized inputs,
    or quantized gradient GEMMs when quantize_grads=True. value "none"/"bf16" is exactly torch.matmul.
    1-D operands follow torch.matmul (promoted to a matrix and the extra dim removed).
    """
    if value in _PLAIN:
        return torch.matmul(a, b)
    cfg = quant_config(value, **kw)
    if a.dim() == 1:
        return quant_matmul(a.unsqueeze(0), b, value, **kw).squeeze(-2)
    if b.dim() == 1:
        return quant_matmul(a, b.unsqueeze(-1), value, **kw).squeeze(-1)
    out: torch.Tensor = _QuantMatmul.apply(a, b, cfg)
    return out


def _check_3d(name: str, **tensors: torch.Tensor) -> None:
    for arg, t in tensors.items():
        if t.dim() != 3:
            shape = tuple(t.shape)
            raise ValueNameError(f"{name}: {arg} must be a 3-D tensor (batch, rows, cols), got {shape}")


def quant_bmm(a: torch.Tensor, b: torch.Tensor, value: str, **kw: Any) -> torch.Tensor:
    """Batched a @ b for 3-D tensors (torch.bmm), quantized like quant_matmul."""
    if value in _PLAIN:
        return torch.bmm(a, b)
    cfg = quant_config(value, **kw)
    _check_3d("quant_bmm", a=a, b=b)
    out: torch.Tensor = _QuantMatmul.apply(a, b, cfg)
    return out


def quant_baddbmm(
    input: torch.Tensor,
    batch1: torch.Tensor,
    batch2: torch.Tensor,
    value: str,
    *,
    beta: float = 1.0,
    alpha: float = 1.0,
    **kw: Any,
) -> torch.Tensor:
    """beta * input + alpha * (batch1 @ batch2) (torch.baddbmm) with batch1/batch2 quantized along the
    reduction axis; `input` is not quantized. Gradients follow torch.baddbmm's formulas (straight-through)."""
    if value in _PLAIN:
        return torch.baddbmm(input, batch1, batch2, beta=beta, alpha=alpha)
    cfg = quant_config(value, **kw)
    _check_3d("quant_baddbmm", batch1=batch1, batch2=batch2)
    out: torch.Tensor = _QuantBaddbmm.apply(input, batch1, batch2, beta, alpha, cfg)
    return out


def quant_linear(
    x: torch.Tensor, weight: torch.Tensor, value: str, *, bias: torch.Tensor | None = None, **kw: Any
) -> torch.Tensor:
    """x @ weight.T (+ bias), the Megatron linear forward: x and weight both quantized along the input
    features (their last axis); bias is added unquantized. value "none" is exactly F.linear."""
    if value in _PLAIN:
        return F.linear(x, weight, bias)
    cfg = quant_config(value, **kw)
    out: torch.Tensor = _QuantLinear.apply(x, weight, bias, cfg)
    return out
