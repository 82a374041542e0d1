"""Every case of tests/test_triton_nvfp4.py (the GPU tests), run through the Triton CPU interpreter on the
CPU: the kernels (megaquant.formats._triton_nvfp4._run) against the torch reference, bit for bit, on the
tests' own inputs. A check to run before spending GPU time; about 8 minutes on 2 cores (`--large`: the
large-tensor test only, instead of the others).

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/triton_interpret_gpu_cases.py [--large]

Known interpreter limitation: it loads bf16 subnormals wrongly (GPUs do not), so bf16 inputs have their
subnormals replaced by zeros here (the GPU tests keep them). Exit status 1 on any difference.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("error: set TRITON_INTERPRET=1 (this runs the kernels on the CPU)")
    import test_triton_nvfp4 as gpu_tests

    from megaquant.formats import _triton_nvfp4 as kernels
    from megaquant.formats import encode, fake_quant

    failures: list[str] = []
    checks = 0

    def options(x: torch.Tensor, fmt: str, kw: dict[str, object]) -> object:
        """kernels._options without its CUDA test (the interpreter runs CPU tensors)."""
        key = [kw.get(k, d) for k, d in (("axis", -1), ("block_size", None), ("scale", "floor"),
                                         ("rounding", "even"), ("saturate", True), ("preset", None),
                                         ("seed", None), ("block_2d", False))]  # fmt: skip
        resolved = kernels._resolve(fmt, *key)
        assert resolved is not None, (fmt, kw)
        return resolved

    def same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        try:
            gpu_tests._assert_bit_equal(got, want)
        except AssertionError as exc:
            failures.append(f"{what}: {str(exc).splitlines()[0]}")

    def check(x: torch.Tensor, fmt: str, **kw: object) -> None:
        nonlocal checks
        if x.dtype == torch.bfloat16:
            x = torch.where(x.float().abs() < 2.0**-126, 0.0, x.float()).to(torch.bfloat16)
        opts = options(x, fmt, kw)
        amax = kw.pop("amax", None)
        what = f"{fmt} {kw} amax={amax is not None} {x.dtype} {tuple(x.shape)}"
        ref_kw = dict(kw, amax=amax) if amax is not None else kw
        same(kernels._run(x, opts, False, amax), fake_quant(x, fmt, **ref_kw), what)  # type: ignore[arg-type]
        if not kw.get("block_2d"):
            got = kernels._run(x, opts, True, amax)
            ref = encode(x, fmt, **ref_kw)  # type: ignore[arg-type]
            same(got.codes, ref.codes, what + " codes")  # type: ignore[union-attr]
            if ref.scales is not None:
                same(got.scales, ref.scales, what + " scales")  # type: ignore[union-attr,arg-type]
            if ref.tensor_scale is not None:
                same(got.tensor_scale, ref.tensor_scale, what + " tensor scale")  # type: ignore[union-attr,arg-type]
        checks += 1

    t0 = time.perf_counter()
    dtypes = gpu_tests.DTYPES
    large = "--large" in sys.argv
    for (fmt, kw), dtype in itertools.product([] if large else gpu_tests.CASES, sorted(dtypes)):
        for shape, axis in gpu_tests.LAYOUTS:
            x = gpu_tests._inputs(shape, dtypes[dtype], seed=zlib.crc32(f"{fmt}{kw}{shape}{dtype}".encode()))
            check(x, fmt, axis=axis, **kw)
    print(f"test_kernels_equal_reference: {checks} calls, {time.perf_counter() - t0:.0f}s", flush=True)
    for dtype in [] if large else sorted(dtypes):
        x = gpu_tests._inputs((64, 96), dtypes[dtype], seed=2, specials=False)
        amax = x.float().abs().amax()
        for factor in (1.0, 0.25, 8.0):
            check(x, "nvfp4", amax=amax * factor)
            check(x, "nvfp4", amax=float(amax * factor), rounding="stochastic", seed=9)
    for x in [] if large else [torch.zeros(4, 32), torch.full((2, 16), float("nan"))]:
        check(x, "nvfp4")
    if not large:
        check(torch.full((2, 16), float("inf")), "nvfp4")
        x = torch.randn(8, 64)
        x[3, 5] = float("inf")
        check(x, "nvfp4")
        check(x, "mxfp8_e4m3", rounding="stochastic", seed=1)
    print(f"+ given amax, special tensors: {checks} calls, {time.perf_counter() - t0:.0f}s", flush=True)
    for dtype in [] if large else sorted(dtypes):
        for (fmt, kw), shape in itertools.product(gpu_tests.TILES, gpu_tests.TILE_SHAPES):
            x = gpu_tests._inputs(shape, dtypes[dtype], seed=zlib.crc32(f"{fmt}{kw}{shape}".encode()))
            check(x, fmt, block_2d=True, **kw)
            check(x, fmt, block_2d=True, axis=-2, **kw)
    print(f"+ block_2d tiles: {checks} calls, {time.perf_counter() - t0:.0f}s", flush=True)
    if large:
        for fmt in ("nvfp4", "mxfp4_e2m1"):
            x = gpu_tests._inputs((1024, 4096), torch.bfloat16, seed=1)
            for axis, kw in itertools.product((-1, -2), ({}, dict(rounding="stochastic", seed=2))):
                if fmt != "nvfp4" and not kw:
                    continue
                check(x, fmt, axis=axis, **kw)
        print(f"+ large tensors: {checks} calls, {time.perf_counter() - t0:.0f}s", flush=True)
    for line in failures:
        print("DIFFERS", line)
    print(f"{checks} calls, {len(failures)} differences, {time.perf_counter() - t0:.0f}s")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
