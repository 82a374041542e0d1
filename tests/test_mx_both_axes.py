"""formats.quantizer_both_axes: an MX gradient blocked along its features and along its tokens from one
read equals fake_quant along each axis on its own, bit for bit: the torch reference path here, the
single-read Triton kernel (formats._triton._mx_dual_kernel) under the CPU interpreter and on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megaquant.formats import fake_quant, quantizer_both_axes

# (shape, dtype): ragged blocks along both axes, a 3-D gradient [s, b, h], a width under one tile
CASES = [
    ((64, 96), torch.float32),
    ((3, 20, 70), torch.float32),
    ((40, 32), torch.bfloat16),
    ((33, 5), torch.float32),
]
OPTIONS = [
    ("mxfp8_e4m3", {}),
    ("mxfp8_e5m2", dict(saturate=False)),
    ("mxfp4_e2m1", dict(scale="rceil", rounding="away")),
    ("mxfp8_e4m3", dict(preset="fork")),
    ("mxfp4_e2m1", dict(block_size=16)),
]


def _input(shape: tuple[int, ...], dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-10, 10, shape, generator=g).float())
    x.view(-1)[:4] = torch.tensor([float("inf"), float("nan"), 0.0, -0.0])
    if dtype == torch.bfloat16:  # the CPU interpreter loads bf16 subnormals inexactly (GPUs do not)
        x = torch.where(x.abs() < 2.0**-126, 0.0, x)
    return x.to(dtype).to(device)


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN positions differ"
    assert got.is_contiguous() and got.shape == want.shape, what
    bits = {2: torch.int16, 4: torch.int32}[got.element_size()]
    assert torch.equal(got[~nan].view(bits), want[~nan].contiguous().view(bits)), what


def _check(fn: object, x: torch.Tensor, fmt: str, kw: dict[str, object], what: str) -> None:
    last, rows = fn(x)  # type: ignore[operator]
    n = x.shape[-1]
    _assert_same(last, fake_quant(x, fmt, axis=-1, **kw), f"{what} along the last axis")
    want_rows = fake_quant(x.reshape(-1, n), fmt, axis=0, **kw).view(x.shape)
    _assert_same(rows, want_rows, f"{what} along the rows")


@pytest.mark.parametrize(("fmt", "kw"), OPTIONS)
def test_reference_pair_equals_each_axis(fmt: str, kw: dict[str, object]) -> None:
    for i, (shape, dtype) in enumerate(CASES):
        x = _input(shape, dtype, i)
        found = quantizer_both_axes(x, fmt, **kw)
        assert found is not None and found[1] == "reference" and "CUDA" in str(found[2])
        _check(found[0], x, fmt, kw, f"{fmt} {kw} {shape}")


def test_no_single_read_where_the_two_blockings_are_not_one_pass() -> None:
    x = torch.randn(64, 64)
    assert quantizer_both_axes(x, "hifp8") is None  # elementwise: megaquant.ops.shared reuses q(dy)
    assert quantizer_both_axes(x, "nvfp4") is None
    assert quantizer_both_axes(x, "mxfp8_e4m3", rounding="stochastic", seed=3) is None
    assert quantizer_both_axes(torch.randn(64), "mxfp8_e4m3") is None


CHILD = "MEGAQUANT_DUAL_CHILD"


def _interpreted() -> None:
    import megaquant.formats._triton as kernels
    from megaquant.formats.registry import resolve_options

    n = 0
    for fmt, kw in OPTIONS:
        base = dict(axis=-1, block_size=None, scale="floor", rounding="even", saturate=True, preset=None)
        opts = resolve_options(fmt, **{**base, **kw})  # type: ignore[arg-type]
        fn = kernels.fake_quant_dual_fn(opts)
        for i, (shape, dtype) in enumerate(CASES):
            _check(fn, _input(shape, dtype, 100 + i), fmt, kw, f"{fmt} {kw} {shape} {dtype}")
            n += 1
    # the launch configurations benchmarks/quant_kernels.py --both-axes sweeps: the same bits
    base = dict(axis=-1, block_size=None, scale="floor", rounding="even", saturate=True, preset=None)
    opts = resolve_options("mxfp8_e5m2", **base)  # type: ignore[arg-type]
    for elems, warps in ((4096, 4), (8192, 8)):
        fn = kernels.fake_quant_dual_fn(opts, tile_elems=elems, num_warps=warps)
        _check(fn, _input((70, 300), torch.float32, 7), "mxfp8_e5m2", {}, f"tile {elems} x {warps} warps")
    print(f"{n} cases ok")


def test_kernel_equals_each_axis_under_the_interpreter() -> None:
    pytest.importorskip("triton", reason="needs triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", CHILD: "1"}
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{len(OPTIONS) * len(CASES)} cases ok" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("fmt", "kw"), OPTIONS)
def test_kernel_equals_the_one_axis_kernels_on_cuda(fmt: str, kw: dict[str, object]) -> None:
    pytest.importorskip("triton", reason="needs triton")
    # the real gradients of the 1B single-gpu preset (2048 tokens; qkv 3072, fc1 16384 wide), an 8B-wide
    # one, ragged ones, and fp16 / fp32 / bf16 with subnormals (exact on the GPU)
    bf16 = torch.bfloat16
    shapes = [((2048, 3072), bf16), ((1024, 2, 16384), bf16), ((2, 8192, 4096), bf16),
              ((1000, 70), torch.float32), ((77, 3, 200), torch.float16)]  # fmt: skip
    for i, (shape, dtype) in enumerate(shapes + CASES):
        x = _input(shape, torch.float32, 200 + i, "cuda")
        x.view(-1)[4:8] = torch.tensor([1e-40, -3e-39, 2.0**-130, 65504.0], device="cuda")
        x = x.to(dtype)
        found = quantizer_both_axes(x, fmt, **kw)
        assert found is not None and found[1] == "triton" and found[2] is None
        _check(found[0], x, fmt, kw, f"{fmt} {kw} {shape} {dtype}")


if __name__ == "__main__" and os.environ.get(CHILD):
    _interpreted()
