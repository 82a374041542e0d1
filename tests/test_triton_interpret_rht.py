"""The one-pass Hadamard transform kernel (formats._triton_rht) under the Triton CPU interpreter
(TRITON_INTERPRET=1) against the torch form (formats.hadamard._apply on the CPU): equal bits where R's
entries are powers of two (blocks 16 and 64) and the block sums are exact in fp32, within the output's
rounding and fp32's summation error otherwise; both tile orientations, transposed inputs, the inverse.
Runs in CI (no GPU); the native bf16 dot, which the interpreter cannot run, is checked on CUDA in
tests/test_formats_hadamard.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")


def _check_all() -> int:
    """The comparisons (run in a child process with TRITON_INTERPRET=1 set before triton is imported)."""
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


def test_rht_kernel_equals_torch_form_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cases ok" in proc.stdout


if __name__ == "__main__":
    print(f"{_check_all()} cases ok")
