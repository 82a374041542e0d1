"""Quantized GEMMs the hook sites call: operands fake-quantized, one plain GEMM, straight-through backward.

Each operand goes through megaquant.ops.operands (the recipe's options over one layout-preserving
fake-quant); this module pairs them into the GEMMs, counts each GEMM's path and defines the autograd
functions of megaquant's own backward."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F

from megaquant.errors import ValueNameError
from megaquant.ops import counters
from megaquant.ops.config import _DEFAULTS, _PLAIN, QuantConfig, quant_config
from megaquant.ops.operands import gradient_both_axes, hadamard_pair, quantize_op
from megaquant.ops.state import PLAIN_SCOPE as _BF16  # recipe BF16 layers (megaquant.ops.layers): run plain

__all__ = ["quant_baddbmm", "quant_bmm", "quant_linear", "quant_matmul"]


def _gemm_path(*paths: str) -> str:
    """A GEMM's path: "reference" if an operand ran the torch reference, "empty" if it had no elements
    (an MoE expert without tokens), else "triton" (kernels or the weight cache)."""
    if "reference" in paths:
        return "reference"
    return "empty" if "empty" in paths else "triton"


_GEMM_ROLES = {"fprop": "linear_fwd", "dgrad": "linear_dgrad", "wgrad": "linear_wgrad"}


def _role(op: str, kw: dict[str, Any]) -> str:
    """The counters' key: the role keyword (or configure()'s); else the linear role the hook's `gemm`
    names (fprop, dgrad, wgrad); else the op's name (`.grad` when grad)."""
    role = kw.get("role") or _DEFAULTS.get("role")
    if role:
        return str(role)
    if kw.get("gemm") in _GEMM_ROLES:
        return _GEMM_ROLES[kw["gemm"]]
    return f"{op}.grad" if kw.get("grad", _DEFAULTS.get("grad")) else op


def _needs_graph(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will record this op (else the autograd.Function is skipped: same result)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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


def _operands(cfg: QuantConfig) -> tuple[str, str]:
    """What the two operands of a quant_matmul/bmm call are: a gradient GEMM's first operand is the
    incoming gradient; the second is the weight in fprop and dgrad (the hooks say gemm=...)."""
    second = "weight" if cfg.gemm in ("fprop", "dgrad") else "activation"
    return ("gradient" if cfg.grad else "activation", second)


def _quant_pair(
    a: torch.Tensor,
    b: torch.Tensor,
    fmt: str,
    axis_b: int,
    cfg: QuantConfig,
    role: str,
    operands: tuple[str, str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands of one GEMM quantized (a along its last axis, b along `axis_b`) after the recipe's
    Hadamard transform, if any; counts the GEMM."""
    a, b = hadamard_pair(a, b, cfg)
    both = None
    if operands == ("gradient", "weight") and cfg.gemm == "dgrad" and b.dim() == 2 and fmt != "hifp8":
        both = gradient_both_axes(a, fmt, cfg, role)  # a linear layer's dgrad: wgrad blocks dy next
    qa, pa = both if both is not None else quantize_op(a, fmt, -1, cfg, operands[0], role)
    qb, pb = quantize_op(b, fmt, axis_b, cfg, operands[1], role)
    counters.count_gemm(role, _gemm_path(pa, pb))
    return qa, qb


def _mm(
    a: torch.Tensor,
    b: torch.Tensor,
    cfg: QuantConfig,
    gemm: str,
    operands: tuple[str, str],
    role: str = "",
) -> torch.Tensor:
    """a @ b for a backward GEMM (`gemm` dgrad or wgrad; `operands` says which of a, b is the gradient):
    plain (straight-through), or with both operands in the gradient format and the recipe's options."""
    if not cfg.quantize_grads or cfg.grad_fmt is None:
        return torch.matmul(a, b)
    bcfg = _backward_config(cfg, gemm)
    return torch.matmul(*_quant_pair(a, b, cfg.grad_fmt, -2, bcfg, role, operands))


def _fwd_matmul(a: torch.Tensor, b: torch.Tensor, cfg: QuantConfig, role: str) -> torch.Tensor:
    assert cfg.fmt is not None
    return torch.matmul(*_quant_pair(a, b, cfg.fmt, -2, cfg, role, _operands(cfg)))


def _fwd_baddbmm(
    inp: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    beta: float,
    alpha: float,
    cfg: QuantConfig,
    role: str,
) -> torch.Tensor:
    assert cfg.fmt is not None
    q1, q2 = _quant_pair(b1, b2, cfg.fmt, -2, cfg, role, ("activation", "activation"))  # attention
    return torch.baddbmm(inp, q1, q2, beta=beta, alpha=alpha)


def _fwd_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: QuantConfig, role: str
) -> torch.Tensor:
    assert cfg.fmt is not None
    qx, qw = _quant_pair(x, weight, cfg.fmt, -1, cfg, role, ("activation", "weight"))
    return F.linear(qx, qw, bias)


class _QuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, cfg: QuantConfig, role: str) -> torch.Tensor:
        ctx.save_for_backward(a, b)  # the unquantized inputs: the same memory a plain matmul keeps
        ctx.cfg, ctx.role = cfg, role
        return _fwd_matmul(a, b, cfg, role)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        a, b = ctx.saved_tensors
        cfg: QuantConfig = ctx.cfg
        grad_a = grad_b = None
        kinds = _operands(cfg)
        if ctx.needs_input_grad[0]:
            grad_a = _sum_to(_mm(g, b.mT, cfg, "dgrad", ("gradient", kinds[1]), ctx.role), a.shape)
        if ctx.needs_input_grad[1]:
            if b.dim() == 2:  # fold the batch into the reduction: one GEMM, like torch.matmul's backward
                a2, g2 = a.reshape(-1, a.shape[-1]).mT, g.reshape(-1, g.shape[-1])
                grad_b = _mm(a2, g2, cfg, "wgrad", (kinds[0], "gradient"), ctx.role)
            else:
                grad_b = _sum_to(_mm(a.mT, g, cfg, "wgrad", (kinds[0], "gradient"), ctx.role), b.shape)
        return grad_a, grad_b, None, None


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
        role: str,
    ) -> torch.Tensor:
        ctx.save_for_backward(b1, b2)
        ctx.cfg, ctx.beta, ctx.alpha, ctx.inp_shape, ctx.role = cfg, beta, alpha, inp.shape, role
        return _fwd_baddbmm(inp, b1, b2, beta, alpha, cfg, role)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        b1, b2 = ctx.saved_tensors
        cfg: QuantConfig = ctx.cfg
        grads: list[torch.Tensor | None] = [None, None, None]
        if ctx.needs_input_grad[0]:
            grads[0] = _sum_to(g if ctx.beta == 1 else g * ctx.beta, ctx.inp_shape)
        if ctx.needs_input_grad[1]:
            grads[1] = _mm(g, b2.mT, cfg, "dgrad", ("gradient", "activation"), ctx.role)
            grads[1] = grads[1] if ctx.alpha == 1 else grads[1] * ctx.alpha
        if ctx.needs_input_grad[2]:
            grads[2] = _mm(b1.mT, g, cfg, "wgrad", ("activation", "gradient"), ctx.role)
            grads[2] = grads[2] if ctx.alpha == 1 else grads[2] * ctx.alpha
        return (*grads, None, None, None, None)


class _QuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        cfg: QuantConfig,
        role: str,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.cfg, ctx.has_bias, ctx.role = cfg, bias is not None, role
        return _fwd_linear(x, weight, bias, cfg, role)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        cfg: QuantConfig = ctx.cfg
        grad_x = grad_w = grad_bias = None
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = _mm(g, weight, cfg, "dgrad", ("gradient", "weight"), ctx.role)
        if ctx.needs_input_grad[1]:
            grad_w = _mm(
                g2.mT, x.reshape(-1, x.shape[-1]), cfg, "wgrad", ("gradient", "activation"), ctx.role
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        return grad_x, grad_w, grad_bias, None, None


def quant_matmul(a: torch.Tensor, b: torch.Tensor, value: str, **kw: Any) -> torch.Tensor:
    """a @ b with a quantized along its last axis and b along its second-to-last (the reduction axis).

    Keywords: recipe, grad, gemm, preset, role, quantize_grads, block_size, scale, rounding, tensor_scale
    (see quant_config). The GEMM runs in the operands' dtype on the dequantized values (bf16 in training,
    fp32 accumulation on GPUs). Backward is straight-through: plain matmuls on the unquantized inputs,
    or quantized gradient GEMMs when quantize_grads=True. value "none"/"bf16" is exactly torch.matmul.
    1-D operands follow torch.matmul (promoted to a matrix and the extra dim removed).
    """
    role = _role("matmul", kw)
    if value in _PLAIN or _BF16[0]:
        counters.count_gemm(role, "plain")
        return torch.matmul(a, b)
    cfg = quant_config(value, **kw)
    if a.dim() == 1:
        return quant_matmul(a.unsqueeze(0), b, value, **kw).squeeze(-2)
    if b.dim() == 1:
        return quant_matmul(a, b.unsqueeze(-1), value, **kw).squeeze(-1)
    if not _needs_graph(a, b):  # e.g. inside Megatron's linear autograd functions: same result, no node
        return _fwd_matmul(a, b, cfg, role)
    out: torch.Tensor = _QuantMatmul.apply(a, b, cfg, role)
    return out


def _check_3d(name: str, **tensors: torch.Tensor) -> None:
    for arg, t in tensors.items():
        if t.dim() != 3:
            shape = tuple(t.shape)
            raise ValueNameError(f"{name}: {arg} must be a 3-D tensor (batch, rows, cols), got {shape}")


def quant_bmm(a: torch.Tensor, b: torch.Tensor, value: str, **kw: Any) -> torch.Tensor:
    """Batched a @ b for 3-D tensors (torch.bmm), quantized like quant_matmul."""
    role = _role("bmm", kw)
    if value in _PLAIN or _BF16[0] > 1:
        counters.count_gemm(role, "plain")
        return torch.bmm(a, b)
    cfg = quant_config(value, **kw)
    _check_3d("quant_bmm", a=a, b=b)
    if not _needs_graph(a, b):
        return _fwd_matmul(a, b, cfg, role)
    out: torch.Tensor = _QuantMatmul.apply(a, b, cfg, role)
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
    role = _role("baddbmm", kw)
    if value in _PLAIN or _BF16[0] > 1:
        counters.count_gemm(role, "plain")
        return torch.baddbmm(input, batch1, batch2, beta=beta, alpha=alpha)
    cfg = quant_config(value, **kw)
    _check_3d("quant_baddbmm", batch1=batch1, batch2=batch2)
    if not _needs_graph(input, batch1, batch2):
        return _fwd_baddbmm(input, batch1, batch2, beta, alpha, cfg, role)
    out: torch.Tensor = _QuantBaddbmm.apply(input, batch1, batch2, beta, alpha, cfg, role)
    return out


def quant_linear(
    x: torch.Tensor, weight: torch.Tensor, value: str, *, bias: torch.Tensor | None = None, **kw: Any
) -> torch.Tensor:
    """x @ weight.T (+ bias), the Megatron linear forward: x and weight both quantized along the input
    features (their last axis); bias is added unquantized. value "none" is exactly F.linear."""
    role = _role("linear", kw)
    if value in _PLAIN or _BF16[0]:
        counters.count_gemm(role, "plain")
        return F.linear(x, weight, bias)
    cfg = quant_config(value, **kw)
    if not _needs_graph(x, weight, bias):
        return _fwd_linear(x, weight, bias, cfg, role)
    out: torch.Tensor = _QuantLinear.apply(x, weight, bias, cfg, role)
    return out
