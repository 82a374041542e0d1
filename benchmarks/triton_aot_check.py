"""Compile every Triton kernel of megaquant.formats (_triton, _triton_nvfp4, _triton_rht) ahead of time for
a CUDA target, on a machine without a GPU: each launch the library would make for the GPU tests' and the
benchmarks' cases (formats, options, dtypes, layouts, block_2d tiles) goes through Triton's own JIT
binder (so arguments are specialized as on the GPU: constexprs, ints equal to 1, divisibility by 16),
then through Triton's full pipeline (TTIR, TTGIR, LLVM IR, PTX, cubin via the bundled ptxas), without a
launch. A kernel that the installed Triton cannot compile fails here with the compiler's full message.

Catches what the CPU interpreter cannot: Triton front-end and lowering errors of a Triton version other
than the interpreter's (the GPU machine has triton 3.6). Install that Triton into a private folder and
put it first on the path, e.g.

    python -m pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36:. python benchmarks/triton_aot_check.py --arch 90

Tensors are on the meta device (no memory, no data); nothing is checked numerically. Exit status 1 when a
kernel fails to compile, 3 when this Triton has no CUDA backend or a JIT interface other than 3.6-3.9's.
`--smoke` (a few variants of every kernel, ~20 s) runs in CI: tests/test_triton_interpret.py.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import test_triton_nvfp4 as gpu_tests  # noqa: E402  (the GPU tests' cases; it imports without a GPU)

# the GPU tests' cases, round-to-nearest MX and HiF8 (formats._triton), the benchmarks' shapes, and a few
# edge shapes (a length-1 axis, one block)
FMT_CASES: list[tuple[str, dict[str, object]]] = [
    *gpu_tests.CASES,
    ("mxfp8_e4m3", {}),
    ("mxfp8_e5m2", dict(scale="rceil", saturate=False)),
    ("mxfp4_e2m1", dict(rounding="away")),
    ("mxfp8_e4m3", dict(preset="fork")),
    ("hifp8", {}),
    ("hifp8", dict(saturate=False, preset="fork")),
    ("hifp8", dict(tensor_scale=True)),  # the amax pass (partial maxima) + the scaled quantize pass
    ("hifp8", dict(tensor_scale=True, saturate=False, preset="fork")),
]
TILE_CASES: list[tuple[str, dict[str, object]]] = gpu_tests.TILES
LAYOUTS: list[tuple[tuple[int, ...], int]] = [
    *gpu_tests.LAYOUTS, ((64, 96), -1), ((1024, 4096), -1), ((1024, 4096), -2), ((16384, 8192), -1),
    ((8192, 2048), -1), ((1, 2048, 8192), -2), ((32, 2048, 64), -1), ((32, 2048, 64), -2), ((16, 1), -1),
    ((1, 16), -1),
]  # fmt: skip
TILE_SHAPES = [*gpu_tests.TILE_SHAPES, (8192, 2048)]
RHT_LAYOUTS: list[tuple[tuple[int, int], int, bool]] = [
    ((16384, 4096), -1, False), ((16384, 4096), -2, False), ((4096, 16384), -1, True), ((64, 1), -2, False),
]  # fmt: skip
"""(shape, axis, whether a transposed view): dgrad's dy and W, wgrad's dy.t() and x, a one-column matrix."""
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
UNSUPPORTED = 3
"""Exit status when this Triton cannot be driven this way (no CUDA backend, another JIT interface)."""


class _CompileOnlyDriver:
    """The little of a Triton driver that JITFunction.run asks for before it compiles."""

    def __init__(self, target: object) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> object:
        return self.target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90 = H100/H200)")
    parser.add_argument("--quick", action="store_true", help="the GPU tests' layouts only")
    parser.add_argument(
        "--smoke", action="store_true", help="a few variants of each kernel (seconds; tests/ runs it)"
    )
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("error: unset TRITON_INTERPRET (this compiles for the GPU)")
    import inspect

    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    run_params = set(inspect.signature(JITFunction.run).parameters)
    if "nvidia" not in backends or not {"grid", "warmup"} <= run_params:
        print(f"triton {triton.__version__}: no CUDA backend or another JIT interface; nothing checked")
        raise SystemExit(UNSUPPORTED)

    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", args.arch, 32)))  # type: ignore[arg-type]
    compiled: dict[str, int] = {}
    failures: dict[str, str] = {}
    run = JITFunction.run

    def compile_only(self: JITFunction, *a: object, grid: object, warmup: bool, **kw: object) -> object:
        name = self.fn.__name__
        try:
            kernel = run(self, *a, grid=grid, warmup=True, **kw)
            kernel = kernel.result() if hasattr(kernel, "result") else kernel
            assert kernel is not None and "cubin" in kernel.asm
            compiled[name] = compiled.get(name, 0) + 1
        except Exception as exc:  # noqa: BLE001  (report every failing kernel, then exit 1)
            consts = {k: v for k, v in kw.items() if k.isupper()}
            failures.setdefault(f"{name} {consts}", "".join(traceback.format_exception(exc)))
        return None

    JITFunction.run = compile_only  # type: ignore[method-assign]
    from megaquant.formats import _triton as mx_kernels
    from megaquant.formats import _triton_nvfp4 as nv_kernels
    from megaquant.formats import _triton_rht as rht_kernels
    from megaquant.formats.registry import resolve_options

    layouts = LAYOUTS[:6] if args.quick else LAYOUTS
    fmt_cases, tile_cases, tile_shapes, dtypes = FMT_CASES, TILE_CASES, TILE_SHAPES, DTYPES
    if args.smoke:  # every kernel, NVFP4 and MX, nearest and stochastic, last axis and inner, fp16 and bf16
        fmt_cases = [FMT_CASES[i] for i in (0, 1, 4, 10, 13, 18, len(FMT_CASES) - 2)]
        layouts, dtypes = [LAYOUTS[0], LAYOUTS[2]], (torch.bfloat16, torch.float16)
        tile_cases, tile_shapes = [TILE_CASES[1], TILE_CASES[3]], TILE_SHAPES[:1]
    t0 = time.perf_counter()
    calls = 0
    for (fmt, kw), (shape, axis), dtype, enc in itertools.product(fmt_cases, layouts, dtypes, (False, True)):
        x = torch.empty(shape, dtype=dtype, device="meta")
        d: dict[str, object] = dict(axis=axis, block_size=None, scale="floor", rounding="even",
                                    saturate=True, preset=None)  # fmt: skip
        d.update(kw)
        opts = resolve_options(fmt, **d)  # type: ignore[arg-type]
        calls += 1
        if opts.rounding == "stochastic" or opts.fmt.block_scale == "e4m3":
            nv_kernels._run(x, opts, enc, None)
            if opts.fmt.block_scale == "e4m3":
                nv_kernels._run(x, opts, enc, torch.empty((), device="meta"))
        elif opts.fmt.block_scaled:
            mx_kernels._mx(x, opts, enc)
        elif opts.tensor_scale:
            mx_kernels._hif8_scaled(x, opts, enc)
        else:
            mx_kernels._hif8(x, opts, enc)
    for (fmt, kw), shape, dtype, axis in itertools.product(tile_cases, tile_shapes, dtypes, (-1, -2)):
        d = dict(axis=axis, block_size=None, scale="floor", rounding="even", saturate=True, preset=None,
                 block_2d=True)  # fmt: skip
        d.update(kw)
        calls += 1
        opts = resolve_options(fmt, **d)  # type: ignore[arg-type]
        nv_kernels._run(torch.empty(shape, dtype=dtype, device="meta"), opts, False, None)
    for fmt, (shape, axis), dtype in itertools.product(
        ("mxfp4_e2m1", "mxfp8_e4m3"), layouts[:2] if args.smoke else layouts, dtypes
    ):  # the Tseng recipe's pre-scaled stochastic rounding (fake_quant's prescale)
        d = dict(axis=axis, block_size=None, scale="floor", rounding="stochastic", saturate=True, preset=None)
        calls += 1
        opts = resolve_options(fmt, seed=1, **d)  # type: ignore[arg-type]
        nv_kernels._run(torch.empty(shape, dtype=dtype, device="meta"), opts, False, None, None, 0.75)
    rht_blocks, rht_dtypes, rht_layouts = (16, 32, 64), DTYPES, RHT_LAYOUTS
    if args.smoke:  # native (bf16) and IEEE (fp32) dots, both tile orientations
        rht_blocks, rht_dtypes, rht_layouts = (16, 64), (torch.bfloat16, torch.float32), RHT_LAYOUTS[:3]
    for block, dtype, (shape, axis, transposed) in itertools.product(rht_blocks, rht_dtypes, rht_layouts):
        x = torch.empty(shape[::-1] if transposed else shape, dtype=dtype, device="meta")
        calls += 1  # the recipes' Hadamard transform (formats._triton_rht), both tile orientations
        m = torch.empty((block, block), device="meta")
        rht_kernels.transform(x.t() if transposed else x, m, axis, block)
    for block, mixed in ((16, False), (64, True)):  # the signed matrix, with and without a device word
        calls += 1
        word = torch.empty((), dtype=torch.int64, device="meta") if mixed else None
        rht_kernels.rht_matrix(block, 3, word, torch.device("meta"), 0.25)
    print(
        f"triton {triton.__version__} ({triton.__file__}), target sm_{args.arch}: {calls} library calls, "
        f"{sum(compiled.values())} launches compiled in {time.perf_counter() - t0:.0f}s: {compiled}"
    )
    for what, text in failures.items():
        print(f"\nFAILED {what}\n{text}")
    if failures:
        print(f"{len(failures)} kernel variants failed to compile")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
