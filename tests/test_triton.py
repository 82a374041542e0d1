"""GPU tests: the Triton kernels equal the torch reference bit for bit (skipped without CUDA/triton)."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from megaquant.formats import FORMATS, encode, fake_quant

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
triton_kernels = pytest.importorskip("megaquant.formats._triton", reason="needs triton")
MX_HIF8 = tuple(f for f in FORMATS if f != "nvfp4")  # nvfp4 has its own kernels: tests/test_triton_nvfp4.py

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SPECIALS = [
    0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -3e-39, 2.0**-130, 3.3e38, 448.0, 464.0,
    480.0, 61440.0, 40960.0, 32768.0, 2.0**-23, 2.0**-22, 1.0625, 6.0, 7.0, 2.5, 0.25, 65504.0,
]  # fmt: skip
# (shape, axis): last axis, B-operand axis -2, other axes, ragged blocks, batch dims, 1-d
LAYOUTS = [
    ((37, 96), -1),
    ((5, 70), -1),
    ((3, 67, 20), -2),
    ((2, 64, 3), -2),
    ((4, 96), 0),
    ((2, 3, 45, 7), 1),
    ((129,), -1),
    ((2, 33, 64), -1),
]
OPTIONS = [
    dict(scale="floor", rounding="even", saturate=True),
    dict(scale="rceil", rounding="even", saturate=True),
    dict(scale="floor", rounding="away", saturate=True),
    dict(scale="rceil", rounding="away", saturate=False),
    dict(scale="rceil", rounding="even", saturate=True, preset="fork"),
]


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Wide dynamic range per block, many exact ties (small integers times powers of two), specials."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    block_exp = torch.randint(-30, 30, (n // 16 + 1,), generator=g).float().repeat_interleave(16)[:n]
    wide = torch.randn(n, generator=g) * torch.exp2(block_exp)
    ties = torch.randint(-64, 65, (n,), generator=g).float() * torch.exp2(
        torch.randint(-12, 12, (n,), generator=g)
    )
    x = torch.where(torch.rand(n, generator=g) < 0.5, wide, ties)
    specials = torch.tensor(SPECIALS)
    idx = torch.randint(0, n, (max(1, n // 40),), generator=g)
    x[idx] = specials[torch.randint(0, len(specials), (len(idx),), generator=g)]
    return x.reshape(shape).to(dtype).cuda()


def _finite_amax(x: torch.Tensor) -> torch.Tensor:
    """The largest finite |x| as a 0-d fp32, in plain torch (what formats.finite_amax and the delayed
    histories are held to; _inputs holds inf and NaN, as real gradients can)."""
    return torch.where(torch.isfinite(x), x.abs(), 0).amax().float()


def _assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype and shape, same NaN positions, identical bits everywhere else (-0.0 included)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[got.element_size()]
    if got.dtype.is_floating_point:
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        got, want = got[~nan], want[~nan]
    bad = got.contiguous().view(int_type) != want.contiguous().view(int_type)
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} differ; first: {got[bad][:4]} vs {want[bad][:4]}"
    )


def _check(x: torch.Tensor, fmt: str, **kw: object) -> None:
    assert triton_kernels.supports(x, fmt, **kw)
    want = fake_quant(x, fmt, backend="reference", **kw)  # type: ignore[arg-type]
    _assert_bit_equal(fake_quant(x, fmt, backend="triton", **kw), want)  # type: ignore[arg-type]
    _assert_bit_equal(fake_quant(x, fmt, **kw), want)  # type: ignore[arg-type]  # auto dispatch
    ref = encode(x, fmt, backend="reference", **kw)  # type: ignore[arg-type]
    got = encode(x, fmt, backend="triton", **kw)  # type: ignore[arg-type]
    assert (got.shape, got.axis, got.fmt, got.block_size) == (ref.shape, ref.axis, ref.fmt, ref.block_size)
    _assert_bit_equal(got.codes, ref.codes)
    if ref.scales is None:
        assert got.scales is None
    else:
        assert got.scales is not None
        _assert_bit_equal(got.scales, ref.scales)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("fmt", MX_HIF8)
def test_kernels_equal_reference(fmt: str, dtype: str) -> None:
    for (shape, axis), kw in itertools.product(LAYOUTS, OPTIONS):
        if fmt == "mxfp4_e2m1" and not kw["saturate"]:
            continue  # E2M1 has no Inf/NaN code: the reference rejects saturate=False
        x = _inputs(shape, DTYPES[dtype], seed=zlib.crc32(f"{fmt}{shape}{dtype}".encode()))
        _check(x, fmt, axis=axis, **kw)


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4_e2m1"])
@pytest.mark.parametrize("block_size", [2, 16, 64, 256])
def test_other_block_sizes(fmt: str, block_size: int) -> None:
    for shape, axis in [((9, 300), -1), ((3, 300, 5), -2)]:
        _check(_inputs(shape, torch.bfloat16, seed=block_size), fmt, axis=axis, block_size=block_size)


@pytest.mark.parametrize("fmt", MX_HIF8)
def test_large_tensor_many_programs(fmt: str) -> None:
    """Whole-block tiles across thousands of programs, both GEMM operand layouts."""
    a = _inputs((1024, 4096), torch.bfloat16, seed=1)
    _check(a, fmt, axis=-1)
    _check(a, fmt, axis=-2)


def test_strided_input_is_served() -> None:
    x = _inputs((64, 96), torch.bfloat16, seed=3).t()
    _check(x, "mxfp8_e4m3", axis=-1)
    _check(x, "hifp8")


def test_hif8_vectors_of_formats_md() -> None:
    """formats.md §8.5 through the kernel: ties away, single zero, tiny values, overflow."""
    x = torch.tensor(
        [1.0625, 1.0624, 17.0, 18.0, 30.0, 40959.0, 40960.0, 2.0**-23, 0.99 * 2.0**-23, -0.0, 0.3]
    )
    codes = [0x09, 0x08, 0x40, 0x41, 0x44, 0x6E, 0x6F, 0x01, 0x00, 0x00, 0x32]
    enc = encode(x.cuda(), "hifp8", backend="triton", saturate=False)
    assert enc.codes.cpu().tolist() == codes


def test_mx_block_vectors_of_formats_md() -> None:
    """formats.md §8.2 rows 2, 3 and 13: saturation under FLOOR, RCEIL scale, E2M1 ties."""
    row = torch.zeros(32)
    row[:2] = torch.tensor([480.0, 1.0])
    assert encode(row.cuda(), "mxfp8_e4m3", backend="triton").codes[:2].tolist() == [0x7E, 0x38]
    rceil = encode(row.cuda(), "mxfp8_e4m3", scale="rceil", backend="triton")
    assert rceil.scales is not None and rceil.scales.tolist() == [128]
    fp4 = torch.zeros(32)
    fp4[:6] = torch.tensor([7.0, 0.9, -3.1, 0.2, 2.5, 0.25])
    y = fake_quant(fp4.cuda(), "mxfp4_e2m1", backend="triton")
    assert y[:6].tolist() == [6.0, 1.0, -3.0, 0.0, 2.0, 0.0]


def test_supports_refuses_what_it_does_not_cover() -> None:
    x = torch.randn(4, 64, device="cuda")
    assert triton_kernels.supports(x, "mxfp8_e4m3", axis=-1)
    assert not triton_kernels.supports(x.cpu(), "mxfp8_e4m3")
    assert not triton_kernels.supports(x.double(), "mxfp8_e4m3")
    assert triton_kernels.supports(x, "hifp8", tensor_scale=True)  # amax + quantize kernels
    assert not triton_kernels.supports(x, "mxfp8_e4m3", block_size=24)
    assert not triton_kernels.supports(x, "mxfp8_e4m3", axis=2)
    assert not triton_kernels.supports(x, "nvfp4")
    assert not triton_kernels.supports(x[:0], "mxfp8_e4m3")
    # tensor_scale runs on the kernels under auto dispatch, bit-identical
    _assert_bit_equal(
        fake_quant(x, "hifp8", tensor_scale=True),
        fake_quant(x, "hifp8", tensor_scale=True, backend="reference"),
    )


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_tensor_scaled_hif8_equals_reference(dtype: str) -> None:
    """Per-tensor scaled HiF8 (amax pass + quantize pass): values, codes and the scale exponent, over inputs
    whose amax puts the scale at both ends (huge, tiny incl. bf16 subnormals) and the specials."""
    g = torch.Generator().manual_seed(5)
    cases = [
        _inputs((37, 96), DTYPES[dtype], seed=11),
        (torch.randn(4096, generator=g) * 2.0**-115).to(DTYPES[dtype]).cuda(),
        (torch.randn(4096, generator=g) * 1e30).to(DTYPES[dtype]).cuda(),
        torch.zeros(64, dtype=DTYPES[dtype], device="cuda"),
        _inputs((1024, 2048), DTYPES[dtype], seed=12),  # many programs: the atomic amax across them
    ]
    big = (torch.randn(3 * 2**21 + 5, generator=g) * 0.5).to(DTYPES[dtype])  # > AMAX_PROGRAMS blocks:
    big[-1] = -300.0  # the grid-stride loop's later iterations hold the maximum
    cases.append(big.cuda())
    for x in cases:
        for kw in (dict(saturate=True), dict(saturate=False), dict(preset="fork")):
            _check(x, "hifp8", tensor_scale=True, **kw)
            ref = encode(x, "hifp8", backend="reference", tensor_scale=True, **kw)  # type: ignore[arg-type]
            got = encode(x, "hifp8", backend="triton", tensor_scale=True, **kw)  # type: ignore[arg-type]
            assert got.tensor_scale_exp is not None and ref.tensor_scale_exp is not None
            assert got.tensor_scale_exp.device == x.device and got.tensor_scale_exp.dtype == torch.int32
            assert int(got.tensor_scale_exp) == int(ref.tensor_scale_exp)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_hif8_with_a_given_amax_equals_reference(dtype: str) -> None:
    """Delayed scaling's kernel path: the tensor amax given (a history's: smaller or larger than x's own,
    zero, non-finite, negative) in one quantize pass, and the finite amax the history records."""
    from megaquant.formats import finite_amax, quantizer_amax

    x = _inputs((256, 384), DTYPES[dtype], seed=13)
    fn, path, _ = quantizer_amax(x, "hifp8", tensor_scale=True)
    assert path == "triton"
    for a in (0.9, 1e-3, 250.0, 0.0, float("inf"), float("nan"), -2.5, 1e-40, 3e38):
        amax = torch.tensor(a, device="cuda")
        _check(x, "hifp8", tensor_scale=True, amax=amax)
        want = fake_quant(x, "hifp8", backend="reference", tensor_scale=True, amax=amax)
        _assert_bit_equal(fn(x, amax), want)
        _assert_bit_equal(fn(x.t(), amax), want.t())  # a transposed view, in its memory order
    finite = _finite_amax(x)
    _assert_bit_equal(finite_amax(x), finite)
    _assert_bit_equal(finite_amax(x.t()), finite)


def test_delayed_scaling_on_the_kernels_equals_scaling_around_them() -> None:
    """megaquant.ops' delayed path (the history's amax given to the tensor-scaled kernel) gives the bits
    of the formula it replaced (t * 2^s, HiF8, * 2^-s in bf16), with the scale from the history."""
    import math

    from megaquant import ops
    from megaquant.ops import counters, quant_matmul

    big = _inputs((64, 256), torch.bfloat16, seed=23)
    small = big * 1e-3
    w = _inputs((256, 128), torch.bfloat16, seed=24)
    ops.reset_state()
    try:
        ops.next_step()
        quant_matmul(big, w, "hifp8", recipe="hifp8_delayed", role="linear_fwd")  # records amax(big)
        ops.next_step()
        counters.reset()
        out = quant_matmul(small, w, "hifp8", recipe="hifp8_delayed", role="linear_fwd")
    finally:
        ops.reset_state()
    s = 3 - math.floor(math.log2(float(_finite_amax(big))))  # the history records the finite amax
    scaled = fake_quant(small * 2.0**s, "hifp8", backend="reference") * 2.0**-s
    expected = torch.matmul(scaled, fake_quant(w, "hifp8", tensor_scale=True, backend="reference"))
    _assert_bit_equal(out, expected)
    snap = counters.snapshot()
    assert snap["gemms"]["linear_fwd"] == {"triton": 1} and snap["operands"]["linear_fwd"] == {"triton": 2}


def test_ops_count_paths_and_log_a_cuda_fallback_once(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from megaquant.ops import counters, quant_matmul, weights

    counters.reset()
    a = _inputs((64, 256), torch.bfloat16, seed=21)
    w = torch.nn.Parameter(_inputs((128, 256), torch.bfloat16, seed=22))
    want = torch.matmul(fake_quant(a, "mxfp8_e4m3", backend="reference"),
                        fake_quant(w.detach(), "mxfp8_e4m3", backend="reference").t())  # fmt: skip
    weights.enable_weight_cache()
    try:
        with torch.no_grad():
            got = [quant_matmul(a, w.t(), "mxfp8", role="linear_fwd") for _ in range(3)]
    finally:
        weights.disable_weight_cache()
    for g in got:
        _assert_bit_equal(g, want)
    snap = counters.snapshot()
    assert snap["gemms"]["linear_fwd"] == {"triton": 3}
    assert snap["operands"]["linear_fwd"] == {"triton": 4, "cache": 2}
    d = a.double()
    with caplog.at_level(logging.WARNING, logger="megaquant.ops"):
        for _ in range(3):
            out = quant_matmul(d, d.t(), "mxfp8", role="qk")
    want64 = torch.matmul(fake_quant(d, "mxfp8_e4m3"), fake_quant(d, "mxfp8_e4m3").t())
    torch.testing.assert_close(out, want64, rtol=0, atol=0, equal_nan=True)  # float64: the reference
    assert counters.snapshot()["gemms"]["qk"] == {"reference": 3}
    lines = [r.getMessage() for r in caplog.records if "ran the torch reference" in r.getMessage()]
    assert len(lines) == 1 and "(64, 256)" in lines[0] and "float64" in lines[0]
    counters.reset()
