"""GPU tests of quant_attention's Triton kernels: against the reference at real head shapes (8B, 1B, MLA),
P's in-kernel quantization bit for bit against fake_quant, O(s) memory (skipped without CUDA/triton)."""

from __future__ import annotations

import pytest
import torch

from megaquant.formats import fake_quant
from megaquant.ops import quant_attention
from megaquant.ops.attention import attention_backend
from megaquant.ops.config import quant_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
kernels = pytest.importorskip("megaquant.ops._attention_triton", reason="needs triton")

# (query heads, kv heads, qk head dim, v head dim, seq)
SHAPES = {
    "8b": (8, 2, 128, 128, 1000),
    "1b": (8, 2, 64, 64, 777),
    "mla": (4, 4, 192, 128, 513),
}
PAIRS = [("none", "none"), ("mxfp8", "none"), ("none", "mxfp8"), ("mxfp8", "mxfp8"), ("hifp8", "hifp8"),
         ("mxfp4", "mxfp4")]  # fmt: skip


def _inputs(hq: int, hkv: int, dk: int, dv: int, s: int, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(1, hq, s, dk), (1, hkv, s, dk), (1, hkv, s, dv), (1, hq, s, dv)]
    return [torch.randn(sh, generator=g, device="cuda").to(torch.bfloat16) for sh in shapes]


def _run(q, k, v, do, **kw):  # type: ignore[no-untyped-def]
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = quant_attention(*leaves, **kw)
    return (out.detach(), *torch.autograd.grad(out, leaves, do))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CASES = [
    *(("8b", pair, True) for pair in PAIRS),
    ("8b", ("none", "none"), False),
    ("8b", ("mxfp8", "hifp8"), False),
    ("1b", ("none", "none"), True),
    ("1b", ("mxfp8", "mxfp8"), True),
    ("1b", ("hifp8", "hifp8"), True),
    ("mla", ("none", "none"), True),
    ("mla", ("mxfp8", "mxfp8"), True),
    ("mla", ("mxfp4", "none"), True),
    ("mla", ("hifp8", "mxfp8"), True),
    ("mla", ("none", "mxfp8"), False),
]


@pytest.mark.parametrize(("shape", "pair", "causal"), CASES)
def test_triton_matches_reference(shape: str, pair: tuple[str, str], causal: bool) -> None:
    qk, pv = pair
    q, k, v, do = _inputs(*SHAPES[shape])
    ours = _run(q, k, v, do, qk=qk, pv=pv, causal=causal, backend="triton")
    ref = _run(q, k, v, do, qk=qk, pv=pv, causal=causal, backend="reference")
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        assert _rel(a, b) < 2e-2, (name, _rel(a, b))


@pytest.mark.parametrize(("qk", "kw"), [("hifp8", {"tensor_scale": True}), ("nvfp4", {})])
def test_triton_serves_qk_values_quantized_before_the_kernels(qk: str, kw: dict[str, object]) -> None:
    # tensor-scaled HiF8 and NVFP4 Q/K go through the formats' own kernels first (they took the reference)
    q, k, v, do = _inputs(*SHAPES["8b"])
    assert attention_backend(q, k, v, qk=qk, **kw) == "triton"
    assert attention_backend(q, k, v, pv=qk, **kw) == "reference"  # P's tensor scale: the reference
    ours = _run(q, k, v, do, qk=qk, backend="triton", **kw)
    ref = _run(q, k, v, do, qk=qk, backend="reference", **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        assert _rel(a, b) < 2e-2, (name, _rel(a, b))


def test_auto_uses_the_deterministic_triton_kernels_for_unquantized_attention_too() -> None:
    q, k, v, do = _inputs(*SHAPES["8b"])
    assert attention_backend(q, k, v) == "triton"
    first, again = _run(q, k, v, do), _run(q, k, v, do)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)  # deterministic, backward included
    assert attention_backend(q, k, v, qk="mxfp8") == "triton"
    assert attention_backend(q, k, v, pv="hifp8", quantize_grads=True) == "reference"
    ours = _run(q, k, v, do)
    ref = _run(q, k, v, do, backend="reference")
    for a, b in zip(ours, ref, strict=True):
        assert _rel(a, b) < 2e-2


@pytest.mark.parametrize("pquant", ["auto", "soft"])
@pytest.mark.parametrize(
    ("value", "kw", "hw"),
    [("mxfp8", {}, 1), ("mxfp4", {}, 0), ("hifp8", {}, 0),
     ("mxfp8", {"scale": "rceil", "rounding": "away"}, 0), ("mxfp8", {"scale": "rceil"}, 1),
     ("mxfp8", {"grad": True}, 2), ("mxfp4", {"preset": "fork"}, 0), ("hifp8", {"preset": "fork"}, 0),
     ("mxfp8", {"block_size": 16}, 1)],
)  # fmt: skip
def test_p_quantization_is_bit_exact(
    value: str, kw: dict[str, object], hw: int, pquant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both element roundings of P (the float8 conversion, HW 1 / 2, and the integer bit tricks) equal
    fake_quant's reference bit for bit, including ties, the scaled subnormal range and saturation."""
    monkeypatch.setenv(kernels.PQUANT_ENV, pquant)
    g = torch.Generator(device="cuda").manual_seed(1)
    p = torch.softmax(torch.randn(256, 512, generator=g, device="cuda") * 4, -1)
    p[4:] = torch.softmax(torch.randn(252, 512, generator=g, device="cuda") * 12, -1)  # deep tails
    p = p.to(torch.bfloat16).float()
    p[0, :64] = 0.25 * (1 + torch.arange(64, device="cuda") / 16)  # exact ties on every grid
    p[1] = 0.0
    # block max 1 (scale 2^-8 for E4M3): elements 2^-20 .. 2^-14 with every bf16 mantissa, the subnormal
    # range of the scaled block, and its ties (2^-18: half the smallest subnormal, 3 * 2^-18: 1.5 of it)
    tail = torch.arange(512, device="cuda")
    p[2] = (2.0 ** (-20 + (tail % 7).float())) * (1 + (tail // 7 % 128).float() / 128)
    p[2, ::32] = 1.0
    p[3] = torch.where(tail % 2 == 0, 2.0**-18, 3 * 2.0**-18)
    p[3, ::32] = 1.0
    p[5, ::32] = 0.98  # scaled above E4M3's 448: saturates
    p[5, 1::32] = 0.9375
    cfg = quant_config(value, **kw)
    assert kernels._pv_constants(cfg, 64)["HW"] == (hw if pquant == "auto" else 0)
    ours = kernels.quantize_p(p, cfg)
    assert cfg.fmt is not None
    ref = fake_quant(p, cfg.fmt, axis=-1, block_size=cfg.block_size, scale=cfg.scale, rounding=cfg.rounding,
                     preset=cfg.preset, backend="reference")  # fmt: skip
    assert torch.equal(ours, ref)


def test_memory_is_linear_in_the_sequence() -> None:
    """seq 8192, 32 heads: an s x s bf16 tensor alone would be 4 GiB."""
    q, k, v, do = _inputs(32, 8, 128, 128, 8192)
    for t in (q, k, v):
        t.requires_grad_(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = quant_attention(q, k, v, qk="mxfp8", pv="mxfp8")
    out.backward(do)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 1 << 30, extra
