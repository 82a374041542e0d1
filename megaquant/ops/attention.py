"""Quantized attention: the QK and PV sites of the unfused path (scores, mask, softmax, PV) as one op.

`quant_attention` computes exactly what the instrumented local attention computes (docs/attention.md):
S = scale * fq_qk(Q) fq_qk(K)^T (blocks along the head dim), causal mask, P = softmax(S) in fp32 rounded
to the input dtype, O = fq_pv(P) fq_pv(V) (P and V blocked along the keys), with the straight-through
backward of quant_baddbmm / quant_bmm: plain GEMMs on the unquantized P, V, Q, K (or gradient-format
GEMMs with quantize_grads). Backends: Triton flash kernels on CUDA (megaquant.ops._attention_triton),
torch SDPA flash for qk = pv = none, and a torch reference chunked along the queries (no s x s tensor).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megaquant.errors import ValueNameError
from megaquant.ops import counters
from megaquant.ops.config import QuantConfig, quant_config
from megaquant.ops.gemm import _mm
from megaquant.ops.operands import quantize, quantized
from megaquant.ops.state import PLAIN_SCOPE as _BF16  # recipe BF16 layers (megaquant.ops.layers): run plain

__all__ = ["ATTENTION_BACKENDS", "attention_backend", "quant_attention"]

ATTENTION_BACKENDS = ("auto", "reference", "triton", "sdpa")
_CHUNK_BYTES = 256 << 20
"""fp32 bytes of one query chunk's scores in the reference (b * hq * chunk * keys * 4)."""


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueNameError(
            "quant_attention: q, k, v must be 4-D [batch, heads, seq, head_dim], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, hq, _, dk = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueNameError(
            f"quant_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, heads and seq "
            f"with each other and the batch of q {tuple(q.shape)}"
        )
    if k.shape[3] != dk:
        raise ValueNameError(f"quant_attention: q and k head dims differ ({dk} vs {k.shape[3]})")
    if hq % k.shape[1]:
        raise ValueNameError(
            f"quant_attention: query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]})"
        )


def _chunk_rows(b: int, hq: int, sk: int, block: int, chunk: int | None) -> int:
    """Query rows per reference chunk: a multiple of the MX block (query-axis gradient blocks stay whole)."""
    rows = chunk or max(1, _CHUNK_BYTES // max(1, 4 * b * hq * sk))
    return max(block, rows // block * block)


def _fold(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """[b, hq, c, d] -> [b, hkv, g*c, d]: the g query heads of a KV head stacked along the rows."""
    b, hq, c, d = t.shape
    return t.reshape(b, hkv, (hq // hkv) * c, d)


def _unfold(t: torch.Tensor, hq: int) -> torch.Tensor:
    b, hkv, gc, d = t.shape
    return t.reshape(b, hq, gc // (hq // hkv), d)


class _Chunk:
    """Scores and probabilities of query rows [q0, q1) against keys [0, kend) (all heads, fp32)."""

    def __init__(
        self,
        qq: torch.Tensor,
        kq: torch.Tensor,
        q0: int,
        q1: int,
        causal: bool,
        scale: float,
        dtype: torch.dtype,
    ) -> None:
        b, hq, sq, _ = qq.shape
        hkv, sk = kq.shape[1], kq.shape[2]
        self.q0, self.q1 = q0, q1
        self.kend = min(q1, sk) if causal else sk
        qc = _fold(qq[:, :, q0:q1].float(), hkv)
        s = torch.matmul(qc, kq[:, :, : self.kend].float().mT) * scale
        if causal:
            rows = torch.arange(q0, q1, device=s.device).repeat(hq // hkv)
            cols = torch.arange(self.kend, device=s.device)
            s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
        # P as the unfused path holds it: softmax in fp32, rounded to the activations' dtype
        self.p = torch.softmax(s, dim=-1).to(dtype).float()


def _pv_fwd(p: torch.Tensor, vq: torch.Tensor, cfg_pv: QuantConfig, dtype: torch.dtype) -> torch.Tensor:
    if cfg_pv.fmt is not None:
        p = quantize(p.to(dtype), cfg_pv.fmt, -1, cfg_pv, role="pv").float()
    return torch.matmul(p, vq.float())


# How the unfused quant_bmm / quant_baddbmm backward names these GEMMs for the recipes: dV = P^T dO and
# dK = dS^T Q are "wgrad"-like, dP = dO V^T and dQ = dS K are "dgrad"-like.
_WGRAD = ("wgrad", ("activation", "gradient"))
_DGRAD = ("dgrad", ("gradient", "activation"))


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, cfg: QuantConfig, g: int) -> torch.Tensor:
    """sum over the g folded query heads of a_h @ b_h, a: [.., n, g*c], b: [.., g*c, d] (reduction over
    the folded rows). Quantized gradient GEMMs quantize per head, as the unfused path does on repeated K/V."""
    if not (cfg.quantize_grads and cfg.grad_fmt is not None) or g == 1:
        return _mm(a, b, cfg, *_WGRAD)
    c = a.shape[-1] // g
    return sum(
        (_mm(a[..., i * c : (i + 1) * c], b[..., i * c : (i + 1) * c, :], cfg, *_WGRAD) for i in range(g)),
        start=torch.zeros((), device=a.device),
    )


class _ReferenceAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cfg_qk: QuantConfig,
        cfg_pv: QuantConfig,
        causal: bool,
        scale: float,
        rows: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.cfg_qk, ctx.cfg_pv, ctx.causal, ctx.scale, ctx.rows = cfg_qk, cfg_pv, causal, scale, rows
        qq, kq, vq = (
            quantized(q, cfg_qk, -1, "qk"),
            quantized(k, cfg_qk, -1, "qk"),
            quantized(v, cfg_pv, -2, "pv"),
        )
        hq, sq = q.shape[1], q.shape[2]
        out = q.new_empty((*q.shape[:3], v.shape[3]))
        for q0 in range(0, sq, rows):
            c = _Chunk(qq, kq, q0, min(q0 + rows, sq), causal, scale, q.dtype)
            out[:, :, c.q0 : c.q1] = _unfold(_pv_fwd(c.p, vq[:, :, : c.kend], cfg_pv, q.dtype), hq).to(
                q.dtype
            )
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v = ctx.saved_tensors
        cfg_qk, cfg_pv, causal, scale, rows = ctx.cfg_qk, ctx.cfg_pv, ctx.causal, ctx.scale, ctx.rows
        qq, kq = quantized(q, cfg_qk, -1, "qk"), quantized(k, cfg_qk, -1, "qk")
        hq, hkv, sq = q.shape[1], k.shape[1], q.shape[2]
        g = hq // hkv
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        vf, kf = v.float(), k.float()
        for q0 in range(0, sq, rows):
            c = _Chunk(qq, kq, q0, min(q0 + rows, sq), causal, scale, q.dtype)
            n = c.kend
            do = _fold(grad[:, :, c.q0 : c.q1].float(), hkv)
            dv[:, :, :n] += _grouped_mm(c.p.mT, do, cfg_pv, g)
            dp = _mm(do, vf[:, :, :n].mT, cfg_pv, *_DGRAD)
            ds = c.p * (dp - (c.p * dp).sum(-1, keepdim=True))
            dq[:, :, c.q0 : c.q1] = _unfold(_mm(ds, kf[:, :, :n], cfg_qk, *_DGRAD), hq) * scale
            qc = _fold(q[:, :, c.q0 : c.q1].float(), hkv)
            dk[:, :, :n] += _grouped_mm(ds.mT, qc, cfg_qk, g) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _configs(qk: str, pv: str, kw: dict[str, Any]) -> tuple[QuantConfig, QuantConfig]:
    kw = {key: val for key, val in kw.items() if key != "grad"}  # forward GEMMs: element formats
    return quant_config(qk, **kw), quant_config(pv, **kw)


def _sdpa_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] == v.shape[-1] <= 256


def attention_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    qk: str = "none",
    pv: str = "none",
    causal: bool = True,
    backend: str = "auto",
    **kw: Any,
) -> str:
    """Which backend quant_attention(q, k, v, ...) runs: "sdpa", "triton" or "reference"."""
    return _backend(q, k, v, *_configs(qk, pv, kw), backend)


def _backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg_qk: QuantConfig, cfg_pv: QuantConfig, backend: str
) -> str:
    """attention_backend on resolved configs (quant_attention resolves them once)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueNameError(
            f"unknown attention backend {backend!r}; expected one of {', '.join(ATTENTION_BACKENDS)}"
        )
    if backend != "auto":
        return backend
    if not q.is_cuda:
        return "reference"
    # Unquantized attention too runs on the Triton kernels when they cover the call: they are deterministic
    # (no atomics; SDPA's flash backward is not: two bf16 runs of the same code diverged at step 3 on the
    # H200 while the Triton-attention runs repeated bit for bit) and were as fast or faster
    # (docs/benchmarks.md §4); bf16 baselines and quantized runs then share one attention kernel.
    from megaquant.ops import _attention_triton

    if _attention_triton.supports(q, k, v, cfg_qk, cfg_pv):
        return "triton"
    if cfg_qk.fmt is None and cfg_pv.fmt is None and _sdpa_ok(q, k, v):
        return "sdpa"
    return "reference"


def quant_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    qk: str = "none",
    pv: str = "none",
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    chunk: int | None = None,
    **kw: Any,
) -> torch.Tensor:
    """Attention with the qk and pv sites quantized: q [b, hq, s, d], k [b, hkv, s_k, d], v [b, hkv, s_k, dv]
    (hq a multiple of hkv: grouped-query attention, K/V never repeated) -> [b, hq, s, dv] in q's dtype.

    qk / pv: value names as for quant_baddbmm / quant_bmm (mxfp8, mxfp4, hifp8, nvfp4, none); `kw` are their
    keywords (preset, role, quantize_grads, block_size, scale, rounding, tensor_scale). causal: key j
    attends to query i when j <= i (top-left aligned, as Megatron's causal mask). softmax_scale defaults
    to 1/sqrt(d). backend: "auto" (CUDA: SDPA flash for none/none when it covers the shapes, else the
    Triton kernels when they cover the call, else the reference; CPU: the reference), "reference",
    "triton", "sdpa" (only for none/none). chunk: query rows per reference chunk (default: scores of
    about 256 MiB). Semantics and gradients: docs/attention.md.
    """
    _check(q, k, v)
    if _BF16[0] > 1:  # a recipe BF16 layer that keeps its attention unquantized
        qk = pv = "none"
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    cfg_qk, cfg_pv = _configs(qk, pv, kw)
    which = _backend(q, k, v, cfg_qk, cfg_pv, backend)
    for site, cfg in (("qk", cfg_qk), ("pv", cfg_pv)):  # the two forward GEMMs, as the unfused sites count
        counters.count_gemm(
            site, "plain" if cfg.fmt is None else ("triton" if which == "triton" else "reference")
        )
    if which == "sdpa":
        if cfg_qk.fmt is not None or cfg_pv.fmt is not None:
            raise ValueNameError("backend='sdpa' computes unquantized attention only (qk = pv = none)")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # never the math backend's s x s fallback
            out: torch.Tensor = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
            )
        return out
    if which == "triton":
        from megaquant.ops import _attention_triton

        if backend == "triton" and not _attention_triton.supports(q, k, v, cfg_qk, cfg_pv):  # auto checked
            raise ValueNameError(
                f"backend='triton' does not cover this call (q {tuple(q.shape)} {q.dtype} on {q.device}, "
                f"qk={qk}, pv={pv}, {kw}); use backend='auto' to fall back to the reference"
            )
        out = _attention_triton.attention(q, k, v, cfg_qk, cfg_pv, causal, scale)
        return out
    # one tensor scale over all of P (HiF8 tensor scaling, NVFP4's FP32 scale): no chunking
    whole = cfg_qk.tensor_scale or cfg_pv.tensor_scale or "nvfp4" in (cfg_qk.value, cfg_pv.value)
    block = max(cfg_qk.block_size, cfg_pv.block_size)
    rows = q.shape[2] if whole else _chunk_rows(q.shape[0], q.shape[1], k.shape[2], block, chunk)
    out = _ReferenceAttention.apply(q, k, v, cfg_qk, cfg_pv, causal, scale, rows)
    return out
