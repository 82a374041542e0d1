"""Quantized GEMM ops: "none" is the plain op bit for bit, forward = fake_quant operands + one GEMM,
straight-through backward (gradcheck), optional quantized gradient GEMMs, shapes and dtypes."""

from __future__ import annotations

import pytest
import torch

from megaquant.errors import ValueNameError  # noqa: E402
from megaquant.formats import FORMATS, fake_quant  # noqa: E402
from megaquant.ops import (  # noqa: E402
    QUANT_VALUES,
    configure,
    quant_baddbmm,
    quant_bmm,
    quant_config,
    quant_linear,
    quant_matmul,
)

FMT = {"mxfp8": "mxfp8_e4m3", "mxfp4": "mxfp4_e2m1", "hifp8": "hifp8", "nvfp4": "nvfp4"}
QUANTIZED = [v for v in QUANT_VALUES if v != "none" and FMT[v] in FORMATS]  # nvfp4: once formats has it


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g).to(dtype)


def _grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(_rand(*out.shape, dtype=out.dtype, seed=7))
    grads = [t.grad for t in leaves]
    assert all(g is not None for g in grads)
    return out.detach(), grads  # type: ignore[return-value]


@pytest.mark.parametrize("value", ["none", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_none_is_the_plain_op_bit_for_bit(value: str, dtype: torch.dtype) -> None:
    a, b = _rand(2, 8, 64, dtype=dtype), _rand(2, 64, 16, dtype=dtype)
    inp, w = _rand(2, 8, 16, dtype=dtype), _rand(16, 64, dtype=dtype)
    pairs = [
        (lambda x, y: quant_matmul(x, y, value), torch.matmul, (a, b)),
        (lambda x, y: quant_bmm(x, y, value), torch.bmm, (a, b)),
        (
            lambda i, x, y: quant_baddbmm(i, x, y, value, beta=0.5, alpha=0.25),
            lambda i, x, y: torch.baddbmm(i, x, y, beta=0.5, alpha=0.25),
            (inp, a, b),
        ),
        (lambda x, y: quant_linear(x, y, value), torch.nn.functional.linear, (a, w)),
    ]
    for ours, plain, args in pairs:
        out, grads = _grads(ours, *args)
        ref_out, ref_grads = _grads(plain, *args)
        assert torch.equal(out, ref_out)
        for g, r in zip(grads, ref_grads, strict=True):
            assert torch.equal(g, r)


@pytest.mark.parametrize("value", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_is_fake_quant_then_one_gemm(value: str, dtype: torch.dtype) -> None:
    a, b = _rand(3, 5, 96, dtype=dtype), _rand(96, 40, dtype=dtype)
    expected = torch.matmul(fake_quant(a, FMT[value], axis=-1), fake_quant(b, FMT[value], axis=-2))
    out = quant_matmul(a, b, value)
    assert out.dtype == dtype and torch.equal(out, expected)
    # a transposed view (K^T) is quantized along the same elements as its contiguous copy; the GEMM reads
    # it in that layout (a CPU GEMM's rounding depends on the layout, so the reference reads the same one)
    bt = b.mT.contiguous().mT
    qbt = fake_quant(b, FMT[value], axis=-2).mT.contiguous().mT
    expected_t = torch.matmul(fake_quant(a, FMT[value], axis=-1), qbt)
    assert not bt.is_contiguous() and torch.equal(quant_matmul(a, bt, value), expected_t)


@pytest.mark.parametrize("value", QUANTIZED)
def test_megatron_strided_views_quantize_like_their_copies(value: str) -> None:
    """QK/PV operands as Megatron passes them: [s, b*np, hn] tensors transposed inside the call."""
    query, key, val = _rand(40, 6, 64), _rand(48, 6, 64, seed=1), _rand(48, 6, 64, seed=2)
    q1, k2 = query.transpose(0, 1), key.transpose(0, 1).transpose(1, 2)
    buf = torch.empty(6, 40, 48)
    out = quant_baddbmm(buf, q1, k2, value, beta=0.0, alpha=0.125)
    fmt = FMT[value]
    q_ref, k_ref = fake_quant(q1.contiguous(), fmt), fake_quant(k2.contiguous(), fmt, axis=-2)
    ref = torch.baddbmm(buf, q_ref, k_ref, beta=0.0, alpha=0.125)
    assert torch.equal(out, ref)
    probs = torch.softmax(out, dim=-1)
    v1 = val.transpose(0, 1)
    ref_pv = torch.bmm(fake_quant(probs, fmt), fake_quant(v1.contiguous(), fmt, axis=-2))
    assert torch.equal(quant_bmm(probs, v1, value), ref_pv)
    grad_out = _rand(64, 40)  # the linear wgrad GEMM: grad_output.t() @ total_input
    total_input = _rand(64, 96, seed=3)
    ref_w = fake_quant(grad_out.t().contiguous(), fmt) @ fake_quant(total_input, fmt, axis=-2)
    assert torch.equal(quant_matmul(grad_out.t(), total_input, value), ref_w)


def test_grad_gemm_and_fork_qk_formats() -> None:
    assert quant_config("mxfp8").fmt == "mxfp8_e4m3"
    assert quant_config("mxfp8", grad=True).fmt == "mxfp8_e5m2"
    assert quant_config("mxfp4", grad=True).fmt == "mxfp4_e2m1"
    assert quant_config("mxfp4", preset="fork", role="qk").fmt == "mxfp8_e5m2"
    assert quant_config("mxfp8", preset="fork", role="qk").fmt == "mxfp8_e5m2"
    assert quant_config("mxfp4", role="qk").fmt == "mxfp4_e2m1"  # only the fork preset changes QK
    assert quant_config("hifp8", preset="fork", role="qk").fmt == "hifp8"
    a, b = _rand(4, 64), _rand(64, 8)
    fork = quant_matmul(a, b, "mxfp4", preset="fork", role="qk")
    expected = fake_quant(a, "mxfp8_e5m2", preset="fork") @ fake_quant(
        b, "mxfp8_e5m2", axis=-2, preset="fork"
    )
    assert torch.equal(fork, expected)


def test_configure_sets_process_defaults() -> None:
    a, b = _rand(4, 64), _rand(64, 8)
    fork_qk = quant_matmul(a, b, "mxfp4", preset="fork", role="qk")
    try:
        configure(preset="fork")
        assert quant_config("mxfp4", role="qk").fmt == "mxfp8_e5m2"
        assert torch.equal(quant_matmul(a, b, "mxfp4", role="qk"), fork_qk)
        assert quant_config("mxfp4", role="qk", preset="spec").fmt == "mxfp4_e2m1"  # a call's keyword wins
        with pytest.raises(ValueNameError, match="keyword"):
            configure(presets="fork")
        with pytest.raises(ValueNameError, match="spec, fork"):
            configure(preset="forked")
    finally:
        configure()
    assert quant_config("mxfp4", role="qk").fmt == "mxfp4_e2m1"


def test_unknown_names_raise() -> None:
    a = _rand(2, 4)
    with pytest.raises(ValueNameError, match="mxfp8, mxfp4, hifp8, nvfp4, none"):
        quant_matmul(a, a.T, "fp8")
    with pytest.raises(ValueNameError, match="qk"):
        quant_matmul(a, a.T, "mxfp8", role="attention")
    with pytest.raises(ValueNameError, match="3-D"):
        quant_bmm(a, a.T, "mxfp8")


def _ste(op, value: str, **kw):
    """f = op(quantized) + (op(plain) - op(quantized)).detach(): numerically the plain op, while its
    analytical gradient is the op's straight-through backward, so gradcheck verifies the STE path."""

    def f(*args: torch.Tensor) -> torch.Tensor:
        q = op(*args, value, **kw)
        return q + (op(*args, "none", **kw) - q).detach()

    return f


@pytest.mark.parametrize("value", QUANTIZED)
def test_straight_through_gradcheck(value: str) -> None:
    d = torch.float64
    a, b = _rand(2, 2, 33, dtype=d), _rand(33, 3, dtype=d)  # broadcast matmul, ragged block
    checks = [
        (_ste(quant_matmul, value), (a, b)),
        (_ste(quant_matmul, value), (_rand(2, 33, dtype=d), _rand(2, 1, 33, 3, dtype=d))),
        (_ste(quant_bmm, value), (_rand(2, 2, 33, dtype=d), _rand(2, 33, 3, dtype=d))),
        (
            _ste(quant_baddbmm, value, beta=0.5, alpha=0.3),
            (_rand(1, 2, 3, dtype=d), _rand(2, 2, 33, dtype=d), _rand(2, 33, 3, dtype=d)),
        ),
        (_ste(quant_linear, value), (a, _rand(3, 33, dtype=d))),
    ]
    for f, args in checks:
        leaves = tuple(t.requires_grad_(True) for t in args)
        assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_linear_bias_and_grad_shapes() -> None:
    x, w, bias = _rand(4, 2, 64), _rand(8, 64), _rand(8)
    out, grads = _grads(lambda x, w, b: quant_linear(x, w, "mxfp8", bias=b), x, w, bias)
    ref_out = torch.nn.functional.linear(fake_quant(x, "mxfp8_e4m3"), fake_quant(w, "mxfp8_e4m3"), bias)
    assert torch.equal(out, ref_out)
    _, ref_grads = _grads(torch.nn.functional.linear, x, w, bias)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r)


def test_quantize_grads_uses_gradient_format() -> None:
    a, b = _rand(6, 64), _rand(64, 32)
    g = _rand(6, 32, seed=7)
    _, (ga, gb) = _grads(lambda x, y: quant_matmul(x, y, "mxfp8", quantize_grads=True), a, b)

    def fq(t: torch.Tensor, axis: int) -> torch.Tensor:
        return fake_quant(t, "mxfp8_e5m2", axis=axis)

    assert torch.equal(ga, fq(g, -1) @ fq(b, -1).mT)
    assert torch.equal(gb, fq(a, -2).mT @ fq(g, -2))
    _, (ga_ste, _) = _grads(lambda x, y: quant_matmul(x, y, "mxfp8"), a, b)
    assert torch.equal(ga_ste, g @ b.mT) and not torch.equal(ga, ga_ste)


@pytest.mark.parametrize("op", ["matmul", "linear", "baddbmm"])
def test_backward_keeps_only_the_unquantized_inputs(op: str) -> None:
    """Straight-through backward must not hold quantized copies: every saved tensor is an input."""
    a, b = _rand(2, 4, 64).requires_grad_(True), _rand(2, 64, 8).requires_grad_(True)
    w = _rand(8, 64).requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if op == "matmul":
            quant_matmul(a, b, "mxfp8")
        elif op == "linear":
            quant_linear(a, w, "mxfp8")
        else:
            quant_baddbmm(torch.empty(2, 4, 8), a, b, "mxfp8", beta=0.0)
    inputs = {t.data_ptr() for t in (a, b, w)}
    assert saved and all(t.data_ptr() in inputs for t in saved)


def test_one_dimensional_operands_follow_matmul() -> None:
    v, m = _rand(64), _rand(64, 8)
    assert quant_matmul(v, m, "mxfp8").shape == torch.matmul(v, m).shape
    assert quant_matmul(m.T, v, "mxfp8").shape == torch.matmul(m.T, v).shape
