"""The NVFP4 / stochastic-rounding Triton kernels and the Hadamard transform's under the Triton CPU
interpreter (TRITON_INTERPRET=1), at small shapes: bit-equal to the torch reference (the transform: where
its sums are exact). Runs in CI (no GPU); the same comparisons on CUDA are in tests/test_triton_nvfp4.py
and tests/test_formats_hadamard.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")


def _check_all() -> int:
    """The comparisons (run in a child process with TRITON_INTERPRET=1 set before triton is imported)."""
    import itertools

    import torch

    from megaquant.formats import _triton_nvfp4 as kernels
    from megaquant.formats import encode, fake_quant
    from megaquant.formats.registry import resolve_options

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])

    def same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        nan = torch.isnan(want) if want.dtype.is_floating_point else torch.zeros_like(want, dtype=torch.bool)
        if want.dtype.is_floating_point:
            assert torch.equal(torch.isnan(got), nan), f"{what}: NaN positions differ"
        bad = bits(got[~nan]) != bits(want[~nan])
        assert not bad.any(), (
            f"{what}: {int(bad.sum())} differ: {got[~nan][bad][:4]} vs {want[~nan][bad][:4]}"
        )

    g = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, -0.0, 1e-40, 448.0, 6.0, 2.5, 0.25, 3e38, -7.0, 1.5e-5, 40000.0, 2.0**-23])
    cases = [
        ("nvfp4", {}),
        ("nvfp4", dict(rounding="stochastic", seed=5)),
        ("nvfp4", dict(block_size=32)),
        ("mxfp4_e2m1", dict(rounding="stochastic", seed=9)),
        ("mxfp8_e4m3", dict(rounding="stochastic", seed=(1 << 40) + 3, scale="rceil")),
        ("mxfp8_e5m2", dict(rounding="stochastic", seed=1, saturate=False)),
        ("hifp8", dict(rounding="stochastic", seed=6, saturate=False)),
        ("hifp8", dict(rounding="stochastic", seed=7, preset="fork")),
    ]
    n = 0
    layouts = [((6, 48), -1), ((3, 40, 5), -2), ((4, 20), 0), ((37,), -1)]
    for dtype, shape, axis in [(torch.float32, *lay) for lay in layouts] + [
        (torch.bfloat16, (6, 48), -1), (torch.bfloat16, (3, 40, 5), -2), (torch.float16, (4, 20), 0),
    ]:  # fmt: skip
        x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 8, shape, generator=g).float())
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (len(specials),), generator=g)
        flat[idx] = specials
        if dtype == torch.bfloat16:  # the interpreter's bf16 -> fp32 load mangles subnormals (GPUs do not)
            x = torch.where(x.abs() < 2.0**-126, 0.0, x)
        x = x.to(dtype)
        for fmt, kw in cases:
            d: dict = dict(axis=axis, block_size=None, scale="floor", rounding="even", saturate=True,
                           preset=None)  # fmt: skip
            d.update(kw)
            opts = resolve_options(fmt, **d)
            what = f"{fmt} {kw} {dtype} {shape} axis={axis}"
            same(kernels._run(x, opts, False, None), fake_quant(x, fmt, axis=axis, **kw), what)
            got, want = kernels._run(x, opts, True, None), encode(x, fmt, axis=axis, **kw)
            assert isinstance(got, type(want))
            same(got.codes, want.codes, what + " codes")  # type: ignore[union-attr]
            if want.scales is not None:  # type: ignore[union-attr]
                same(got.scales, want.scales, what + " scales")  # type: ignore[union-attr,arg-type]
            if fmt == "nvfp4":
                ts_got, ts_want = got.tensor_scale, want.tensor_scale  # type: ignore[union-attr]
                same(ts_got, ts_want, what + " tensor scale")
                amax = x.abs().amax().float() * 0.4
                same(
                    kernels._run(x, opts, False, amax),
                    fake_quant(x, fmt, axis=axis, amax=amax, **kw),
                    what,
                )
            n += 1
    tiles = [
        ("nvfp4", {}),
        ("nvfp4", dict(rounding="stochastic", seed=2)),
        ("mxfp8_e4m3", {}),
        ("mxfp4_e2m1", dict(rounding="away", scale="rceil")),
        ("mxfp4_e2m1", dict(rounding="stochastic", seed=4)),
    ]
    for (fmt, kw), (shape, dtype) in itertools.product(
        tiles, [((40, 56), torch.float32), ((2, 20, 33), torch.bfloat16)]
    ):
        x = (torch.randn(shape, generator=g) * 4).to(dtype)
        d = dict(axis=-1, block_size=None, scale="floor", rounding="even", saturate=True, preset=None)
        d.update(kw)
        opts = resolve_options(fmt, block_2d=True, **d)  # type: ignore[arg-type]
        want = fake_quant(x, fmt, block_2d=True, **kw)  # type: ignore[arg-type]
        same(kernels._run(x, opts, False, None), want, f"block_2d {fmt} {kw} {shape}")
        n += 1
    # fake_quant's prescale (the Tseng recipe's 3/4) in the MX stochastic kernels: q(p x) / p, rounded once
    for fmt, (shape, axis), dtype, p in itertools.product(
        ("mxfp4_e2m1", "mxfp8_e4m3"), [((6, 64), -1), ((3, 64, 5), -2)],
        (torch.bfloat16, torch.float16, torch.float32), (0.75, 0.6),
    ):  # fmt: skip
        x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-6, 6, shape, generator=g).float())
        x.view(-1)[:4] = torch.tensor([0.0, -0.0, 448.0, 3e4])
        x = x.to(dtype)
        d = dict(axis=axis, block_size=None, scale="floor", rounding="stochastic", saturate=True, preset=None)
        opts = resolve_options(fmt, seed=8, **d)  # type: ignore[arg-type]
        want = fake_quant(x, fmt, axis=axis, rounding="stochastic", seed=8, prescale=p)
        same(kernels._run(x, opts, False, None, None, p), want, f"prescale {p} {fmt} {dtype} {shape} {axis}")
        n += 1
    opts = resolve_options(
        "nvfp4", axis=-1, block_size=None, scale="floor", rounding="even", saturate=True, preset=None
    )
    for special in (torch.zeros(3, 32), torch.full((2, 16), float("nan")), torch.full((2, 16), float("inf"))):
        same(kernels._run(special, opts, False, None), fake_quant(special, "nvfp4"), "special tensor")
    # an odd axis length: the packed tail's high nibble is 0 (mx.pack_e2m1) even where the block's lanes
    # are NaN: an Inf (fp16 overflows to it) or NaN in the last block, or a tiny amax (1/ts is Inf)
    for fmt, kw in (("nvfp4", {}), ("nvfp4", dict(rounding="stochastic", seed=3))):
        for (shape, axis), (dtype, special) in itertools.product(
            [((3, 35), -1), ((3, 35, 4), -2)],
            [(torch.float16, 7e4), (torch.float32, float("nan")), (torch.float32, None)],
        ):
            x = torch.randn(shape, generator=g)
            if special is None:
                x = x * 1e-38
            else:
                x.view(-1)[-1] = special
            x = x.to(dtype)
            d = dict(axis=axis, block_size=None, scale="floor", rounding="even", saturate=True, preset=None)
            d.update(kw)
            got = kernels._run(x, resolve_options(fmt, **d), True, None)  # type: ignore[arg-type]
            want = encode(x, fmt, axis=axis, **kw)  # type: ignore[arg-type]
            what = f"odd tail {fmt} {kw} {dtype} {shape} {special}"
            same(got.codes, want.codes, what + " codes")  # type: ignore[union-attr]
            same(got.scales, want.scales, what + " scales")  # type: ignore[union-attr,arg-type]
            n += 1
    return n


def _check_rht() -> int:
    """The one-pass Hadamard transform (formats._triton_rht) against the torch form (formats.hadamard._apply
    on the CPU): equal bits where R's entries are powers of two (blocks 16 and 64) and the block sums are
    exact in fp32, within the output's rounding and fp32's summation error otherwise; both tile
    orientations, transposed inputs, the inverse. The native bf16 dot, which the interpreter cannot run,
    is checked on CUDA in tests/test_formats_hadamard.py."""
    import torch

    from megaquant.formats import _triton_rht as kernels
    from megaquant.formats import hadamard

    g = torch.Generator().manual_seed(0)
    n = 0
    layouts = [((128, 96), -1, False), ((64, 96), -2, False), ((96, 64), -1, True), ((96, 128), 0, True),
               ((4, 3, 64), -1, False), ((64,), 0, False), ((64, 1), -2, False)]  # fmt: skip
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for block in (16, 32, 64):
            for shape, axis, transposed in layouts:
                if shape[axis] % block:
                    continue
                base = torch.randn(shape[::-1] if transposed else shape, generator=g) * 4
                x = (base.t() if transposed else base).to(dtype)
                for seed, inverse in ((7, False), (7, True), (None, False)):
                    m = hadamard.hadamard_matrix(block, seed)
                    m = m.T if inverse else m
                    # the interpreter runs no bf16 dot: bf16 takes the IEEE one here (the GPU test does both)
                    native = False if dtype == torch.bfloat16 else None
                    got = kernels.transform(x, m, axis, block, native=native)
                    want = hadamard._apply(x, m, axis, block)
                    what = f"{dtype} block={block} {shape} axis={axis} transposed={transposed} seed={seed}"
                    assert got is not None, what
                    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous(), what
                    diff = (got.float() - want.float()).abs()
                    if block != 32 and dtype != torch.float32:  # exact products, sums exact in fp32 here
                        assert torch.equal(got, want), f"{what}: {int((diff > 0).sum())} differ"
                    else:  # fp32 input or R's entries rounded: sums in another order, a rounding apart
                        # the output's rounding (two ulps) + fp32 summation error over a block of x
                        big = torch.maximum(got.float().abs(), want.float().abs())
                        sums = 4 * block**0.5 * torch.finfo(torch.float32).eps * float(x.float().abs().max())
                        assert bool((diff <= 2 * torch.finfo(dtype).eps * big + sums).all()), (
                            f"{what}: max diff {float(diff.max())}"
                        )
                        same = float((diff == 0).float().mean())
                        assert dtype == torch.float32 or same > 0.99, f"{what}: {same:.4f} equal"
                    n += 1
    # the inverse undoes the transform (R orthogonal; fp32 input: to fp32 rounding)
    x = torch.randn(64, 128, generator=g)
    m = hadamard.hadamard_matrix(64, 3)
    back = kernels.transform(kernels.transform(x, m, -1, 64), m.T, -1, 64)  # type: ignore[arg-type]
    assert back is not None and torch.allclose(back, x, atol=1e-5)
    # an inner axis of a 3-D tensor has no 2-D view: the caller takes the torch form
    y = torch.randn(2, 64, 48, generator=g)
    assert kernels.transform(y, hadamard.hadamard_matrix(16, 1), -2, 16) is None
    assert kernels.serves(y, 16) and not kernels.serves(y, 8) and not kernels.serves(y, 256)
    assert not kernels.serves(y.to(torch.int32), 16) and not kernels.serves(y[:0], 16)
    return n + 2


def test_kernels_equal_reference_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cases ok" in proc.stdout


def test_kernels_compile_for_sm90() -> None:
    """The interpreter runs kernels that the compiler refuses (a plain-int global, as Triton 3.6 reported on
    the H200): compile a few variants of every kernel for sm_90 with the installed Triton, without a GPU."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_aot_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke"], env=env, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "launches compiled" in proc.stdout


if __name__ == "__main__":
    print(f"{_check_all() + _check_rht()} cases ok")


def test_the_prescale_multiply_rounds_as_the_division_for_every_mxfp4_value() -> None:
    """The kernels take the Tseng recipe's p = 3/4 back out of an MXFP4 value by multiplying by fl(4/3)
    (formats._triton_nvfp4._unscale): for every value an E2M1 element times an E8M0 scale can take, both
    signs, the bf16 and fp16 results equal the IEEE division's (and the fp32 ones where q / p is normal);
    for other formats, factors and an fp32 result the kernels keep the division."""
    import torch

    from megaquant.formats import _triton_nvfp4 as kernels
    from megaquant.formats.registry import element_format

    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    scales = torch.exp2(torch.arange(-127, 128, dtype=torch.float64)).float()  # 2^127 is finite in fp32
    q = (e2m1[:, None] * scales[None, :]).flatten()
    q = torch.cat([q, -q])
    div = q / 0.75
    mul = q * torch.tensor(1 / 0.75, dtype=torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(div.to(dtype).view(torch.int16), mul.to(dtype).view(torch.int16)), dtype
    normal = div.abs() >= torch.finfo(torch.float32).tiny
    assert torch.equal(div[normal].view(torch.int32), mul[normal].view(torch.int32))
    assert bool(torch.isinf(div).any()) and torch.equal(torch.isinf(div), torch.isinf(mul))
    assert not torch.equal(div.view(torch.int32), mul.view(torch.int32))  # subnormals: why fp32 divides

    mx4, mx8, nv = element_format("mxfp4_e2m1"), element_format("mxfp8_e4m3"), element_format("nvfp4")
    assert kernels._unscale(mx4, torch.bfloat16, 0.75) == kernels._unscale(mx4, torch.float16, 0.75) == 2
    assert kernels._unscale(mx4, torch.float32, 0.75) == 1
    assert kernels._unscale(mx4, torch.bfloat16, 0.6) == kernels._unscale(mx8, torch.bfloat16, 0.75) == 1
    assert kernels._unscale(nv, torch.bfloat16, 0.75) == 1
    assert kernels._unscale(mx4, torch.bfloat16, 1.0) == 0
